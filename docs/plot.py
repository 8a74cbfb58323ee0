"""Plot the small-scale runs: val_loss.png (val loss against tokens and training wall-clock, mean over
seeds with a min..max band) and beta_heatmap.png (mean beta per layer and sublayer, last gates record);
with --memorize, memorize.png from docs/memorize.py's output (loss against step, one panel per lr);
with --sweep, lr_sweep.png from a learning-rate sweep (final val loss against peak lr, per variant);
with --ladder, ladder.png from the size ladder's logs (docs/ladder.py: each DDL variant's gap to the
additive baseline against tokens per non-embedding parameter, per token and at equal training time) and
ladder_passes.png (the runs of several passes: train and val loss against step);
with --ablations, ablations.png (each setting's final val loss per seed, beside its reference) and
k_stability.png from docs/ablations.py's reference runs (k's gate-audit probes).

    python docs/plot.py runs                   # runs/<variant>-<seed>/log.jsonl -> plots/*.png
    python docs/plot.py runs --out docs        # redraw the committed figures in docs/
    python docs/plot.py "runs/*-1" --out /tmp  # a glob of run folders
    python docs/plot.py --memorize memorize.jsonl
    python docs/plot.py --sweep sweep          # sweep/<variant>_<lr>_<seed>/log.jsonl -> plots/lr_sweep.png
    python docs/plot.py --ladder docs/records/ladder --out docs    # docs/ladder.png, ladder_passes.png
    python docs/plot.py --ablations docs/records --out docs       # docs/ablations.png, k_stability.png

Drawing needs matplotlib (pip install matplotlib); --help does not.
"""
import argparse
import collections
import glob
import json
import os
import sys

import numpy as np

plt = None  # matplotlib.pyplot, imported by main: --help and the data functions run without it

LABELS = {"additive": "additive", "delta": "DDL d_v=1", "cc": "DDL-CC d_v=4 + EC",
          "tc": "DDL-TC d_v=4 + EC", "write": "write-only d_v=4 (CC + EC)"}
SUBLAYERS = ("attn", "mlp")


def load_runs(pattern):
    """{variant: [records of one seed, ...]}; a run folder is named <variant>-<seed>."""
    runs = {}
    for folder in sorted(glob.glob(os.path.join(pattern, "*") if os.path.isdir(pattern) else pattern)):
        if os.path.isfile(os.path.join(folder, "log.jsonl")):
            with open(os.path.join(folder, "log.jsonl")) as f:
                variant = os.path.basename(os.path.normpath(folder)).rsplit("-", 1)[0]
                runs.setdefault(variant, []).append([json.loads(line) for line in f])
    return {v: runs[v] for v in [*LABELS, *sorted(runs)] if v in runs}  # LABELS' order first


def val_points(records):
    """{step: (tokens in millions, training seconds, val loss)} of one run, after step 0."""
    val = [r for r in records if r["type"] == "val" and r["step"] > 0]
    train = [r for r in records if r["type"] == "train"]
    steps = np.array([r["step"] for r in val])
    seconds = np.interp(steps, [0] + [r["step"] for r in train], [0] + [r["train_time_s"] for r in train])
    tokens = steps * records[0]["config"]["total_batch"] * records[0]["model_config"]["block_size"] / 1e6
    return {int(s): (t, sec, r["loss"]) for s, t, sec, r in zip(steps, tokens, seconds, val)}


def aligned(seeds):
    """The steps that every seed (run) has a val record at, and tokens, seconds and losses there, each an
    array (seeds, steps): seeds with other eval schedules meet on their common steps."""
    points = [val_points(records) for records in seeds]
    steps = sorted(set.intersection(*(set(p) for p in points)))
    values = np.array([[p[s] for s in steps] for p in points]).reshape(len(points), len(steps), 3)
    return steps, values[..., 0], values[..., 1], values[..., 2]


def final_beta(records):
    """Mean beta of the last gates record as a (layer, sublayer) array."""
    gates = [r for r in records if r["type"] == "gates"][-1]["gates"]
    beta = np.zeros((1 + max(g["layer"] for g in gates), len(SUBLAYERS)))
    for g in gates:
        beta[g["layer"], SUBLAYERS.index(g["sublayer"])] = g["beta_mean"]
    return beta


def plot_val_loss(runs, path):
    """Mean val loss over seeds with a min..max band, at the steps all seeds evaluated (seeds that share no
    step: each its own line); the y-axis spans the losses drawn, which leave out step 0 (loss ~10.9)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    drawn = []
    for variant, seeds in runs.items():
        color = None
        for group in [seeds] if aligned(seeds)[0] else [[records] for records in seeds]:
            _, tokens, seconds, losses = aligned(group)
            drawn.append(losses)
            for ax, x in zip(axes, (tokens[0], seconds.mean(0))):  # wall-clock: mean over seeds
                line, = ax.plot(x, losses.mean(0), marker="o", ms=3, color=color,
                                label=None if color else LABELS.get(variant, variant))
                ax.fill_between(x, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2)
            color = line.get_color()
    low, high = min(d.min() for d in drawn), max(d.max() for d in drawn)
    margin = 0.05 * (high - low) or 0.1
    axes[0].set(ylabel="val loss", ylim=(low - margin, high + margin))
    xlabels = ("training tokens (millions)", "training seconds (no compile step, no evals)")
    for ax, xlabel in zip(axes, xlabels):
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, title="mean over seeds, band min..max", title_fontsize=8)
    fig.savefig(path, dpi=120)


def plot_beta(runs, path):
    gated = {v: s for v, s in runs.items() if any(r["type"] == "gates" for r in s[0])}
    if not gated:
        return
    fig, axes = plt.subplots(1, len(gated), figsize=(2 * len(gated) + 1.2, 5), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, (variant, seeds) in zip(axes[0], gated.items()):
        beta = np.mean([final_beta(records) for records in seeds], axis=0)
        image = ax.imshow(beta, cmap="coolwarm", vmin=0, vmax=2, aspect="auto")
        for (i, j), b in np.ndenumerate(beta):
            ax.text(j, i, f"{b:.1f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(SUBLAYERS)), SUBLAYERS)
        ax.set_title(LABELS.get(variant, variant).replace(" d_v", "\nd_v"), fontsize=9)
    axes[0][0].set(ylabel="layer", yticks=range(beta.shape[0]))
    fig.suptitle("mean beta at the last gates record (mean over seeds)", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8,
                 label="beta (0 identity, 1 projection, 2 reflection)")
    fig.savefig(path, dpi=120)


def plot_memorize(path_in, path):
    rows = [json.loads(line) for line in open(path_in)]
    lrs = sorted({r["lr"] for r in rows})
    fig, axes = plt.subplots(1, len(lrs), figsize=(4 * len(lrs), 3.8), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, lr in zip(axes[0], lrs):
        for r in (r for r in rows if r["lr"] == lr):
            dashed = "-" in r["variant"] and r["variant"] != "write-cc"  # the ablations
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], ls="--" if dashed else "-",
                    label=r["variant"])
        ax.set(title=f"lr {lr:g}", xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].set(ylabel="train loss on the fixed random batch")
    axes[0][-1].legend(fontsize=7)
    fig.savefig(path, dpi=120)


SweepRun = collections.namedtuple("SweepRun", "variant lr seed final diverged_at")


def sweep_run(folder):
    """One run of a learning-rate sweep, named <variant>_<lr>_<seed>: its final val loss (None if it has
    no eval at max_steps) and the step it diverged at (None if it did not)."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    config = records[0]["config"]
    final = [r["loss"] for r in records if r["type"] == "val" and r["step"] == config["max_steps"]]
    diverged = [r.get("step") for r in records if r["type"] == "diverged"]
    return SweepRun(os.path.basename(os.path.normpath(folder)).split("_")[0], config["lr"], config["seed"],
                    final[0] if final else None, diverged[0] if diverged else None)


def plot_sweep(folder, path):
    """Final val loss against peak lr: seed 1 as a line; where an lr has more seeds, their mean with a
    min..max bar (drawn a little to the right); a diverged run as an x at the top of the axes."""
    runs = [sweep_run(os.path.dirname(p)) for p in glob.glob(os.path.join(folder, "*", "log.jsonl"))]
    present = {r.variant for r in runs}
    variants = [v for v in [*LABELS, *sorted(present - set(LABELS))] if v in present]  # LABELS' order first
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for variant in variants:
        mine = [r for r in runs if r.variant == variant]
        seed1 = sorted((r.lr, r.final) for r in mine if r.seed == 1 and r.final is not None)
        line, = ax.plot(*zip(*seed1), marker="o", ms=4, label=LABELS.get(variant, variant) + " (seed 1)")
        for lr in sorted({r.lr for r in mine}):
            losses = [r.final for r in mine if r.lr == lr and r.final is not None]
            if len(losses) > 1:
                mean = np.mean(losses)
                ax.errorbar(lr * 1.04, mean, yerr=[[mean - min(losses)], [max(losses) - mean]], fmt="s",
                            ms=4, mfc="white", color=line.get_color(), capsize=3)
        for r in (r for r in mine if r.diverged_at is not None):
            ax.plot(r.lr, 1, "x", ms=9, color=line.get_color(), transform=ax.get_xaxis_transform(),
                    clip_on=False)
            ax.annotate(f"diverged at {r.diverged_at}", (r.lr, 0.97), xycoords=("data", "axes fraction"),
                        fontsize=7, ha="right")
    ax.plot([], [], "s", mfc="white", color="gray", label="mean of seeds, bar min..max")
    ax.set(xscale="log", xlabel="peak learning rate (min_lr = lr / 10)", ylabel="final val loss (step 530)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_ladder(folder, path):
    """Three panels: each DDL variant's gap to the baseline's val loss (best lr each, mean of seeds; bars:
    the larger of the two seed spreads) per token and at the baseline's training time against tokens per
    non-embedding parameter (log), and per token against the model's non-embedding parameters (log). A
    line per variant and number of passes; each point is labelled with its size."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ladder  # docs/ladder.py: the table this figure draws
    rows = ladder.table(ladder.load_logs(folder))
    base = {(r["size"], r["passes"]): r for r in rows if r["variant"] == "additive"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), layout="constrained", sharey=True)
    panels = ((axes[0], "tokens_per_param", "gap"), (axes[1], "tokens_per_param", "gap_equal_time"),
              (axes[2], "params", "gap"))
    for key in sorted({(r["variant"], r["passes"]) for r in rows if r["gap"] is not None}):
        mine = sorted((r for r in rows if (r["variant"], r["passes"]) == key and r["gap"] is not None),
                      key=lambda r: r["params"])
        bars = [max(r["spread"], base[r["size"], r["passes"]]["spread"]) for r in mine]
        label = f"{LABELS.get(key[0], key[0])}, {key[1]} pass{'es' if key[1] > 1 else ''}"
        for ax, along, gap in panels:
            x = [r[along] for r in mine]
            y = [float("nan") if r[gap] is None else r[gap] for r in mine]  # None: no pair on one card
            ax.errorbar(x, y, yerr=bars, marker="o", ms=4, capsize=3, label=label)
            for r, xi, yi in zip(mine, x, y):
                if not np.isnan(yi):  # no point drawn, no label
                    ax.annotate(r["size"], (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=7)
    titles = ("per token (equal steps)", "at the baseline's training time", "per token, by model size")
    for (ax, along, _), title in zip(panels, titles):
        ax.axhline(0, color="gray", lw=0.8)
        if along == "params":  # d256's 3.1M to the 124m shape's 85M
            ax.set(xscale="log", xlabel="non-embedding parameters", title=title, xlim=(1e6, 2e8))
        else:  # the ladder's span: d768 once (0.2) to d256 four times (22)
            ax.set(xscale="log", xlabel="training tokens per non-embedding parameter", title=title,
                   xlim=(0.1, 50))
        ax.grid(alpha=0.3, which="both")
    axes[0].set(ylabel="val loss: DDL - additive (best lr each)")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_passes(folder, path):
    """The runs of more than one pass, one panel per size: each variant at its best lr (seed 1337), its val
    loss (held-out text) and its train loss (a mean over 50 steps: text seen before, after the first pass)
    against step, the passes' ends marked. Where the two part tells whether a lead on held-out text is lost
    to fitting the repeated text."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ladder
    logs = ladder.load_logs(folder)
    best = {c: ladder.best_lr(logs, *c) for c in ladder.cells() if c[2] > 1}
    cells = [c for c, lr in best.items() if lr]
    sizes = [size for size in ladder.SIZES if any(c[0] == size for c in cells)]
    if not sizes:  # no sweep of several passes finished yet: no figure
        return
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 4.5), layout="constrained",
                             squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for k, (_, variant, passes) in enumerate(c for c in cells if c[0] == size):
            log = logs[ladder.name(size, variant, passes, best[size, variant, passes], ladder.SWEEP_SEED)]
            train = [(r["step"], r["loss"]) for r in log if r["type"] == "train"]
            steps, losses = np.array(train).T
            n = min(5, len(losses))  # log_interval 10: a mean over 50 steps, ending at its step
            smooth = np.convolve(losses, np.ones(n) / n, mode="valid")
            val = [(r["step"], r["loss"]) for r in log if r["type"] == "val" and r["step"] > 0]
            label = LABELS.get(variant, variant)
            ax.plot(steps[n - 1:], smooth, color=f"C{k}", lw=0.8, alpha=0.6, label=f"{label}: train")
            ax.plot(*zip(*val), color=f"C{k}", marker="o", ms=4, label=f"{label}: val (held out)")
        for end in range(1, passes):
            ax.axvline(end * ladder.steps(1), color="gray", lw=0.8, ls=":")
        ax.set(xlabel=f"step ({passes} passes over the training text; dotted: a pass ends)", ylabel="loss",
               title=f"{size}, each variant at its best lr, seed {ladder.SWEEP_SEED}", ylim=(3.8, 6.5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def ablation_logs(records):
    """docs/ablations.py and docs/ladder.py as modules, and the logs of records/ablations/ and
    records/ladder/ (records: the folder holding both)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ablations  # docs/ablations.py
    import ladder
    return (ablations, ladder, ladder.load_logs(os.path.join(records, "ablations")),
            ladder.load_logs(os.path.join(records, "ladder")))


def plot_k_stability(records, path):
    """Four panels against step, one line per DDL reference of docs/ablations.py (its K_SEED run, else its
    seed-1337 one): the mean |k~|, the cosine of each token's k with the previous eval's and with the step
    before's (where the log has it), and of the attention's k with the MLP's, each averaged over layers and
    sublayers. records: the folder holding ladder/ and ablations/."""
    ablations, ladder, logs, ladder_logs = ablation_logs(records)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), layout="constrained")
    for setting in ("delta", "cc", "tc"):
        log = (ablations.log_of(logs, ladder_logs, setting, ablations.K_SEED)  # the run that logs k_cos_step
               or ablations.log_of(logs, ladder_logs, setting, ladder.SWEEP_SEED))
        if log is None:
            continue
        c = ablations.k_curves(log)
        for ax, key in zip(axes, ("k_tilde_norm", "k_cos_before", "k_cos_step", "k_cos_attn_mlp")):
            points = [(s, y) for s, y in zip(c["step"], c[key]) if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=LABELS.get(setting, setting))
    titles = ("mean |k~| (the sublayer's output)", "cos(k, k at the previous eval), same token",
              "cos(k, k one step earlier), same token", "cos(attention's k, MLP's k), same block")
    for ax, title in zip(axes, titles):
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        if not ax.lines:  # a quantity no log has yet (k_cos_step: train.py from 2026-12-07)
            ax.text(0.5, 0.5, "no run has logged it yet", transform=ax.transAxes, ha="center")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_ablations(records, path):
    """Each setting of docs/ablations.py with runs: every seed's final val loss (dots) and their mean (a
    line), coloured by the reference it is compared with (its family); a setting whose mean differs from
    its reference's by at least twice the larger seed spread (ablations.table) is starred. records: the
    folder holding ladder/ and ablations/."""
    ablations, _, logs, ladder_logs = ablation_logs(records)
    rows = ablations.table(logs, ladder_logs)
    families = [name for name, (_, _, ref) in ablations.SETTINGS.items() if ref is None]  # the references
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 4.2), layout="constrained")
    for x, r in enumerate(rows):
        color = f"C{families.index(r['reference'] or r['setting'])}"
        ax.plot([x] * len(r["losses"]), r["losses"], "o", color=color, ms=4, alpha=0.7)
        ax.hlines(r["loss"], x - 0.3, x + 0.3, color=color, lw=2)
        if r["counts"]:
            ax.annotate("*", (x, max(r["losses"])), ha="center", va="bottom", fontsize=14)
    ax.set_xticks(range(len(rows)), [r["setting"] + ("\n(reference)" if r["reference"] is None else "")
                                     for r in rows], fontsize=8)
    ax.set_ylabel("final val loss (held out)")
    ax.set_title(f"ablations at {ablations.SIZE}, one pass: seeds (dots) and their mean (line)\n"
                 "*: differs from its reference by >= 2x the larger seed spread", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=120)


def main():
    global plt
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="?", default="runs", help="a folder of run folders, or a glob of them")
    p.add_argument("--out", default="plots", help="output folder (default: plots; docs: the committed ones)")
    p.add_argument("--memorize", help="plot docs/memorize.py's JSON lines instead")
    p.add_argument("--sweep", help="plot a folder of <variant>_<lr>_<seed> runs of a learning-rate sweep")
    p.add_argument("--ladder", help="plot the size ladder from a folder of its logs (docs/ladder.py)")
    p.add_argument("--ablations", help="plot the ablations and k's stability from the folder holding "
                   "ladder/ and ablations/")
    args = p.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("docs/plot.py: error: drawing needs matplotlib: pip install matplotlib")
    os.makedirs(args.out, exist_ok=True)
    if args.memorize:
        return plot_memorize(args.memorize, os.path.join(args.out, "memorize.png"))
    if args.sweep:
        return plot_sweep(args.sweep, os.path.join(args.out, "lr_sweep.png"))
    if args.ladder:
        plot_passes(args.ladder, os.path.join(args.out, "ladder_passes.png"))
        return plot_ladder(args.ladder, os.path.join(args.out, "ladder.png"))
    if args.ablations:
        plot_ablations(args.ablations, os.path.join(args.out, "ablations.png"))
        return plot_k_stability(args.ablations, os.path.join(args.out, "k_stability.png"))
    runs = load_runs(args.runs)
    if not runs:
        raise SystemExit(f"no <variant>-<seed>/log.jsonl in {args.runs!r}")
    plot_val_loss(runs, os.path.join(args.out, "val_loss.png"))
    plot_beta(runs, os.path.join(args.out, "beta_heatmap.png"))
    print("wrote the figures in", args.out)


if __name__ == "__main__":
    main()
