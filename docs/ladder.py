"""
The size ladder: does DDL's lead over the additive baseline hold as tokens per parameter grow? Four
widths, d = 256 / 4 layers (3.1M non-embedding parameters) to the 124m preset's (85M), on the fixed prose
corpus: part-0000 held out for validation, parts 1-3 (17.35M tokens) to train on, once; the two smallest
also four times (passes repeat the data). Each variant first at three peak learning rates (one seed;
more where the best is at an end of the range), then two more seeds at its best; the write-only control
at the smallest and largest sizes only.

    python prepare_data.py --input <corpus>/part-000{0,1,2,3}.jsonl.gz --out data/ladder --val_tokens=5771815
    python docs/ladder.py plan                  # the runs still to do, as train.py commands
    python docs/ladder.py run --only d256-      # run them in turn (those whose name holds the text)
    python docs/ladder.py table                 # the best lrs' table, from the committed logs alone
    python docs/ladder.py sweeps                # each size's sweeps: the final loss at every lr, likewise
    python docs/ladder.py first-pass            # one pass's tokens under the one- and four-pass schedules

When a run ends, hellaswag.py scores its checkpoint on the HellaSwag-format stand-in (docs/standin.py; not
HellaSwag), its log.jsonl with that score added is written to --logs (docs/records/ladder/<run>.jsonl),
and its checkpoint deleted (up to 1.5 GB a run; what the ladder reports is in the log). The data's
--val_tokens is part-0000's size, so validation never sees training text.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import hellaswag  # noqa: E402  (the repository's root: the stand-in's scoring, and the parameter counts)
from ddl import GPT, GPTConfig  # noqa: E402

SIZES = {"d256": dict(n_embd=256, n_layer=4, n_head=2), "d384": dict(n_embd=384, n_layer=6, n_head=3),
         "d512": dict(n_embd=512, n_layer=8, n_head=4), "d768": dict(n_embd=768, n_layer=12, n_head=6)}
# A sweep's centre is LR_CENTRE[size] x VARIANT_LR[variant]; it runs x 0.5, 1, 2 of that (see sweep).
# VARIANT_LR and d768's centre follow the tuned 124M sweep of docs/results.md (best lrs: additive 2e-3,
# d_v = 1 4e-3, CC and write-only 8e-3) and the first d256 sweeps, where every DDL variant's best lay at
# the top of a range centred on the baseline's.
LR_CENTRE = {"d256": 3e-3, "d384": 2e-3, "d512": 1.5e-3, "d768": 1.5e-3}
VARIANT_LR = {"additive": 1, "delta": 2, "cc": 4, "write": 4}
LR_FACTORS = (0.5, 1.0, 2.0)
MAX_EXTRA = 2  # lrs a sweep may add, a factor 2 at a time, past the end that holds its least loss
PASSES = {"d256": (1, 4), "d384": (1, 4), "d512": (1,), "d768": (1,)}
VARIANTS = {"additive": dict(residual="additive"), "delta": dict(residual="delta"),
            "cc": dict(residual="delta", d_v=4, compressor="cc", embed_conv=True),
            "write": dict(residual="write", d_v=4, compressor="cc", embed_conv=True)}
CONTROL_SIZES = ("d256", "d768")  # the write-only control's
SWEEP_SEED, SEEDS = 1337, (1337, 1338, 1339)
TRAIN_TOKENS, BATCH, T = 17_347_266, 64, 1024  # parts 1-3; sequences of T tokens per step
# Sequences per forward at d768: 4 accumulated micro-batches give it the same optimizer steps as every other
# size. Chosen on an estimate that BATCH at once would not fit DDL-CC (78 GiB); its runs then peaked at 10.3
# GiB with 16, so 64 would likely fit, but every d768 run keeps 16, so all of them accumulate alike.
MICRO_BATCH = {"d768": 16}
VAL_TOKENS = 2_097_152  # the first 2M tokens of part-0000 at every eval

def non_embedding_params(size, variant):
    """Parameters outside the (tied) embedding, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**SIZES[size], head_dim=128, **VARIANTS[variant]))
    return model.num_params() - model.wte.weight.numel()

def name(size, variant, passes, lr, seed):
    return f"{size}-{variant}-p{passes}-lr{lr:g}-s{seed}"

def steps(passes):
    """Optimizer steps for `passes` over the training text: train.py's TokenStream reads whole windows of
    T + 1 tokens, BATCH a step, and starts a new pass where fewer than BATCH are left."""
    return passes * (((TRAIN_TOKENS - 1) // T) // BATCH)

def train_args(size, model, passes, lr, seed, run, paths):
    """train.py's arguments for the run named `run` of a model of `size` (GPTConfig flags `model`): passes x
    the training text at BATCH x T tokens a step (MICRO_BATCH at a time), warm-up a tenth of the steps,
    cosine to lr / 10, an evaluation at step 0 and 8 more, one checkpoint."""
    n = steps(passes)
    flags = {**SIZES[size], "head_dim": 128, **model, "block_size": T,
             "batch_size": MICRO_BATCH.get(size, BATCH), "total_batch": BATCH, "max_steps": n,
             "warmup_steps": n // 10, "lr": lr, "min_lr": lr / 10,
             "eval_interval": n // 8, "val_tokens": VAL_TOKENS, "seed": seed,
             "log_interval": 10, "ckpt_interval": n, "sample_tokens": 0, "data_dir": paths.data_dir,
             "out_dir": os.path.join(paths.runs, run), "overwrite": True}
    text = lambda v: str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else v
    return [f"--{k}={text(v)}" for k, v in flags.items()]

def ladder_args(r, paths):
    """train_args of the ladder's run r = (size, variant, passes, lr, seed)."""
    size, variant, passes, lr, seed = r
    return train_args(size, VARIANTS[variant], passes, lr, seed, name(*r), paths)

def cells():
    """Every (size, variant, passes) of the ladder."""
    return [(s, v, p) for s in SIZES for v in VARIANTS for p in PASSES[s]
            if v != "write" or s in CONTROL_SIZES]

def diverged(log):
    """Whether train.py stopped the run on a non-finite loss or gradient."""
    return any(r["type"] == "diverged" for r in log)

def final_loss(log):
    """The last val loss of a finished run's records; inf for a run that diverged."""
    if diverged(log):
        return float("inf")
    return [r["loss"] for r in log if r["type"] == "val"][-1]

def late_train_loss(log):
    """The mean of the run's train records (one every log_interval steps, each its step's loss) over its
    last tenth of steps: how well it fits the training text, which after one pass it has seen before (set
    against its val loss, held-out text); inf where it diverged."""
    if diverged(log):
        return float("inf")
    train = [r for r in log if r["type"] == "train"]
    return float(np.mean([r["loss"] for r in train if r["step"] > 0.9 * train[-1]["step"]]))

def standin_acc_norm(log):
    """The stand-in's acc_norm of the run's last scoring (the end's: the first d256 runs also scored it at
    each eval, through train.py's --hellaswag); None for a run that never reached one."""
    scores = [r["acc_norm"] for r in log if r["type"] == "hellaswag"]
    return scores[-1] if scores else None

def card(log):
    """The GPU that ran, and timed, the run (train.py's config record)."""
    return next(r for r in log if r["type"] == "config")["device"]

def code(log):
    """The sources that ran, and timed, the run: their sha256's first 8 digits (train.py's config record;
    rundir.provenance says how to recompute it)."""
    return next(r for r in log if r["type"] == "config")["source_sha256"][:8]

def load_logs(folder):
    """{run name: its records}, for every log in folder."""
    logs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        with open(path) as f:
            logs[os.path.basename(path)[:-len(".jsonl")]] = [json.loads(line) for line in f]
    return logs

def sweep(logs, size, variant, passes):
    """(the sweep's lrs so far, its best lr or None). It starts at its centre x LR_FACTORS; while the least
    final val loss lies at an end of the swept range, it adds the lr a factor 2 past that end (at most
    MAX_EXTRA), so that the best lr is a minimum, not a bound. None until every lr so far is logged."""
    lrs = [LR_CENTRE[size] * VARIANT_LR[variant] * f for f in LR_FACTORS]
    while True:
        runs = [logs.get(name(size, variant, passes, lr, SWEEP_SEED)) for lr in lrs]
        if None in runs:
            return lrs, None
        best = min(range(len(lrs)), key=lambda i: final_loss(runs[i]))
        if 0 < best < len(lrs) - 1 or len(lrs) == len(LR_FACTORS) + MAX_EXTRA:
            return lrs, lrs[best] if final_loss(runs[best]) < float("inf") else None  # all diverged: none
        lrs = [lrs[0] / 2, *lrs] if best == 0 else [*lrs, lrs[-1] * 2]

def swept(logs, size, variant, passes):
    """{lr: final val loss} of every logged run of the cell at seed SWEEP_SEED: its sweep's, and any from an
    earlier centre (the first d256 sweeps')."""
    prefix, suffix = f"{size}-{variant}-p{passes}-lr", f"-s{SWEEP_SEED}"  # name()'s, around the lr
    return {float(run[len(prefix):-len(suffix)]): final_loss(log) for run, log in logs.items()
            if run.startswith(prefix) and run.endswith(suffix)}

def best_lr(logs, size, variant, passes):
    """The finished sweep's lr of least final val loss, or None."""
    return sweep(logs, size, variant, passes)[1]

def plan(logs):
    """The runs not logged yet: the sweeps, and the seeds at each best lr where its sweep is done."""
    todo = []
    for size, variant, passes in cells():
        lrs, lr = sweep(logs, size, variant, passes)
        runs = [(lr, SWEEP_SEED) for lr in lrs] if lr is None else [(lr, seed) for seed in SEEDS]
        todo += [(size, variant, passes, lr, seed) for lr, seed in runs
                 if name(size, variant, passes, lr, seed) not in logs]
    return todo

def val_at_time(log, seconds):
    """The run's val loss at `seconds` of its training clock, interpolated between its evaluations (the
    train records give each step's clock); its final loss past its end."""
    train = [r for r in log if r["type"] == "train"]
    val = [r for r in log if r["type"] == "val"]  # step 0 at clock 0: the start of the curve
    clock = np.interp([r["step"] for r in val], [0] + [r["step"] for r in train],
                      [0] + [r["train_time_s"] for r in train])
    return float(np.interp(seconds, clock, [r["loss"] for r in val]))

def table(logs):
    """Per cell at its best lr: final val loss over seeds (mean, max - min), late train loss (mean), tokens
    per non-embedding parameter, and for DDL the gap to the additive baseline per token (equal steps) and
    at the baseline's training time (each seed against the baseline's run of the same seed on the same
    card: the clocks of two cards do not compare); the cards and the code (sources' sha256) that timed the
    runs. Rows of dicts."""
    rows = []
    for size, variant, passes in cells():
        lr = best_lr(logs, size, variant, passes)
        runs = {s: logs.get(name(size, variant, passes, lr, s)) for s in SEEDS} if lr else {}
        runs = {s: log for s, log in runs.items() if log}
        if not runs:
            continue
        losses = [final_loss(log) for log in runs.values()]
        standin = [a for a in map(standin_acc_norm, runs.values()) if a is not None]
        n = non_embedding_params(size, variant)
        row = dict(size=size, variant=variant, passes=passes, lr=lr, seeds=len(runs), params=n,
                   tokens_per_param=steps(passes) * BATCH * T / n, loss=float(np.mean(losses)),
                   spread=float(np.ptp(losses)), gap=None, gap_equal_time=None,
                   train_loss=float(np.mean([late_train_loss(log) for log in runs.values()])),
                   standin_acc_norm=float(np.mean(standin)) if standin else None,
                   cards=", ".join(sorted({card(log) for log in runs.values()})),
                   code=", ".join(sorted({code(log) for log in runs.values()})))
        base = next((r for r in rows if (r["size"], r["variant"], r["passes"]) == (size, "additive", passes)),
                    None)
        if variant != "additive" and base:
            row["gap"] = row["loss"] - base["loss"]
            bases = {s: logs.get(name(size, "additive", passes, base["lr"], s)) for s in runs}
            pairs = [(log, bases[s]) for s, log in runs.items() if bases[s] and card(bases[s]) == card(log)
                     and not diverged(log) and not diverged(bases[s])]  # a diverged run: no clock
            row["gap_equal_time"] = float(np.mean([
                val_at_time(log, [r for r in b if r["type"] == "train"][-1]["train_time_s"]) - final_loss(b)
                for log, b in pairs])) if pairs else None
        rows.append(row)
    return rows

def val_at_step(log, step):
    """The run's val loss at its evaluation of `step`; inf where it diverged before it."""
    at = [r["loss"] for r in log if r["type"] == "val" and r["step"] == step]
    return at[0] if at or not diverged(log) else float("inf")

def first_pass(logs):
    """One pass's tokens under two schedules, for each size trained at four passes: per variant at its best
    one-pass lr and seed SWEEP_SEED (the seed run at every lr), so with the same lr, seed, init and batches,
    the one-pass run's final val loss (a tenth of steps(1) to warm up, then cosine to lr / 10 by its end)
    and the four-pass run's where its first pass ends (steps(1), after a tenth of steps(4) to warm up, near
    the peak of a cosine four times longer); DDL's gap to the baseline in each. Rows of dicts, for the
    variants run at that lr at both."""
    rows = []
    for size, variant, _ in [c for c in cells() if c[2] == 4]:
        lr = best_lr(logs, size, variant, 1)
        one, four = (logs.get(name(size, variant, p, lr, SWEEP_SEED)) if lr else None for p in (1, 4))
        if not (one and four):
            continue
        row = dict(size=size, variant=variant, lr=lr, one_pass=final_loss(one),
                   first_of_four=val_at_step(four, steps(1)), gap_one=None, gap_first=None)
        base = next((r for r in rows if (r["size"], r["variant"]) == (size, "additive")), None)
        if variant != "additive" and base:
            row.update(gap_one=row["one_pass"] - base["one_pass"],
                       gap_first=row["first_of_four"] - base["first_of_four"])
        rows.append(row)
    return rows

def run(jobs, paths):
    """Run each (run name, train.py arguments) of jobs, in turn. When it ends, score its checkpoint on the
    stand-in (hellaswag.py, in this process: one CUDA start for all runs), write its log with that score
    into paths.logs (a log there is a finished run's: one that diverged counts, its loss is inf, unscored)
    and delete its checkpoint. Any other failure stops here."""
    if not os.path.isfile(paths.standin):
        sys.exit(f"error: --standin={paths.standin}: no such file; make it with docs/standin.py")
    hellaswag.load(paths.standin)  # a bad file, or no tokenizer, stops here, not after a run
    os.makedirs(paths.logs, exist_ok=True)
    for run_name, args in jobs:
        start = time.perf_counter()
        out, dest = os.path.join(paths.runs, run_name), os.path.join(paths.logs, run_name + ".jsonl")
        logs = [os.path.join(out, f) for f in ("log.jsonl", "log.failed.jsonl")]  # train.py's: done, failed
        for f in logs:
            if os.path.exists(f):  # an earlier try's, cut short: not this run's
                os.remove(f)
        failed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args]).returncode
        kept = next((f for f in logs if os.path.exists(f)), None)
        with open(kept or os.devnull) as f:
            log = [json.loads(line) for line in f]
        if failed and not diverged(log):
            raise RuntimeError(f"{run_name}: train.py failed (exit {failed}) without diverging")
        if not failed:
            score = hellaswag.main([f"--out_dir={out}", f"--file={paths.standin}"])
            end = [r["step"] for r in log if r["type"] == "val"][-1]
            log.append(dict(type="hellaswag", step=end, by="hellaswag.py", **score))
            os.remove(os.path.join(out, "ckpt.pt"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the scoring's memory, back for the next run
        with open(dest + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in log)
        os.replace(dest + ".tmp", dest)
        print(f"ladder: {run_name} logged, {time.perf_counter() - start:.0f} s in all", flush=True)

def lr_text(lr):
    """An lr as a column header, with the digits it has and one decimal at least: 7.5e-4, 3.0e-3, 3.75e-4."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    mantissa = mantissa.rstrip("0")
    return f"{mantissa}{'0' if mantissa.endswith('.') else ''}e{int(exponent)}"

def print_sweeps(logs):
    """Per size, a table of each cell's final val loss at every swept lr (seed SWEEP_SEED; the best in bold)
    and, once its sweep has ended, the mean and spread of the seeds at its best lr so far and their stand-in
    acc_norm (table's)."""
    rows = {(r["size"], r["variant"], r["passes"]): r for r in table(logs)}
    for size in SIZES:
        losses = {c: swept(logs, *c) for c in cells() if c[0] == size}
        losses = {c: by_lr for c, by_lr in losses.items() if by_lr}
        if not losses:
            continue
        lrs = sorted({lr for by_lr in losses.values() for lr in by_lr})
        header = " | ".join(map(lr_text, lrs))
        print(f"\n{size}: final val loss, seed {SWEEP_SEED}, by peak lr (best in bold)\n")
        print(f"| variant | passes | {header} | seeds at the best: mean, max − min | stand-in acc_norm |")
        print("|---|" + "---:|" * (len(lrs) + 1) + "---|---:|")
        for (_, variant, passes), by_lr in losses.items():
            r = rows.get((size, variant, passes))
            def text(lr):  # a blank where the lr did not run; the best lr's loss in bold
                if lr not in by_lr:
                    return ""
                loss = "diverged" if by_lr[lr] == float("inf") else f"{by_lr[lr]:.4f}"
                return f"**{loss}**" if r and lr == r["lr"] else loss
            seeds = f"{r['seeds']}: {r['loss']:.4f}, {r['spread']:.3f}" if r else "sweep unfinished"
            acc = "—" if r is None or r["standin_acc_norm"] is None else f"{r['standin_acc_norm']:.3f}"
            print(f"| {variant} | {passes} | " + " | ".join(map(text, lrs)) + f" | {seeds} | {acc} |")

def print_first_pass(logs):
    """first_pass's rows as a table: the lr, then each schedule's val loss and gap to the baseline."""
    print(f"| size | variant | lr (seed {SWEEP_SEED}) | one pass: val loss | gap "
          "| four passes, at the first's end: val loss | gap |\n|---|---|" + "---:|" * 5)
    gap = lambda x: "—" if x is None else f"{x:+.4f}"
    for r in first_pass(logs):
        print(f"| {r['size']} | {r['variant']} | {r['lr']:g} | {r['one_pass']:.4f} | {gap(r['gap_one'])} | "
              f"{r['first_of_four']:.4f} | {gap(r['gap_first'])} |")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("plan", "run", "table", "sweeps", "first-pass"))
    p.add_argument("--logs", default=os.path.join(ROOT, "docs", "records", "ladder"), help="the runs' logs")
    p.add_argument("--data_dir", default="data/ladder", help="prepare_data.py's output (see above)")
    p.add_argument("--runs", default="runs/ladder", help="the runs' folders")
    p.add_argument("--standin", default="data/standin/standin_val.jsonl", help="docs/standin.py's output")
    p.add_argument("--only", default="", help="run: only the runs whose name holds this text")
    args = p.parse_args(argv)
    logs = load_logs(args.logs)
    todo = [r for r in plan(logs) if args.only in name(*r)]
    if args.what == "plan":
        for r in todo:
            print("python train.py " + " ".join(ladder_args(r, args)))
    elif args.what == "run":
        def due():  # planned again after each run: a sweep's extension or seeds come due as it goes
            while todo := [r for r in plan(load_logs(args.logs)) if args.only in name(*r)]:
                yield name(*todo[0]), ladder_args(todo[0], args)
        run(due(), args)
    elif args.what == "sweeps":
        print_sweeps(logs)
    elif args.what == "first-pass":
        print_first_pass(logs)
    else:
        print("| size | variant | passes | lr | seeds | non-emb. params | tokens/param | val loss | spread | "
              "train loss, last 10% | stand-in acc_norm | gap per token | gap at equal time | card | code |\n"
              "|---|---|" + "---:|" * 11 + "---|---|")
        fmt = lambda x, f: "—" if x is None else format(x, f)
        for r in table(logs):
            print(f"| {r['size']} | {r['variant']} | {r['passes']} | {r['lr']:g} | {r['seeds']} | "
                  f"{r['params'] / 1e6:.1f}M | {fmt(r['tokens_per_param'], '.1f')} | {r['loss']:.4f} | "
                  f"{r['spread']:.4f} | {r['train_loss']:.4f} | {fmt(r['standin_acc_norm'], '.4f')} | "
                  f"{fmt(r['gap'], '+.4f')} | "
                  f"{fmt(r['gap_equal_time'], '+.4f')} | {r['cards']} | {r['code']} |")

if __name__ == "__main__":
    main()
