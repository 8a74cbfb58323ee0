"""
What a run of train.py or hellaswag.py stands on: its settings from the command line (parse_settings), its
device and process group (setup), a model loaded from a checkpoint (load_model), and the run folder
(out_dir) that train.py writes, kept whole: one run in it at a time (out_dir/lock), a new run never over
another run's files unless asked, checkpoints written whole or not at all, the log cut back to the
checkpoint on resume, and which code made the run (provenance).
"""
import contextlib
import dataclasses
import difflib
import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from ddl import GPT, ConfigError, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
CKPT_KEYS = ("model", "optimizer", "step", "config", "model_config", "data", "rng", "world_size")
SOURCES = ("bench.py", "ddl.py", "fused.py", "hellaswag.py", "prepare_data.py", "rundir.py", "train.py")
BOOLS = {"true": True, "1": True, "false": False, "0": False}

def parse_settings(argv, kinds, doc, presets=None):
    """Each dataclass of kinds from --key=value overrides typed from its defaults; presets[--preset] first
    (the dataclass that has `preset` checks its name). -h / --help prints doc and every key."""
    fields = {f.name: (kind, f) for kind in kinds for f in dataclasses.fields(kind)}
    given = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(doc + "\n".join(f"  --{k}={f.default!r}".ljust(36) + " " + f.metadata["help"]
                                  for k, (_, f) in fields.items()))
            sys.exit(0)
        key, eq, text = arg[2:].partition("=")
        if not eq and key in fields and fields[key][1].type is bool:
            eq, text = "=", "true"  # a bare --flag: true
        if not arg.startswith("--") or not eq:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value (or --flag for a true bool)")
        if key not in fields:
            near = ", ".join("--" + n for n in difflib.get_close_matches(key, list(fields), n=3))
            raise ConfigError(f"unknown key --{key}" + (f"; did you mean {near}?" if near else ""))
        kind = fields[key][1].type
        try:
            given[key] = BOOLS[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            raise ConfigError(f"--{key}={text!r}: expected {article} {kind.__name__}") from None
    values = {**(presets or {}).get(given.get("preset"), {}), **given}
    for key in [k for k in ("compressor", "embed_conv") if k in given and values.get("d_v", 1) == 1]:
        raise ConfigError(f"--{key}={given[key]!r}: applies to d_v > 1 only; d_v is 1: set --d_v or drop it")
    return [kind(**{k: v for k, v in values.items() if fields[k][0] is kind}) for kind in kinds]

def setup(cfg):
    """Process group (torchrun), device and autocast context."""
    ddp, env = "RANK" in os.environ, os.environ  # ddp: started by torchrun
    rank, world, local = (int(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) if ddp else (0, 1, 0)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device='cuda': this torch finds no CUDA device (CPU-only build or no GPU)")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    return rank, world, dev, autocast

# a lock holding no pid is refused for this long after it was made: the run that made it may be starting
# (it writes its pid right after); past this, the lock is a failed start's and is taken over
LOCK_START_S = 10.0

def claim(cfg):
    """Take out_dir/lock (made with O_EXCL, holding this pid): a second run into out_dir is refused while
    this one runs; the lock of a process that is gone, or one left without a pid for LOCK_START_S, is taken
    over; a lock this call made but could not write is removed. A new run refuses an out_dir holding
    a run's ckpt.pt or log.jsonl unless --overwrite=true, which deletes them: log and checkpoint stay of
    one run (a new log beside an old checkpoint would later pass for its history)."""
    lock = os.path.join(cfg.out_dir, "lock")
    with named_os_errors(lock):
        os.makedirs(cfg.out_dir, exist_ok=True)
    while True:
        try:  # "x": O_CREAT | O_EXCL, fails where the file exists
            with named_os_errors(lock), open(lock, "x") as f, removed_on_error(lock):
                f.write(str(os.getpid()))
                f.flush()
            break
        except FileExistsError:
            pid = lock_pid(lock)
            starting = pid is None and time.time() - os.path.getmtime(lock) < LOCK_START_S
            if starting or (pid is not None and pid_alive(pid)):
                msg = f"--out_dir={cfg.out_dir} is in use by another run (pid {pid}, {lock}): wait for it, "
                msg += "choose another --out_dir, or delete the lock if no run uses it"
                raise ConfigError(msg) from None
            print(f"{lock}: its run ({f'pid {pid}' if pid else 'no pid: a failed start'}) is gone; "
                  "taking the lock over")
            os.remove(lock)
    old = [n for n in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(cfg.out_dir, n))]
    if old and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"--out_dir={cfg.out_dir} holds a run's {' and '.join(old)}: --resume continues "
                          "it, --overwrite=true deletes it, or choose another --out_dir")
    for n in old if cfg.overwrite else []:
        os.remove(os.path.join(cfg.out_dir, n))

def release(out_dir):
    """Remove out_dir/lock if this process holds it."""
    if lock_pid(lock := os.path.join(out_dir, "lock")) == os.getpid():
        os.remove(lock)

def lock_pid(path):
    """The pid in a lock file; None if there is none or it is unreadable."""
    try:
        return int(open(path).read())
    except (OSError, ValueError):
        return None

def pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: only the check
    except OSError as e:
        return e.errno == errno.EPERM  # alive, another user's
    return True

def start_log(path, step):
    """log.jsonl emptied for a new run (step None), or cut back to a resumed checkpoint's step: the records of
    later steps (and a last line cut short) came after the checkpoint; a record seen twice is kept once."""
    lines = open(path).readlines() if step is not None and os.path.exists(path) else []
    keep, seen = [], set()
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.endswith("\n") else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not a JSON record ({e.msg}): mend or delete that line, then "
                              "--resume again") from None
        key = (rec.get("type"), rec.get("step"))
        if rec and (rec["type"] == "config" or rec["step"] <= step and key not in seen):
            keep.append(line)
            seen.add(key)
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    if len(lines) > len(keep):
        print(f"{path}: dropped {len(lines) - len(keep)} records written after the step-{step} checkpoint")

def all_finite(tensors):
    """Whether every value is finite in tensors (and in dicts of them: an optimizer's state): the fused
    norm of each (inf or nan where any value is), one sync; only where a norm is not finite, each one's
    min and max, as a norm of finite values past ~1e19 overflows. Tensors on another device than the
    first (AdamW's step counts) are left out."""
    flat = [t for x in tensors for t in (x.values() if isinstance(x, dict) else [x]) if torch.is_tensor(t)]
    flat = [t for t in flat if t.device == flat[0].device and t.is_floating_point() and t.numel()]
    return bool(torch.stack(torch._foreach_norm(flat)).isfinite().all()) or all(
        bool(torch.stack(torch.aminmax(t)).isfinite().all()) for t in flat)

@contextlib.contextmanager
def removed_on_error(path):
    """Delete path if the body raises (a half-written file would keep a disk full or stand in a later run's
    way), then let the exception go on."""
    try:
        yield
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise

DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}

@contextlib.contextmanager
def named_os_errors(path):
    """A full disk, or a read-only or forbidden folder, as one line naming path (ConfigError); any other
    OSError keeps its traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        raise ConfigError(f"cannot write {path}: {DISK_ERRORS[e.errno]}: free space or choose another "
                          "--out_dir") from None

def save_atomic(obj, path):
    """torch.save to a temporary name, then rename: a crash mid-write leaves the old file intact, and the
    temporary file is removed. Written through a Python file, so that a full disk raises its own OSError
    (torch's own writer says only "iostream error")."""
    with named_os_errors(path), removed_on_error(path + ".tmp"):
        with open(path + ".tmp", "wb") as f:
            torch.save(obj, f)
        os.replace(path + ".tmp", path)

def load_checkpoint(path):
    """The checkpoint at path, refusing a missing or unreadable file and one without train.py's keys."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"cannot load checkpoint {path}: {e}") from None
    if missing := [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]:
        raise ConfigError(f"{path} is not a checkpoint of this train.py: it has no {', '.join(missing)}")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    for what, keys in (("unknown", set(ckpt["model_config"]) - known),
                       ("missing", known - set(ckpt["model_config"]))):
        if keys:  # a missing key would silently take today's default
            raise ConfigError(f"{path}: its model_config has {what} keys {', '.join(sorted(keys))}: made by "
                              "another version of ddl.py; load it with that version")
    return ckpt

def load_model(path, dev):
    """The GPT of the checkpoint at path, with its weights, on dev, and the checkpoint."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"])).to(dev)
    model.load_state_dict(ckpt["model"])
    return model, ckpt

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

def provenance(root=HERE):
    """source_sha256: the sha256 of what `sha256sum` prints for the project's source files (those present,
    in sorted order), so `sha256sum bench.py ddl.py ... train.py | sha256sum` recomputes it; git_commit:
    HEAD where git finds those files as committed there, else None; git_dirty: whether they differ from it
    (None without git). The hash holds where git metadata is stale or absent."""
    names = [n for n in SOURCES if os.path.exists(os.path.join(root, n))]
    digest = lambda n: hashlib.sha256(open(os.path.join(root, n), "rb").read()).hexdigest()
    listing = "".join(f"{digest(n)}  {n}\n" for n in names)
    out = dict(source_sha256=hashlib.sha256(listing.encode()).hexdigest(), git_commit=None, git_dirty=None)
    try:
        head, status = (subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=30)
                        for a in (["rev-parse", "HEAD"], ["status", "--porcelain", "--", *names]))
    except (OSError, subprocess.TimeoutExpired):
        return out
    if head.returncode == 0 and status.returncode == 0:
        dirty = bool(status.stdout.strip())
        out.update(git_commit=None if dirty else head.stdout.strip(), git_dirty=dirty)
    return out
