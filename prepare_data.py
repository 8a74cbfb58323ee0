"""FineWeb-Edu (or any local text) -> GPT-2 token shards for train.py, as build-nanogpt's fineweb.py.

    python prepare_data.py                                     # FineWeb-Edu sample-10BT from the HF hub
    python prepare_data.py --input corpus/ --out data/local   # offline: .txt, .jsonl(.gz), .parquet

Each document (a .txt file, a JSON line, a parquet row) is token 50256, then tiktoken GPT-2's ordinary
encoding of its text. The first --val_tokens go to {prefix}_val_000000.bin (to hold out a file, name it
first), the rest to {prefix}_train_{k:06d}.bin, in llm.c's layout (256 int32 header: magic, version,
token count; uint16 tokens). run.json marks an unfinished output (the same command resumes it after its
finished shards), manifest.json a complete one.
"""
import argparse
import gzip
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import zlib

import numpy as np
import tiktoken

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
EOT = 50256
HUB_DATASET = "HuggingFaceFW/fineweb-edu"
EXTENSIONS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
HUB_TOKENS = {"sample-10BT": 10e9, "sample-100BT": 100e9, "sample-350BT": 350e9}  # nominal, for the time left

class DataError(ValueError):
    """A problem with the user's input, options or shards: reported in one line, without a traceback."""

def read_shard(path):  # the uint16 tokens, memory-mapped, after checking magic, version and size
    size, head = os.path.getsize(path), 4 * HEADER_INTS
    if size < head:
        raise DataError(f"{path}: {size} bytes is shorter than the {head}-byte shard header")
    magic, version, n = np.fromfile(path, dtype="<i4", count=3).tolist()
    if (magic, version) != (MAGIC, VERSION):
        raise DataError(f"{path}: magic {magic}, version {version} (not {MAGIC}, {VERSION}): not a shard")
    if size != (want := head + 2 * n):
        raise DataError(f"{path}: header says {n} tokens ({want} bytes), the file has {size}: corrupt")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=head, shape=(n,))

def write_atomic(path, *chunks):
    """Write bytes-like chunks under a temporary name, then os.replace: no partial file has the final name."""
    with open(path + ".tmp", "wb") as f:
        f.writelines(chunks)
    os.replace(path + ".tmp", path)

def write_shard(path, tokens):
    header = np.array([MAGIC, VERSION, len(tokens)] + [0] * (HEADER_INTS - 3), dtype="<i4")
    write_atomic(path, header, tokens.astype("<u2", copy=False))  # numpy arrays are written without a copy

def local_files(paths):
    """The input files, folders walked in sorted order."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(r, f) for r, _, fs in os.walk(p)
                            for f in fs if f.endswith(EXTENSIONS))
        elif os.path.exists(p) and p.endswith(EXTENSIONS):
            files.append(p)
        else:
            why = "has an unsupported extension" if os.path.exists(p) else "does not exist"
            raise DataError(f"--input: {p} {why} (allowed: {', '.join(EXTENSIONS)}, or folders of them)")
    if not files:
        raise DataError(f"--input: no {', '.join(EXTENSIONS)} files found in {paths}")
    return files

def file_rows(path, field):
    """Yield (row, where) of one local file: its parquet rows or JSON lines, or a .txt file's text whole."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        batches = pq.ParquetFile(path).iter_batches(columns=[field])  # streamed, row group by group
        for i, row in enumerate(row for batch in batches for row in batch.to_pylist()):
            yield row, f"{path} row {i}"
        return
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for lineno, data in enumerate([f.read()] if path.endswith(".txt") else f, 1):
                text = data.decode("utf-8")
                if path.endswith(".txt"):  # the whole file, one document
                    yield {field: text}, path
                elif text.strip():
                    yield json.loads(text), f"{path} line {lineno}"
    except UnicodeDecodeError as e:
        bad = lineno + data.count(b"\n", 0, e.start)
        raise DataError(f"{path} line {bad}: not valid UTF-8 (byte {data[e.start]:#x})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {lineno}: not valid JSON: {e.msg} at column {e.colno}") from None
    except (EOFError, OSError, zlib.error) as e:  # gzip's BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read it ({e}): a corrupt or truncated file?") from None

def documents(args, files):
    """Yield (text, where, source) in input order; source: the input file, or the hub dataset (streamed)."""
    field = args.text_field
    if args.input:
        streams = [(path, file_rows(path, field)) for path in files]
    else:
        try:
            import datasets
        except ImportError:
            raise DataError("FineWeb-Edu from the hub needs `pip install datasets` (or --input)") from None
        source = f"{HUB_DATASET}:{args.name}"
        rows = datasets.load_dataset(HUB_DATASET, name=args.name, split="train", streaming=True)
        streams = [(source, ((row, f"{source} row {i}") for i, row in enumerate(rows)))]
    for source, rows in streams:
        for row, where in rows:
            if not isinstance(row, dict) or field not in row:
                raise DataError(f"{where}: no '{field}' field (see --text_field)")
            if not isinstance(row[field], str):
                raise DataError(f"{where}: the text field is {type(row[field]).__name__}, not a string")
            yield row[field], where, source

def tokenize(item):
    text, where, source = item
    try:  # encode_ordinary's tokens as numpy; unlike encode_ordinary it refuses lone surrogates (not UTF-8)
        body = tiktoken.get_encoding("gpt2").encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:
        raise DataError(f"{where}: text is not valid UTF-8") from None
    return source, np.concatenate([[EOT], body]).astype(np.uint16)

class ShardWriter:
    """Cuts the token stream into the val shard, then train shards; val_sources: tokens from each source.
    After each shard run.json records how far the input went (documents: those wholly in shards; carry: the
    tokens of the next one already in them), so that a rerun resumes there and makes the same bytes. Progress
    goes to stderr: on a terminal a line rewritten about once a second, elsewhere one per finished shard."""
    def __init__(self, args, run):
        self.args, self.run, self.fill = args, run, 0
        self.shards, self.val_sources = run["shards"], run["val_sources"]
        self.docs, self.taken = run["documents"], run["carry"]
        self.tokens = self.start = sum(s["tokens"] for s in self.shards)  # start: the resumed tokens
        self.buf = np.empty(args.shard_tokens if self.shards else args.val_tokens, dtype=np.uint16)
        self.target = args.max_tokens or (None if args.input else HUB_TOKENS.get(args.name))
        self.t0 = self.shown = time.time()
        self.tty = sys.stderr.isatty()

    def add(self, tokens, source):
        """One document's tokens, less those in a shard already (resumed: `carry`) or past --max_tokens."""
        tokens = tokens[self.taken:]
        if self.args.max_tokens:
            tokens = tokens[:self.args.max_tokens - self.tokens]
        while len(tokens):
            n = min(len(tokens), len(self.buf) - self.fill)
            if not self.shards:  # the val shard is the first one written
                self.val_sources[source] = self.val_sources.get(source, 0) + n
            self.buf[self.fill:self.fill + n], self.fill, tokens = tokens[:n], self.fill + n, tokens[n:]
            self.taken, self.tokens = self.taken + n, self.tokens + n
            if self.fill == len(self.buf):
                self.flush()
        self.docs, self.taken = self.docs + 1, 0
        if self.tty and time.time() - self.shown >= 1:
            self.show()

    def flush(self):
        if self.fill:
            split = "train" if self.shards else "val"
            k = sum(s["split"] == split for s in self.shards)
            name = f"{self.args.prefix}_{split}_{k:06d}.bin"
            write_shard(os.path.join(self.args.out, name), self.buf[:self.fill])
            self.shards.append({"file": name, "split": split, "tokens": self.fill})
            self.run.update(documents=self.docs, carry=self.taken)  # shards, val_sources: the same objects
            write_atomic(os.path.join(self.args.out, "run.json"), json.dumps(self.run).encode())
            self.show(f"wrote {name}: {self.fill:,} tokens | ")
            self.fill, self.buf = 0, np.empty(self.args.shard_tokens, dtype=np.uint16)

    def show(self, shard=""):  # a shard's line ends with a newline; the others are rewritten in place
        rate = (self.tokens - self.start) / max(time.time() - self.t0, 1e-9)
        line = f"{shard}{self.docs:,} documents, {self.tokens:,} tokens, {rate:,.0f} tok/s"
        if self.target and rate:
            line += f", {hms(max((self.target - self.tokens) / rate, 0))} left"
        print(("\r" if self.tty else "") + line, end="\n" if shard else "", file=sys.stderr, flush=True)
        self.shown = time.time()

def hms(seconds):
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

def claim_output(out, run_args, force):
    """(manifest, None) where the same run is complete in `out` (unless force); else (None, run): run.json's
    progress where the same run was interrupted (its shards kept), else a fresh start (another run's output
    replaced only with force). run.json is written first: `out` reads as unfinished until manifest.json."""
    os.makedirs(out, exist_ok=True)
    manifest, run = read_json(os.path.join(out, "manifest.json")), read_json(os.path.join(out, "run.json"))
    # a manifest beside run.json is a --force clear cut short, not a complete output
    if manifest and run is None and manifest["args"] == run_args and not force:
        return manifest, None
    ours = isinstance(run, dict) and run.get("args") == run_args
    existing = [f for f in os.listdir(out) if f.endswith((".bin", ".tmp")) or f == "manifest.json"]
    if existing and not (ours or force):
        raise DataError(f"--out {out} holds another run's output ({existing[0]}...): --force replaces it")
    # resume only this run's own interrupted output once it has a finished shard; else start over
    if force or manifest or not (ours and run["shards"]):
        run = dict(args=run_args, shards=[], val_sources={}, documents=0, carry=0)
    write_atomic(os.path.join(out, "run.json"), json.dumps(run).encode())
    clear_output(out, keep={"run.json", *(s["file"] for s in run["shards"])})
    return None, run

def read_json(path):  # None if there is no such file
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)

def clear_output(out, keep=()):
    for f in os.listdir(out):
        if (f.endswith((".bin", ".tmp")) or f in ("manifest.json", "run.json")) and f not in keep:
            os.remove(os.path.join(out, f))

def prepare(args):
    """Tokenise args' source into shards under args.out; returns the manifest."""
    files = local_files(args.input) if args.input else None  # bad paths fail before any write
    run_args = {k: v for k, v in sorted(vars(args).items()) if k not in ("workers", "force")}
    manifest, run = claim_output(args.out, run_args, args.force)
    if manifest:
        print(f"{args.out} is already complete ({manifest['total_tokens']:,} tokens); --force to redo",
              file=sys.stderr)
        return manifest
    w = ShardWriter(args, run)
    if w.shards:
        print(f"resuming after {len(w.shards)} finished shards ({w.tokens:,} tokens, {w.docs:,} documents)",
              file=sys.stderr)
    tiktoken.get_encoding("gpt2")  # load the BPE once here: forked workers inherit it ready-made
    # Ctrl-C signals every process of the group: the workers ignore it, the main process handles it
    with mp.Pool(args.workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        try:  # the documents already in shards are read again, but not tokenised
            items = itertools.islice(documents(args, files), w.docs, None)
            for source, tokens in pool.imap(tokenize, items, chunksize=16):
                w.add(tokens, source)
                if args.max_tokens and w.tokens >= args.max_tokens:
                    break
        except DataError:  # bad input: a rerun meets it again, so the shards written so far go
            clear_output(args.out)
            raise
    if w.tokens <= args.val_tokens:
        raise DataError(f"the input gave {w.tokens:,} tokens: --val_tokens={args.val_tokens} leaves none "
                        "to train on")
    w.flush()
    manifest = dict(source=args.input or f"{HUB_DATASET}:{args.name}", documents=w.docs,
                    total_tokens=w.tokens,
                    tokenizer="tiktoken gpt2 ordinary encoding, <|endoftext|> (50256) before every document",
                    shards=w.shards, val_sources=w.val_sources, args=run_args)
    write_atomic(os.path.join(args.out, "manifest.json"), json.dumps(manifest, indent=1).encode())  # last
    os.remove(os.path.join(args.out, "run.json"))
    print(f"done: {w.docs:,} documents, {w.tokens:,} tokens in {len(w.shards)} shards, "
          f"{(w.tokens - w.start) / (time.time() - w.t0):,.0f} tok/s -> {args.out}", file=sys.stderr)
    if len(w.val_sources) > 1:
        print(f"note: the val shard drew from {len(w.val_sources)} input files (tokens from each: "
              f"{w.val_sources}); to hold out the first one alone, lower --val_tokens", file=sys.stderr)
    return manifest

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="local files or folders (default: FineWeb-Edu from the hub)")
    d = " (default: %(default)s)"
    p.add_argument("--name", default="sample-10BT", help="FineWeb-Edu config" + d)
    p.add_argument("--out", help="output folder (default: data/fineweb_edu, or data/local with --input)")
    p.add_argument("--prefix", help="shard name prefix (default: fineweb_edu, or local with --input)")
    p.add_argument("--text_field", default="text", help="JSON / parquet field of the text" + d)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokeniser processes" + d)
    p.add_argument("--val_tokens", type=int, default=10_485_760, help="val shard tokens, >= 1" + d)
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="train shard tokens" + d)
    p.add_argument("--max_tokens", type=int, default=0, help="stop after this many tokens, 0: all" + d)
    p.add_argument("--force", action="store_true", help="redo the output, even a complete one or another's")
    args = p.parse_args(argv)
    default = "local" if args.input else "fineweb_edu"
    args.out, args.prefix = args.out or os.path.join("data", default), args.prefix or default
    for field, low in (("workers", 1), ("shard_tokens", 1), ("val_tokens", 1), ("max_tokens", 0)):
        if getattr(args, field) < low:
            raise DataError(f"--{field}={getattr(args, field)} is invalid: must be >= {low}")
    check_folder("--out", args.out)
    return args

def check_folder(flag, path):
    """Refuse an output folder that a file stands in the way of (path, or a parent of it), before any work."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise DataError(f"{flag}={path}: {p} is a file, not a folder; choose another {flag}")

def main(argv=None):
    """User errors (DataError) and Ctrl-C end in one line; any other error keeps its traceback."""
    try:
        prepare(parse_args(argv))
    except DataError as e:
        sys.exit(f"prepare_data.py: error: {e}")
    except KeyboardInterrupt:
        print("prepare_data.py: interrupted: the output is incomplete; the same command resumes it after its "
              "finished shards", file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    main()
