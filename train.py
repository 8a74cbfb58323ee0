"""
Train a Deep Delta Learning GPT (ddl.py) on token shards (prepare_data.py), nanoGPT style.

    python train.py --preset=smoke                      # a tiny DDL model on smoke/kjv.txt, CPU
    torchrun --standalone --nproc_per_node=8 train.py --preset=124m --data_dir=data/fineweb_edu
    python train.py --preset=124m --resume              # continue out_dir/ckpt.pt exactly
    python train.py --mode=sample --out_dir=out         # generate from a checkpoint

Every setting is a --key=value override of a TrainConfig default or a ddl.GPTConfig one:
"""
import codecs
import dataclasses
import glob
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from ddl import GPT, ConfigError, GPTConfig, setting
from prepare_data import DataError, check_folder, hms, read_shard
from rundir import (HERE, all_finite, claim, load_checkpoint, load_model, parse_settings, provenance, release,
                    resume_changes, save_atomic, setup, start_log)

SMOKE_TEXT = "smoke/kjv.txt"  # the smoke preset's corpus (smoke/README.md), under HERE

@dataclasses.dataclass
class TrainConfig:
    mode: str = setting("train", "train | sample")
    preset: str = setting("", "124m | 353m | smoke: a named set of values, applied before the other keys")
    out_dir: str = setting("out", "ckpt.pt and log.jsonl go here")
    overwrite: bool = setting(False, "start afresh where out_dir holds a run (deletes its files)")
    data_dir: str = setting("data/fineweb_edu", f"prepare_data.py's shards; the smoke preset: {SMOKE_TEXT}")
    seed: int = setting(1337, "model init and data order")
    batch_size: int = setting(16, "micro-batch: sequences per process per forward")
    total_batch: int = setting(480, "sequences per optimizer step over all processes (gradient accumulation)")
    max_steps: int = setting(100_000, "stop after this many optimizer steps")
    decay_steps: int = setting(0, "length of the lr schedule; 0: max_steps (set it to stop early, resume on)")
    lr: float = setting(1e-3, "peak learning rate (paper §4.1)")
    min_lr: float = setting(1e-4, "final lr of the cosine decay (our choice, lr / 10; the paper gives none)")
    warmup_steps: int = setting(2000, "linear warm-up steps")
    weight_decay: float = setting(0.1, "AdamW weight decay, by role (GPT.DECAYED: weights mapping features)")
    beta1: float = setting(0.9, "AdamW first-moment decay")
    beta2: float = setting(0.95, "AdamW second-moment decay")
    grad_clip: float = setting(1.0, "global gradient-norm clip")
    eval_interval: int = setting(1000, "steps between val loss + gate audit")
    val_tokens: int = setting(1_048_576, "val budget: the first tokens of the val shard, whole windows")
    hellaswag: str = setting("", "HellaSwag val file scored at each eval (hellaswag.py); fetch: download it; "
                                 "'': off")
    log_interval: int = setting(10, "steps between train log lines")
    ckpt_interval: int = setting(1000, "steps between checkpoints (and one at the end)")
    resume: bool = setting(False, "continue from out_dir/ckpt.pt")
    compile: bool = setting(True, "torch.compile (CUDA only), as one graph: a graph break is an error")
    compile_mode: str = setting("default", "torch.compile's mode: default | reduce-overhead (CUDA graphs) | "
                                           "max-autotune (CUDA graphs) | max-autotune-no-cudagraphs")
    fused: str = setting("auto", "the state's rewrite in fused.py's Triton kernels: auto (on CUDA where "
                                 "fused.install accepts the model: d_v > 1) | true (or an error) | false")
    device: str = setting("auto", "auto | cpu | cuda")
    peak_tflops: float = setting(0.0, "bf16 peak per GPU for MFU where the card is not in PEAK_TFLOPS")
    sample_tokens: int = setting(64, "tokens generated at the end of training and in --mode=sample")
    prompt: str = setting("The", "the sample's prompt")
    num_samples: int = setting(1, "samples drawn, one after the other")
    temperature: float = setting(0.8, "sampling temperature; 0: greedy")
    top_k: int = setting(200, "sample from the top_k likeliest ids; 0: from all")

    def __post_init__(self):
        at_least = dict(batch_size=1, total_batch=1, val_tokens=1, eval_interval=1, log_interval=1,
                        ckpt_interval=1, seed=0, max_steps=0, decay_steps=0, warmup_steps=0, sample_tokens=0,
                        weight_decay=0, peak_tflops=0, num_samples=1, temperature=0, top_k=0)
        checks = [(k, getattr(self, k) >= low, f"must be >= {low}") for k, low in at_least.items()]
        checks += [(k, 0 <= getattr(self, k) < 1, "must lie in [0, 1)") for k in ("beta1", "beta2")]
        checks += [("lr", 0 < self.lr < math.inf, "must be > 0 and finite"),
                   ("grad_clip", self.grad_clip > 0, "must be > 0"),
                   ("min_lr", 0 <= self.min_lr <= self.lr, f"must lie in [0, lr={self.lr!r}]"),
                   ("mode", self.mode in ("train", "sample"), "allowed: train, sample (bench.py benchmarks)"),
                   ("preset", self.preset in ("", *PRESETS), f"allowed: {', '.join(PRESETS)}")]
        choices = dict(device=("auto", "cpu", "cuda"), fused=("auto", "true", "false"),
                       compile_mode=COMPILE_MODES)
        checks += [(k, getattr(self, k) in v, f"allowed: {', '.join(v)}") for k, v in choices.items()]
        checks += [("overwrite", not (self.overwrite and self.resume), "excludes --resume: choose one"),
                   ("out_dir", self.out_dir.strip() != "", "must name a folder")]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"--{key}={getattr(self, key)!r}: {allowed}")

PRESETS = {
    # micro-batch 30: faster than 16 (H200, docs/performance.md), and divides 480 on 1, 2, 4, 8, 16 GPUs
    "124m": dict(n_layer=12, n_head=6, head_dim=128, n_embd=768, block_size=1024, batch_size=30),
    "353m": dict(n_layer=24, n_head=8, head_dim=128, n_embd=1024, block_size=1024),
    "smoke": dict(n_layer=2, n_head=2, head_dim=32, n_embd=64, block_size=64, d_v=4, compressor="cc",
                  batch_size=16, total_batch=16, max_steps=200, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                  eval_interval=50, val_tokens=4096, log_interval=20, ckpt_interval=200, compile=False,
                  out_dir="out-smoke", data_dir=SMOKE_TEXT),
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # dense bf16, per GPU

def parse_args(argv, kinds=(TrainConfig, GPTConfig), doc=__doc__):  # --preset's values come first
    return parse_settings(argv, kinds, doc, PRESETS)

# ----------------------------------------------------------------------------- data

class TokenStream:
    """Windows of T + 1 tokens from token arrays (shards) in a seeded order, new every epoch: the shards
    permuted, then the windows of each; rank r of W gets windows r, r + W, ... State: epoch, shard, window."""
    def __init__(self, shards, T, B, seed, rank=0, world=1):
        self.shards, self.T, self.B, self.seed, self.rank, self.world = shards, T, B, seed, rank, world
        if all((len(s) - 1) // T < world * B for s in shards):
            raise DataError(f"too few train tokens: no shard holds batch_size={B} x {world} processes "
                            f"windows of block_size + 1 = {T + 1} tokens (a window never crosses two shards)")
        self.load_state(dict(epoch=0, shard=0, window=0))

    def load_state(self, s):
        self.epoch, self.shard, self.window = s["epoch"], s["shard"], s["window"]
        rng = lambda *key: np.random.default_rng([self.seed, self.epoch, *key])
        self.tokens = self.shards[rng().permutation(len(self.shards))[self.shard]]
        n = (len(self.tokens) - 1) // self.T // self.world * self.world  # windows, a multiple of world
        self.windows = rng(self.shard).permutation(n)[self.rank::self.world]

    def state(self):
        return dict(epoch=self.epoch, shard=self.shard, window=self.window)

    def next_batch(self):
        while self.window + self.B > len(self.windows):  # shard exhausted: the next shard, or the next epoch
            last = self.shard + 1 == len(self.shards)
            self.load_state(dict(epoch=self.epoch + last, shard=0 if last else self.shard + 1, window=0))
        idx = self.windows[self.window:self.window + self.B]
        self.window += self.B
        x = np.stack([self.tokens[i * self.T:(i + 1) * self.T + 1] for i in idx]).astype(np.int64)
        return torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])

def load_data(cfg, vocab_size):
    """(train shards, val tokens) of data_dir or SMOKE_TEXT (90% to train on); ids checked < vocab_size."""
    d = cfg.data_dir
    if d == SMOKE_TEXT:
        text = open(os.path.join(HERE, SMOKE_TEXT), encoding="utf-8").read()
        tokens = np.array([50256] + tiktoken.get_encoding("gpt2").encode_ordinary(text), np.uint16)  # EOT
        cut = len(tokens) * 9 // 10
        parts = [(f"{d} (train)", tokens[:cut]), (f"{d} (val)", tokens[cut:])]
    else:
        if os.path.exists(os.path.join(d, "run.json")):  # prepare_data.py's mark of an unfinished run
            raise DataError(f"--data_dir={d}: prepare_data.py did not finish there; rerun it to complete it")
        train, val = (sorted(glob.glob(os.path.join(d, f"*_{split}_*.bin"))) for split in ("train", "val"))
        if not (train and val):
            missing = " and ".join(f"*_{s}_*.bin" for s, got in (("train", train), ("val", val)) if not got)
            raise DataError(f"--data_dir={d}: no {missing} shards there; make them with prepare_data.py")
        parts = [(p, read_shard(p)) for p in train + val[:1]]
    for name, tokens in parts:  # np.max of a 100M-token shard: ~10 ms from the page cache
        if len(tokens) and (top := int(tokens.max())) >= vocab_size:
            raise DataError(f"{name}: token id {top} >= vocab_size={vocab_size}: another tokenizer's shard?")
    return [t for _, t in parts[:-1]], parts[-1][1]

# ----------------------------------------------------------------------------- the model and its step

def lr_at(step, cfg):
    """Linear warm-up to lr over warmup_steps, then cosine decay to min_lr at decay_steps (or max_steps)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, (cfg.decay_steps or cfg.max_steps) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)

def compiled(cfg, dev):  # on CUDA only: on a CPU, compiling costs more than it saves
    return cfg.compile and dev.type == "cuda"

def cuda_graphs(cfg, dev):  # the compiled model's steps replayed as CUDA graphs (torch.compile's graph trees)
    return compiled(cfg, dev) and cfg.compile_mode in ("reduce-overhead", "max-autotune")

def choose_path(cfg, raw, dev):
    """--fused: the model and a line naming its state's path and why. auto takes fused.py on CUDA wherever
    fused.install accepts the model (its config and numerical checks); else ddl.py, with install's reason."""
    if cfg.fused == "false" or (cfg.fused == "auto" and dev.type != "cuda"):
        return raw, f"ddl.py (--fused={cfg.fused}{': no CUDA' if cfg.fused == 'auto' else ''})"
    import fused  # only here: it needs Triton
    try:
        return fused.install(raw), f"fused.py (--fused={cfg.fused})"
    except ConfigError as e:
        if cfg.fused == "true":
            raise
        return raw, f"ddl.py (--fused=auto: {e})"

def check_compile(cfg, mcfg, dev, world):
    """Refuse what a compiled run cannot do, before anything is built or written."""
    if compiled(cfg, dev) and mcfg.check_spectrum:
        raise ConfigError("--check_spectrum=true reads values back in every forward, which a compiled graph "
                          "cannot: add --compile=false")
    if cuda_graphs(cfg, dev) and world > 1:
        raise ConfigError(f"--compile_mode={cfg.compile_mode!r} (CUDA graphs) is untested under torchrun: "
                          "use default or max-autotune-no-cudagraphs")

def build(cfg, mcfg, dev, world=1):
    """The seeded model, its compiled form on CUDA (else itself) and its optimizer: train.py's, bench.py's."""
    check_compile(cfg, mcfg, dev, world)
    torch.manual_seed(cfg.seed)
    raw, path = choose_path(cfg, GPT(mcfg).to(dev), dev)
    raw.path = path  # the run's header and log name it
    # one graph: a graph break (a host sync, an untraceable call) fails the first step, naming its line,
    # instead of splitting the model and keeping tensors alive across the pieces
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    model = torch.compile(raw, fullgraph=True, mode=mode) if compiled(cfg, dev) else raw
    if cuda_graphs(cfg, dev):
        # a graph's outputs, the backward's gradients too, live in its memory, which the next replay reuses;
        # gradients that already exist are accumulated into in place, so they are made here and only zeroed
        for p in raw.parameters():
            p.grad = torch.zeros_like(p)
    return raw, model, raw.configure_optimizers(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dev.type)

def train_step(model, raw, opt, next_batch, accum, lr, cfg, ctx):
    """An optimizer step over accum micro-batches (DDP all-reduces on the last): mean loss, norm, no sync."""
    for g in opt.param_groups:
        g["lr"] = lr
    dev = raw.wte.weight.device
    graphs, loss_sum = cuda_graphs(cfg, dev), 0.0
    for micro in range(accum):
        x, y = (t.to(dev, non_blocking=True) for t in next_batch())
        last = not isinstance(model, DDP) or micro == accum - 1
        if graphs:  # a new replay: the last one's outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with nullcontext() if last else model.no_sync():
            with ctx:
                loss = model(x, y)
            (loss / accum).backward()
        loss_sum = loss_sum + loss.detach() / accum  # a new tensor: the next replay leaves it as it is
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=not graphs)  # CUDA graphs: the gradients stay where build() made them
    return loss_sum, norm

# ----------------------------------------------------------------------------- training

def val_windows(val, cfg, T, rank, world):
    """This rank's share of the val shard's first val_tokens // T whole windows, and their number overall."""
    n_windows = min(cfg.val_tokens, len(val) - 1) // T
    return list(range(rank, n_windows, world)), n_windows

def probe_batch(val, cfg, T, rank, world):
    """The gate audit's fixed input: this rank's last val batch (at most batch_size rows of T tokens), on
    the CPU; None where the rank holds no window."""
    windows = val_windows(val, cfg, T, rank, world)[0]
    if not windows:
        return None
    last = windows[(len(windows) - 1) // cfg.batch_size * cfg.batch_size:]
    return torch.from_numpy(np.stack([val[w * T:(w + 1) * T] for w in last]).astype(np.int64))

@torch.no_grad()
def evaluate(model, raw, val, cfg, ctx, dev, rank, world, audit=None, k_before=None, k_step=None):
    """Mean loss over the val shard's first val_tokens // block_size whole windows; the gate audit of the
    rows `audit` (probe_batch: the same at every eval; None: no audit), with k compared to k_before (the
    last eval's) and to k_step (the step before's, where train() probed it); this eval's k."""
    T = raw.config.block_size
    windows, n_windows = val_windows(val, cfg, T, rank, world)
    total = torch.zeros((), device=dev)
    model.eval()
    for i in range(0, len(windows), cfg.batch_size):
        rows = np.stack([val[w * T:(w + 1) * T + 1] for w in windows[i:i + cfg.batch_size]]).astype(np.int64)
        rows = torch.from_numpy(rows).to(dev)
        if cuda_graphs(cfg, dev):
            torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            total += model(rows[:, :-1], rows[:, 1:]).float() * len(rows)  # added up before the next replay
    gates, k = None, None
    if audit is not None:
        with ctx:
            gates, k = raw.gate_audit(audit.to(dev), k_before, k_step)
    model.train()
    if world > 1:
        dist.all_reduce(total)
    return total.item() / n_windows, gates, k

def variant(mcfg):
    if mcfg.residual == "additive":
        return "additive baseline"
    rule = "DDL" if mcfg.residual == "delta" else "write-only control"
    bound = "" if mcfg.beta_bound == 2 else f", beta < {mcfg.beta_bound:g}"  # the ablation without reflection
    reads = "" if mcfg.d_v == 1 else f" {mcfg.compressor.upper()}{' + EC' if mcfg.embed_conv else ''}"
    return f"{rule}{reads}, d_v = {mcfg.d_v}{bound}"

def train(cfg, mcfg, kept):
    """kept: what a Ctrl-C leaves, filled as the run goes: the log, the checkpoint and its step."""
    rank, world, dev, ctx = setup(cfg)
    B, T, master = cfg.batch_size, mcfg.block_size, rank == 0
    if cfg.total_batch % (B * world):
        raise ConfigError(f"--total_batch={cfg.total_batch} must be a multiple of batch_size x processes = "
                          f"{B * world}")
    if cfg.val_tokens < T:
        raise ConfigError(f"--val_tokens={cfg.val_tokens}: must be >= block_size={T} (one whole val window)")
    check_folder("--out_dir", cfg.out_dir)  # before the data load and the build
    accum = cfg.total_batch // (B * world)
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    changed = resume_changes(ckpt, cfg, mcfg, world) if ckpt else None
    train_shards, val = load_data(cfg, mcfg.vocab_size)
    if len(val) < T + 1:
        raise DataError(f"the val shard holds {len(val)} token{'s' * (len(val) != 1)}, fewer than "
                        f"block_size + 1 = {T + 1}")
    hs = hellaswag.from_setting(cfg.hellaswag)  # read once: a missing file stops the run before it starts
    # the eval line names the file scored: a stand-in (docs/standin.py) must not pass for HellaSwag
    scored = os.path.basename(hellaswag.DEFAULT_FILE if cfg.hellaswag == "fetch" else cfg.hellaswag)
    resumed = ckpt["step"] if ckpt else None
    step = resumed or 0
    raw, model, opt = build(cfg, mcfg, dev, world)  # before the claim: a bad setting writes nothing
    stream = TokenStream(train_shards, T, B, cfg.seed, rank, world)
    if ckpt:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        stream.load_state(ckpt["data"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
    if master:  # the one process that writes; nothing is written before this
        claim(cfg)
        start_log(log_path, resumed)
        kept.update(log=log_path, ckpt=ckpt_path, step=resumed)
    # evaluation runs the model without DDP: a rank that holds no val window must join no collective (DDP's
    # forward broadcasts buffers) but the val loss's all_reduce
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None) if world > 1 else model
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # the first step with a non-finite loss or gradient norm (-1: none), on the device: read where we sync
    bad_step = torch.full((), -1, dtype=torch.long, device=dev)
    # k on the audit's first sequence: the last eval's ("k", the next eval's k_cos_before) and the step
    # before an eval's ("k_step", its k_cos_step: how far one optimizer step turns k)
    probe = {}
    # the audit's rows, the same at every eval; None: no audit (the baseline, or a rank without val windows)
    probe_idx = probe_batch(val, cfg, T, rank, world) if raw.config.residual != "additive" else None

    def log(rec, line=None):
        if master:
            if line:
                print(line, flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def check_finite(weights=False):  # weights: also every weight and AdamW moment (never checkpoint them)
        bad, what = bad_step.item(), "the loss or gradient norm is"
        if bad < 0 and weights and not all_finite([*raw.parameters(), *opt.state.values()]):
            bad, what = step, "a weight or AdamW's state is"
        if bad >= 0:
            log(dict(type="diverged", step=bad))
            raise FloatingPointError(f"{what} not finite at step {bad}: training stopped, {ckpt_path} is "
                                     "left as it was; lower --lr or lengthen --warmup_steps")

    def save_checkpoint():
        check_finite(weights=True)
        if master:
            save_atomic(dict(model=raw.state_dict(), optimizer=opt.state_dict(), step=step, world_size=world,
                             config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mcfg),
                             data=stream.state(), rng=dict(cpu=torch.get_rng_state())), ckpt_path)
            kept["step"] = step

    def run_eval():
        vloss, gates, probe["k"] = evaluate(model, raw, val, cfg, ctx, dev, rank, world, probe_idx,
                                            probe.get("k"), probe.pop("k_step", None))
        acc = hellaswag.evaluate(raw, hs, dev, ctx, rank, world) if hs else None  # raw: not compiled, not DDP
        log(dict(type="val", step=step, loss=vloss, ppl=math.exp(vloss)),
            f"step {step:6d} | val loss {vloss:.4f} | ppl {math.exp(vloss):.2f}"
            + (f" | {scored} acc_norm {acc['acc_norm']:.4f} acc {acc['acc']:.4f}" if acc else ""))
        if acc:
            log(dict(type="hellaswag", step=step, **acc))
        if gates:
            log(dict(type="gates", step=step, gates=gates))

    mode = (f"compiled ({cfg.compile_mode}{', CUDA graphs' if cuda_graphs(cfg, dev) else ''})"
            if compiled(cfg, dev) else "eager")
    dtype = "bf16 autocast" if dev.type == "cuda" else "fp32"
    log(dict(type="config", config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mcfg),
             device=name, world_size=world, threads=torch.get_num_threads(), torch=torch.__version__,
             **provenance(), grad_accum=accum, params=raw.num_params(), resumed_from=resumed,
             changed=changed, variant=variant(mcfg), path=raw.path, mode=mode, dtype=dtype),
        f"{name} x{world} | {variant(mcfg)} | {raw.path} | {mode} | {dtype} | {raw.num_params():,} params | "
        f"accum {accum} | {cfg.total_batch * T:,} tokens/step"
        + (f" | resumed at step {step}, changed: {changed or 'nothing'}" if ckpt else ""))
    if master and dev.type == "cpu":  # torch takes a thread per core: slow where other work runs too
        print(f"cpu: {torch.get_num_threads()} torch threads (OMP_NUM_THREADS=1: often faster on busy cores)")
    start = time.perf_counter()
    if master and compiled(cfg, dev) and step < cfg.max_steps:
        print("compiling: the first evaluation and the first step compile the model, which takes about 1-4 "
              "minutes at the 124m size on one H100 (longer for d_v > 1); nothing is printed meanwhile",
              flush=True)
    if not ckpt:
        run_eval()  # the initial model (a resumed run's step has its eval in the log)
        if cfg.max_steps == 0:
            save_checkpoint()  # the initial model: --resume continues from it
    # the clock counts training only: it restarts after this run's first step (compilation), pauses for evals
    # and k's probes
    first, t0, train_time = step + 1, time.perf_counter(), 0.0
    while step < cfg.max_steps:
        if probe_idx is not None and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_steps):
            sync()  # the next step ends at an eval, which compares its k with k here; the clock pauses
            train_time += time.perf_counter() - t0
            with ctx:
                probe["k_step"] = raw.gate_audit(probe_idx.to(dev))[1]
            t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        loss, norm = train_step(ddp, raw, opt, stream.next_batch, accum, lr, cfg, ctx)
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        step += 1
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss + norm), step, bad_step)
        if step == first:
            sync()
            t0, train_time = time.perf_counter(), 0.0
            if master and compiled(cfg, dev):
                print(f"compiled: {t0 - start:.0f} s to the end of the first step", flush=True)
        if step == first or step % cfg.log_interval == 0 or step == cfg.max_steps:
            lval, elapsed = loss.item(), train_time + time.perf_counter() - t0  # .item() syncs first
            ms = 1000 * elapsed / (step - first) if step > first else None
            tps = cfg.total_batch * T / (ms / 1000) if ms else None
            mfu = raw.flops_per_token(T) * tps / world / (peak * 1e12) if ms and peak else None  # per GPU
            left = ms / 1000 * (cfg.max_steps - step) if ms else None  # training steps only, evals aside
            log(dict(type="train", step=step, loss=lval, lr=lr, grad_norm=norm.item(), ms_per_step=ms,
                     tokens_per_s=tps, mfu=mfu, train_time_s=elapsed, left_s=left),
                f"step {step:6d}/{cfg.max_steps} | loss {lval:.4f} | lr {lr:.2e} | norm {norm.item():.3f} | "
                + (f"{ms:7.1f} ms | {tps:,.0f} tok/s" if ms else "first step, untimed")
                + (f" | mfu {100 * mfu:.1f}%" if mfu else "")
                + f" | {hms(time.perf_counter() - start)} elapsed" + (f", {hms(left)} left" if ms else ""))
            check_finite()
        # a step's records all come before its checkpoint: a resume keeps the log up to the checkpoint's step
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            check_finite()
            sync()
            train_time += time.perf_counter() - t0
            run_eval()
            t0 = time.perf_counter()
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            save_checkpoint()
    if master and step >= first:  # the first step (compilation) is not timed
        n_steps, timed = step - first + 1, (step - first) * cfg.total_batch * T
        rate = f"; {timed / train_time:,.0f} tok/s over the timed steps ({hms(train_time)})" if timed else ""
        print(f"done: {n_steps} steps, {n_steps * cfg.total_batch * T:,} tokens in "
              f"{hms(time.perf_counter() - start)}{rate}")
    if dev.type == "cuda" and master:
        print(f"peak memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(dev) / 2**30:.2f} GiB reserved"
              + (" (CUDA graphs' pools included)" if cuda_graphs(cfg, dev) else ""))
    if master and cfg.sample_tokens:
        print("sample: ", end="")
        sample(raw, cfg, dev, ctx)
    if world > 1:
        dist.barrier()  # tear down together: a rank leaving while another still talks aborted gloo runs
        dist.destroy_process_group()

def sample(model, cfg, dev, ctx):
    """Print num_samples continuations of cfg.prompt as they come (seeded by --seed; only the ids tiktoken
    decodes: no vocabulary padding), then the tokens/s (stderr); returns the texts."""
    enc, texts, timed, seconds = tiktoken.get_encoding("gpt2"), [], 0, 0.0
    torch.manual_seed(cfg.seed)
    prompt = torch.tensor([[enc.eot_token] + enc.encode_ordinary(cfg.prompt)], device=dev)
    for _ in range(cfg.num_samples):
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # a character's bytes may span tokens
        texts.append(utf8.decode(enc.decode_bytes(prompt[0, 1:].tolist())))
        print(texts[-1], end="", flush=True)
        with ctx:
            for n, t in enumerate(model.generate_tokens(prompt, cfg.sample_tokens, cfg.temperature,
                                                        cfg.top_k or None, enc.n_vocab)):
                texts[-1] += (piece := utf8.decode(enc.decode_single_token_bytes(t.item())))
                print(piece, end="", flush=True)
                if n == 1:  # timed from here: the prompt's forward and the decoder's set-up (on CUDA a
                    t0 = time.perf_counter()  # graph's capture, for the second token) come once per sample
            if cfg.sample_tokens > 2:
                timed, seconds = timed + cfg.sample_tokens - 2, seconds + time.perf_counter() - t0
        texts[-1] += (piece := utf8.decode(b"", final=True))
        print(piece + ("\n---------------" if cfg.num_samples > 1 else ""))
    if timed:
        print(f"{timed} tokens in {seconds:.2f} s: {timed / seconds:.1f} tokens/s (each sample's first two "
              "tokens not timed: the prompt's forward and the decoder's set-up)", file=sys.stderr)
    return texts

def main(argv):
    (cfg, mcfg), kept = parse_args(argv), {}
    try:
        if cfg.mode == "train":
            return train(cfg, mcfg, kept)
        _, _, dev, ctx = setup(cfg)
        model, _ = load_model(os.path.join(cfg.out_dir, "ckpt.pt"), dev)
        sample(model.eval(), cfg, dev, ctx)
    except KeyboardInterrupt:  # one line on what is kept, as prepare_data.py's
        what = ("no checkpoint yet (--overwrite=true starts afresh)" if kept.get("step") is None
                else f"the step-{kept['step']} checkpoint {kept['ckpt']} (--resume continues it)")
        print("train.py: interrupted" + (f": kept {what} and its log {kept['log']}" if kept else ""),
              file=sys.stderr)
        sys.exit(130)
    except Exception:
        if kept.get("log") and kept["step"] is None and os.path.exists(kept["log"]):
            # a new run that failed before its first checkpoint: its log moves aside, so that a retry is
            # not refused as a run to --resume or --overwrite
            failed = os.path.join(cfg.out_dir, "log.failed.jsonl")
            os.replace(kept["log"], failed)
            print(f"train.py: no checkpoint was written; the log is kept as {failed}", file=sys.stderr)
        raise
    finally:
        release(cfg.out_dir)

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, FloatingPointError) as e:  # a user can act on these; else a traceback
        sys.exit(f"train.py: error: {e}")
