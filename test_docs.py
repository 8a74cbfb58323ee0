"""The scripts in docs/: they run, and what they compute is what they say."""
import importlib.util
import json
import os
import subprocess
import sys
import types
from contextlib import nullcontext
from unittest import mock

import numpy as np
import pytest
import torch

import train
from test_ddl import tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "docs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memorization_probe_ablations_run_and_unit_k_is_the_normalised_update():
    mem = load_script("memorize")
    branch = tiny_model(residual="additive").blocks[1].mlp
    with torch.no_grad():
        branch.norm_gain.copy_(torch.rand(16) + 0.5)
    X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9))
    c = X / torch.sqrt((X * X).mean(-1, keepdim=True) + 1e-5) * branch.norm_gain
    out = branch.sublayer(c)
    want = X + out / torch.sqrt((out * out).sum(-1, keepdim=True) + 1e-10)
    assert torch.allclose(mem.additive_with_unit_k(branch, X), want, atol=1e-5)
    cfg, mcfg = train.parse_args(["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16",
                                  "--block_size=8",
                                  "--vocab_size=97", "--device=cpu"])
    x, y = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    for name in ("additive-unit-k", "delta-frozen-beta", "delta-linear-v"):
        losses = mem.probe(cfg, mcfg, name, 1e-2, 4, torch.device("cpu"), nullcontext(), x, y)
        assert len(losses) == 4 and losses[-1] < losses[0]


def test_memorize_refuses_a_bad_preset_variant_or_lr_in_one_line(monkeypatch):
    mem = load_script("memorize")
    for arg, message in (("--preset=foo", "--preset='foo': allowed: 124m, 353m, smoke"),
                         ("--variants=cc,ddl", "--variants: unknown 'ddl'; allowed: additive, "),
                         ("--lrs=1e-3,fast", "could not convert string to float: 'fast'")):
        monkeypatch.setattr(sys, "argv", ["memorize.py", arg])
        with pytest.raises(SystemExit) as e:
            mem.main()
        assert e.value.code.startswith(f"docs/memorize.py: error: {message}") and "\n" not in e.value.code


NO_MATPLOTLIB = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
                 # importing matplotlib raises ImportError
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_plot_help_runs_without_matplotlib_and_drawing_says_how_to_install_it(tmp_path):
    plot = os.path.join(HERE, "docs", "plot.py")
    r = subprocess.run([sys.executable, "-c", NO_MATPLOTLIB, plot, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--out OUT" in r.stdout and "default: plots" in r.stdout
    r = subprocess.run([sys.executable, "-c", NO_MATPLOTLIB, plot, str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 1
    assert r.stderr == "docs/plot.py: error: drawing needs matplotlib: pip install matplotlib\n"


def write_run(folder, val_steps, loss_at, total_batch=4, block_size=8):
    """A log.jsonl of train.py's form: config, a train record every step (1 s each), val at val_steps."""
    os.makedirs(folder)
    records = [dict(type="config", config=dict(total_batch=total_batch),
                    model_config=dict(block_size=block_size))]
    for step in range(1, max(val_steps) + 1):
        records.append(dict(type="train", step=step, train_time_s=float(step)))
        if step in val_steps:
            records.append(dict(type="val", step=step, loss=loss_at(step)))
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def fake_matplotlib():
    """matplotlib with a pyplot whose figures and axes record their calls (no drawing)."""
    plt, fig, axes = mock.MagicMock(), mock.MagicMock(), [mock.MagicMock(), mock.MagicMock()]
    for ax in axes:
        ax.plot.return_value = [mock.MagicMock()]
    plt.subplots.return_value = (fig, axes)
    return types.SimpleNamespace(use=lambda backend: None, pyplot=plt), fig, axes


def test_plot_aligns_seeds_with_other_eval_schedules_scales_y_to_the_data_and_writes_plots(tmp_path,
                                                                                           monkeypatch):
    """Seed 1 evaluates every 10 steps, seed 2 every 20: the curve is their mean at steps 20 and 40, with
    the min..max band; the y-axis spans the drawn losses (below 4.9 too) plus 5%; the figures go to
    plots/ in the working directory, not over the committed docs/*.png."""
    write_run(tmp_path / "runs" / "cc-1", [10, 20, 30, 40], lambda s: 4.0 - s / 100)
    write_run(tmp_path / "runs" / "cc-2", [20, 40], lambda s: 3.0 - s / 100)
    mpl, fig, axes = fake_matplotlib()
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", mpl.pyplot)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["plot.py", "runs"])
    load_script("plot").main()
    (x_tokens, mean), _ = axes[0].plot.call_args
    assert np.allclose(x_tokens, [20 * 32 / 1e6, 40 * 32 / 1e6]) and np.allclose(mean, [3.3, 3.1])
    (x_seconds, _), _ = axes[1].plot.call_args
    assert np.allclose(x_seconds, [20.0, 40.0])
    (_, low, high), _ = axes[0].fill_between.call_args
    assert np.allclose(low, [2.8, 2.6]) and np.allclose(high, [3.8, 3.6])
    [ylim] = [c.kwargs["ylim"] for c in axes[0].set.call_args_list if "ylim" in c.kwargs]
    assert np.allclose(ylim, (2.6 - 0.06, 3.8 + 0.06))
    fig.savefig.assert_called_once_with(os.path.join("plots", "val_loss.png"), dpi=120)
    assert os.path.isdir(tmp_path / "plots")


def test_plot_draws_seeds_that_share_no_eval_step_each_on_its_own(tmp_path, monkeypatch):
    write_run(tmp_path / "runs" / "delta-1", [10, 30], lambda s: 5.0)
    write_run(tmp_path / "runs" / "delta-2", [20], lambda s: 6.0)
    plot = load_script("plot")
    plot.plt = fake_matplotlib()[0].pyplot
    _, fig, axes = plot.plt, *plot.plt.subplots.return_value
    plot.plot_val_loss(plot.load_runs(str(tmp_path / "runs")), str(tmp_path / "v.png"))
    assert [list(c.args[0]) for c in axes[1].plot.call_args_list] == [[10.0, 30.0], [20.0]]
    assert [c.kwargs["label"] for c in axes[0].plot.call_args_list] == ["DDL d_v=1", None]


def test_memorize_unit_k_probe_reads_the_models_own_input_norm(monkeypatch):
    """The probe's c is the branch's input_norm (a LayerNorm here, as a reader's change would make it): the
    probe follows, X + unit_direction(F(input_norm(X)))."""
    import ddl
    memorize = load_script("memorize")
    layer_norm = lambda self, x: torch.nn.functional.layer_norm(x, (x.shape[-1],), self.norm_gain)
    monkeypatch.setattr(ddl.ResidualBranch, "input_norm", layer_norm)
    branch = tiny_model(residual="additive").blocks[0].mlp
    X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2)) * 3 + 1
    c = torch.nn.functional.layer_norm(X, (16,), branch.norm_gain)
    want = X + ddl.unit_direction(branch.sublayer(c), branch.cfg.k_eps)
    assert torch.allclose(memorize.additive_with_unit_k(branch, X), want, atol=1e-6)
