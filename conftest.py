"""Shared by the test files: Triton's CPU interpreter, set before anything imports Triton, the token
shards the training tests read, and CUDA's capture query as a GPU machine has it (the one-graph tests)."""
import json
import os

# fused.py's kernels on the CPU: Triton reads this when first imported
os.environ.setdefault("TRITON_INTERPRET", "1")
import numpy as np
import pytest
import torch

import prepare_data


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
