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


@pytest.mark.parametrize("flag, drawn", [
    ("--ladder", [("plot_passes", "ladder_passes.png"), ("plot_ladder", "ladder.png")]),
    ("--ablations", [("plot_ablations", "ablations.png"), ("plot_k_stability", "k_stability.png")])])
def test_plot_main_draws_each_figure_of_a_flag_from_its_folder_into_out(tmp_path, monkeypatch, flag, drawn):
    mpl, _, _ = fake_matplotlib()
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", mpl.pyplot)
    plot, calls = load_script("plot"), []
    for fn, _ in drawn:
        monkeypatch.setattr(plot, fn, lambda logs, out, fn=fn: calls.append((fn, logs, out)))
    monkeypatch.setattr(sys, "argv", ["plot.py", flag, "records", "--out", str(tmp_path / "figs")])
    plot.main()
    assert calls == [(fn, "records", str(tmp_path / "figs" / png)) for fn, png in drawn]
    assert os.path.isdir(tmp_path / "figs")


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


# ----------------------------------------------------------------------------- docs/ladder.py

def ladder_log(points, acc_norm, card="H100", sha="0123abcd" * 8):
    """A finished run's records on `card`, from sources of sha256 `sha`: points is [(step, train clock s,
    val loss)], step 0 first; each train record's loss is 0.5 below the val loss at its step."""
    return ([dict(type="config", device=card, source_sha256=sha)]
            + [dict(type="train", step=s, train_time_s=t, loss=v - 0.5) for s, t, v in points[1:]]
            + [dict(type="val", step=s, loss=v) for s, _, v in points]
            + [dict(type="hellaswag", step=points[-1][0], acc_norm=acc_norm)])


def write_logs(folder, logs):
    folder.mkdir(exist_ok=True)
    for run, log in logs.items():
        (folder / f"{run}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def test_ladder_plan_sweeps_three_lrs_then_two_seeds_at_the_best_and_every_command_parses(tmp_path):
    ladder = load_script("ladder")
    paths = types.SimpleNamespace(standin="s.jsonl", data_dir="data/ladder", runs="runs")
    todo = ladder.plan({})
    assert len(todo) == 3 * 21 and {r[4] for r in todo} == {1337}  # 21 cells: sizes x variants x passes
    for r in todo:
        cfg, mcfg = train.parse_args(ladder.ladder_args(r, paths))
        assert cfg.total_batch == 64 and cfg.max_steps == 264 * r[2]  # 264 whole batches a pass
        assert cfg.batch_size == (16 if r[0] == "d768" else 64)  # d768: MICRO_BATCH, 4 accumulated
        assert cfg.hellaswag == "" and cfg.min_lr == pytest.approx(cfg.lr / 10)  # scored at the end instead
    # the smallest size at 4 passes: >= 20 tokens per non-embedding parameter, counted by hand
    d, L, hd = 256, 4, 128
    n = L * (4 * d * d + 3 * d * (8 * d // 3) + 2 * d + 2 * hd) + d
    assert ladder.non_embedding_params("d256", "additive") == n and 4 * 264 * 64 * 1024 / n > 20
    assert ladder.non_embedding_params("d768", "additive") / n > 20  # the ladder spans > 20x
    logs = {ladder.name("d256", "additive", 1, lr, 1337): ladder_log([(0, 0, 11), (264, 9, loss)], 0.3)
            for lr, loss in ((1.5e-3, 5.0), (3e-3, 4.8), (6e-3, 4.9))}
    todo = ladder.plan(logs)
    assert [r for r in todo if r[:3] == ("d256", "additive", 1)] == [("d256", "additive", 1, 3e-3, s)
                                                                     for s in (1338, 1339)]
    assert len(todo) == 3 * 20 + 2


def test_ladder_sweep_adds_an_lr_past_the_end_that_holds_the_least_loss_until_it_is_inside():
    """d256's additive sweep is 1.5e-3, 3e-3, 6e-3 (the size's centre x 0.5, 1, 2); a best at 6e-3 asks for
    1.2e-2, a best at 1.5e-3 for 7.5e-4; at most two lrs are added; a diverged run's loss is infinite."""
    ladder = load_script("ladder")
    # a variant's centre is the size's times its factor: DDL d_v = 1 x 2, CC and write-only x 4
    assert [ladder.sweep({}, "d768", v, 1)[0] for v in ("additive", "delta", "cc")] == [
        [7.5e-4, 1.5e-3, 3e-3], [1.5e-3, 3e-3, 6e-3], [3e-3, 6e-3, 1.2e-2]]
    def logs_of(losses):  # {lr: final loss, or None: diverged}
        return {ladder.name("d256", "additive", 1, lr, 1337): ladder_log([(0, 0, 11), (264, 9, v or 0)], 0.3)
                + ([dict(type="diverged", step=200)] if v is None else []) for lr, v in losses.items()}
    sweep = lambda losses: ladder.sweep(logs_of(losses), "d256", "additive", 1)
    assert sweep({1.5e-3: 5.0, 3e-3: 4.9}) == ([1.5e-3, 3e-3, 6e-3], None)
    up = {1.5e-3: 5.0, 3e-3: 4.9, 6e-3: 4.8}
    assert sweep(up) == ([1.5e-3, 3e-3, 6e-3, 1.2e-2], None)
    assert sweep({**up, 1.2e-2: None})[1] == 6e-3  # diverged: inf
    assert sweep({**up, 1.2e-2: 4.7, 2.4e-2: 4.6})[1] == 2.4e-2  # the cap
    every = {lr: None for lr in (3.75e-4, 7.5e-4, 1.5e-3, 3e-3, 6e-3)}  # all diverged, down to the cap
    assert sweep(every) == (sorted(every), None)
    down = {1.5e-3: 4.8, 3e-3: 4.9, 6e-3: 5.0}
    assert sweep({**down, 7.5e-4: 4.85}) == ([7.5e-4, 1.5e-3, 3e-3, 6e-3], 1.5e-3)
    todo = ladder.plan(logs_of({**down, 7.5e-4: 4.85}))
    base = [r for r in todo if r[:3] == ("d256", "additive", 1)]
    assert base == [("d256", "additive", 1, 1.5e-3, s) for s in (1338, 1339)]


def test_ladder_late_train_loss_is_the_mean_over_the_last_tenth_of_steps():
    ladder = load_script("ladder")
    log = [dict(type="config")] + [dict(type="train", step=s, loss=10 - s / 100) for s in range(10, 1001, 10)]
    assert ladder.late_train_loss(log) == pytest.approx(np.mean([10 - s / 100 for s in range(910, 1001, 10)]))
    assert ladder.late_train_loss(log + [dict(type="diverged", step=1000)]) == float("inf")


def test_plot_passes_draws_each_variants_best_run_of_several_passes_train_smoothed_and_val(tmp_path):
    """d256 at 4 passes, additive and DDL d_v = 1, each sweep's middle lr best: the best run's val loss at
    its evals and its train loss as a mean over 5 records (50 steps), the ends of passes 1-3 marked; the
    one-pass runs and the other lrs are not drawn."""
    ladder, plot = load_script("ladder"), load_script("plot")
    steps = list(range(0, 1057, 132))
    logs = {}
    for variant in ("additive", "delta"):
        for lr, shift in zip(ladder.sweep({}, "d256", variant, 4)[0], (1.0, 0.0, 1.0)):
            logs[ladder.name("d256", variant, 4, lr, 1337)] = ladder_log(
                [(s, s / 100, 9 - s / 200 + shift) for s in steps], 0.3)
    for lr, loss in zip(ladder.sweep({}, "d256", "delta", 1)[0], (5.5, 5.0, 5.5)):  # one pass, swept
        logs[ladder.name("d256", "delta", 1, lr, 1337)] = ladder_log([(0, 0, 11), (264, 9, loss)], 0.3)
    write_logs(tmp_path / "logs", logs)
    ax, fig = mock.MagicMock(), mock.MagicMock()
    plot.plt = mock.MagicMock(**{"subplots.return_value": (fig, [[ax]])})
    plot.plot_passes(str(tmp_path / "logs"), str(tmp_path / "p.png"))
    lines = ax.plot.call_args_list
    assert [c.kwargs["label"] for c in lines] == ["additive: train", "additive: val (held out)",
                                                  "DDL d_v=1: train", "DDL d_v=1: val (held out)"]
    train = [9 - s / 200 - 0.5 for s in steps[1:]]  # ladder_log: train 0.5 below val
    assert np.allclose(lines[0].args[0], steps[5:])
    assert np.allclose(lines[0].args[1], [np.mean(train[i:i + 5]) for i in range(len(train) - 4)])
    assert list(lines[1].args[0]) == steps[1:]
    assert np.allclose(lines[1].args[1], [9 - s / 200 for s in steps[1:]])
    assert [c.args[0] for c in ax.axvline.call_args_list] == [264, 528, 792]
    fig.savefig.assert_called_once_with(str(tmp_path / "p.png"), dpi=120)
    for run in [r for r in logs if "-p4-" in r]:  # one pass only: no figure, no error
        (tmp_path / "logs" / f"{run}.jsonl").unlink()
    plot.plt = mock.MagicMock()
    plot.plot_passes(str(tmp_path / "logs"), str(tmp_path / "q.png"))
    plot.plt.subplots.assert_not_called()


def test_ladder_table_is_the_mean_over_seeds_at_the_best_lr_and_the_gaps_per_token_and_time(tmp_path):
    """Additive's best lr 3e-3 (seeds: 5.0, 5.1, 4.9; 10 s of training), DDL's 6e-3 (4.6, 4.7, 4.5),
    evaluated at steps 0, 132, 264 at 0, 8 and 16 s: at additive's 10 s, DDL's val loss lies a quarter of
    the way from its step-132 loss to its final one."""
    ladder = load_script("ladder")
    name = lambda v, lr, s: ladder.name("d256", v, 1, lr, s)
    logs = {name("additive", 1.5e-3, 1337): ladder_log([(0, 0, 11), (264, 10, 5.3)], 0.2),
            name("additive", 6e-3, 1337): ladder_log([(0, 0, 11), (264, 10, 5.2)], 0.2),
            name("delta", 1.5e-3, 1337): ladder_log([(0, 0, 11), (264, 16, 4.9)], 0.2),
            name("delta", 3e-3, 1337): ladder_log([(0, 0, 11), (264, 16, 4.8)], 0.2),
            name("delta", 1.2e-2, 1337): ladder_log([(0, 0, 11), (264, 16, 4.7)], 0.2)}
    for seed, base, ddl in ((1337, 5.0, 4.6), (1338, 5.1, 4.7), (1339, 4.9, 4.5)):
        logs[name("additive", 3e-3, seed)] = ladder_log([(0, 0, 11), (132, 5, 6.0), (264, 10, base)], 0.30)
        logs[name("delta", 6e-3, seed)] = ladder_log([(0, 0, 11), (132, 8, ddl + 1), (264, 16, ddl)], 0.34)
    logs[name("delta", 6e-3, 1338)][2]["loss"] += 0.3  # its last train record: train losses 4.1, 4.5, 4.0
    write_logs(tmp_path / "logs", logs)
    rows = ladder.table(ladder.load_logs(str(tmp_path / "logs")))
    assert [(r["variant"], r["lr"], r["seeds"]) for r in rows] == [("additive", 3e-3, 3), ("delta", 6e-3, 3)]
    base, ddl = rows
    assert base["loss"] == pytest.approx(5.0) and base["spread"] == pytest.approx(0.2)
    assert ddl["loss"] == pytest.approx(4.6) and ddl["gap"] == pytest.approx(-0.4)
    assert ddl["train_loss"] == pytest.approx(4.2)  # the last tenth of 264 steps holds step 264 alone
    pairs = ((5.0, 4.6), (5.1, 4.7), (4.9, 4.5))
    at_10s = [(d + 1) + (10 - 8) / (16 - 8) * (d - (d + 1)) - b for b, d in pairs]
    assert ddl["gap_equal_time"] == pytest.approx(np.mean(at_10s))  # 4.6 + 0.75 - 5.0 = +0.35
    assert ddl["standin_acc_norm"] == pytest.approx(0.34) and base["gap"] is None
    assert ddl["tokens_per_param"] == pytest.approx(264 * 64 * 1024 / ddl["params"])
    assert ddl["cards"] == "H100" and ddl["code"] == "0123abcd"
    # a seed timed on another card keeps its loss but leaves the equal-time gap: clocks of two cards differ
    moved = logs[name("delta", 6e-3, 1339)]
    moved[0]["device"], moved[0]["source_sha256"] = "H200", "fedc" * 16
    next(r for r in moved if r["type"] == "val" and r["step"] == 132)["loss"] += 1  # its gap at 10 s too
    moved.remove(next(r for r in moved if r["type"] == "hellaswag"))  # unscored: the others' mean stands
    write_logs(tmp_path / "logs", logs)
    ddl = ladder.table(ladder.load_logs(str(tmp_path / "logs")))[1]
    assert ddl["cards"] == "H100, H200" and ddl["code"] == "0123abcd, fedcfedc"
    assert ddl["loss"] == pytest.approx(4.6)
    assert ddl["standin_acc_norm"] == pytest.approx(0.34)
    assert ddl["gap_equal_time"] == pytest.approx(np.mean(at_10s[:2]))
    broke = logs[name("delta", 6e-3, 1338)]
    next(r for r in broke if r["type"] == "val" and r["step"] == 132)["loss"] += 2
    broke.append(dict(type="diverged", step=200))  # no clock to compare either
    write_logs(tmp_path / "logs", logs)
    ddl = ladder.table(ladder.load_logs(str(tmp_path / "logs")))[1]
    assert ddl["loss"] == float("inf") and ddl["gap_equal_time"] == pytest.approx(at_10s[0])


def test_ladder_first_pass_compares_one_pass_runs_with_four_pass_runs_at_step_264(tmp_path, capsys):
    """d256, seed 1337: each variant's one-pass run at its best one-pass lr (its sweep's middle; the other
    seeds there end elsewhere) against the four-pass run of that lr and seed at step 264 (not at its end, and
    not at the four-pass sweep's best lr, 2x higher for the baseline); CC, whose four-pass runs lack its
    one-pass best lr, gives no row; a four-pass run that diverged before step 264 counts inf."""
    ladder = load_script("ladder")
    logs = {}
    def put(variant, passes, lrs, at_264, ends, seed=1337):  # val: 11, at_264 + 1, at_264, then ends
        for lr, mid, end in zip(lrs, at_264, ends):
            val = lambda s: 11 if s == 0 else mid + 1 if s < 264 else mid if s == 264 else end
            logs[ladder.name("d256", variant, passes, lr, seed)] = ladder_log(
                [(s, s / 100, val(s)) for s in range(0, 264 * passes + 1, 132)], 0.3)
    put("additive", 1, (1.5e-3, 3e-3, 6e-3), (6.2, 6.0, 6.1), (6.2, 6.0, 6.1))
    put("additive", 1, (3e-3,), (6.5,), (6.5,), seed=1338)
    put("additive", 4, (1.5e-3, 3e-3, 6e-3, 1.2e-2), (5.7, 5.5, 5.4, 5.8), (4.9, 4.8, 4.7, 4.9))
    put("delta", 1, (3e-3, 6e-3, 1.2e-2), (5.7, 5.5, 5.6), (5.7, 5.5, 5.6))
    put("delta", 1, (6e-3,), (5.9,), (5.9,), seed=1339)
    put("delta", 4, (3e-3, 6e-3, 1.2e-2), (5.4, 5.2, 5.1), (4.6, 4.5, 4.7))
    put("cc", 1, (6e-3, 1.2e-2, 2.4e-2), (5.5, 5.3, 5.4), (5.5, 5.3, 5.4))
    put("cc", 4, (2.4e-2,), (5.0,), (4.4,))
    write_logs(tmp_path / "logs", logs)
    rows = ladder.first_pass(ladder.load_logs(str(tmp_path / "logs")))
    assert [(r["variant"], r["lr"]) for r in rows] == [("additive", 3e-3), ("delta", 6e-3)]
    base, ddl = rows
    assert (base["one_pass"], base["first_of_four"]) == (6.0, 5.5)
    assert (ddl["one_pass"], ddl["first_of_four"]) == (5.5, 5.2)
    assert ddl["gap_one"] == pytest.approx(-0.5) and ddl["gap_first"] == pytest.approx(-0.3)
    assert base["gap_one"] is None and base["gap_first"] is None
    ladder.main(["first-pass", f"--logs={tmp_path / 'logs'}"])
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| d256 | additive | 0.003 | 6.0000 | — | 5.5000 | — |",
        "| d256 | delta | 0.006 | 5.5000 | -0.5000 | 5.2000 | -0.3000 |"]
    broke = logs[ladder.name("d256", "delta", 4, 6e-3, 1337)]
    broke[:] = [r for r in broke if r["type"] != "val" or r["step"] < 264] + [dict(type="diverged", step=200)]
    write_logs(tmp_path / "logs", logs)
    assert ladder.first_pass(ladder.load_logs(str(tmp_path / "logs")))[1]["first_of_four"] == float("inf")


def test_ladder_sweeps_print_every_logged_lr_of_seed_1337_per_size_the_best_in_bold(tmp_path, capsys):
    """d256 additive: 1.5e-3, 3e-3 (best; seeds 5.0, 5.1, 4.9), 6e-3 diverged; DDL d_v = 1: 3e-3 of its sweep
    and 3.75e-4 from an earlier centre (its header with all three digits), its sweep unfinished (6e-3 not
    run); seeds other than 1337 and other sizes' runs are not columns; no size without runs is printed."""
    ladder = load_script("ladder")
    name = lambda v, lr, s=1337: ladder.name("d256", v, 1, lr, s)
    logs = {name("additive", 1.5e-3): ladder_log([(0, 0, 11), (264, 10, 5.3)], 0.2),
            name("additive", 6e-3): ladder_log([(0, 0, 11), (264, 10, 5.2)], 0.2) + [dict(type="diverged")],
            name("delta", 3.75e-4): ladder_log([(0, 0, 11), (264, 10, 4.9)], 0.2),
            name("delta", 3e-3): ladder_log([(0, 0, 11), (264, 10, 4.8)], 0.2),
            name("delta", 3e-3, 1338): ladder_log([(0, 0, 11), (264, 10, 4.1)], 0.2),
            ladder.name("d512", "cc", 1, 4.8e-2, 1338): ladder_log([(0, 0, 11), (264, 10, 4.1)], 0.2)}
    for seed, loss, acc in ((1337, 5.0, 0.3), (1338, 5.1, 0.32), (1339, 4.9, 0.37)):
        logs[name("additive", 3e-3, seed)] = ladder_log([(0, 0, 11), (264, 10, loss)], acc)
    write_logs(tmp_path / "logs", logs)
    ladder.main(["sweeps", f"--logs={tmp_path / 'logs'}"])
    assert capsys.readouterr().out == (
        "\nd256: final val loss, seed 1337, by peak lr (best in bold)\n\n"
        "| variant | passes | 3.75e-4 | 1.5e-3 | 3.0e-3 | 6.0e-3 | "
        "seeds at the best: mean, max − min | stand-in acc_norm |\n"
        "|---|---:|---:|---:|---:|---:|---|---:|\n"
        "| additive | 1 |  | 5.3000 | **5.0000** | diverged | 3: 5.0000, 0.200 | 0.330 |\n"
        "| delta | 1 | 4.9000 |  | 4.8000 |  | sweep unfinished | — |\n")


def test_ladder_table_means_the_last_standin_scores_counts_each_cells_passes_and_skips_what_is_missing(
        tmp_path):
    """d256 at one pass: additive (best 3e-3: 5.0, 5.1; seed 1339 not run) and DDL (best 6e-3: 4.6, 4.7,
    4.5, stand-in 0.30, 0.34, 0.38 at the end, seed 1337 also 0.99 at step 132, as the first runs scored each
    eval); additive's seed 1338 diverged at the end. Four passes: additive's sweep alone (best 3e-3)."""
    ladder = load_script("ladder")
    name = lambda v, lr, s, p=1: ladder.name("d256", v, p, lr, s)
    logs = {name("additive", lr, 1337): ladder_log([(0, 0, 11), (264, 10, loss)], 0.2)
            for lr, loss in ((1.5e-3, 5.3), (6e-3, 5.2))}
    logs.update({name("delta", lr, 1337): ladder_log([(0, 0, 11), (264, 16, loss)], 0.2)
                 for lr, loss in ((3e-3, 4.8), (1.2e-2, 4.7))})
    logs.update({name("additive", lr, 1337, 4): ladder_log([(0, 0, 11), (1056, 40, loss)], 0.4)
                 for lr, loss in ((1.5e-3, 4.6), (3e-3, 4.5), (6e-3, 4.7))})
    for seed, base, ddl, acc in ((1337, 5.0, 4.6, 0.30), (1338, 5.1, 4.7, 0.34), (1339, None, 4.5, 0.38)):
        if base is not None:
            logs[name("additive", 3e-3, seed)] = ladder_log([(0, 0, 11), (132, 5, 6.0), (264, 10, base)], 0.3)
        logs[name("delta", 6e-3, seed)] = ladder_log([(0, 0, 11), (132, 8, ddl + 1), (264, 16, ddl)], acc)
    logs[name("delta", 6e-3, 1337)].insert(3, dict(type="hellaswag", step=132, acc_norm=0.99))
    diverged_base = logs[name("additive", 3e-3, 1338)]
    diverged_base.remove(next(r for r in diverged_base if r["type"] == "hellaswag"))
    diverged_base.append(dict(type="diverged", step=264))
    write_logs(tmp_path / "logs", logs)
    rows = ladder.table(ladder.load_logs(str(tmp_path / "logs")))
    assert [(r["variant"], r["passes"], r["lr"], r["seeds"]) for r in rows] == [
        ("additive", 1, 3e-3, 2), ("additive", 4, 3e-3, 1), ("delta", 1, 6e-3, 3)]
    one, four, ddl = rows
    assert ddl["standin_acc_norm"] == pytest.approx(0.34)  # each seed's last score, then their mean
    assert four["tokens_per_param"] == pytest.approx(1056 * 64 * 1024 / four["params"])
    assert four["tokens_per_param"] == pytest.approx(4 * one["tokens_per_param"], rel=0.01)
    # only seed 1337 has a baseline with a clock (1338's diverged, 1339's is missing): 4.6 + 0.75 - 5.0
    assert ddl["gap_equal_time"] == pytest.approx(0.35)


def test_ladder_run_plans_again_after_each_run_so_that_seeds_follow_their_sweep_in_one_call(tmp_path,
                                                                                             monkeypatch):
    ladder = load_script("ladder")
    losses = {1.5e-3: 5.0, 3e-3: 4.8, 6e-3: 4.9}
    ran = []

    def run(jobs, paths):  # logs each job as it comes, as a finished run of its lr's loss
        for job, _ in jobs:
            ran.append(job)
            lr = float(job.split("-lr")[1].split("-s")[0])
            write_logs(tmp_path / "logs", {job: ladder_log([(0, 0, 11), (264, 9, losses[lr])], 0.3)})
    monkeypatch.setattr(ladder, "run", run)
    ladder.main(["run", f"--logs={tmp_path / 'logs'}", "--only=d256-additive-p1"])
    assert ran == [ladder.name("d256", "additive", 1, lr, s) for lr, s in
                   ((1.5e-3, 1337), (3e-3, 1337), (6e-3, 1337), (3e-3, 1338), (3e-3, 1339))]


def test_ladder_run_logs_each_finished_run_and_deletes_its_checkpoint(tmp_path, monkeypatch):
    ladder = load_script("ladder")
    paths = types.SimpleNamespace(standin=str(tmp_path / "missing.jsonl"), data_dir="d",
                                  runs=str(tmp_path / "r"), logs=str(tmp_path / "logs"))
    todo = ladder.plan({})[:2]
    jobs = [(ladder.name(*r), ladder.ladder_args(r, paths)) for r in todo]
    with pytest.raises(SystemExit, match="--standin=.*missing.jsonl: no such file; make it with docs"):
        ladder.run(jobs, paths)
    paths.standin = str(tmp_path / "s.jsonl")
    open(paths.standin, "w").close()

    val = dict(type="val", step=264, loss=5.0)
    # what each run's log ends with; as train.py, a run that fails before its first checkpoint (the
    # ladder's only one is at the end) leaves its log as log.failed.jsonl
    ends = iter([[val], [val, dict(type="diverged", step=270)]])
    scored, checked = [], []

    def train_py(cmd):  # what train.py leaves in its out_dir, and its exit status
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--out_dir="))
        os.makedirs(out, exist_ok=True)
        assert not {"log.jsonl", "log.failed.jsonl"} & set(os.listdir(out))  # an earlier try's are gone
        end = next(ends)
        done = end[-1]["type"] == "val"
        if done:
            open(os.path.join(out, "ckpt.pt"), "w").close()
        if end[-1]["type"] != "none":
            with open(os.path.join(out, "log.jsonl" if done else "log.failed.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in [dict(type="config", out=out), *end])
        return types.SimpleNamespace(returncode=0 if done else 1)

    def hellaswag_py(argv):  # the stand-in's score of the checkpoint in --out_dir
        out = argv[0].split("=", 1)[1]
        assert argv == [f"--out_dir={out}", f"--file={paths.standin}"]
        assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]
        scored.append(out)
        return dict(acc=0.25, acc_norm=0.3, n=2000)
    monkeypatch.setattr(ladder.subprocess, "run", train_py)
    monkeypatch.setattr(ladder.hellaswag, "main", hellaswag_py)
    monkeypatch.setattr(ladder.hellaswag, "load", checked.append)
    outs = [os.path.join(paths.runs, ladder.name(*r)) for r in todo]
    os.makedirs(outs[1])
    open(os.path.join(outs[1], "log.failed.jsonl"), "w").close()  # a cut try's: not this run's
    ladder.run(jobs, paths)  # the second diverged: train.py failed, and its log is a finished run's, unscored
    logs = ladder.load_logs(paths.logs)
    assert scored == outs[:1] and checked == [paths.standin]  # the stand-in read before the first run
    assert logs[ladder.name(*todo[0])] == [dict(type="config", out=outs[0]), val, dict(
        type="hellaswag", step=264, by="hellaswag.py", acc=0.25, acc_norm=0.3, n=2000)]
    diverged = [dict(type="config", out=outs[1]), val, dict(type="diverged", step=270)]
    assert logs[ladder.name(*todo[1])] == diverged
    assert ladder.standin_acc_norm(logs[ladder.name(*todo[1])]) is None
    assert [sorted(os.listdir(out)) for out in outs] == [["log.jsonl"], ["log.failed.jsonl"]]
    paths.runs = str(tmp_path / "r2")
    for end in ("train", "none"):  # a failure, not a divergence, with a log and without: the ladder stops
        ends = iter([[dict(type=end)]])
        with pytest.raises(RuntimeError, match="train.py failed .exit 1. without diverging"):
            ladder.run([(jobs[0][0], ladder.ladder_args(todo[0], paths))], paths)
    assert not os.path.exists(os.path.join(paths.logs, jobs[0][0] + ".jsonl.tmp"))
    assert ladder.plan(ladder.load_logs(paths.logs)) == ladder.plan({})[2:]


def test_ladder_figure_draws_each_gap_against_tokens_per_parameter_with_the_larger_spread(tmp_path):
    ladder, plot = load_script("ladder"), load_script("plot")
    name = lambda v, lr, s: ladder.name("d256", v, 1, lr, s)
    logs = {name(v, lr, 1337): ladder_log([(0, 0, 11), (264, 10, 9.0)], 0.2)
            for v in ("additive", "delta") for lr in (1.5e-3, 6e-3, 1.2e-2)}
    seeds = ((1337, 5.0, 4.6), (1338, 5.3, 4.8), (1339, 4.8, 4.4))  # spreads: additive 0.5, DDL 0.4
    for seed, base, ddl in seeds:
        logs[name("additive", 3e-3, seed)] = ladder_log([(0, 0, 11), (264, 10, base)], 0.3)
        logs[name("delta", 3e-3, seed)] = ladder_log([(0, 0, 11), (264, 20, ddl)], 0.3)
    write_logs(tmp_path / "logs", logs)
    plot.plt, fig, axes = fake_matplotlib()[0].pyplot, mock.MagicMock(), [mock.MagicMock() for _ in range(3)]
    plot.plt.subplots.return_value = fig, axes
    plot.plot_ladder(str(tmp_path / "logs"), str(tmp_path / "ladder.png"))
    n = ladder.non_embedding_params("d256", "delta")
    per_token, at_10s = 4.6 - np.mean([5.0, 5.3, 4.8]), np.mean([11 + (d - 11) / 2 - b for _, b, d in seeds])
    tokens = 264 * 64 * 1024
    for ax, x, gap in zip(axes, (tokens / n, tokens / n, n), (per_token, at_10s, per_token)):
        (xs, ys), kw = ax.errorbar.call_args  # at_10s: halfway along DDL's 20 s
        assert np.allclose(xs, [x]) and np.allclose(ys, [gap]) and np.allclose(kw["yerr"], [0.5])
        assert kw["label"] == "DDL d_v=1, 1 pass" and ax.annotate.call_args[0][0] == "d256"
    fig.savefig.assert_called_once_with(str(tmp_path / "ladder.png"), dpi=120)
    for seed in (1337, 1338, 1339):  # DDL's seeds on another card: no gap at equal time, drawn as none
        logs[name("delta", 3e-3, seed)][0]["device"] = "H200"
    write_logs(tmp_path / "logs", logs)
    axes[1].annotate.reset_mock()
    plot.plot_ladder(str(tmp_path / "logs"), str(tmp_path / "ladder.png"))
    assert np.isnan(axes[1].errorbar.call_args[0][1]).all() and not axes[1].annotate.called  # nor a label
    assert axes[2].set.call_args[1]["xlabel"] == "non-embedding parameters"


# ----------------------------------------------------------------------------- docs/ablations.py

def audited_log(final_loss, k_cos_before, k_cos_attn_mlp, k_cos_step=None):
    """A finished run's records with a last gate audit of two rows (without k_cos_step: as logs before it)."""
    gates = [dict(layer=0, sublayer=s, k_cos_before=b, k_cos_attn_mlp=a)
             for s, b, a in zip(("attn", "mlp"), k_cos_before, k_cos_attn_mlp)]
    for g, c in zip(gates, k_cos_step or ()):
        g["k_cos_step"] = c
    return ladder_log([(0, 0, 11), (264, 10, final_loss)], 0.3) + [dict(type="gates", step=264, gates=gates)]


def test_ablations_wait_for_the_ladders_lr_then_run_each_setting_at_three_seeds_at_it():
    ladder, abl = load_script("ladder"), load_script("ablations")
    assert abl.plan({}, {}) == []  # no lr settled yet
    sweep = {ladder.name("d512", "delta", 1, lr, 1337): ladder_log([(0, 0, 11), (264, 9, loss)], 0.3)
             for lr, loss in ((7.5e-4, 5.0), (1.5e-3, 4.9), (3e-3, 4.8), (6e-3, 4.85))}
    todo = abl.plan({}, sweep)  # the reference once more at K_SEED (k's stability figure), first
    assert todo == [("delta", 1340, 3e-3)] + [(s, seed, 3e-3) for s in ("delta-bound1", "write1")
                                              for seed in (1337, 1338, 1339)]
    k_run = {abl.run_name("delta", 3e-3, 1340): ["k"]}  # logged here, not in the ladder's folder
    assert abl.plan(k_run, sweep) == todo[1:] and abl.log_of(k_run, sweep, "delta", 1340) == ["k"]
    paths = types.SimpleNamespace(standin="s.jsonl", data_dir="data/ladder", runs="runs")
    cfg, mcfg = train.parse_args(ladder.train_args("d512", abl.SETTINGS["delta-bound1"][1], 1, 3e-3, 1338,
                                                   abl.run_name("delta-bound1", 3e-3, 1338), paths))
    assert (mcfg.beta_bound, mcfg.beta_init, mcfg.residual, mcfg.d_v, mcfg.n_embd, cfg.lr, cfg.seed) == (
        1, 0.5, "delta", 1, 512, 3e-3, 1338)  # beta starts mid-range, as 1.0 of the paper's 2
    assert cfg.out_dir == os.path.join("runs", "d512-delta-bound1-lr0.003-s1338")
    done = {abl.run_name("write1", 3e-3, s): [] for s in (1337, 1338)}
    assert abl.plan(done, sweep)[-1] == ("write1", 1339, 3e-3)
    assert {abl.SETTINGS[f"tc-k{k}"][1]["conv_kernel"] for k in (1, 2, 8)} == {1, 2, 8}
    assert all(abl.SETTINGS[s][1]["compressor"] == "tc" and abl.SETTINGS[s][0] == "cc"
               for s in ("tc", "tc-k1", "tc-k8"))


def test_ablations_split_gives_each_of_n_processes_every_nth_planned_run(tmp_path, capsys):
    """The d_v = 1 family's seven runs (delta at K_SEED, then delta-bound1 and write1 at seeds 1337-1339):
    1/2 takes runs 1, 3, 5 (0-based)."""
    ladder, abl = load_script("ladder"), load_script("ablations")
    write_logs(tmp_path / "ladder", {ladder.name("d512", "delta", 1, lr, 1337): ladder_log(
        [(0, 0, 11), (264, 9, loss)], 0.3) for lr, loss in ((1.5e-3, 4.9), (3e-3, 4.8), (6e-3, 4.85))})
    (tmp_path / "ablations").mkdir()
    folders = [f"--logs={tmp_path / 'ablations'}", f"--ladder_logs={tmp_path / 'ladder'}"]

    def planned(split):  # each planned run's --out_dir
        abl.main(["plan", f"--split={split}", *folders])
        return [line.split("--out_dir=")[1].split()[0] for line in capsys.readouterr().out.splitlines()]
    settings = [("delta", 1340)] + [(s, n) for s in ("delta-bound1", "write1") for n in (1337, 1338, 1339)]
    runs = [os.path.join("runs/ablations", abl.run_name(s, 3e-3, seed)) for s, seed in settings]
    assert planned("0/1") == runs and planned("1/2") == runs[1::2] and planned("0/4") == runs[::4]
    for bad in ("2/2", "1", "a/3", "-1/2"):
        with pytest.raises(SystemExit, match=f"--split={bad} is invalid"):
            abl.main(["plan", f"--split={bad}", *folders])


def test_ablations_table_compares_each_setting_with_its_reference_by_twice_the_larger_spread():
    """The reference (the ladder's delta at its best lr): 4.0, 4.1, 3.9 (spread 0.2); beta_bound = 1: 4.45,
    4.55, 4.5 (spread 0.1): +0.5 >= 2 x 0.2 counts; write-only: 4.2, 4.25, 4.15 (0.1): +0.2 does not."""
    ladder, abl = load_script("ladder"), load_script("ablations")
    ladder_logs = {ladder.name("d512", "delta", 1, lr, 1337): audited_log(9.0, (0.5, 0.5), (0.1, 0.1))
                   for lr in (7.5e-4, 3e-3, 6e-3)}
    logs = {}
    for seed, ref, bound1, write in ((1337, 4.0, 4.45, 4.2), (1338, 4.1, 4.55, 4.25), (1339, 3.9, 4.5, 4.15)):
        ladder_logs[ladder.name("d512", "delta", 1, 1.5e-3, seed)] = audited_log(ref, (0.9, 0.7), (0.2, 0.4))
        logs[abl.run_name("delta-bound1", 1.5e-3, seed)] = audited_log(bound1, (0.8, 0.6), (0.1, 0.3),
                                                                       (0.99, 0.97))
        logs[abl.run_name("write1", 1.5e-3, seed)] = audited_log(write, (None, None), (0.0, 0.0))
    logs[abl.run_name("write1", 3e-3, 1337)] = audited_log(1.0, (0.8, 0.6), (0.1, 0.3))  # not at the best lr
    for seed in (1337, 1338, 1339):  # an earlier audit, at step 132: the table reads the last one's cosines
        logs[abl.run_name("delta-bound1", 1.5e-3, seed)].insert(-1, audited_log(0, (0, 0), (0.9, 0.9))[-1])
    rows = abl.table(logs, ladder_logs)
    assert [(r["setting"], r["lr"], r["seeds"]) for r in rows] == [
        ("delta", 1.5e-3, 3), ("delta-bound1", 1.5e-3, 3), ("write1", 1.5e-3, 3)]
    ref, bound1, write = rows
    assert ref["loss"] == pytest.approx(4.0) and ref["spread"] == pytest.approx(0.2) and ref["counts"] is None
    assert bound1["difference"] == pytest.approx(0.5) and bound1["counts"] is True
    assert write["difference"] == pytest.approx(0.2) and write["counts"] is False
    assert (ref["k_cos_before"], ref["k_cos_attn_mlp"]) == pytest.approx((0.8, 0.3))
    assert write["k_cos_before"] is None and bound1["standin"] == pytest.approx(0.3)
    assert (bound1["k_cos_before"], bound1["k_cos_attn_mlp"]) == pytest.approx((0.7, 0.2))
    assert bound1["k_cos_step"] == pytest.approx(0.98) and ref["k_cos_step"] is None  # an older log: none
    assert bound1["losses"] == pytest.approx([4.45, 4.55, 4.5])  # the seeds' own, in seed order


def test_ablations_figure_draws_each_seed_and_the_mean_by_family_and_stars_what_counts(tmp_path):
    """As the table's test, with a DDL-CC reference of one seed (4.3, at its sweep's best lr 6e-3): delta's
    family in C0, CC's in C1; only beta_bound = 1 (+0.5 against twice 0.2) is starred, at its top seed."""
    ladder, abl, plot = load_script("ladder"), load_script("ablations"), load_script("plot")
    ladder_logs = {ladder.name("d512", family, 1, lr, 1337): audited_log(9.0, (0.5, 0.5), (0.1, 0.1))
                   for family, lrs in (("delta", (7.5e-4, 3e-3, 6e-3)), ("cc", (3e-3, 1.2e-2))) for lr in lrs}
    ladder_logs[ladder.name("d512", "cc", 1, 6e-3, 1337)] = audited_log(4.3, (0.5, 0.5), (0.1, 0.1))
    logs = {}
    for seed, ref, bound1, write in ((1337, 4.0, 4.45, 4.2), (1338, 4.1, 4.55, 4.25), (1339, 3.9, 4.5, 4.15)):
        ladder_logs[ladder.name("d512", "delta", 1, 1.5e-3, seed)] = audited_log(ref, (0.9, 0.7), (0.2, 0.4))
        logs[abl.run_name("delta-bound1", 1.5e-3, seed)] = audited_log(bound1, (0.8, 0.6), (0.1, 0.3))
        logs[abl.run_name("write1", 1.5e-3, seed)] = audited_log(write, (0.8, 0.6), (0.0, 0.0))
    write_logs(tmp_path / "ladder", ladder_logs)
    write_logs(tmp_path / "ablations", logs)
    plot.plt = mock.MagicMock()
    fig, ax = mock.MagicMock(), mock.MagicMock()
    plot.plt.subplots.return_value = (fig, ax)
    plot.plot_ablations(str(tmp_path), str(tmp_path / "a.png"))
    dots = ax.plot.call_args_list
    assert [c.args[0] for c in dots] == [[0] * 3, [1] * 3, [2] * 3, [3]]
    assert [c.args[1] for c in dots] == [pytest.approx(v) for v in
                                         ([4.0, 4.1, 3.9], [4.45, 4.55, 4.5], [4.2, 4.25, 4.15], [4.3])]
    assert [c.kwargs["color"] for c in dots] == ["C0", "C0", "C0", "C1"]
    assert [c.args[0] for c in ax.hlines.call_args_list] == pytest.approx([4.0, 4.5, 4.2, 4.3])
    ax.annotate.assert_called_once()
    assert ax.annotate.call_args.args == ("*", (1, pytest.approx(4.55)))
    ticks = ["delta\n(reference)", "delta-bound1", "write1", "cc\n(reference)"]
    assert ax.set_xticks.call_args.args == (range(4), ticks)
    fig.savefig.assert_called_once_with(str(tmp_path / "a.png"), dpi=120)


def test_k_stability_figure_draws_each_reference_runs_layer_means_against_step(tmp_path):
    """The ladder's d512 DDL d_v=1 run at its best lr (seed 1337), audited at steps 0 and 132: |k~| 2 and 4
    over its two rows at step 0 (mean 3), the previous-eval cosine from step 132 on only."""
    ladder, plot = load_script("ladder"), load_script("plot")
    gates = lambda norms, before, attn_mlp: [dict(k_tilde_norm_mean=n, k_cos_before=b, k_cos_attn_mlp=a)
                                             for n, b, a in zip(norms, before, attn_mlp)]
    audits = [dict(type="gates", step=0, gates=gates((2, 4), (None, None), (0.1, 0.3))),
              dict(type="gates", step=132, gates=gates((3, 5), (0.9, 0.7), (0.0, 0.4)))]
    for row, c in zip(audits[1]["gates"], (0.99, 0.91)):  # the step before's, where a log has it
        row["k_cos_step"] = c
    logs = {ladder.name("d512", "delta", 1, lr, 1337): ladder_log([(0, 0, 11), (264, 9, loss)], 0.3) + audits
            for lr, loss in ((7.5e-4, 5.0), (1.5e-3, 4.8), (3e-3, 4.9), (6e-3, 5.0))}
    write_logs(tmp_path / "ladder", logs)
    (tmp_path / "ablations").mkdir()
    plot.plt = mock.MagicMock()
    def draw():  # axes whose lines are what plot() drew on them
        fig, axes = mock.MagicMock(), [mock.MagicMock(lines=[]) for _ in range(4)]
        for ax in axes:
            ax.plot.side_effect = lambda *a, lines=ax.lines, **kw: lines.append(a)
        plot.plt.subplots.return_value = (fig, axes)
        plot.plot_k_stability(str(tmp_path), str(tmp_path / "k.png"))
        return fig, axes
    fig, axes = draw()
    wants = (((0, 132), (3.0, 4.0)), ((132,), (0.8,)), ((132,), (0.95,)), ((0, 132), (0.2, 0.2)))
    for ax, want in zip(axes, wants):
        (steps, ys), kw = ax.plot.call_args
        assert steps == want[0] and ys == pytest.approx(want[1]) and kw["label"] == "DDL d_v=1"
        assert not ax.text.called
    fig.savefig.assert_called_once_with(str(tmp_path / "k.png"), dpi=120)
    for row in audits[1]["gates"]:  # a log from before k_cos_step: its panel says so, the others draw
        del row["k_cos_step"]
    write_logs(tmp_path / "ladder", logs)
    fig, axes = draw()
    assert not axes[2].plot.called and "no run has logged it yet" in axes[2].text.call_args[0]
    assert all(ax.plot.called and not ax.text.called for ax in (axes[0], axes[1], axes[3]))
    abl = load_script("ablations")  # the reference's K_SEED run, where there is one, is the one drawn
    k_run = ladder_log([(0, 0, 11), (264, 9, 4.8)], 0.3) + [dict(type="gates", step=264, gates=gates(
        (7, 9), (0.5, 0.5), (0.1, 0.1)))]
    write_logs(tmp_path / "ablations", {abl.run_name("delta", 1.5e-3, abl.K_SEED): k_run})
    fig, axes = draw()
    assert axes[0].plot.call_args[0] == ((264,), (8.0,))
