"""
Train a Deep Delta Learning GPT (ddl.py) on token shards (prepare_data.py), nanoGPT style.

    python train.py --preset=smoke                      # tiny DDL model on this repo's own text, CPU
    torchrun --standalone --nproc_per_node=8 train.py --preset=124m --data_dir=data/fineweb_edu
    python train.py --preset=124m --resume              # continue out_dir/ckpt.pt exactly
    python train.py --mode=sample --out_dir=out         # generate from a checkpoint

Every setting is a --key=value override of a TrainConfig default or a ddl.GPTConfig one:
"""
import dataclasses
import difflib
import glob
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddl import GPT, ConfigError, GPTConfig, setting
from prepare_data import DataError, read_shard

@dataclasses.dataclass
class TrainConfig:
    mode: str = setting("train", "train | sample")
    preset: str = setting("", "124m | 353m | smoke: a named set of values, applied before the other keys")
    out_dir: str = setting("out", "ckpt.pt and log.jsonl go here")
    data_dir: str = setting("data/fineweb_edu", "{prefix}_train_*.bin and {prefix}_val_*.bin from prepare_data.py")
    seed: int = setting(1337, "model init and data order")
    batch_size: int = setting(16, "micro-batch: sequences per process per forward")
    total_batch: int = setting(480, "sequences per optimizer step over all processes (gradient accumulation)")
    max_steps: int = setting(100_000, "stop after this many optimizer steps")
    decay_steps: int = setting(0, "length of the lr schedule; 0: max_steps (set it to stop early, resume later)")
    lr: float = setting(1e-3, "peak learning rate (paper §4.1)")
    min_lr: float = setting(1e-4, "final lr of the cosine decay (our choice, lr / 10; the paper gives none)")
    warmup_steps: int = setting(2000, "linear warm-up steps")
    weight_decay: float = setting(0.1, "AdamW weight decay, on parameters of 2+ dims only")
    beta1: float = setting(0.9, "AdamW first-moment decay")
    beta2: float = setting(0.95, "AdamW second-moment decay")
    grad_clip: float = setting(1.0, "global gradient-norm clip")
    eval_interval: int = setting(1000, "steps between val loss + gate audit")
    val_tokens: int = setting(1_048_576, "val budget: the first tokens of the val shard, whole windows")
    log_interval: int = setting(10, "steps between train log lines")
    ckpt_interval: int = setting(1000, "steps between checkpoints (and one at the end)")
    resume: bool = setting(False, "continue from out_dir/ckpt.pt")
    compile: bool = setting(True, "torch.compile (CUDA only)")
    fused: bool = setting(False, "d_v > 1, CC: the state's rewrite in fused.py's Triton kernels (CUDA; equal to ddl.py's)")
    device: str = setting("auto", "auto | cpu | cuda")
    peak_tflops: float = setting(0.0, "bf16 peak per GPU for MFU where the card is not in PEAK_TFLOPS")
    sample_tokens: int = setting(64, "tokens generated at the end of training and in --mode=sample")
    prompt: str = setting("The", "the sample's prompt")

    def __post_init__(self):
        at_least = dict(batch_size=1, total_batch=1, val_tokens=1, eval_interval=1, log_interval=1, ckpt_interval=1,
                        seed=0, max_steps=0, decay_steps=0, warmup_steps=0, sample_tokens=0, weight_decay=0, peak_tflops=0)
        checks = [(k, getattr(self, k) >= low, f"must be >= {low}") for k, low in at_least.items()]
        checks += [(k, 0 <= getattr(self, k) < 1, "must lie in [0, 1)") for k in ("beta1", "beta2")]
        checks += [("lr", self.lr > 0, "must be > 0"), ("grad_clip", self.grad_clip > 0, "must be > 0"),
                   ("min_lr", 0 <= self.min_lr <= self.lr, f"must lie in [0, lr={self.lr!r}]"),
                   ("mode", self.mode in ("train", "sample"), "allowed: train, sample (the benchmark is bench.py)"),
                   ("preset", self.preset in ("", *PRESETS), f"allowed: {', '.join(PRESETS)}"),
                   ("device", self.device in ("auto", "cpu", "cuda"), "allowed: auto, cpu, cuda")]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"--{key}={getattr(self, key)!r}: {allowed}")

PRESETS = {
    # micro-batch 30: faster than 16 (H200, docs/performance.md), and divides 480 on 1, 2, 4, 8, 16 GPUs
    "124m": dict(n_layer=12, n_head=6, head_dim=128, n_embd=768, block_size=1024, batch_size=30),
    "353m": dict(n_layer=24, n_head=8, head_dim=128, n_embd=1024, block_size=1024),
    "smoke": dict(n_layer=2, n_head=2, head_dim=32, n_embd=64, block_size=64, d_v=4, compressor="cc", batch_size=16,
                  total_batch=16, max_steps=200, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_interval=50,
                  val_tokens=4096, log_interval=20, ckpt_interval=200, compile=False, out_dir="out-smoke"),
}
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # dense bf16, per GPU
CKPT_KEYS = ("model", "optimizer", "step", "config", "model_config", "data", "rng", "world_size", "log_records")

# ----------------------------------------------------------------------------- settings

def parse_args(argv, kinds=(TrainConfig, GPTConfig), doc=__doc__):
    """One instance of each dataclass in kinds from --key=value overrides of their defaults, typed from
    them (a bool from true/false/1/0); the preset's values come first, then the keys given."""
    fields = {f.name: (kind, f) for kind in kinds for f in dataclasses.fields(kind)}
    given = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(doc + "\n".join(f"  --{k}={f.default!r}".ljust(36) + " " + f.metadata["help"] for k, (_, f) in fields.items()))
            sys.exit(0)
        key, eq, text = arg[2:].partition("=") if arg != "--resume" else ("resume", "=", "true")
        if not arg.startswith("--") or not eq:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value")
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=3)
            raise ConfigError(f"unknown key --{key}" + (f"; did you mean {', '.join('--' + n for n in near)}?" if near else ""))
        kind = fields[key][1].type
        try:
            given[key] = {"true": True, "1": True, "false": False, "0": False}[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            raise ConfigError(f"--{key}={text!r}: expected a {kind.__name__}") from None
    values = {**PRESETS.get(given.get("preset"), {}), **given}  # TrainConfig checks the preset's name
    return [kind(**{k: v for k, v in values.items() if fields[k][0] is kind}) for kind in kinds]

# ----------------------------------------------------------------------------- data

class TokenStream:
    """Windows of T + 1 tokens from token arrays (shards) in a seeded order, new every epoch: the shards
    permuted, then the windows of each; rank r of W takes windows r, r + W, ... (epoch, shard, window) is the state."""
    def __init__(self, shards, T, B, seed, rank=0, world=1):
        self.shards, self.T, self.B, self.seed, self.rank, self.world = shards, T, B, seed, rank, world
        if all((len(s) - 1) // T < world * B for s in shards):
            raise DataError(f"the train shards hold too few tokens for batch_size={B} x block_size={T} x {world} processes")
        self.load_state(dict(epoch=0, shard=0, window=0))

    def load_state(self, s):
        self.epoch, self.shard, self.window = s["epoch"], s["shard"], s["window"]
        self.tokens = self.shards[np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))[self.shard]]
        n = (len(self.tokens) - 1) // self.T // self.world * self.world  # windows, a multiple of world
        self.windows = np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(n)[self.rank::self.world]

    def state(self):
        return dict(epoch=self.epoch, shard=self.shard, window=self.window)

    def next_batch(self):
        while self.window + self.B > len(self.windows):  # shard exhausted: the next shard, or the next epoch
            last = self.shard + 1 == len(self.shards)
            self.load_state(dict(epoch=self.epoch + last, shard=0 if last else self.shard + 1, window=0))
        idx = self.windows[self.window:self.window + self.B]
        self.window += self.B
        x = torch.from_numpy(np.stack([self.tokens[i * self.T:(i + 1) * self.T + 1] for i in idx]).astype(np.int64))
        return x[:, :-1], x[:, 1:]

def load_data(cfg):
    """(train shards, val tokens); the smoke preset falls back to this repository's own text."""
    if os.path.exists(os.path.join(cfg.data_dir, "run.json")):  # prepare_data.py's mark of an unfinished run
        raise DataError(f"--data_dir={cfg.data_dir}: prepare_data.py did not finish there; rerun it to complete the shards")
    train, val = (sorted(glob.glob(os.path.join(cfg.data_dir, f"*_{split}_*.bin"))) for split in ("train", "val"))
    if train and val:
        return [read_shard(p) for p in train], read_shard(val[0])
    if cfg.preset == "smoke":
        import tiktoken
        enc, here = tiktoken.get_encoding("gpt2"), os.path.dirname(os.path.abspath(__file__))
        files = sorted(glob.glob(os.path.join(here, "*.py")) + glob.glob(os.path.join(here, "*.md")))
        tokens = np.array([t for p in files for t in [enc.eot_token] + enc.encode_ordinary(open(p).read())], np.uint16)
        return [tokens[:len(tokens) * 9 // 10]], tokens[len(tokens) * 9 // 10:]
    raise DataError(f"--data_dir={cfg.data_dir}: no *_train_*.bin and *_val_*.bin shards there; "
                    "make them with prepare_data.py (or use --preset=smoke)")

# ----------------------------------------------------------------------------- the model and its step

def lr_at(step, cfg):
    """Linear warm-up to lr over warmup_steps, then cosine decay to min_lr at decay_steps (or max_steps)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, (cfg.decay_steps or cfg.max_steps) - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)

def build(cfg, mcfg, dev):
    """The model (seeded), its compiled form on CUDA (else itself) and its optimizer, as train and bench run them."""
    torch.manual_seed(cfg.seed)
    raw = GPT(mcfg).to(dev)
    raw = __import__("fused").install(raw) if cfg.fused else raw  # imported only when asked: it needs Triton
    model = torch.compile(raw) if cfg.compile and dev.type == "cuda" else raw
    return raw, model, raw.configure_optimizers(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dev.type)

def train_step(model, raw, opt, next_batch, accum, lr, cfg, ctx):
    """One optimizer step over accum micro-batches (DDP all-reduces on the last); the mean loss and gradient norm, no sync."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss_sum = 0.0
    for micro in range(accum):
        x, y = (t.to(raw.wte.weight.device, non_blocking=True) for t in next_batch())
        last = not isinstance(model, DDP) or micro == accum - 1
        with nullcontext() if last else model.no_sync():
            with ctx:
                loss = model(x, y)
            (loss / accum).backward()
        loss_sum = loss_sum + loss.detach() / accum
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, norm

# ----------------------------------------------------------------------------- checkpoints and log

def save_atomic(obj, path):
    """torch.save to a temporary name, then rename: a crash mid-write leaves the old file intact."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(path):
    """The checkpoint at path, refusing a missing or unreadable file and one without train.py's keys."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"cannot load checkpoint {path}: {e}") from None
    if missing := [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]:
        raise ConfigError(f"{path} is not a checkpoint of this train.py: it has no {', '.join(missing)}")
    return ckpt

def resume_changes(ckpt, cfg, mcfg, world):
    """The settings that differ from the checkpoint's run, {key: [old, new]}. Another model config,
    data_dir, seed or process count is refused: the weights or the data order would not continue."""
    old = {**ckpt["config"], **ckpt["model_config"], "world_size": ckpt["world_size"]}
    new = {**dataclasses.asdict(cfg), **dataclasses.asdict(mcfg), "world_size": world}
    for key in [*ckpt["model_config"], "data_dir", "seed", "world_size"]:
        if old[key] != new[key]:
            raise ConfigError(f"--resume: the checkpoint's {key} was {old[key]!r}, asked: {new[key]!r}; "
                              "resume with the same value")
    return {k: [old.get(k), v] for k, v in new.items() if k != "resume" and old.get(k) != v}

def start_log(path, keep):
    """log.jsonl emptied for a new run (keep = 0), or cut back to the `keep` records its resumed checkpoint saw."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lines = open(path).readlines() if keep and os.path.exists(path) else []
    with open(path + ".tmp", "w") as f:
        f.writelines(lines[:keep])
    os.replace(path + ".tmp", path)
    if len(lines) > keep:
        print(f"dropped the {len(lines) - keep} log records written after the checkpoint")

# ----------------------------------------------------------------------------- training

@torch.no_grad()
def evaluate(model, raw, val, cfg, ctx, dev, rank, world):
    """Mean loss over the first val_tokens // block_size whole windows of the val shard; the gate audit of one batch."""
    T = raw.config.block_size
    windows = list(range(rank, min(cfg.val_tokens, len(val) - 1) // T, world))
    total, count = torch.zeros((), device=dev), torch.zeros((), device=dev)
    model.eval()
    for i in range(0, len(windows), cfg.batch_size):
        rows = np.stack([val[w * T:(w + 1) * T + 1] for w in windows[i:i + cfg.batch_size]]).astype(np.int64)
        rows = torch.from_numpy(rows).to(dev)
        with ctx:
            total += model(rows[:, :-1], rows[:, 1:]).float() * len(rows)
        count += len(rows)
    with ctx:  # a rank may hold no val window
        gates = raw.gate_audit(rows[:, :-1]) if raw.config.residual != "additive" and windows else None
    model.train()
    if world > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count).item(), gates

def setup(cfg):
    """Process group (torchrun), device and autocast context."""
    ddp = "RANK" in os.environ  # started by torchrun
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) if ddp else (0, 1, 0)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device='cuda': this torch finds no CUDA device (CPU-only build or no GPU)")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, dev, torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

def git_commit():  # provenance for log.jsonl; None outside a git checkout or without git
    try:
        return subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None

def train(cfg, mcfg):
    rank, world, dev, ctx = setup(cfg)
    B, T, master = cfg.batch_size, mcfg.block_size, rank == 0
    if cfg.total_batch % (B * world):
        raise ConfigError(f"--total_batch={cfg.total_batch} must be a multiple of batch_size x processes = {B * world}")
    if cfg.val_tokens < T:
        raise ConfigError(f"--val_tokens={cfg.val_tokens}: must be >= block_size={T} (one whole val window)")
    accum = cfg.total_batch // (B * world)
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    changed = resume_changes(ckpt, cfg, mcfg, world) if ckpt else None
    train_shards, val = load_data(cfg)
    if len(val) < T + 1:
        raise DataError(f"the val shard holds {len(val)} tokens, fewer than block_size + 1 = {T + 1}")
    raw, model, opt = build(cfg, mcfg, dev)
    stream, step, records = TokenStream(train_shards, T, B, cfg.seed, rank, world), 0, 0
    if ckpt:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        stream.load_state(ckpt["data"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        step, records = ckpt["step"], ckpt["log_records"]
    if world > 1:
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if master:
        start_log(log_path, records)

    def log(rec, line=None):
        nonlocal records
        if master:
            if line:
                print(line, flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            records += 1

    log(dict(type="config", config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mcfg), device=name, world_size=world,
             torch=torch.__version__, git_commit=git_commit(), grad_accum=accum, params=raw.num_params(),
             resumed_from=step if ckpt else None, changed=changed),
        f"{name} x{world} | {raw.num_params():,} params | accum {accum} | {cfg.total_batch * T:,} tokens/step"
        + (f" | resumed at step {step}, changed: {changed or 'nothing'}" if ckpt else ""))
    # the first step with a non-finite loss or gradient norm (-1: none), on the device: read where the loop syncs
    bad_step = torch.full((), -1, dtype=torch.long, device=dev)

    def check_finite():
        if (bad := bad_step.item()) >= 0:
            log(dict(type="diverged", step=bad))
            raise FloatingPointError(f"the loss or gradient norm is not finite at step {bad}: training stopped, "
                                     f"{ckpt_path} is left as it was; lower --lr or lengthen --warmup_steps")

    def run_eval():
        vloss, gates = evaluate(model, raw, val, cfg, ctx, dev, rank, world)
        log(dict(type="val", step=step, loss=vloss, ppl=math.exp(vloss)),
            f"step {step:6d} | val loss {vloss:.4f} | ppl {math.exp(vloss):.2f}")
        if gates:
            log(dict(type="gates", step=step, gates=gates))

    # the clock counts training only: it restarts after this run's first step (compilation), pauses for evals
    first, t0, train_time = step + 1, time.perf_counter(), 0.0
    while step < cfg.max_steps:
        if step % cfg.eval_interval == 0:
            sync()
            train_time += time.perf_counter() - t0
            run_eval()
            t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        loss, norm = train_step(model, raw, opt, stream.next_batch, accum, lr, cfg, ctx)
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        step += 1
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss + norm), step, bad_step)
        if step == first:
            sync()
            t0, train_time = time.perf_counter(), 0.0
        if step == first or step % cfg.log_interval == 0 or step == cfg.max_steps:
            lval, elapsed = loss.item(), train_time + time.perf_counter() - t0  # .item() syncs first
            ms = 1000 * elapsed / (step - first) if step > first else None
            tps = cfg.total_batch * T / (ms / 1000) if ms else None
            mfu = raw.flops_per_token(T) * tps / world / (peak * 1e12) if ms and peak else None  # per GPU
            log(dict(type="train", step=step, loss=lval, lr=lr, grad_norm=norm.item(), ms_per_step=ms,
                     tokens_per_s=tps, mfu=mfu, train_time_s=elapsed),
                f"step {step:6d} | loss {lval:.4f} | lr {lr:.2e} | norm {norm.item():.3f} | "
                + (f"{ms:7.1f} ms | {tps:,.0f} tok/s" if ms else "first step, untimed")
                + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))
            check_finite()
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            check_finite()  # never a checkpoint of non-finite weights
            if master:
                save_atomic(dict(model=raw.state_dict(), optimizer=opt.state_dict(), step=step, world_size=world,
                                 config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mcfg), data=stream.state(),
                                 rng=dict(cpu=torch.get_rng_state()), log_records=records), ckpt_path)
    run_eval()
    if dev.type == "cuda" and master:
        print(f"peak memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    if master and cfg.sample_tokens:
        print("sample:", sample(raw, cfg, dev, ctx))
    if world > 1:
        dist.barrier()  # tear down together: a rank leaving while another still talks aborted gloo runs
        dist.destroy_process_group()

def sample(model, cfg, dev, ctx):
    """A continuation of cfg.prompt, restricted to the ids tiktoken can decode (no vocabulary padding)."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    torch.manual_seed(cfg.seed)
    idx = torch.tensor([[enc.eot_token] + enc.encode_ordinary(cfg.prompt)], device=dev)
    with ctx:
        out = model.generate(idx, cfg.sample_tokens, temperature=0.8, top_k=200, n_vocab=enc.n_vocab)
    return enc.decode(out[0, 1:].tolist())

def main(argv):
    cfg, mcfg = parse_args(argv)
    if cfg.mode == "train":
        return train(cfg, mcfg)
    _, _, dev, ctx = setup(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    model = GPT(GPTConfig(**ckpt["model_config"])).to(dev)
    model.load_state_dict(ckpt["model"])
    print(sample(model.eval(), cfg, dev, ctx))

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, FloatingPointError) as e:  # a user can act on these; all else keeps its traceback
        sys.exit(f"train.py: error: {e}")
