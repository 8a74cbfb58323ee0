"""
The memorization probe of docs/results.md: how many steps each variant, and each ablation of the delta
rule, needs to fit one fixed batch of random tokens (inputs and targets drawn independently, the same
batch every step), at a few learning rates. Full training steps as train.py runs them (AdamW, clip 1.0,
bf16 autocast on CUDA), eager mode. One JSON line per (variant, lr) on stdout: the loss at every step.

    python docs/memorize.py --preset=124m --lrs=3e-4,1e-3,3e-3 --steps=150 > memorize.jsonl   # one GPU
    python docs/memorize.py --preset=smoke --steps=5                                    # the code path, CPU

Ablations (none needs a switch in ddl.py): beta frozen at its initial value (w_beta, b_beta not trained);
v in its plain linear form (v_scale = 0); the write-only rule (no erase term) at d_v = 1; and an additive
baseline whose sublayer output is normalised the way k is (x + k, k = F(c) / |F(c)|).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ddl  # noqa: E402
import train  # noqa: E402

VARIANTS = {  # name: (GPTConfig overrides, ablation)
    "additive": (dict(residual="additive", d_v=1), None),
    "additive-unit-k": (dict(residual="additive", d_v=1), "unit_k"),
    "delta": (dict(residual="delta", d_v=1), None),
    "delta-frozen-beta": (dict(residual="delta", d_v=1), "frozen_beta"),
    "delta-linear-v": (dict(residual="delta", d_v=1, v_scale=0.0), None),
    "write": (dict(residual="write", d_v=1), None),
    "cc": (dict(residual="delta", d_v=4, compressor="cc"), None),
    "write-cc": (dict(residual="write", d_v=4, compressor="cc"), None),
}


def additive_with_unit_k(branch, X, cache=None):
    """The additive residual with the sublayer output normalised as DDL normalises k: X + k."""
    c = branch.input_norm(X)  # the model's own norm: a change to it reaches this probe too
    return X + ddl.unit_direction(branch.sublayer(c, cache), branch.cfg.k_eps)


def probe(cfg, mcfg, name, lr, steps, dev, ctx, x, y):
    overrides, ablation = VARIANTS[name]
    torch.manual_seed(cfg.seed)
    model = ddl.GPT(ddl.GPTConfig(**{**mcfg.__dict__, **overrides})).to(dev)
    for m in model.modules():
        if isinstance(m, ddl.ResidualBranch) and ablation == "unit_k":
            m.forward = additive_with_unit_k.__get__(m)
        if isinstance(m, ddl.ResidualBranch) and ablation == "frozen_beta":
            m.w_beta.requires_grad_(False)
            m.b_beta.requires_grad_(False)
    opt = model.configure_optimizers(lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dev.type)
    losses = []
    for _ in range(steps):
        loss, _ = train.train_step(model, model, opt, lambda: (x, y), 1, lr, cfg, ctx)
        losses.append(loss.item())
        if losses[-1] < 1e-3:  # memorised: the rest of the curve says nothing more
            break
    return losses


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--preset", default="124m", help="train.py preset for the model size" + d)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all)")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="peak learning rates" + d)
    p.add_argument("--steps", type=int, default=150, help="steps per run at most" + d)
    p.add_argument("--batch", type=int, default=16, help="sequences in the fixed batch" + d)
    args = p.parse_args()
    try:  # a setting of the user's: one line, as train.py's
        cfg, mcfg = train.parse_args([f"--preset={args.preset}"])
        if unknown := [v for v in args.variants.split(",") if v not in VARIANTS]:
            raise ddl.ConfigError(f"--variants: unknown {unknown[0]!r}; allowed: {', '.join(VARIANTS)}")
        lrs = [float(lr) for lr in args.lrs.split(",")]
    except (ddl.ConfigError, ValueError) as e:
        sys.exit(f"docs/memorize.py: error: {e}")
    _, _, dev, ctx = train.setup(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = (torch.randint(0, 50257, (args.batch, mcfg.block_size), generator=gen).to(dev) for _ in range(2))
    for name in args.variants.split(","):
        for lr in lrs:
            losses = probe(cfg, mcfg, name, lr, args.steps, dev, ctx, x, y)
            print(json.dumps(dict(variant=name, lr=lr, losses=losses)), flush=True)


if __name__ == "__main__":
    main()
