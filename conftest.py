"""Shared by the test files: Triton's CPU interpreter, set before anything imports Triton, the token
shards the training tests read, and CUDA's capture query as a GPU machine has it (the one-graph tests)."""
import json
import os

# fused.py's kernels on the CPU: Triton reads this when first imported
os.environ.setdefault("TRITON_INTERPRET", "1")
import numpy as np
import pytest
import tiktoken
import torch

import prepare_data

LOAD_ENCODING = tiktoken.get_encoding

def get_encoding_or_skip(name):
    """tiktoken's encoding for every test. Where it cannot be loaded and TIKTOKEN_CACHE_DIR is not set (an
    offline machine without the cache), the test is skipped with one line saying what to set; where the
    variable is set, a failure stays a failure."""
    try:
        return LOAD_ENCODING(name)
    except Exception as e:
        if os.environ.get("TIKTOKEN_CACHE_DIR"):
            raise
        pytest.skip(f"tiktoken could not load {name} ({type(e).__name__}): offline, set TIKTOKEN_CACHE_DIR "
                    "to a folder holding tiktoken's cache of it")

tiktoken.get_encoding = get_encoding_or_skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    gen = np.random.default_rng(0)
    words = ["delta", "rule", "state", "gate", "erase", "write", "the", "a", "of", "token"]
    with open(folder / "docs.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(gen.choice(words, size=40))}) + "\n")
    args = ["--input", str(folder / "docs.jsonl"), "--out", str(folder / "out"),
            "--val_tokens", "512", "--shard_tokens", "3000", "--workers", "1"]
    prepare_data.prepare(prepare_data.parse_args(args))
    return str(folder / "out")


@pytest.fixture
def capture_query_as_on_cuda(monkeypatch):
    """CUDA as a GPU machine has it, for Dynamo: initialised, and its capture query a call that torch.compile
    cannot trace (on CUDA it splits the graph: "torch.* op returned non-Tensor"). On a CPU-only torch the
    real query is never reached, so without this a model that asks it inside the graph passes here."""
    @torch._dynamo.disable
    def is_current_stream_capturing():
        return False

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", is_current_stream_capturing)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
