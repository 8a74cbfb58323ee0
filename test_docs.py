"""The scripts in docs/: they run, and what they compute is what they say."""
import os
from contextlib import nullcontext

import torch

import train
from test_ddl import tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


def test_memorization_probe_ablations_run_and_unit_k_is_the_normalised_update():
    import importlib.util
    spec = importlib.util.spec_from_file_location("memorize", os.path.join(HERE, "docs", "memorize.py"))
    mem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mem)
    branch = tiny_model(residual="additive").blocks[1].mlp
    with torch.no_grad():
        branch.norm_gain.copy_(torch.rand(16) + 0.5)
    X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9))
    c = X / torch.sqrt((X * X).mean(-1, keepdim=True) + 1e-5) * branch.norm_gain
    out = branch.sublayer(c)
    want = X + out / torch.sqrt((out * out).sum(-1, keepdim=True) + 1e-10)
    assert torch.allclose(mem.additive_with_unit_k(branch, X), want, atol=1e-5)
    cfg, mcfg = train.parse_args(["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=8",
                                  "--vocab_size=97", "--device=cpu"])
    x, y = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    for name in ("additive-unit-k", "delta-frozen-beta", "delta-linear-v"):
        losses = mem.probe(cfg, mcfg, name, 1e-2, 4, torch.device("cpu"), nullcontext(), x, y)
        assert len(losses) == 4 and losses[-1] < losses[0]
