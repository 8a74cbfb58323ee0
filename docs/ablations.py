"""
Which part of DDL does the work? Three ablations the paper leaves open, at the size ladder's d512 rung
(docs/ladder.py: the same corpus, recipe, one pass and stand-in), every setting at the ladder's three seeds:

- reflection: beta_bound = 1 (the shortcut's eigenvalue 1 - beta stays in [0, 1]) against the paper's 2,
  for DDL d_v = 1 and DDL-CC + EC, beside the write-only control (no erase term). beta starts at the
  sigmoid's midpoint in both: beta_init 0.5 of 1 as 1.0 of 2 (1.0 would start every gate saturated);
- the conv kernel: conv_kernel = 1 (no mixing across tokens), 2, 4 (the default) and 8, for DDL-CC + EC
  and DDL-TC + EC;
- the stability of k: every DDL run's gate audit logs, per layer and sublayer, the cosine of each token's
  k with the previous eval's and with the step before's (from 2026-12-07's train.py on), and of the
  attention's k with the MLP's (docs/plot.py --ablations draws them).

Each setting runs at its family's lr: the ladder's best at d512 for DDL d_v = 1 or DDL-CC (DDL-TC, not in
the ladder, at DDL-CC's). The references "delta" and "cc" are the ladder's own d512 runs at that lr;
DDL-TC's ("tc", conv_kernel 4) is run here. A
setting differs from its reference only where the means differ by at least twice the larger seed spread.
Each reference also runs here once more, at K_SEED, for k's stability figure alone: its runs at the
three seeds predate the per-step cosine (k_cos_step); the table does not read K_SEED's runs.

    python docs/ablations.py plan | run | table     # as docs/ladder.py; logs in docs/records/ablations/
    python docs/ablations.py run --split 1/3        # plan's runs 1, 4, 7... (0-based), with 0/3 and 2/3

Unlike the ladder's, these runs may share a GPU (--split): the table uses no run's training clock. Start
the N processes together: each splits the plan it computes at its start.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ladder  # noqa: E402  (docs/ladder.py: the recipe, the runner, the ladder's logs)

SIZE = "d512"
CC, TC = ladder.VARIANTS["cc"], dict(ladder.VARIANTS["cc"], compressor="tc")
# name: (the family whose best lr it runs at, its GPTConfig flags, its reference: None for a reference)
SETTINGS = {
    "delta": ("delta", ladder.VARIANTS["delta"], None),
    "delta-bound1": ("delta", dict(residual="delta", beta_bound=1.0, beta_init=0.5), "delta"),
    "write1": ("delta", dict(residual="write"), "delta"),
    "cc": ("cc", CC, None),
    "cc-bound1": ("cc", dict(CC, beta_bound=1.0, beta_init=0.5), "cc"),
    "write4": ("cc", ladder.VARIANTS["write"], "cc"),
    **{f"cc-k{k}": ("cc", dict(CC, conv_kernel=k), "cc") for k in (1, 2, 8)},
    "tc": ("cc", TC, None),
    **{f"tc-k{k}": ("cc", dict(TC, conv_kernel=k), "tc") for k in (1, 2, 8)},
}
FROM_LADDER = ("delta", "cc")  # references that are the ladder's runs
K_SEED = 1340  # one more run of each reference, logging k_cos_step (train.py from 7b13627), for the figure

def run_name(setting, lr, seed):
    """The lr is in the name: should the ladder's best lr change, older runs no longer count as done."""
    return f"{SIZE}-{setting}-lr{lr:g}-s{seed}"

def family_lr(ladder_logs, setting):
    """The lr a setting runs at: its family's best in the ladder's d512 sweep (None until it is done)."""
    return ladder.best_lr(ladder_logs, SIZE, SETTINGS[setting][0], 1)

def log_of(logs, ladder_logs, setting, seed):
    """A setting's log of one seed, from the ladder for its references (but K_SEED's, run here); None where
    it is not run yet."""
    lr = family_lr(ladder_logs, setting)
    if setting in FROM_LADDER and seed != K_SEED:
        return None if lr is None else ladder_logs.get(ladder.name(SIZE, setting, 1, lr, seed))
    return None if lr is None else logs.get(run_name(setting, lr, seed))

def plan(logs, ladder_logs):
    """(setting, seed, lr) of the runs not logged yet whose family's lr the ladder has settled: each
    reference at K_SEED first, then every setting not from the ladder at the ladder's seeds."""
    lrs = {s: family_lr(ladder_logs, s) for s in SETTINGS}
    runs = [(s, K_SEED) for s, (_, _, ref) in SETTINGS.items() if ref is None]
    runs += [(s, seed) for s in SETTINGS if s not in FROM_LADDER for seed in ladder.SEEDS]
    return [(s, seed, lrs[s]) for s, seed in runs
            if lrs[s] is not None and run_name(s, lrs[s], seed) not in logs]

def summary(log):
    """Of one run: final val loss, the stand-in's last acc_norm, and the last gate audit's k cosines
    averaged over layers and sublayers (None for a cosine the audit lacks: no earlier eval, or a log from
    before train.py probed the step before)."""
    gates = [r for r in log if r["type"] == "gates"][-1]["gates"]
    return dict(loss=ladder.final_loss(log), standin=ladder.standin_acc_norm(log),
                **{key: mean_of(gates, key) for key in ("k_cos_before", "k_cos_step", "k_cos_attn_mlp")})

def mean_of(gates, key):
    """The mean of key over an audit's rows; None where a row has none."""
    values = [g.get(key) for g in gates]
    return None if None in values else float(np.mean(values))

def k_curves(log):
    """Of one run, at each gate audit: the step and, averaged over layers and sublayers, the mean |k~|,
    the cosine of k with the previous audit's (from the second audit on) and with the step before's (None
    where the audit has none), and the attention-MLP cosine."""
    audits = [r for r in log if r["type"] == "gates"]
    keys = ("k_tilde_norm_mean", "k_cos_before", "k_cos_step", "k_cos_attn_mlp")
    return dict(step=[r["step"] for r in audits],
                **{key.removesuffix("_mean"): [mean_of(r["gates"], key) for r in audits] for key in keys})

def table(logs, ladder_logs):
    """Per setting with runs: its lr, seeds, final val loss per seed (losses), their mean and spread (max -
    min), the stand-in's acc_norm and the k cosines (means over seeds), its difference to its reference and
    whether that counts (|difference| >= 2 x the larger spread). Rows of dicts, in SETTINGS' order."""
    rows = {}
    for setting, (_, _, ref) in SETTINGS.items():
        runs = [log for seed in ladder.SEEDS if (log := log_of(logs, ladder_logs, setting, seed))]
        if not runs:
            continue
        s = [summary(log) for log in runs]
        losses = [x["loss"] for x in s]
        mean = lambda key: None if None in [x[key] for x in s] else float(np.mean([x[key] for x in s]))
        row = dict(setting=setting, lr=family_lr(ladder_logs, setting), seeds=len(runs), losses=losses,
                   loss=float(np.mean(losses)), spread=float(np.ptp(losses)), standin=mean("standin"),
                   k_cos_before=mean("k_cos_before"), k_cos_step=mean("k_cos_step"),
                   k_cos_attn_mlp=mean("k_cos_attn_mlp"),
                   reference=ref, difference=None, counts=None)
        if ref in rows:
            row["difference"] = row["loss"] - rows[ref]["loss"]
            row["counts"] = abs(row["difference"]) >= 2 * max(row["spread"], rows[ref]["spread"])
        rows[setting] = row
    return list(rows.values())

def split(text):
    """(I, N) of --split=I/N; a malformed or out-of-range value exits with a one-line error."""
    i, _, n = text.partition("/")
    if not (i.isdecimal() and n.isdecimal() and int(i) < int(n)):
        sys.exit(f"error: --split={text} is invalid: must be I/N, integers with 0 <= I < N (e.g. 1/3)")
    return int(i), int(n)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("plan", "run", "table"))
    p.add_argument("--logs", default=os.path.join(ladder.ROOT, "docs", "records", "ablations"))
    p.add_argument("--ladder_logs", default=os.path.join(ladder.ROOT, "docs", "records", "ladder"))
    p.add_argument("--data_dir", default="data/ladder", help="prepare_data.py's output (docs/ladder.py)")
    p.add_argument("--runs", default="runs/ablations", help="the runs' folders")
    p.add_argument("--standin", default="data/standin/standin_val.jsonl", help="docs/standin.py's output")
    p.add_argument("--split", default="0/1", help="plan and run: I/N, plan's runs I, I + N, I + 2N... only "
                   "(0-based, 0 <= I < N)")
    args = p.parse_args(argv)
    i, n = split(args.split)
    logs, ladder_logs = ladder.load_logs(args.logs), ladder.load_logs(args.ladder_logs)
    todo = [(s, seed, lr, run_name(s, lr, seed)) for s, seed, lr in plan(logs, ladder_logs)][i::n]
    jobs = [(run, ladder.train_args(SIZE, SETTINGS[s][1], 1, lr, seed, run, args))
            for s, seed, lr, run in todo]
    if args.what == "plan":
        for _, cmd in jobs:
            print("python train.py " + " ".join(cmd))
    elif args.what == "run":
        ladder.run(jobs, args)
    else:
        fmt = lambda x, f: "—" if x is None else format(x, f)
        print("| setting | lr | seeds | val loss | spread | vs reference | counts | stand-in acc_norm | "
              "k cos, previous eval | k cos, previous step | k cos, attn-MLP |\n|---|" + "---:|" * 10)
        for r in table(logs, ladder_logs):
            print(f"| {r['setting']} | {r['lr']:g} | {r['seeds']} | {r['loss']:.4f} | {r['spread']:.4f} | "
                  f"{fmt(r['difference'], '+.4f')} | {fmt(r['counts'], '')} | {fmt(r['standin'], '.4f')} | "
                  f"{fmt(r['k_cos_before'], '.3f')} | {fmt(r['k_cos_step'], '.4f')} | "
                  f"{fmt(r['k_cos_attn_mlp'], '.3f')} |")

if __name__ == "__main__":
    main()
