"""
HellaSwag (Zellers et al. 2019) accuracy of a train.py checkpoint, scored as build-nanogpt scores it: each of
the 4 endings is appended to the context and the model's cross-entropy over the ending's tokens is compared.

    python hellaswag.py --out_dir=out --fetch=true              # download the val file once (10,042 examples)
    python hellaswag.py --out_dir=out                           # score every example
    torchrun --standalone --nproc_per_node=8 hellaswag.py --out_dir=out   # examples split over the GPUs
    python train.py --preset=124m --hellaswag=data/hellaswag/hellaswag_val.jsonl   # at every eval_interval

acc: the ending of least summed loss; acc_norm: the ending of least mean loss per token, the figure
build-nanogpt and llm.c report (GPT-2 124M: about 0.295 scored this way). Settings:
"""
import dataclasses
import http.client
import json
import os
import shutil
import sys
import time
import urllib.request
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ddl import ConfigError, setting
from prepare_data import DataError
from rundir import load_model, parse_settings, setup

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_FILE = os.path.join("data", "hellaswag", "hellaswag_val.jsonl")  # where --fetch puts it

class HellaSwagError(DataError):
    """The HellaSwag file is missing, malformed or cannot be downloaded: reported in one line."""

@dataclasses.dataclass
class EvalConfig:
    out_dir: str = setting("out", "the checkpoint to score: out_dir/ckpt.pt, written by train.py")
    file: str = setting(DEFAULT_FILE, "the HellaSwag val file: JSON lines with ctx, endings (4), label")
    fetch: bool = setting(False, "download --file from the HellaSwag repository first, if it is not there")
    limit: int = setting(0, "score only the first N examples; 0: all")
    batch_examples: int = setting(16, "examples per forward (4 rows each)")
    device: str = setting("auto", "auto | cpu | cuda")

    def __post_init__(self):
        if self.limit < 0:
            raise ConfigError(f"--limit={self.limit}: must be >= 0")
        if self.batch_examples < 1:
            raise ConfigError(f"--batch_examples={self.batch_examples}: must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device={self.device!r}: allowed: auto, cpu, cuda")

class Example(NamedTuple):
    """One example as token ids: the context, the 4 endings (each with its leading space), the right one."""
    ctx: list
    endings: list
    label: int

# ----------------------------------------------------------------------------- the file

def fetch(path=DEFAULT_FILE, url=URL):
    """path, downloaded from url first if it is not there. The download goes to a temporary name, then is
    renamed: an interrupted one leaves no file that looks complete."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: torchrun's ranks may all fetch at once
    print(f"downloading {url} to {path}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise HellaSwagError(f"cannot download {url}: {getattr(e, 'reason', e)}; is this machine offline? "
                             f"Download the file elsewhere and copy it to {path}") from None
    os.replace(tmp, path)
    return path

def parse_record(line, where):
    """The dict on one line of the file, checked: ctx a non-empty string, endings 4 strings, label 0-3."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise HellaSwagError(f"{where}: not a JSON record ({e.msg}, column {e.colno})") from None
    if not isinstance(rec, dict) or not {"ctx", "endings", "label"} <= rec.keys():
        raise HellaSwagError(f"{where}: a record needs the keys ctx, endings and label")
    ctx, endings, label = rec["ctx"], rec["endings"], rec["label"]
    if not isinstance(ctx, str) or not ctx:  # an empty context leaves the ending's first token unscored
        raise HellaSwagError(f"{where}: ctx must be a non-empty string, got {ctx!r}")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: endings must be a list of 4 strings, got {endings!r}"[:300])
    if type(label) is not int or not 0 <= label < 4:
        raise HellaSwagError(f"{where}: label must be an integer 0-3, got {label!r}")
    return rec

def utf8(line, where):
    """A line's bytes as text, or an error naming the file and line where they are not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HellaSwagError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from None

def read_examples(path):
    """The records of a HellaSwag JSON-lines file (blank lines skipped), each checked by parse_record."""
    if os.path.isdir(path):
        raise HellaSwagError(f"{path} is a folder: --file names HellaSwag's val file (hellaswag_val.jsonl)")
    if not os.path.isfile(path):
        raise HellaSwagError(f"{path}: no such file; download it with "
                             f"`python hellaswag.py --fetch=true --file={path}` (from {URL})")
    with open(path, "rb") as f:
        records = [parse_record(utf8(line, f"{path}:{i}"), f"{path}:{i}") for i, line in enumerate(f, 1)
                   if line.strip()]
    if not records:
        raise HellaSwagError(f"{path}: the file holds no examples")
    return records

def encode(rec, enc):
    """A record as token ids, GPT-2's tiktoken encoding: the context, then each ending after a space."""
    return Example(enc.encode_ordinary(rec["ctx"]), [enc.encode_ordinary(" " + e) for e in rec["endings"]],
                   rec["label"])

def load(path):
    """The examples of the file at path, tokenised once (training scores them at every eval)."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    return [encode(rec, enc) for rec in read_examples(path)]

def from_setting(value):
    """train.py's --hellaswag: '' -> None (off); 'fetch' -> DEFAULT_FILE's examples, downloaded when absent;
    otherwise the examples of the file at that path."""
    if not value:
        return None
    return load(fetch() if value == "fetch" else value)

# ----------------------------------------------------------------------------- scoring

def render(ex, block_size):
    """Four rows of token ids, the context then ending i, and their masks: 1 on the ending's tokens.

    A row longer than block_size loses context tokens from the left, the same number in all four rows, so that
    the endings are still compared after one context. An ending of block_size tokens or more (possible only
    with a tiny block_size) also loses its tail: one context token is always kept, to predict the ending's
    first token."""
    endings = [e[:block_size - 1] for e in ex.endings]
    keep = block_size - max(len(e) for e in endings)  # >= 1
    ctx = ex.ctx[-keep:]
    return [ctx + e for e in endings], [[0] * len(ctx) + [1] * len(e) for e in endings]

def is_cut(ex, block_size):
    """Whether render shortens this example to fit block_size."""
    return len(ex.ctx) + max(len(e) for e in ex.endings) > block_size

def collate(rendered, device):
    """The rows of several rendered examples as one (rows, longest) tensor of ids and one of masks, padded
    with zeros at the right: a causal model's logits before the padding do not see it, the mask ignores it."""
    rows = [r for tokens, _ in rendered for r in tokens]
    masks = [m for _, mask in rendered for m in mask]
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return tokens.to(device), mask.to(device)

def ending_losses(model, tokens, mask, ctx):
    """Per row, the summed and the mean cross-entropy over the ending's tokens, each predicted by the logit
    one position before it (the logit at t scores token t + 1). In fp32, whatever the autocast dtype."""
    with ctx:
        logits = model(tokens[:, :-1])  # the last token predicts nothing we score
    targets, scored = tokens[:, 1:], mask[:, 1:].bool()
    losses = torch.zeros(scored.shape, device=tokens.device)
    # only the ending's positions: the context's and the padding's cross-entropy would be thrown away,
    # and over the whole vocabulary it costs a quarter of the evaluation
    losses[scored] = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    total = losses.sum(1)
    return total, total / scored.sum(1)

def choose(total, mean):
    """Per example (4 consecutive rows): the ending of least summed loss (acc) and of least mean loss
    (acc_norm); a tie goes to the first."""
    return total.view(-1, 4).argmin(1), mean.view(-1, 4).argmin(1)

@torch.no_grad()
def evaluate(model, examples, device, ctx, rank=0, world=1, batch_examples=16):
    """acc, acc_norm and n over examples (from load). Under torchrun rank r of world W scores examples
    r, r + W, ... and the counts are summed over ranks (every rank must call it). model: the raw GPT (not the
    DDP or compiled wrapper: HellaSwag's lengths vary per batch); ctx: the autocast context (bf16 on CUDA)."""
    block_size = model.config.block_size
    mine = examples[rank::world]
    counts = torch.zeros(3, dtype=torch.long, device=device)  # examples, right by sum, right by mean
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), batch_examples):
        batch = mine[i:i + batch_examples]
        tokens, mask = collate([render(ex, block_size) for ex in batch], device)
        by_sum, by_mean = choose(*ending_losses(model, tokens, mask, ctx))
        labels = torch.tensor([ex.label for ex in batch], device=device)
        counts[0] += len(batch)
        counts[1] += (by_sum == labels).sum()
        counts[2] += (by_mean == labels).sum()
    model.train(was_training)
    if world > 1:
        dist.all_reduce(counts)
    n, right, right_norm = counts.tolist()  # syncs
    return dict(acc=right / n, acc_norm=right_norm / n, n=n)

# ----------------------------------------------------------------------------- the command line

def main(argv):
    cfg, = parse_settings(argv, (EvalConfig,), __doc__)
    rank, world, dev, ctx = setup(cfg)
    examples = load(fetch(cfg.file) if cfg.fetch else cfg.file)[:cfg.limit or None]
    model, ckpt = load_model(os.path.join(cfg.out_dir, "ckpt.pt"), dev)
    t0 = time.perf_counter()
    r = evaluate(model, examples, dev, ctx, rank, world, cfg.batch_examples)
    seconds = time.perf_counter() - t0
    if rank == 0:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        block_size = model.config.block_size
        cut = sum(is_cut(ex, block_size) for ex in examples)
        print(f"step {ckpt['step']} | {os.path.basename(cfg.file)}: {r['n']} examples | acc {r['acc']:.4f} | "
              f"acc_norm {r['acc_norm']:.4f} | {r['n'] / seconds:.1f} examples/s on {name} x{world}"
              + (f" | {cut} cut to block_size={block_size}, context from the left" if cut else ""))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return r

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError) as e:  # a user can act on these; all else keeps its traceback
        sys.exit(f"hellaswag.py: error: {e}")
