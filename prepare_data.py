"""
FineWeb-Edu (or any local text) -> GPT-2 token shards for train.py, as build-nanogpt's fineweb.py.

    python prepare_data.py                                     # FineWeb-Edu sample-10BT from the HF hub
    python prepare_data.py --input corpus/ --out data/local   # offline: .txt, .jsonl(.gz), .parquet

Each document: the end-of-text token 50256, then tiktoken GPT-2's ordinary encoding of its text.
Shards use the llm.c .bin layout (256 int32 header: magic, version, token count; uint16 tokens):
first {prefix}_val_000000.bin (--val_tokens), then {prefix}_train_{k:06d}.bin (--shard_tokens each).
"""
import argparse
import gzip
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import tiktoken

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
EOT = 50256
HUB_DATASET = "HuggingFaceFW/fineweb-edu"
EXTENSIONS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


class DataError(ValueError):
    """The input or a shard is not usable; the message says which and why (one line, no traceback)."""


def read_shard(path):
    """The uint16 tokens of a .bin shard (memory-mapped), after checking magic, version and size."""
    size = os.path.getsize(path)
    if size < 4 * HEADER_INTS:
        raise ValueError(f"{path}: {size} bytes is shorter than the {4 * HEADER_INTS}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: magic {header[0]} is not {MAGIC}: not a token shard")
    if header[1] != VERSION:
        raise ValueError(f"{path}: shard version {header[1]} is not supported (expected {VERSION})")
    n = int(header[2])
    if size != 4 * HEADER_INTS + 2 * n:
        raise ValueError(f"{path}: header says {n} tokens ({4 * HEADER_INTS + 2 * n} bytes) but the file "
                         f"has {size} bytes: truncated or corrupt")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * HEADER_INTS, shape=(n,))


def write_shard(path, tokens):
    """Write atomically: a temporary name, then os.replace, so no partial file has the final name."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    with open(path + ".tmp", "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- sources

def local_files(paths):
    """The input files, folders walked in sorted order; missing paths and other extensions refused."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs)
            files += [f for f in found if f.endswith(EXTENSIONS)]
        elif not os.path.exists(p):
            raise ValueError(f"--input: {p} does not exist")
        elif not p.endswith(EXTENSIONS):
            raise ValueError(f"--input: {p} has an unsupported extension (allowed: {', '.join(EXTENSIONS)})")
        else:
            files.append(p)
    if not files:
        raise ValueError(f"--input: no {', '.join(EXTENSIONS)} files found in {paths}")
    return files


def row_text(row, field, where):
    """The text of one JSON object / dataset row, with errors naming where it came from."""
    if not isinstance(row, dict) or field not in row:
        raise ValueError(f"{where}: no '{field}' field (see --text_field)")
    if not isinstance(row[field], str):
        raise ValueError(f"{where}: the text field is {type(row[field]).__name__}, not a string")
    return row[field]


def file_documents(path, text_field):
    """Yield (text, where) from one file; errors name the file and line."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)")
        batches = pq.ParquetFile(path).iter_batches(columns=[text_field])  # streamed, row group by group
        for i, row in enumerate(row for batch in batches for row in batch.to_pylist()):
            yield row_text(row, text_field, f"{path} row {i}"), f"{path} row {i}"
        return
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if path.endswith(".txt"):
                yield f.read(), path
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
                yield row_text(row, text_field, f"{path} line {lineno}"), f"{path} line {lineno}"
    except UnicodeDecodeError:
        raise ValueError(f"{path} after line {lineno}: not valid UTF-8") from None


def load_hub(name):
    """FineWeb-Edu rows streamed from the Hugging Face hub (needs `datasets`)."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("downloading FineWeb-Edu needs the datasets package: pip install datasets "
                         "(or use --input with local files)")
    return datasets.load_dataset(HUB_DATASET, name=name, split="train", streaming=True)


def documents(args, files):
    if args.input:
        for path in files:
            yield from file_documents(path, args.text_field)
    else:
        for i, row in enumerate(load_hub(args.name)):
            where = f"{HUB_DATASET}:{args.name} row {i}"
            yield row_text(row, args.text_field, where), where


# ----------------------------------------------------------------------------- tokenisation

def tokenize(item):
    text, where = item
    # encode_ordinary's tokens (no special tokens recognised), returned straight as a numpy array;
    # unlike encode_ordinary it refuses lone surrogates (from JSON escapes), which are not UTF-8
    try:
        body = tiktoken.get_encoding("gpt2").encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:
        raise ValueError(f"{where}: text is not valid UTF-8") from None
    tokens = np.empty(len(body) + 1, dtype=np.uint16)
    tokens[0], tokens[1:] = EOT, body
    return tokens


class ShardWriter:
    """Fills fixed-size buffers and writes val, then train shards; memory is one shard."""
    def __init__(self, out, prefix, val_tokens, shard_tokens):
        self.out, self.prefix, self.shard_tokens = out, prefix, shard_tokens
        self.split, self.index, self.shards, self.fill = "val" if val_tokens else "train", 0, [], 0
        self.buf = np.empty(val_tokens or shard_tokens, dtype=np.uint16)

    def add(self, tokens):
        while len(tokens):
            n = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = tokens[:n]
            self.fill, tokens = self.fill + n, tokens[n:]
            if self.fill == len(self.buf):
                self.flush()

    def flush(self):
        if self.fill == 0:
            return
        name = f"{self.prefix}_{self.split}_{self.index:06d}.bin"
        write_shard(os.path.join(self.out, name), self.buf[:self.fill])
        self.shards.append({"file": name, "split": self.split, "tokens": int(self.fill)})
        if self.split == "val":
            self.split, self.index = "train", 0
            self.buf = np.empty(self.shard_tokens, dtype=np.uint16)
        else:
            self.index += 1
        self.fill = 0


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def claim_output(out, run_args, force):
    """Make `out` ready for this run. Returns the manifest if the same run is already complete;
    otherwise clears an unfinished run of the same arguments (a restart from scratch) and marks
    the folder with run.json. Shards of another run are refused unless force."""
    os.makedirs(out, exist_ok=True)
    manifest = read_json(os.path.join(out, "manifest.json"))
    if manifest and manifest["args"] == run_args and not force:
        return manifest
    ours = read_json(os.path.join(out, "run.json")) == run_args
    existing = [f for f in os.listdir(out) if f.endswith((".bin", ".tmp")) or f == "manifest.json"]
    if existing and not (ours or force):
        raise ValueError(f"--out {out} holds shards of a different run ({existing[0]}, ...): "
                         "use --force to replace them, or another --out")
    for f in existing:
        os.remove(os.path.join(out, f))
    write_json(os.path.join(out, "run.json"), run_args)
    return None


def prepare(args):
    """Tokenise args' source into shards under args.out; returns the manifest."""
    files = local_files(args.input) if args.input else None  # bad paths fail before any write
    run_args = {k: v for k, v in sorted(vars(args).items()) if k not in ("workers", "force")}
    manifest = claim_output(args.out, run_args, args.force)
    if manifest:
        print(f"{args.out} is already complete ({manifest['total_tokens']:,} tokens); --force to redo",
              file=sys.stderr)
        return manifest
    writer = ShardWriter(args.out, args.prefix, args.val_tokens, args.shard_tokens)
    tiktoken.get_encoding("gpt2")  # load the BPE once here: forked workers inherit it ready-made
    t0, last, docs, total = time.time(), 0.0, 0, 0
    with mp.Pool(args.workers) as pool:
        for tokens in pool.imap(tokenize, documents(args, files), chunksize=16):
            if args.max_tokens:
                tokens = tokens[:args.max_tokens - total]
            writer.add(tokens)
            docs, total = docs + 1, total + len(tokens)
            done = args.max_tokens and total >= args.max_tokens
            if time.time() - last > 0.5 or done:
                last = time.time()
                print(f"\rdocuments {docs:,} | tokens {total:,} | {total / (last - t0 + 1e-9):,.0f} tok/s | "
                      f"shards {len(writer.shards)}", end="", file=sys.stderr, flush=True)
            if done:
                break
    writer.flush()
    manifest = {"source": f"{HUB_DATASET}:{args.name}" if not args.input else args.input,
                "tokenizer": "tiktoken gpt2, <|endoftext|> (50256) before every document",
                "documents": docs, "total_tokens": total, "shards": writer.shards, "args": run_args}
    write_json(os.path.join(args.out, "manifest.json"), manifest)  # last: marks the output complete
    os.remove(os.path.join(args.out, "run.json"))
    dt = time.time() - t0
    print(f"\ndone: {docs:,} documents, {total:,} tokens in {len(writer.shards)} shards, {dt:.1f} s "
          f"({total / max(dt, 1e-9):,.0f} tok/s) -> {args.out}", file=sys.stderr)
    return manifest


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="local files or folders (.txt, .jsonl, .jsonl.gz, .parquet); "
                                              "default: FineWeb-Edu from the hub")
    p.add_argument("--name", default="sample-10BT", help="FineWeb-Edu config, e.g. sample-100BT")
    p.add_argument("--out", default=None, help="output folder (default data/fineweb_edu or data/local)")
    p.add_argument("--prefix", default=None, help="shard name prefix (default fineweb_edu or local)")
    p.add_argument("--text_field", default="text", help="JSON / parquet field holding the text")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokeniser processes")
    p.add_argument("--val_tokens", type=int, default=10_485_760, help="tokens in the val shard (first)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per train shard")
    p.add_argument("--max_tokens", type=int, default=0, help="stop after this many tokens (0: all)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    default = "local" if args.input else "fineweb_edu"
    args.out = args.out or os.path.join("data", default)
    args.prefix = args.prefix or default
    for field, low in (("workers", 1), ("shard_tokens", 1), ("val_tokens", 0), ("max_tokens", 0)):
        if getattr(args, field) < low:
            raise ValueError(f"--{field}={getattr(args, field)} is invalid: must be >= {low}")
    return args


if __name__ == "__main__":
    try:
        prepare(parse_args())
    except ValueError as e:
        sys.exit(f"prepare_data.py: error: {e}")
