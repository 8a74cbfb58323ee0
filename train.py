"""
Train a Deep Delta Learning GPT (ddl.py) on token shards (prepare_data.py), nanoGPT style.

    python train.py --preset=smoke                      # tiny DDL model on this repo's own text, CPU
    python train.py --preset=124m --data_dir=data/fineweb_edu
    torchrun --standalone --nproc_per_node=8 train.py --preset=124m
    python train.py --preset=124m --resume              # continue out_dir/ckpt.pt exactly
    python train.py --mode=sample --out_dir=out         # generate from a checkpoint
    python train.py --mode=bench                        # throughput of every variant vs the baseline

Every setting below is a --key=value override, typed from its default; --help lists them.
"""
import dataclasses
import difflib
import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddl import GPT, GPTConfig
from prepare_data import read_shard

# ----------------------------------------------------------------------------- defaults
mode = "train"          # train | sample | bench
preset = ""             # 124m | 353m | smoke: a named set of the values below
out_dir = "out"         # ckpt.pt and log.jsonl
data_dir = "data/fineweb_edu"  # {prefix}_train_*.bin and {prefix}_val_*.bin from prepare_data.py
seed = 1337             # model init and data order
batch_size = 16         # micro-batch, sequences per process per forward
total_batch = 480       # sequences per optimizer step over all processes (gradient accumulation)
max_steps = 100_000     # stop after this many optimizer steps
decay_steps = 0         # length of the lr schedule; 0: max_steps (set it to stop early and resume later)
lr = 1e-3               # peak learning rate (paper §4.1)
min_lr = 1e-4           # final lr of the cosine decay (our choice: lr / 10; the paper gives none)
warmup_steps = 2000     # linear warm-up steps
weight_decay = 0.1      # on parameters of 2+ dims (see make_optimizer)
beta1 = 0.9             # AdamW first-moment decay
beta2 = 0.95            # AdamW second-moment decay
grad_clip = 1.0         # global gradient-norm clip
eval_interval = 1000    # steps between val loss + gate audit
val_tokens = 1_048_576  # fixed val budget: the first tokens of the val shard
log_interval = 10       # steps between train log lines
ckpt_interval = 1000    # steps between checkpoints (and one at the end)
resume = False          # continue from out_dir/ckpt.pt
compile = True          # torch.compile (CUDA only)
device = "auto"         # auto | cpu | cuda
peak_tflops = 0.0       # bf16 peak for MFU where the card is not in PEAK_TFLOPS
sample_tokens = 64      # tokens generated at the end of training and in --mode=sample
prompt = "The"          # the sample's prompt
bench_batch = 16        # --mode=bench micro-batch
bench_steps = 20        # timed steps per variant
bench_variants = "additive,delta,cc,tc,write"  # comma-separated names from VARIANTS
# the model: every GPTConfig field (ddl.py documents them)
for _f in dataclasses.fields(GPTConfig):
    globals()[_f.name] = _f.default

PRESETS = {
    "124m": dict(n_layer=12, n_head=6, head_dim=128, n_embd=768, block_size=1024),
    "353m": dict(n_layer=24, n_head=8, head_dim=128, n_embd=1024, block_size=1024),
    "smoke": dict(n_layer=2, n_head=2, head_dim=32, n_embd=64, block_size=64, d_v=4, compressor="cc",
                  batch_size=16, total_batch=16, max_steps=200, lr=3e-3, min_lr=3e-4,
                  warmup_steps=20, eval_interval=50, val_tokens=4096, log_interval=20, ckpt_interval=200,
                  compile=False, out_dir="out-smoke"),
}
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # dense bf16
VARIANTS = {  # --mode=bench
    "additive": dict(residual="additive", d_v=1),
    "delta": dict(residual="delta", d_v=1),
    "cc": dict(residual="delta", d_v=4, compressor="cc", embed_conv=True),
    "tc": dict(residual="delta", d_v=4, compressor="tc", embed_conv=True),
    "write": dict(residual="write", d_v=4, compressor="cc", embed_conv=True),
}
MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig)]
KEYS = [k for k in list(globals()) if not k.startswith("_") and isinstance(globals()[k], (bool, int, float, str))
        and k.islower()]


def help_text(defaults):
    """Every key, its default and the comment beside it here or in ddl.py's GPTConfig."""
    here = os.path.dirname(os.path.abspath(__file__))
    notes = {}
    for name in ("train.py", "ddl.py"):
        with open(os.path.join(here, name), encoding="utf-8") as f:
            notes.update(re.findall(r"^\s*(\w+)(?:: \w+)? = [^#\n]*#\s*(.*)$", f.read(), re.M))
    return __doc__ + "\n".join(f"  --{k}={v!r}".ljust(36) + notes.get(k, "") for k, v in defaults.items())


def parse_overrides(argv, defaults):
    """--key=value pairs typed from the defaults; --preset first, then the other keys."""
    cfg = dict(defaults)
    pairs = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(defaults))
            sys.exit(0)
        if arg == "--resume":
            arg = "--resume=true"
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"argument {arg!r} is not of the form --key=value")
        if key not in defaults:
            near = difflib.get_close_matches(key, list(defaults), n=3)
            raise ValueError(f"unknown key --{key}" + (f"; did you mean {', '.join('--' + n for n in near)}?" if near else ""))
        pairs.append((key, value))
    for key, value in sorted(pairs, key=lambda kv: kv[0] != "preset"):
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                cfg[key] = value.lower() in ("true", "1")
            else:
                cfg[key] = type(default)(value)
        except ValueError:
            raise ValueError(f"--{key}={value!r}: expected a {type(default).__name__} like {default!r}") from None
        if key == "preset":
            if value not in PRESETS:
                raise ValueError(f"--preset={value!r}: allowed: {', '.join(PRESETS)}")
            cfg.update(PRESETS[value])
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Stop early, naming the key, on values the loop cannot run with."""
    minimum = dict(batch_size=1, total_batch=1, eval_interval=1, log_interval=1, ckpt_interval=1, val_tokens=1,
                   bench_batch=1, bench_steps=1, max_steps=0, decay_steps=0, warmup_steps=0, sample_tokens=0)
    for key, low in minimum.items():
        if cfg[key] < low:
            raise ValueError(f"--{key}={cfg[key]!r}: must be >= {low}")
    for key, allowed in (("mode", ("train", "sample", "bench")), ("device", ("auto", "cpu", "cuda"))):
        if cfg[key] not in allowed:
            raise ValueError(f"--{key}={cfg[key]!r}: allowed: {', '.join(allowed)}")
    if not 0 <= cfg["min_lr"] <= cfg["lr"]:
        raise ValueError(f"--min_lr={cfg['min_lr']!r}: must lie in [0, lr={cfg['lr']!r}]")


# ----------------------------------------------------------------------------- data

class TokenStream:
    """Windows of block_size + 1 tokens from a list of token arrays (shards). The order is a
    seed-shuffled permutation of the shards and of the windows inside each shard, new every epoch;
    rank r of W takes windows r, r + W, ... The position (epoch, shard, window) is all the state."""
    def __init__(self, shards, T, B, seed, rank=0, world=1):
        self.shards, self.T, self.B, self.seed, self.rank, self.world = shards, T, B, seed, rank, world
        if all((len(s) - 1) // T < world * B for s in shards):
            raise ValueError(f"the train shards hold too few tokens for batch_size={B} x block_size={T} "
                             f"x {world} processes")
        self.epoch, self.shard, self.window = 0, 0, 0
        self._plan()

    def _plan(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.order = rng.permutation(len(self.shards))
        n = (len(self.shards[self.order[self.shard]]) - 1) // self.T // self.world  # windows per rank
        perm = np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(n * self.world)
        self.windows = perm[self.rank::self.world]

    def next_batch(self):
        while self.window + self.B > len(self.windows):  # shard exhausted: next shard or epoch
            self.window, self.shard = 0, self.shard + 1
            if self.shard == len(self.shards):
                self.epoch, self.shard = self.epoch + 1, 0
            self._plan()
        tokens = self.shards[self.order[self.shard]]
        idx = self.windows[self.window:self.window + self.B]
        self.window += self.B
        rows = np.stack([tokens[i * self.T:(i + 1) * self.T + 1] for i in idx]).astype(np.int64)
        x = torch.from_numpy(rows)
        return x[:, :-1], x[:, 1:]

    def state(self):
        return dict(epoch=self.epoch, shard=self.shard, window=self.window)

    def load_state(self, s):
        self.epoch, self.shard = s["epoch"], s["shard"]
        self._plan()
        self.window = s["window"]


def load_data(cfg):
    """(train shards, val tokens); the smoke preset falls back to this repository's own text."""
    train = sorted(glob.glob(os.path.join(cfg["data_dir"], "*_train_*.bin")))
    val = sorted(glob.glob(os.path.join(cfg["data_dir"], "*_val_*.bin")))
    if train and val:
        return [read_shard(p) for p in train], read_shard(val[0])
    if cfg["preset"] == "smoke":
        import tiktoken
        enc, here = tiktoken.get_encoding("gpt2"), os.path.dirname(os.path.abspath(__file__))
        tokens = []
        for path in sorted(glob.glob(os.path.join(here, "*.py")) + glob.glob(os.path.join(here, "*.md"))):
            with open(path, encoding="utf-8") as f:
                tokens += [50256] + enc.encode_ordinary(f.read())
        tokens = np.array(tokens, dtype=np.uint16)
        cut = len(tokens) * 9 // 10
        return [tokens[:cut]], tokens[cut:]
    raise ValueError(f"--data_dir={cfg['data_dir']}: no *_train_*.bin and *_val_*.bin shards there; "
                     "make them with prepare_data.py (or use --preset=smoke)")


# ----------------------------------------------------------------------------- helpers

def lr_at(step, cfg):
    """Linear warm-up, then cosine decay from lr to min_lr over decay_steps (or max_steps)."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    decay = cfg["decay_steps"] or cfg["max_steps"]
    progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, decay - cfg["warmup_steps"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["lr"] - cfg["min_lr"])


def make_optimizer(model, cfg, device_type):
    """AdamW, fused on CUDA. Weight decay on every parameter of 2 or more dims: the matrices, and
    also W_v and the compressor / EC weights; none on norm gains, biases and w_beta."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg["weight_decay"]),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device_type == "cuda")


def flops_per_token(model, T):
    """Training FLOPs per token for MFU: 6N for the matrices (the tied embedding counted once, as the
    LM head) plus 12 L T d for attention scores, the PaLM / nanoGPT estimate."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * T * c.n_embd


def ddl_flops_per_token(c):
    """The DDL rewrite's extra training FLOPs per token (the paper reports none): 3x the forward's
    elementwise work, per sublayer about 10 d d_v (compression, readout k^T X, rewrite, v) and
    4 d (k's norm, beta); the TC compressor adds 2 d d_v per extra tap."""
    if c.residual == "additive":
        return 0
    per_sublayer = 10 * c.n_embd * c.d_v + 4 * c.n_embd
    if c.d_v > 1 and c.compressor == "tc":
        per_sublayer += 2 * c.n_embd * c.d_v * (c.conv_kernel - 1)
    return 3 * 2 * c.n_layer * per_sublayer


def model_config(cfg):
    return GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, mcfg=None):
    """The checkpoint at path, refusing a missing / unreadable file or (given mcfg) another model config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {path}: {e}") from None
    diff = {k: (v, getattr(mcfg, k)) for k, v in ckpt["model_config"].items() if mcfg and getattr(mcfg, k) != v}
    if diff:
        raise ValueError(f"checkpoint {path} was made with another model config "
                         + ", ".join(f"{k}={a!r} (asked: {b!r})" for k, (a, b) in diff.items()))
    return ckpt


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def evaluate(model, raw, val, cfg, ctx, dev, rank, world):
    """Mean loss over the first val_tokens of the val shard, the same tokens every time, and the
    gate audit of one val batch."""
    T, B = cfg["block_size"], cfg["batch_size"]
    n_win = min(cfg["val_tokens"], len(val) - 1) // T
    total, count = torch.zeros((), device=dev), torch.zeros((), device=dev)
    windows = list(range(rank, n_win, world))
    model.eval()
    for i in range(0, len(windows), B):
        rows = torch.from_numpy(np.stack([val[w * T:(w + 1) * T + 1] for w in windows[i:i + B]]).astype(np.int64))
        with ctx:
            _, loss = model(rows[:, :-1].to(dev), rows[:, 1:].to(dev))
        total += loss.float() * rows.shape[0]
        count += rows.shape[0]
    gates = None
    if raw.config.residual != "additive" and windows:  # a rank may hold no val window
        raw.record_gates = True
        with ctx:
            raw(rows[:, :-1].to(dev))
        gates, raw.record_gates = raw.gate_stats(), False
    model.train()
    if world > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count.clamp(min=1)).item(), gates


def setup(cfg):
    """Process group (torchrun), device and autocast context."""
    ddp = "RANK" in os.environ
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) if ddp else (0, 1, 0)
    dev_type = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(f"cuda:{local}" if dev_type == "cuda" else "cpu")
    if dev_type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    if ddp:
        dist.init_process_group("nccl" if dev_type == "cuda" else "gloo")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev_type == "cuda" else nullcontext()
    return rank, world, dev, dev_type, ctx


def train(cfg):
    rank, world, dev, dev_type, ctx = setup(cfg)
    master = rank == 0
    B, T = cfg["batch_size"], cfg["block_size"]
    if cfg["total_batch"] % (B * world):
        raise ValueError(f"--total_batch={cfg['total_batch']} must be a multiple of batch_size x processes "
                         f"= {B * world}")
    accum = cfg["total_batch"] // (B * world)
    mcfg = model_config(cfg)
    ckpt_path, log_path = os.path.join(cfg["out_dir"], "ckpt.pt"), os.path.join(cfg["out_dir"], "log.jsonl")
    ckpt = load_checkpoint(ckpt_path, mcfg) if cfg["resume"] else None
    train_shards, val = load_data(cfg)
    if len(val) < T + 1:
        raise ValueError(f"the val shard holds {len(val)} tokens, fewer than block_size + 1 = {T + 1}")
    torch.manual_seed(cfg["seed"])
    raw = GPT(mcfg).to(dev)
    opt = make_optimizer(raw, cfg, dev_type)
    stream = TokenStream(train_shards, T, B, cfg["seed"], rank, world)
    step = 0
    if ckpt:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        stream.load_state(ckpt["data"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
    model = torch.compile(raw) if cfg["compile"] and dev_type == "cuda" else raw
    if world > 1:
        model = DDP(model, device_ids=[dev.index] if dev_type == "cuda" else None)
    fpt = flops_per_token(raw, T)
    name = torch.cuda.get_device_name(dev) if dev_type == "cuda" else "cpu"
    peak = cfg["peak_tflops"] or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)

    def log(rec, line=None):
        if master:
            if line:
                print(line, flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        if not ckpt and os.path.exists(log_path):
            os.remove(log_path)
    log(dict(type="config", config=cfg, git_commit=git_commit(), torch=torch.__version__, device=name,
             world_size=world, grad_accum=accum, params=raw.num_params(), resumed_from=step if ckpt else None),
        f"{name} x{world} | {raw.num_params():,} params | accum {accum} | {cfg['total_batch'] * T:,} tokens/step")

    def checkpoint():
        if master:
            save_atomic(dict(model=raw.state_dict(), optimizer=opt.state_dict(), step=step, config=cfg,
                             model_config=dataclasses.asdict(mcfg), data=stream.state(),
                             rng=dict(cpu=torch.get_rng_state())), ckpt_path)

    def run_eval():
        t0 = time.time()
        vloss, gates = evaluate(model, raw, val, cfg, ctx, dev, rank, world)
        log(dict(type="val", step=step, loss=vloss, ppl=math.exp(vloss)),
            f"step {step:6d} | val loss {vloss:.4f} | ppl {math.exp(vloss):.2f}")
        if gates:
            log(dict(type="gates", step=step, gates=gates))
        return time.time() - t0

    # the clock: training time only, without the first step (compilation) and without evaluations
    first, t_mark, step_mark, train_time = step + 1, None, step, 0.0
    while step < cfg["max_steps"]:
        if step % cfg["eval_interval"] == 0:
            if dev_type == "cuda":
                torch.cuda.synchronize(dev)  # charge the pending training work to training
            eval_s = run_eval()
            t_mark = t_mark and t_mark + eval_s
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=dev)
        for micro in range(accum):
            x, y = stream.next_batch()
            sync = world == 1 or micro == accum - 1
            with nullcontext() if sync else model.no_sync():  # all-reduce only on the last micro-step
                with ctx:
                    _, loss = model(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        if step == first or step % cfg["log_interval"] == 0 or step == cfg["max_steps"]:
            lval, now = loss_sum.item(), time.time()  # .item() syncs the device before the clock
            # the first step holds compilation: it is logged untimed and the clock starts after it
            ms = (now - t_mark) * 1000 / (step - step_mark) if t_mark else float("nan")
            train_time += (now - t_mark) if t_mark else 0.0
            t_mark, step_mark = now, step
            tps = cfg["total_batch"] * T / (ms / 1000)
            mfu = fpt * tps / (peak * 1e12) if peak else None
            log(dict(type="train", step=step, loss=lval, lr=lr, grad_norm=norm.item(), ms_per_step=ms,
                     tokens_per_s=tps, mfu=mfu, train_time_s=train_time),
                f"step {step:6d} | loss {lval:.4f} | lr {lr:.2e} | norm {norm.item():.3f} | "
                + (f"{ms:7.1f} ms | {tps:,.0f} tok/s" if ms == ms else "first step, untimed")
                + (f" | mfu {100 * mfu:.1f}%" if mfu and mfu == mfu else ""))
        if step % cfg["ckpt_interval"] == 0 or step == cfg["max_steps"]:
            checkpoint()
    run_eval()
    if dev_type == "cuda" and master:
        print(f"peak memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    if master and cfg["sample_tokens"]:
        print("sample:", sample(raw, cfg, dev, ctx))
    if world > 1:
        dist.barrier()  # tear down together: a rank leaving while another still talks aborted gloo runs
        dist.destroy_process_group()


def sample(model, cfg, dev, ctx):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    torch.manual_seed(cfg["seed"])
    idx = torch.tensor([[50256] + enc.encode_ordinary(cfg["prompt"])], device=dev)
    with ctx:
        out = model.generate(idx, cfg["sample_tokens"], temperature=0.8, top_k=200)
    return enc.decode(out[0, 1:].tolist())


# ----------------------------------------------------------------------------- benchmark

def time_ms(fn, steps, dev):
    """Median wall time of fn in ms over steps calls after 3 warm-up calls (compilation), with the
    device synchronised before every clock read."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def matmul_peak_tflops(dev):
    """Measured dense bf16 matmul rate (8192^3 on random data; fp32 512^3 on a CPU, for the code path)."""
    n, dtype = (8192, torch.bfloat16) if dev.type == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n ** 3 / time_ms(lambda: a @ b, 10, dev) / 1e9


def check_fast_path(dev, use_compile):
    """The model's rewrite (DeltaRule, compiled on CUDA as the benchmark runs it) against the reference
    delta_update in float64, on fresh random inputs in bf16 and fp32: the output and the gradients of
    X, k, v, beta. Prints the largest relative error and fails beyond 1e-2 (bf16) / 1e-5 (fp32)."""
    from ddl import DeltaRule, delta_update
    fast = torch.compile(DeltaRule.apply) if use_compile else DeltaRule.apply
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        X, kt, G = torch.randn(8, 256, 768, 4, device=dev), torch.randn(8, 256, 768, device=dev), torch.randn(8, 256, 768, 4, device=dev)
        k = kt / kt.norm(dim=-1, keepdim=True)
        v, beta = 4 * torch.rand(8, 256, 4, device=dev), 2 * torch.rand(8, 256, device=dev)
        errs = []
        for f, ins in ((delta_update, [t.double() for t in (X, k, v, beta)]),
                       (fast, [X.to(dtype), k.to(dtype), v, beta])):
            ins = [t.detach().requires_grad_() for t in ins]
            out = f(*ins)
            out.backward(G.to(out.dtype))
            errs.append([out] + [t.grad for t in ins])
        err = max(((b.double() - a).norm() / a.norm()).item() for a, b in zip(*errs))
        print(f"fast path (output and 4 gradients) vs float64 reference, {dtype}: max relative error {err:.2e} (limit {tol:.0e})")
        if not err <= tol:
            raise RuntimeError(f"the {dtype} rewrite disagrees with the reference: {err:.2e} > {tol:.0e}")


def bench(cfg):
    """Training and inference throughput of every variant at the configured size, in one process,
    against the additive baseline; prints one table and returns its rows."""
    _, _, dev, dev_type, ctx = setup(cfg)
    B, T = cfg["bench_batch"], cfg["block_size"]
    names = cfg["bench_variants"].split(",")
    for n in names:
        if n not in VARIANTS:
            raise ValueError(f"--bench_variants: unknown variant {n!r}; allowed: {', '.join(VARIANTS)}")
    peak = matmul_peak_tflops(dev)
    check_fast_path(dev, cfg["compile"] and dev_type == "cuda")
    gen = torch.Generator().manual_seed(cfg["seed"])
    x, y = (torch.randint(0, cfg["vocab_size"], (B, T), generator=gen).to(dev) for _ in range(2))
    rows = []
    for n in names:
        mcfg = model_config({**cfg, **VARIANTS[n]})
        torch.manual_seed(cfg["seed"])
        raw = GPT(mcfg).to(dev)
        opt = make_optimizer(raw, cfg, dev_type)
        model = torch.compile(raw) if cfg["compile"] and dev_type == "cuda" else raw

        def train_step():
            with ctx:
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer_step():
            with torch.no_grad(), ctx:
                model(x, y)

        if dev_type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        train_ms = time_ms(train_step, cfg["bench_steps"], dev)
        mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev_type == "cuda" else float("nan")
        infer_ms = time_ms(infer_step, cfg["bench_steps"], dev)
        fpt = flops_per_token(raw, T)
        rows.append(dict(variant=n, params=raw.num_params(), flops_per_token=fpt + ddl_flops_per_token(mcfg),
                         train_ms=train_ms, train_tps=B * T / train_ms * 1000, infer_tps=B * T / infer_ms * 1000,
                         mem_gib=mem, mfu=fpt * B * T / train_ms * 1000 / (peak * 1e12)))
        del raw, opt, model
        torch._dynamo.reset()  # a fresh compile cache per variant, so none hits the recompile limit
    base = next((r for r in rows if r["variant"] == "additive"), rows[0])
    name = torch.cuda.get_device_name(dev) if dev_type == "cuda" else "cpu"
    print(f"\n{name} | matmul peak {peak:.0f} TFLOP/s | micro-batch {B} x {T} | compile "
          f"{cfg['compile'] and dev_type == 'cuda'} | ratios against {base['variant']}")
    print(f"{'variant':9} {'params':>12} {'GFLOP/tok':>9} {'ms/step':>8} {'train tok/s':>12} {'ratio':>6} "
          f"{'infer tok/s':>12} {'ratio':>6} {'mem GiB':>8} {'ratio':>6} {'MFU':>6}")
    for r in rows:
        print(f"{r['variant']:9} {r['params']:12,} {r['flops_per_token'] / 1e9:9.3f} {r['train_ms']:8.1f} "
              f"{r['train_tps']:12,.0f} {r['train_tps'] / base['train_tps']:6.3f} {r['infer_tps']:12,.0f} "
              f"{r['infer_tps'] / base['infer_tps']:6.3f} {r['mem_gib']:8.2f} {r['mem_gib'] / base['mem_gib']:6.3f} "
              f"{100 * r['mfu']:5.1f}%")
    return rows


def main(argv):
    defaults = {k: globals()[k] for k in KEYS}
    cfg = parse_overrides(argv, defaults)
    if cfg["mode"] == "train":
        train(cfg)
    elif cfg["mode"] == "sample":
        _, _, dev, _, ctx = setup(cfg)
        ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))
        model = GPT(GPTConfig(**ckpt["model_config"])).to(dev)
        model.load_state_dict(ckpt["model"])
        print(sample(model.eval(), cfg, dev, ctx))
    else:
        bench(cfg)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"train.py: error: {e}")
