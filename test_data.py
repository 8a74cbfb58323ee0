"""prepare_data.py: shards, their format, its options and the failures a user can hit. CPU, offline."""
import gzip
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

import prepare_data

HERE = os.path.dirname(os.path.abspath(__file__))


# ============================================================================ prepare_data.py

# the last is a .txt: one document
DOCS = ["Größe und Maß: naïve café ☕", "日本語のテキスト。",
        "plain <|endoftext|> inside text", "emoji 🙂 and more words " * 20, "last one,\nover two lines\n"]


def eot_tokens(docs):
    """The oracle: per document, 50256 then tiktoken's ordinary GPT-2 encoding, in order."""
    enc = tiktoken.get_encoding("gpt2")
    return [t for d in docs for t in [50256] + enc.encode_ordinary(d)]


def write_inputs(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "a.jsonl"), "w", encoding="utf-8") as f:
        for d in DOCS[:2]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with gzip.open(os.path.join(folder, "b.jsonl.gz"), "wt", encoding="utf-8") as f:
        for d in DOCS[2:4]:
            f.write(json.dumps({"text": d}) + "\n")
    with open(os.path.join(folder, "c.txt"), "w", encoding="utf-8") as f:
        f.write(DOCS[4])


def run_prepare(src, out, *extra):
    return prepare_data.prepare(prepare_data.parse_args(["--input", str(src), "--out", str(out), *extra]))


def all_tokens(out):
    files = sorted(f for f in os.listdir(out) if f.endswith(".bin"))
    val = [f for f in files if "_val_" in f]
    order = val + [f for f in files if f not in val]
    return np.concatenate([prepare_data.read_shard(os.path.join(out, f)) for f in order])


def test_round_trip_split_sizes_and_header(tmp_path):
    write_inputs(tmp_path / "in")
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "10", "--shard_tokens", "25",
                    "--workers", "2")
    want = eot_tokens(DOCS)
    # the val shard is exactly the first 10 tokens, then train shards of exactly 25 but the last
    cuts = [0, 10] + list(range(35, len(want), 25)) + [len(want)]
    names = ["local_val_000000.bin"] + [f"local_train_{k:06d}.bin" for k in range(len(cuts) - 2)]
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".bin")) == sorted(names)
    for name, a, b in zip(names, cuts, cuts[1:]):
        assert prepare_data.read_shard(tmp_path / "out" / name).tolist() == want[a:b], name
    sizes = [b - a for a, b in zip(cuts, cuts[1:])]
    assert m["shards"] == [{"file": n, "split": n.split("_")[1], "tokens": size}
                           for n, size in zip(names, sizes)]
    enc = tiktoken.get_encoding("gpt2")
    assert enc.decode(all_tokens(tmp_path / "out").tolist()) == "".join("<|endoftext|>" + d for d in DOCS)
    assert m["total_tokens"] == len(want) and m["documents"] == 5
    header = np.fromfile(tmp_path / "out" / "local_val_000000.bin", dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, 10] and not header[3:].any()


def test_document_order_kept_by_two_workers_with_short_and_long_documents(tmp_path):
    # 16 long documents, then short and long ones alternating: a worker that finishes a short document or
    # a light chunk early must not move it ahead (imap_unordered, or any reordering of chunks, would)
    docs = [f"long {i}" + " x" * 5000 for i in range(16)]
    docs += [str(i) if i % 2 else f"long {i}" + " x" * 5000 for i in range(16, 48)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "100", "--workers", "2")
    assert all_tokens(tmp_path / "out").tolist() == eot_tokens(docs)


def test_prepare_max_tokens_is_exact(tmp_path):
    write_inputs(tmp_path / "in")
    want = eot_tokens(DOCS)
    for cap in (37, len(eot_tokens(DOCS[:2])) + 1):  # inside a document; the first token of the third
        m = run_prepare(tmp_path / "in", tmp_path / str(cap), "--val_tokens", "10", "--shard_tokens", "8",
                        "--max_tokens", str(cap))
        assert all_tokens(tmp_path / str(cap)).tolist() == want[:cap]
        assert m["total_tokens"] == cap and m["documents"] == want[:cap].count(50256)


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    write_inputs(tmp_path / "in")
    pq.write_table(pa.table({"text": DOCS, "n": list(range(5))}), tmp_path / "d.parquet", row_group_size=2)
    run_prepare(tmp_path / "d.parquet", tmp_path / "pq", "--val_tokens", "8")
    run_prepare(tmp_path / "in", tmp_path / "js", "--val_tokens", "8")
    assert all_tokens(tmp_path / "pq").tolist() == all_tokens(tmp_path / "js").tolist()


def test_same_bytes_with_one_and_two_workers(tmp_path):
    write_inputs(tmp_path / "in")
    for w in ("1", "2"):
        run_prepare(tmp_path / "in", tmp_path / w, "--val_tokens", "7", "--shard_tokens", "30",
                    "--workers", w)
    files = sorted(os.listdir(tmp_path / "1"))
    assert files == sorted(os.listdir(tmp_path / "2")) and len(files) > 3
    for f in files:
        if f.endswith(".bin"):
            assert (tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes()


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": x}\n',
     "bad.jsonl line 2: not valid JSON: Expecting value at column 10$"),
    ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"nofield.jsonl line 2: no 'text' field"),
    ("num.jsonl", '{"text": 42}\n', r"num.jsonl line 1: the text field is int"),
    ("surrogate.jsonl", '{"text": "bad \\ud800 half"}\n', r"surrogate.jsonl line 1: text is not valid UTF-8"),
    ("latin1.jsonl", b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n',
     r"latin1.jsonl line 3: not valid UTF-8 \(byte 0xe9\)"),
    ("latin1.txt", b"ok\nfine\ncaf\xe9\n", r"latin1.txt line 3: not valid UTF-8 \(byte 0xe9\)"),
    ("x.csv", "a,b", r"x.csv has an unsupported extension \(allowed: .txt, .jsonl, .jsonl.gz, .parquet"),
])
def test_bad_input_errors_and_leaves_no_shard(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(prepare_data.DataError, match=message):
        run_prepare(path, tmp_path / "out", "--val_tokens", "2", "--workers", "1")
    out = tmp_path / "out"
    assert not out.exists() or not [f for f in os.listdir(out) if f.endswith(".bin") or f == "manifest.json"]


def test_prepare_missing_optional_packages_are_data_errors(tmp_path, monkeypatch):
    # documents() runs in the pool's feeder thread, which hands on Exceptions only: a SystemExit would hang
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"never read")
    for argv, message in ([[], r"FineWeb-Edu from the hub needs `pip install datasets`"],
                          [["--input", str(tmp_path / "d.parquet")],
                           r"d.parquet: reading .parquet needs pyarrow"]):
        args = prepare_data.parse_args(argv)
        with pytest.raises(prepare_data.DataError, match=message):
            next(prepare_data.documents(args, args.input))


def test_input_without_training_tokens_is_refused(tmp_path):
    write_inputs(tmp_path / "in")
    n = len(eot_tokens(DOCS))
    with pytest.raises(prepare_data.DataError,
                       match=f"the input gave {n:,} tokens: --val_tokens={n} leaves none"):
        run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", str(n))
    assert (tmp_path / "out" / "run.json").exists() and not (tmp_path / "out" / "manifest.json").exists()
    # one token to train on
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", str(n - 1), "--force")
    assert [(s["split"], s["tokens"]) for s in m["shards"]] == [("val", n - 1), ("train", 1)]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(prepare_data.DataError, match="the input gave 0 tokens: --val_tokens=1 leaves none"):
        run_prepare(tmp_path / "empty.jsonl", tmp_path / "out2", "--val_tokens", "1")
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_val_shard_spanning_input_files_is_reported(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    a, b = str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in" / "b.jsonl.gz")
    n_a = len(eot_tokens(DOCS[:2]))
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", str(n_a + 3))
    assert m["val_sources"] == {a: n_a, b: 3}
    note = (f"note: the val shard drew from 2 input files (tokens from each: {{'{a}': {n_a}, '{b}': 3}}); "
            "to hold out the first one alone, lower --val_tokens")
    assert note in capsys.readouterr().err.splitlines()
    m = run_prepare(tmp_path / "in", tmp_path / "out2", "--val_tokens", str(n_a))
    assert m["val_sources"] == {a: n_a} and "note:" not in capsys.readouterr().err


def test_missing_path_and_foreign_output(tmp_path):
    with pytest.raises(prepare_data.DataError, match="nope does not exist"):
        run_prepare(tmp_path / "nope", tmp_path / "out")
    write_inputs(tmp_path / "in")
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5")
    with pytest.raises(prepare_data.DataError, match="holds another run's output .*--force replaces it"):
        run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "6")
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "6", "--force")
    assert m["shards"][0]["tokens"] == 6


def test_complete_output_is_not_redone_unless_force(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--workers", "1")
    with open(tmp_path / "in" / "c.txt", "w", encoding="utf-8") as f:
        f.write("changed text")
    # workers: the same run
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--workers", "2")
    assert "already complete" in capsys.readouterr().err
    assert all_tokens(tmp_path / "out").tolist() == eot_tokens(DOCS)
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--force")
    assert all_tokens(tmp_path / "out").tolist() == eot_tokens(DOCS[:4] + ["changed text"])
    assert m["total_tokens"] == len(eot_tokens(DOCS[:4] + ["changed text"]))


def test_read_shard_refuses_truncated_and_foreign_files(tmp_path):
    prepare_data.write_shard(str(tmp_path / "ok.bin"), np.arange(100, dtype=np.uint16))
    assert prepare_data.read_shard(tmp_path / "ok.bin").tolist() == list(range(100))
    prepare_data.write_shard(str(tmp_path / "empty.bin"), np.arange(0, dtype=np.uint16))  # the header alone
    assert (tmp_path / "empty.bin").stat().st_size == 1024
    assert prepare_data.read_shard(tmp_path / "empty.bin").tolist() == []
    data = (tmp_path / "ok.bin").read_bytes()
    assert len(data) == 1024 + 200
    for name, content, message in [
            ("cut.bin", data[:-10],
             "cut.bin: header says 100 tokens \\(1224 bytes\\), the file has 1214: corrupt"),
            ("long.bin", data + b"\0\0",
             "long.bin: header says 100 tokens \\(1224 bytes\\), the file has 1226"),
            ("short.bin", data[:1000], "short.bin: 1000 bytes is shorter than the 1024-byte shard header"),
            ("magic.bin", b"\x01\x02\x03\x04" + data[4:],
             "magic.bin: magic 67305985, version 1 .*not a shard"),
            ("version.bin", data[:4] + b"\x02\0\0\0" + data[8:], "version.bin: magic 20240520, version 2 ")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(prepare_data.DataError, match=message):
            prepare_data.read_shard(tmp_path / name)


def test_val_tokens_0_is_refused_before_anything_is_written(tmp_path):
    """train.py needs a val shard: --val_tokens 0 would write train shards that train.py then refuses."""
    write_inputs(tmp_path / "in")
    with pytest.raises(prepare_data.DataError, match="^--val_tokens=0 is invalid: must be >= 1$"):
        run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "0")
    assert not (tmp_path / "out").exists()
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "1", "--shard_tokens", "40",
                    "--workers", "1")
    n = len(eot_tokens(DOCS)) - 1
    assert [s["tokens"] for s in m["shards"]] == [1] + [40] * (n // 40) + [n % 40]


def test_an_out_in_the_way_of_a_file_is_refused_before_the_input_is_read(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(prepare_data, "local_files", lambda paths: pytest.fail("the input was read first"))
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        message = f"^--out={re.escape(str(out))}: {re.escape(str(tmp_path / 'f'))} is a file, not a folder"
        with pytest.raises(prepare_data.DataError, match=message):
            prepare_data.prepare(prepare_data.parse_args(["--input", "x.txt", "--out", str(out)]))


def test_prepare_option_defaults_and_bounds():
    a = prepare_data.parse_args(["--input", "x"])
    assert (a.out, a.prefix, a.input) == (os.path.join("data", "local"), "local", ["x"])
    a = prepare_data.parse_args([])
    assert (a.out, a.prefix, a.input, a.name, a.text_field, a.val_tokens, a.shard_tokens, a.max_tokens,
            a.force) == (os.path.join("data", "fineweb_edu"), "fineweb_edu", None, "sample-10BT", "text",
                         10_485_760, 100_000_000, 0, False)
    a = prepare_data.parse_args(["--val_tokens=1", "--max_tokens=0", "--workers=1", "--shard_tokens=1",
                                 "--out=o", "--prefix=p"])
    assert (a.val_tokens, a.max_tokens, a.workers, a.shard_tokens, a.out, a.prefix) == (1, 0, 1, 1, "o", "p")
    for key, low in (("workers", 1), ("shard_tokens", 1), ("val_tokens", 1), ("max_tokens", 0)):
        with pytest.raises(prepare_data.DataError, match=f"^--{key}={low - 1} is invalid: must be >= {low}$"):
            prepare_data.parse_args([f"--{key}={low - 1}"])


def test_forced_rerun_first_clears_the_old_manifest_and_stray_temporaries(tmp_path, monkeypatch):
    """Between the claim and the new manifest the folder must read as unfinished: run.json, no old
    manifest.json."""
    write_inputs(tmp_path / "in")
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--workers", "1")
    (tmp_path / "out" / "local_train_000042.bin.tmp").write_bytes(b"left by a crash")

    def interrupted(path, tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--workers", "1", "--force")
    assert sorted(os.listdir(tmp_path / "out")) == ["run.json"]


class FullDisk:
    """A file that takes the first `room` bytes written to it, then fails as a full disk would."""
    def __init__(self, f, room):
        self.f, self.room = f, room

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        data = memoryview(data).cast("B")
        self.f.write(data[:self.room])
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)

    def writelines(self, chunks):
        for chunk in chunks:
            self.write(chunk)


def test_shard_write_dying_mid_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "open", lambda path, mode="r": FullDisk(open(path, mode), 1024),
                        raising=False)
    with pytest.raises(OSError, match="No space left"):
        prepare_data.write_shard(str(tmp_path / "s.bin"), np.arange(100, dtype=np.uint16))
    assert not (tmp_path / "s.bin").exists()
    # died after the header
    assert [(f.name, f.stat().st_size) for f in tmp_path.iterdir()] == [("s.bin.tmp", 1024)]


def test_interrupted_run_leaves_no_partial_shard_and_reruns_identically(tmp_path, monkeypatch):
    write_inputs(tmp_path / "in")
    args = ("--val_tokens", "10", "--shard_tokens", "20", "--workers", "1")
    run_prepare(tmp_path / "in", tmp_path / "ref", *args)
    real, calls = prepare_data.write_shard, []

    def crashing(path, tokens):
        calls.append(path)
        if len(calls) == 3:  # die half-way through writing the third shard
            with open(path + ".tmp", "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        real(path, tokens)

    monkeypatch.setattr(prepare_data, "write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path / "in", tmp_path / "out", *args)
    done = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".bin"))
    assert len(done) == 2 and os.path.basename(calls[2]) not in done
    # the contract train.py relies on: run.json marks the folder unfinished, manifest.json is absent
    assert (tmp_path / "out" / "run.json").exists() and not (tmp_path / "out" / "manifest.json").exists()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert sorted(s["file"] for s in run["shards"]) == done and run["carry"] > 0  # the next document begun
    monkeypatch.undo()
    # the rerun resumes: the two finished shards are kept, not written again, and the output is the same,
    # byte for byte (a shard boundary falls inside a document: its first tokens are left out on resume)
    rewritten = []
    monkeypatch.setattr(prepare_data, "write_shard", lambda path, tokens: (rewritten.append(path),
                                                                           real(path, tokens)))
    run_prepare(tmp_path / "in", tmp_path / "out", *args)
    assert [os.path.basename(p) for p in rewritten[:1]] == [os.path.basename(calls[2])]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "ref"))
    for f in os.listdir(tmp_path / "ref"):
        got, want = ((tmp_path / d / f).read_bytes() for d in ("out", "ref"))
        if f == "manifest.json":  # the same but for the output folder's name
            got, want = (json.loads(b.replace(b"/out", b"/ref")) for b in (got, want))
        assert got == want, f


def test_forced_rerun_of_an_interrupted_run_starts_over(tmp_path, monkeypatch):
    """--force on an unfinished output resumes nothing: every shard is written again, from the val shard."""
    write_inputs(tmp_path / "in")
    args = ("--val_tokens", "10", "--shard_tokens", "20", "--workers", "1")
    run_prepare(tmp_path / "in", tmp_path / "ref", *args)
    real, calls = prepare_data.write_shard, []

    def crashing(path, tokens):  # dies on the third shard, after two finished ones
        calls.append(os.path.basename(path))
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(path, tokens)

    monkeypatch.setattr(prepare_data, "write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path / "in", tmp_path / "out", *args)
    monkeypatch.undo()
    rewritten = []

    def recorded(path, tokens):
        rewritten.append(os.path.basename(path))
        real(path, tokens)

    monkeypatch.setattr(prepare_data, "write_shard", recorded)
    run_prepare(tmp_path / "in", tmp_path / "out", *args, "--force")
    assert sorted(rewritten) == sorted(f for f in os.listdir(tmp_path / "ref") if f.endswith(".bin"))
    assert rewritten[:2] == calls[:2] == ["local_val_000000.bin", "local_train_000000.bin"]
    for f in rewritten:
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_a_forced_rerun_marks_the_folder_unfinished_before_it_removes_anything(tmp_path, monkeypatch):
    """run.json exists at every removal of a --force over another run's output; a clear cut short (the old
    manifest beside run.json) is not taken for a complete output: the same command starts over."""
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    run_prepare(tmp_path / "in", out, "--val_tokens", "5", "--workers", "1")
    real_remove, removed = os.remove, []

    def remove(path):
        assert (out / "run.json").exists(), f"{path} removed before run.json marks the folder unfinished"
        removed.append(os.path.basename(path))
        if os.path.basename(path) == "manifest.json":
            raise KeyboardInterrupt  # the clear is cut short here
        real_remove(path)

    monkeypatch.setattr(prepare_data.os, "remove", remove)
    with pytest.raises(KeyboardInterrupt):  # --force with the same options: redo it
        run_prepare(tmp_path / "in", out, "--val_tokens", "5", "--workers", "1", "--force")
    assert "manifest.json" in removed and (out / "manifest.json").exists() and (out / "run.json").exists()
    monkeypatch.undo()
    run_prepare(tmp_path / "in", out, "--val_tokens", "5", "--workers", "1")
    run_prepare(tmp_path / "in", tmp_path / "ref", "--val_tokens", "5", "--workers", "1")
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))  # run.json gone, every shard
    assert np.array_equal(all_tokens(out), all_tokens(tmp_path / "ref"))


REAL_TOKENIZE = prepare_data.tokenize


def tokenize_checking_sigint(item):  # at module level, so that pool workers can unpickle it
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        raise RuntimeError("a pool worker does not ignore SIGINT")
    return REAL_TOKENIZE(item)


def test_ctrl_c_workers_ignore_it_and_the_main_process_exits_130_in_one_line(tmp_path, monkeypatch, capsys):
    write_inputs(tmp_path / "in")
    monkeypatch.setattr(prepare_data, "tokenize", tokenize_checking_sigint)
    run_prepare(tmp_path / "in", tmp_path / "ok", "--val_tokens", "5", "--workers", "2")
    capsys.readouterr()

    def interrupted(path, tokens):  # Ctrl-C reaches the main process while it writes a shard
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "write_shard", interrupted)
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--val_tokens",
                           "5"])
    assert e.value.code == 130
    assert capsys.readouterr().err == ("prepare_data.py: interrupted: the output is incomplete; the same "
                                       "command resumes it after its finished shards\n")
    assert (tmp_path / "out" / "run.json").exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_only_data_errors_end_in_one_line(tmp_path, monkeypatch):
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), "--input",
                        str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"prepare_data.py: error: --input: {tmp_path / 'nope'} does not exist "
                        "(allowed: .txt, .jsonl, .jsonl.gz, .parquet, or folders of them)\n")
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--val_tokens=-1"])
    assert e.value.code == "prepare_data.py: error: --val_tokens=-1 is invalid: must be >= 1"
    assert issubclass(prepare_data.DataError, ValueError)  # train.py's one-line handler catches it too

    def buggy(paths):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(prepare_data, "local_files", buggy)
    with pytest.raises(ValueError, match="a bug") as e:
        prepare_data.main(["--input", "x"])
    assert type(e.value) is ValueError  # not turned into a one-line exit: its traceback stays


def test_prepare_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        prepare_data.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("val_tokens", "10485760"), ("shard_tokens", "100000000"),
                            ("name", "sample-10BT"),
                            ("text_field", "text"), ("max_tokens", "0")]:
        described = text.split(f"--{option} {option.upper()} ")[-1].split(" --")[0]
        assert f"(default: {default}" in described, option


class FakeDatasets:
    """Stands in for the datasets package: the hub's FineWeb-Edu rows, offline."""
    def __init__(self, rows):
        self.rows = rows

    def load_dataset(self, path, name, split, streaming):
        assert (path, name, split, streaming) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
        return iter(self.rows)


def test_fineweb_path_uses_the_same_code(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets([{"text": d, "score": 3.1} for d in DOCS]))
    m = prepare_data.prepare(prepare_data.parse_args(["--out", str(tmp_path / "fw"), "--val_tokens", "8",
                                                      "--workers", "2"]))
    assert m["source"] == "HuggingFaceFW/fineweb-edu:sample-10BT"
    assert m["val_sources"] == {"HuggingFaceFW/fineweb-edu:sample-10BT": 8}
    assert os.path.exists(tmp_path / "fw" / "fineweb_edu_val_000000.bin")
    assert all_tokens(tmp_path / "fw").tolist() == eot_tokens(DOCS)
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets([{"text": "ok"}, {"body": "x"}]))
    with pytest.raises(prepare_data.DataError, match="fineweb-edu:sample-10BT row 1: no 'text' field"):
        prepare_data.prepare(prepare_data.parse_args(["--out", str(tmp_path / "fw2"), "--workers", "1"]))


def test_a_corrupt_or_truncated_gzip_is_one_error_naming_it_and_leaves_no_partial_output(tmp_path):
    """A .jsonl.gz cut short after enough text for the val shard, and one that is no gzip at all: a
    DataError naming the file, and the output folder left without shards or run.json (a rerun meets the
    same file)."""
    gen = np.random.default_rng(1)
    text = "".join(json.dumps({"text": " ".join(gen.choice(["delta", "state", "gate"], size=50))}) + "\n"
                   for _ in range(400))
    whole = gzip.compress(text.encode(), mtime=0)
    for name, data, why in (("cut.jsonl.gz", whole[:len(whole) // 2], "Compressed file ended"),
                            ("junk.jsonl.gz", b"not a gzip file", "Not a gzipped file")):
        src, out = tmp_path / name, tmp_path / f"out-{name}"
        src.write_bytes(data)
        with pytest.raises(prepare_data.DataError, match=f"^{re.escape(str(src))}: cannot read it \\({why}"):
            run_prepare(src, out, "--val_tokens=100", "--workers=1")
        assert os.listdir(out) == []


def test_progress_lines_give_documents_tokens_rate_and_the_time_left(tmp_path, monkeypatch, capsys):
    """Not a terminal: a line with each finished shard; with --max_tokens the time left is known. On a
    fake clock of 1 s per shard written: 20 tokens/s."""
    write_inputs(tmp_path / "in")
    clock, real = [0.0], prepare_data.write_shard
    monkeypatch.setattr(prepare_data.time, "time", lambda: clock[0])
    monkeypatch.setattr(prepare_data, "write_shard", lambda path, tokens: (clock.__setitem__(0, clock[0] + 1),
                                                                           real(path, tokens)))
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens=20", "--shard_tokens=20", "--max_tokens=100",
                "--workers=1")
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("wrote ")]
    assert re.fullmatch(r"wrote local_val_000000.bin: 20 tokens \| \d+ documents, 20 tokens, 20 tok/s, "
                        r"0:00:04 left", lines[0])
    assert re.fullmatch(r"wrote local_train_000000.bin: 20 tokens \| \d+ documents, 40 tokens, 20 tok/s, "
                        r"0:00:03 left", lines[1])


def test_on_a_terminal_the_progress_line_is_rewritten_in_place(tmp_path, monkeypatch, capsys):
    """About once a second (here: every document, on a fake clock of 1 s each) the line is rewritten after
    a carriage return, without a newline; each finished shard's line ends with one."""
    write_inputs(tmp_path / "in")
    clock = [0.0]

    def tick():
        clock[0] += 1
        return clock[0]

    monkeypatch.setattr(prepare_data.time, "time", tick)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens=20", "--shard_tokens=20", "--workers=1")
    err = capsys.readouterr().err
    assert re.search(r"\r\d+ documents, \d+ tokens, [\d,]+ tok/s\r", err)  # rewritten, no newline between
    shard = r"\rwrote local_val_000000.bin: 20 tokens \| \d+ documents, 20 tokens, [\d,]+ tok/s\n"
    assert re.search(shard, err)
