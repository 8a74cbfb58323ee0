"""hellaswag.py: the scoring against an oracle from the model's own token losses, a fake model whose answer is
forced, the file's checks, the download (urllib faked: offline), and train.py's --hellaswag. CPU, offline."""
import io
import json
import math
import os
import re
import shutil
import urllib.error
import urllib.request
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import tiktoken
import torch

import hellaswag
import train
from ddl import GPT, ConfigError, GPTConfig
from test_train import run_train

CPU, NO_AUTOCAST = torch.device("cpu"), nullcontext()

# endings of unequal lengths: the summed loss favours short ones, the mean does not: acc and acc_norm differ
RECORDS = [
    dict(ctx="A woman stands on a ladder beside the house. She", label=0,
         endings=["paints the window frame white.", "falls.",
                  "is reading a very long novel about the sea and its ships.",
                  "climbs down and walks into the garden to fetch more paint."]),
    dict(ctx="The cat", label=0,
         endings=["sat.", "jumped over the sleeping dog in the kitchen this morning.",
                  "slept on the warm mat.", "ran."]),
    dict(ctx="To bake bread, first mix flour, water, salt and yeast in a large bowl, then", label=0,
         endings=["knead.", "let the dough rest for an hour before shaping it into a loaf.",
                  "throw it at the wall.", "paint the bowl blue and hang it on the wall to dry."]),
    dict(ctx="Two men are playing chess in a park. One of them", label=0,
         endings=["moves his queen across the board.", "laughs.",
                  "eats the knight and the bishop, then the board.",
                  "stands up and shakes hands with the other player."]),
    dict(ctx="How to clean a bicycle chain. Shift the chain onto the smallest cog, then", label=0,
         endings=["wipe it with a rag.", "sing.",
                  "apply degreaser to the links while turning the pedals backwards.",
                  "take the wheel to the lake."]),
]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture
def hs_file(tmp_path):
    return write_jsonl(tmp_path / "hellaswag_val.jsonl", RECORDS)


def spread_model(block_size=64):
    """A tiny GPT on GPT-2's vocabulary, its embedding scaled up: the endings' losses differ clearly."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, head_dim=8, n_embd=16, block_size=block_size))
    with torch.no_grad():
        model.wte.weight.mul_(50)
    return model.eval()


@torch.no_grad()
def oracle(model, rec):
    """Per ending, its summed and mean loss written out: the full sequence through the model, then for
    every position p of the ending, -log softmax(logits at p - 1)[token p], as logsumexp - that logit."""
    enc = tiktoken.get_encoding("gpt2")
    ctx, sums, means = enc.encode_ordinary(rec["ctx"]), [], []
    for ending in rec["endings"]:
        full = ctx + enc.encode_ordinary(" " + ending)
        logits = model(torch.tensor([full]))[0]
        losses = [(torch.logsumexp(logits[p - 1].double(), 0) - logits[p - 1, full[p]].double()).item()
                  for p in range(len(ctx), len(full))]
        sums.append(sum(losses))
        means.append(sum(losses) / len(losses))
    return sums, means


def argmin(xs):
    return min(range(len(xs)), key=xs.__getitem__)


def test_losses_choices_and_accuracies_equal_an_oracle_of_the_models_token_losses(tmp_path):
    model = spread_model()
    truth = [oracle(model, rec) for rec in RECORDS]
    by_sum, by_mean = [argmin(s) for s, _ in truth], [argmin(m) for _, m in truth]
    assert by_sum != by_mean  # else swapping the reductions could pass
    for sums, means in truth:  # no near-ties: the choices below must not hang on rounding
        assert sorted(sums)[1] - min(sums) > 1e-3 and sorted(means)[1] - min(means) > 1e-3
    # labels: the sum's choice for the first two examples, the mean's for the rest, so acc != acc_norm
    records = [{**rec, "label": (by_sum if i < 2 else by_mean)[i]} for i, rec in enumerate(RECORDS)]
    examples = hellaswag.load(write_jsonl(tmp_path / "f.jsonl", records))
    tokens, mask = hellaswag.collate([hellaswag.render(ex, 64) for ex in examples], CPU)  # 20 padded rows
    with torch.no_grad():
        total, mean = hellaswag.ending_losses(model, tokens, mask, NO_AUTOCAST)
    assert torch.allclose(total.double(), torch.tensor([s for s, _ in truth]).flatten().double(), atol=1e-3)
    assert torch.allclose(mean.double(), torch.tensor([m for _, m in truth]).flatten().double(), atol=1e-4)
    chosen = hellaswag.choose(total, mean)
    assert chosen[0].tolist() == by_sum and chosen[1].tolist() == by_mean
    want = dict(acc=sum(r["label"] == s for r, s in zip(records, by_sum)) / 5,
                acc_norm=sum(r["label"] == m for r, m in zip(records, by_mean)) / 5, n=5)
    assert want["acc"] != want["acc_norm"]
    for batch_examples in (1, 16):  # padding to the longest row of a batch changes nothing
        assert hellaswag.evaluate(model, examples, CPU, NO_AUTOCAST, batch_examples=batch_examples) == want


class Bigram(torch.nn.Module):
    """A fake model: the logits at position t are log p(. | token t), from a table; so the loss of token t + 1
    is -log p(token t + 1 | token t). Refuses sequences longer than block_size, as GPT does."""
    def __init__(self, losses, vocab=16, block_size=32):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        logp = torch.zeros(vocab, vocab)
        for a in range(vocab):  # the given transitions, the rest of the probability spread evenly
            given = {b: loss for (a_, b), loss in losses.items() if a_ == a}
            rest = (1 - sum(math.exp(-v) for v in given.values())) / (vocab - len(given))
            logp[a] = math.log(rest)
            for b, loss in given.items():
                logp[a, b] = -loss
        self.logp, self.lengths = logp, []

    def forward(self, idx):
        assert idx.shape[1] <= self.config.block_size
        self.lengths.append(idx.shape[1])
        return self.logp[idx]


# The forced example: context 1 2 3; the context's last token makes ending 2's first token likely and
# ending 2's tokens follow each other. Per ending, transition losses by hand (and their sum, mean):
#   0: [4]        3->4 1.5                          sum 1.5, mean 1.5   <- least sum (acc's choice)
#   1: [5] x 8    3->5 2.0, then 5->5 2.0 x 7       sum 16,  mean 2.0
#   2: [6, 7]     3->6 1.0, 6->7 1.0                sum 2.0, mean 1.0   <- least mean (acc_norm's), the label
#   3: [8, 8, 8]  3->8 4.5, 8->8 4.5 x 2            sum 13.5, mean 4.5
# The context's own transitions 1->2, 2->3 cost 4.5 each, and the padding (0) after ending 2 costs 4.0. So
# each wrong scoring changes the mean's choice to ending 1: scoring the context too
# ((16 + 9) / 10 < (2 + 9) / 4); dropping the ending's first token (3->x) for the context's last (2->3)
# ((4.5 + 14) / 8 < (4.5 + 1) / 2), or for the token after the ending ((1 + 4) / 2 > 2). Swapping the
# reductions swaps acc and acc_norm.
FORCED_LOSSES = {(1, 2): 4.5, (2, 3): 4.5, (3, 4): 1.5, (3, 5): 2.0, (5, 5): 2.0, (3, 6): 1.0, (6, 7): 1.0,
                 (7, 0): 4.0, (3, 8): 4.5, (8, 8): 4.5}
FORCED = hellaswag.Example(ctx=[1, 2, 3], endings=[[4], [5] * 8, [6, 7], [8, 8, 8]], label=2)


def test_forced_example_sum_and_mean_by_hand():
    model = Bigram(FORCED_LOSSES)
    tokens, mask = hellaswag.collate([hellaswag.render(FORCED, 32)], CPU)
    total, mean = hellaswag.ending_losses(model, tokens, mask, NO_AUTOCAST)
    assert torch.allclose(total, torch.tensor([1.5, 16.0, 2.0, 13.5]), atol=1e-5)
    assert torch.allclose(mean, torch.tensor([1.5, 2.0, 1.0, 4.5]), atol=1e-5)
    assert [c.item() for c in hellaswag.choose(total, mean)] == [0, 2]


def test_forced_example_accuracies_acc_wrong_acc_norm_right():
    model = Bigram(FORCED_LOSSES)
    other = FORCED._replace(ctx=[9, 1, 2, 3], label=0)  # same scores, more context: padded rows in the batch
    assert hellaswag.evaluate(model, [FORCED, other], CPU, NO_AUTOCAST) == dict(acc=0.5, acc_norm=0.5, n=2)
    assert hellaswag.evaluate(model, [FORCED], CPU, NO_AUTOCAST) == dict(acc=0.0, acc_norm=1.0, n=1)
    assert hellaswag.evaluate(model, [other], CPU, NO_AUTOCAST) == dict(acc=1.0, acc_norm=0.0, n=1)


def test_render_rows_masks_and_truncation_from_the_left():
    ex = hellaswag.Example(ctx=list(range(100, 110)), endings=[[1, 2], [3, 4, 5], [6], [7, 8]], label=0)
    rows, masks = hellaswag.render(ex, 64)  # fits: untouched
    assert rows[1] == list(range(100, 110)) + [3, 4, 5] and masks[1] == [0] * 10 + [1, 1, 1]
    assert not hellaswag.is_cut(ex, 13) and hellaswag.is_cut(ex, 12)
    rows, masks = hellaswag.render(ex, 6)  # the longest ending (3) leaves 3 context tokens, in every row
    tail = [107, 108, 109]
    assert rows == [tail + [1, 2], tail + [3, 4, 5], tail + [6], tail + [7, 8]]
    assert masks[1] == [0, 0, 0, 1, 1, 1] and masks[2] == [0, 0, 0, 1]
    long = ex._replace(endings=[[1] * 9, [2], [3], [4]])  # an ending beyond block_size: its tail goes too
    rows, masks = hellaswag.render(long, 6)
    assert rows[0] == [109, 1, 1, 1, 1, 1] and rows[1] == [109, 2] and masks[0] == [0, 1, 1, 1, 1, 1]


def test_evaluate_never_feeds_more_than_block_size(hs_file):
    examples = hellaswag.load(hs_file)
    assert sum(hellaswag.is_cut(ex, 12) for ex in examples) >= 4
    model, lengths = spread_model(block_size=12), []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    assert hellaswag.evaluate(model, examples, CPU, NO_AUTOCAST, batch_examples=2)["n"] == 5
    assert max(lengths) == 11  # 12-token rows: the last token is never input (it predicts nothing scored)


def test_ranks_split_the_examples_and_their_counts_add_up(monkeypatch):
    model, examples = Bigram(FORCED_LOSSES), [FORCED._replace(label=label) for label in (0, 1, 2, 3, 2)]
    whole = hellaswag.evaluate(model, examples, CPU, NO_AUTOCAST)
    assert whole == dict(acc=1 / 5, acc_norm=2 / 5, n=5)
    reduced = []
    monkeypatch.setattr(hellaswag.dist, "all_reduce", lambda t: reduced.append(t.clone()))  # one rank's view
    parts = [hellaswag.evaluate(model, examples, CPU, NO_AUTOCAST, rank=r, world=3) for r in range(3)]
    assert [p["n"] for p in parts] == [2, 2, 1] and len(reduced) == 3
    n, right, right_norm = sum(reduced).tolist()  # what all_reduce sums
    assert (n, right / n, right_norm / n) == (whole["n"], whole["acc"], whole["acc_norm"])


# ----------------------------------------------------------------------------- the file

@pytest.mark.parametrize("line, message", [
    ("{not json", "not a JSON record"),
    (json.dumps(dict(ctx="a", endings=["b"] * 4)), "a record needs the keys ctx, endings and label"),
    (json.dumps(dict(ctx="", endings=["b"] * 4, label=0)), "ctx must be a non-empty string"),
    (json.dumps(dict(ctx="a", endings=["b"] * 3, label=0)), "endings must be a list of 4 strings"),
    (json.dumps(dict(ctx="a", endings=["b", "c", "d", 5], label=0)), "endings must be a list of 4 strings"),
    (json.dumps(dict(ctx="a", endings=["b"] * 4, label=4)), "label must be an integer 0-3"),
    (json.dumps(dict(ctx="a", endings=["b"] * 4, label="1")), "label must be an integer 0-3"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + line + "\n")
    with pytest.raises(hellaswag.HellaSwagError, match=f"^{path}:3: {message}"):
        hellaswag.read_examples(str(path))


def test_missing_or_empty_file_says_what_to_do(tmp_path):
    with pytest.raises(hellaswag.HellaSwagError, match="no such file; download it with .*--fetch=true"):
        hellaswag.read_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(hellaswag.HellaSwagError, match="holds no examples"):
        hellaswag.read_examples(str(tmp_path / "empty.jsonl"))
    assert issubclass(hellaswag.HellaSwagError, ValueError)


def test_load_tokenises_context_and_space_prefixed_endings(hs_file):
    enc = tiktoken.get_encoding("gpt2")
    ex = hellaswag.load(hs_file)[1]
    assert ex.ctx == enc.encode_ordinary("The cat") and ex.label == 0
    assert ex.endings[0] == enc.encode_ordinary(" sat.") and len(ex.endings) == 4


class FakeResponse(io.BytesIO):
    """urlopen's answer; checks that nothing is at the destination while the download runs."""
    def __init__(self, data, dest, fail=False):
        super().__init__(data)
        self.dest, self.fail = dest, fail

    def read(self, *args):
        assert not os.path.exists(self.dest)
        if self.fail:
            raise ConnectionResetError("connection reset by peer")
        return super().read(*args)


def test_fetch_downloads_once_through_a_temporary_name(tmp_path, monkeypatch):
    dest, data, calls = str(tmp_path / "hs" / "val.jsonl"), b'{"ctx": "x"}\n', []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: calls.append(url) or FakeResponse(data, dest))
    assert hellaswag.fetch(dest) == dest and open(dest, "rb").read() == data
    assert calls == [hellaswag.URL] and os.listdir(tmp_path / "hs") == ["val.jsonl"]
    hellaswag.fetch(dest)  # already there: not downloaded again
    assert len(calls) == 1


def offline(url, timeout):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_fetch_offline_or_interrupted_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    dest = str(tmp_path / "val.jsonl")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(hellaswag.HellaSwagError, match=f"cannot download {hellaswag.URL}: .*name resolution.*"
                                                       f"offline.*copy it to {dest}"):
        hellaswag.fetch(dest)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"x", dest, fail=True))
    with pytest.raises(hellaswag.HellaSwagError, match="connection reset"):
        hellaswag.fetch(dest)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- train.py and the command line

def test_training_logs_hellaswag_beside_val_and_the_command_line_agrees(shards, hs_file, tmp_path, capsys):
    out = tmp_path / "o"
    standin = shutil.copy(hs_file, tmp_path / "standin_val.jsonl")  # named as what it is, not HellaSwag
    log = run_train(shards, out, "--max_steps=2", f"--hellaswag={standin}")
    records = [r for r in log if r["type"] == "hellaswag"]
    assert [r["step"] for r in records] == [r["step"] for r in log if r["type"] == "val"] == [0, 2]
    assert all(set(r) == {"type", "step", "acc", "acc_norm", "n"} and r["n"] == 5 for r in records)
    assert "| standin_val.jsonl acc_norm" in capsys.readouterr().out  # the file's name: a stand-in says so
    # the final eval scores the final checkpoint: the command line gets the same numbers (CPU: exact)
    result = hellaswag.main([f"--out_dir={out}", f"--file={hs_file}", "--device=cpu", "--batch_examples=3"])
    assert result == {k: records[-1][k] for k in ("acc", "acc_norm", "n")}
    printed = capsys.readouterr().out
    assert "step 2 | hellaswag_val.jsonl: 5 examples" in printed and "examples/s on cpu x1" in printed
    assert "cut to block_size=16" in printed  # the fixture's contexts do not fit a 16-token model
    assert hellaswag.main([f"--out_dir={out}", f"--file={hs_file}", "--device=cpu", "--limit=2"])["n"] == 2
    hellaswag.main([f"--out_dir={out}", f"--file={standin}", "--device=cpu", "--limit=1"])
    assert "step 2 | standin_val.jsonl: 1 examples" in capsys.readouterr().out


def test_training_refuses_a_missing_file_before_it_starts(shards, tmp_path):
    with pytest.raises(hellaswag.HellaSwagError, match="no such file"):
        run_train(shards, tmp_path / "o", "--max_steps=2", f"--hellaswag={tmp_path / 'nope.jsonl'}")
    assert not os.path.exists(tmp_path / "o" / "log.jsonl")


def test_fetch_on_request_from_training_and_the_command_line(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default file, data/hellaswag/hellaswag_val.jsonl, is relative
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(hellaswag.HellaSwagError, match="cannot download"):  # never a silent skip
        run_train(shards, tmp_path / "o", "--max_steps=1", "--hellaswag=fetch")
    with pytest.raises(hellaswag.HellaSwagError, match="cannot download"):
        hellaswag.main(["--out_dir=o", "--fetch=true", "--device=cpu"])
    data = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(data, hellaswag.DEFAULT_FILE))
    assert len(hellaswag.from_setting("fetch")) == 5  # what train.py's --hellaswag=fetch reads
    assert os.path.exists(tmp_path / hellaswag.DEFAULT_FILE) and hellaswag.from_setting("") is None


def test_command_line_settings_are_checked():
    with pytest.raises(ConfigError, match="--limit=-1: must be >= 0"):
        hellaswag.main(["--limit=-1"])
    with pytest.raises(ConfigError, match="unknown key --fetc; did you mean --fetch"):
        hellaswag.main(["--fetc=true"])


def test_a_non_utf8_line_or_a_folder_is_one_error_naming_it(tmp_path):
    good = json.dumps(dict(ctx="A man", endings=["a", "b", "c", "d"], label=0))
    path = tmp_path / "hs.jsonl"
    path.write_bytes(good.encode() + b"\n" + b'{"ctx": "caf\xe9"}\n')
    where = re.escape(str(path))
    with pytest.raises(hellaswag.HellaSwagError, match=f"^{where}:2: not UTF-8 text \\(byte 12"):
        hellaswag.read_examples(str(path))
    folder = re.escape(str(tmp_path))
    with pytest.raises(hellaswag.HellaSwagError, match=f"^{folder} is a folder: --file names"):
        hellaswag.read_examples(str(tmp_path))
