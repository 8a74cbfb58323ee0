"""FineWeb-Edu (or any local text) -> GPT-2 token shards for train.py, as build-nanogpt's fineweb.py.

    python prepare_data.py                                     # FineWeb-Edu sample-10BT from the HF hub
    python prepare_data.py --input corpus/ --out data/local   # offline: .txt, .jsonl(.gz), .parquet

Each document (a .txt file, a JSON line, a parquet row): the end-of-text token 50256, then tiktoken GPT-2's
ordinary encoding of its UTF-8 text as stored. Shards use llm.c's .bin layout (256 int32 header: magic,
version, token count; uint16 tokens): {prefix}_val_000000.bin holds the input's first --val_tokens (to hold
out a file, name it first), then {prefix}_train_{k:06d}.bin. run.json marks an unfinished output and
records its finished shards (the same command resumes after them), manifest.json a complete one.
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

def read_shard(path):
    """The uint16 tokens of a .bin shard (memory-mapped), after checking magic, version and size."""
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
    """The input files, folders walked in sorted order; missing paths and other extensions refused."""
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

def row_document(row, field, where, source):
    """(text, where, source) of one JSON object / dataset row; errors name where it came from."""
    if not isinstance(row, dict) or field not in row:
        raise DataError(f"{where}: no '{field}' field (see --text_field)")
    if not isinstance(row[field], str):
        raise DataError(f"{where}: the text field is {type(row[field]).__name__}, not a string")
    return row[field], where, source

def file_documents(path, text_field):
    """Yield (text, where, path) from one local file; errors name the file and line (or row)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        batches = pq.ParquetFile(path).iter_batches(columns=[text_field])  # streamed, row group by group
        for i, row in enumerate(row for batch in batches for row in batch.to_pylist()):
            yield row_document(row, text_field, f"{path} row {i}", path)
        return
    try:
        yield from text_lines(path, text_field)
    except (EOFError, OSError, zlib.error) as e:  # gzip's BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read it ({e}): a corrupt or truncated file?") from None

def text_lines(path, text_field):
    """file_documents of a .txt, .jsonl or .jsonl.gz file."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for lineno, data in enumerate([f.read()] if path.endswith(".txt") else f, 1):  # .txt: one document
            try:
                text, where = data.decode("utf-8"), f"{path} line {lineno}"
            except UnicodeDecodeError as e:
                bad = lineno + data.count(b"\n", 0, e.start)
                raise DataError(f"{path} line {bad}: not valid UTF-8 (byte {data[e.start]:#x})") from None
            if path.endswith(".txt"):
                yield text, path, path
            elif text.strip():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON: {e.msg} at column {e.colno}") from None
                yield row_document(row, text_field, where, path)

def documents(args, files):
    """Yield (text, where, source) in input order; source: the input file, or the hub dataset (streamed)."""
    for path in files or []:
        yield from file_documents(path, args.text_field)
    if not args.input:
        try:
            import datasets
        except ImportError:
            raise DataError("FineWeb-Edu from the hub needs `pip install datasets` (or --input)") from None
        source = f"{HUB_DATASET}:{args.name}"
        rows = datasets.load_dataset(HUB_DATASET, name=args.name, split="train", streaming=True)
        for i, row in enumerate(rows):
            yield row_document(row, args.text_field, f"{source} row {i}", source)

def tokenize(item):
    """(source, tokens) of one document (text, where, source): EOT, then the text's ordinary encoding."""
    text, where, source = item
    try:  # encode_ordinary's tokens as numpy; unlike encode_ordinary it refuses lone surrogates (not UTF-8)
        body = tiktoken.get_encoding("gpt2").encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:
        raise DataError(f"{where}: text is not valid UTF-8") from None
    return source, np.concatenate([[EOT], body]).astype(np.uint16)

class ShardWriter:
    """Cuts the token stream into the val shard, then train shards; val_sources: tokens from each source.
    After each shard run.json records how far the input went (documents: those wholly in shards; carry: the
    tokens of the next one already in them), so that a rerun resumes there and makes the same bytes."""
    def __init__(self, args, run_args, progress):
        self.args, self.run_args, self.fill = args, run_args, 0
        p = progress or dict(shards=[], val_sources={}, documents=0, carry=0)
        self.shards, self.val_sources = p["shards"], p["val_sources"]
        self.doc, self.taken = p["documents"], p["carry"]
        self.split = "train" if self.shards else "val"  # the val shard is the first one written
        self.buf = np.empty(args.shard_tokens if self.shards else args.val_tokens, dtype=np.uint16)
        self.meter = Meter(args, self.doc, sum(s["tokens"] for s in self.shards))

    def add(self, tokens, source):
        """One document's tokens (after its first `carry` where resumed)."""
        while len(tokens):
            n = min(len(tokens), len(self.buf) - self.fill)
            if self.split == "val":
                self.val_sources[source] = self.val_sources.get(source, 0) + n
            self.buf[self.fill:self.fill + n], self.fill, tokens = tokens[:n], self.fill + n, tokens[n:]
            self.taken += n
            self.meter.count(n)
            if self.fill == len(self.buf):
                self.flush()
        self.doc, self.taken = self.doc + 1, 0
        self.meter.count(0, documents=1)

    def flush(self):
        if self.fill:
            k = sum(s["split"] == self.split for s in self.shards)
            name = f"{self.args.prefix}_{self.split}_{k:06d}.bin"
            write_shard(os.path.join(self.args.out, name), self.buf[:self.fill])
            self.shards.append({"file": name, "split": self.split, "tokens": self.fill})
            write_atomic(os.path.join(self.args.out, "run.json"), json.dumps(dict(
                args=self.run_args, shards=self.shards, val_sources=self.val_sources, documents=self.doc,
                carry=self.taken)).encode())
            self.meter.show(f"wrote {name}: {self.fill:,} tokens", final=True)
            self.split, self.fill, self.buf = "train", 0, np.empty(self.args.shard_tokens, dtype=np.uint16)

def hms(seconds):
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

class Meter:
    """Documents, tokens, tok/s and, where the total is known (--max_tokens, the hub config's nominal size),
    the time left: on a terminal a line rewritten about once a second, elsewhere one per finished shard."""
    def __init__(self, args, documents, tokens):
        self.target = args.max_tokens or (None if args.input else HUB_TOKENS.get(args.name))
        self.documents, self.tokens, self.start = documents, tokens, tokens  # start: the resumed tokens
        self.t0 = self.shown = time.time()
        self.tty = sys.stderr.isatty()

    def count(self, tokens, documents=0):
        self.tokens, self.documents = self.tokens + tokens, self.documents + documents
        if self.tty and time.time() - self.shown >= 1:
            self.show("")

    def show(self, what, final=False):
        rate = (self.tokens - self.start) / max(time.time() - self.t0, 1e-9)
        left = (self.target - self.tokens) / rate if self.target and rate else None
        line = (f"{what}{' | ' if what else ''}{self.documents:,} documents, {self.tokens:,} tokens, "
                f"{rate:,.0f} tok/s" + (f", {hms(max(left, 0))} left" if left is not None else ""))
        print(("\r" if self.tty else "") + line, end="\n" if final else "", file=sys.stderr, flush=True)
        self.shown = time.time()

def read_json(path):  # None if there is no such file
    return json.loads(open(path).read()) if os.path.exists(path) else None

def claim_output(out, run_args, force):
    """(manifest, progress): the manifest where the same run is complete in `out` (unless force); else
    run.json's progress where it was interrupted (its shards kept, its other files removed); else None,
    `out` cleared (another run's output only with force) and marked by run.json until manifest.json."""
    os.makedirs(out, exist_ok=True)
    manifest = read_json(os.path.join(out, "manifest.json"))
    if manifest and manifest["args"] == run_args and not force:
        return manifest, None
    run = read_json(os.path.join(out, "run.json"))
    ours = isinstance(run, dict) and run.get("args") == run_args
    if ours and not force and not manifest:
        kept = {s["file"] for s in run["shards"]}
        clear_output(out, keep={*kept, "run.json"})
        return None, run if kept else None
    existing = [f for f in os.listdir(out) if f.endswith((".bin", ".tmp")) or f == "manifest.json"]
    if existing and not (ours or force):
        raise DataError(f"--out {out} holds another run's output ({existing[0]}...): --force replaces it")
    clear_output(out)
    write_atomic(os.path.join(out, "run.json"), json.dumps(dict(args=run_args, shards=[])).encode())
    return None, None

def clear_output(out, keep=()):
    for f in os.listdir(out):
        if (f.endswith((".bin", ".tmp")) or f in ("manifest.json", "run.json")) and f not in keep:
            os.remove(os.path.join(out, f))

def prepare(args):
    """Tokenise args' source into shards under args.out; returns the manifest."""
    files = local_files(args.input) if args.input else None  # bad paths fail before any write
    run_args = {k: v for k, v in sorted(vars(args).items()) if k not in ("workers", "force")}
    manifest, progress = claim_output(args.out, run_args, args.force)
    if manifest:
        print(f"{args.out} is already complete ({manifest['total_tokens']:,} tokens); --force to redo",
              file=sys.stderr)
        return manifest
    writer, t0 = ShardWriter(args, run_args, progress), time.time()
    docs, total, carry = writer.doc, writer.meter.tokens, writer.taken
    if progress:
        print(f"resuming after {len(writer.shards)} finished shards ({total:,} tokens, {docs:,} documents)",
              file=sys.stderr)
    tiktoken.get_encoding("gpt2")  # load the BPE once here: forked workers inherit it ready-made
    # Ctrl-C signals every process of the group: the workers ignore it, the main process handles it
    with mp.Pool(args.workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        try:  # the documents already in shards are read again, but not tokenised
            items = itertools.islice(documents(args, files), docs, None)
            for source, tokens in pool.imap(tokenize, items, chunksize=16):
                tokens, carry = tokens[carry:], 0  # resumed: the first one's tokens already in a shard
                tokens = tokens[:args.max_tokens - total] if args.max_tokens else tokens
                writer.add(tokens, source)
                docs, total = docs + 1, total + len(tokens)
                if args.max_tokens and total >= args.max_tokens:
                    break
        except DataError:  # bad input: a rerun meets it again, so the shards written so far go
            clear_output(args.out)
            raise
    if total <= args.val_tokens:
        raise DataError(f"the input gave {total:,} tokens: --val_tokens={args.val_tokens} leaves none "
                        "to train on")
    writer.flush()
    manifest = dict(source=args.input or f"{HUB_DATASET}:{args.name}", documents=docs, total_tokens=total,
                    tokenizer="tiktoken gpt2 ordinary encoding, <|endoftext|> (50256) before every document",
                    shards=writer.shards, val_sources=writer.val_sources, args=run_args)
    write_atomic(os.path.join(args.out, "manifest.json"), json.dumps(manifest, indent=1).encode())  # last
    os.remove(os.path.join(args.out, "run.json"))
    print(f"done: {docs:,} documents, {total:,} tokens in {len(writer.shards)} shards, "
          f"{(total - writer.meter.start) / (time.time() - t0):,.0f} tok/s -> {args.out}", file=sys.stderr)
    if len(writer.val_sources) > 1:
        print(f"note: the val shard drew from {len(writer.val_sources)} input files (tokens from each: "
              f"{writer.val_sources}); to hold out the first one alone, lower --val_tokens", file=sys.stderr)
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
