"""docs/standin.py, the HellaSwag-format stand-in, on a fake corpus whose sentences the test wrote: each
example checked against them, the file read and scored by hellaswag.py's own code, determinism, errors."""
import gzip
import importlib.util
import json
import os
import random
from contextlib import nullcontext

import pytest
import torch

import hellaswag
from test_hellaswag import spread_model

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "river stone light house garden winter music paper letter window city road field cloud".split()


def load_standin():
    spec = importlib.util.spec_from_file_location("standin", os.path.join(HERE, "docs", "standin.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sentence(gen, *ids):
    """A unique sentence of 8-20 words: 'Item <ids> ...'."""
    return " ".join(["Item", "-".join(map(str, ids))] + gen.choices(WORDS, k=gen.randint(6, 18))) + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 documents in 2 collections: 2 prose paragraphs of 8 sentences each, and a verse paragraph (line
    breaks: never a context). Also the oracle: (context, true ending) -> document, for every 3 consecutive
    sentences of a prose paragraph and the one after them; and prose sentence -> (document, collection)."""
    gen, pairs, owner, docs = random.Random(0), {}, {}, []
    for d in range(40):
        paragraphs = [[sentence(gen, d, p, s) for s in range(8)] for p in range(2)]
        verse = "\n".join(sentence(gen, d, "v", s) for s in range(8))
        collection = ("wiki", "book")[d % 2]
        docs.append(dict(text="\n\n".join([" ".join(p) for p in paragraphs] + [verse]),
                         source=f"{collection}/Title {d}"))
        for p in paragraphs:
            owner.update({s: (d, collection) for s in p})
            pairs.update({(" ".join(p[i:i + 3]), p[i + 3]): d for i in range(5)})
    path = tmp_path_factory.mktemp("corpus") / "part-0000.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in docs)
    return str(path), pairs, owner


def build(corpus, out, *args):
    load_standin().main(["--corpus", corpus[0], "--out", str(out), "--n", "40", *args])
    return [json.loads(line) for line in open(out, encoding="utf-8")]


def test_true_ending_follows_its_context_wrong_ones_are_other_documents_of_similar_length(corpus, tmp_path):
    _, pairs, owner = corpus
    examples = build(corpus, tmp_path / "s.jsonl")
    assert len({pairs[ex["ctx"], ex["endings"][ex["label"]]] for ex in examples}) == 40  # documents' turns
    for ex in examples:
        true = ex["endings"][ex["label"]]
        doc = pairs[ex["ctx"], true]  # 3 whole sentences of one prose paragraph, then the next one
        wrong = [owner[e] for i, e in enumerate(ex["endings"]) if i != ex["label"]]
        assert len({d for d, _ in wrong} | {doc}) == 4  # 3 documents, none the context's
        assert all(collection == owner[true][1] for _, collection in wrong)
        words = len(true.split())
        assert all(4 * words <= 5 * len(e.split()) <= 6 * words for e in ex["endings"])  # 80-120 %


def test_labels_are_0_to_3_and_vary_and_the_summary_line_counts_them(corpus, tmp_path, capsys):
    examples = build(corpus, tmp_path / "s.jsonl")
    labels = [ex["label"] for ex in examples]
    assert set(labels) <= {0, 1, 2, 3} and len(set(labels)) > 1
    printed = capsys.readouterr().out
    assert printed.startswith("standin.py: 40 examples from ") and "| seed 0" in printed
    assert printed.count("\n") == 1 and os.listdir(tmp_path) == ["s.jsonl"]  # no temporary file left


def test_same_seed_same_bytes_another_seed_another_file(corpus, tmp_path):
    build(corpus, tmp_path / "a.jsonl")
    build(corpus, tmp_path / "b.jsonl")
    build(corpus, tmp_path / "c.jsonl", "--seed", "1")
    a, b, c = (open(tmp_path / f"{x}.jsonl", "rb").read() for x in "abc")
    assert a == b and a != c


def test_hellaswag_reads_the_file_and_scores_it_end_to_end(corpus, tmp_path):
    path = str(tmp_path / "s.jsonl")
    records = build(corpus, path)
    assert hellaswag.read_examples(path) == records  # its checks pass on every line
    examples = hellaswag.load(path)
    assert [ex.label for ex in examples] == [r["label"] for r in records]
    model = spread_model(block_size=128)  # scores two: its logits span GPT-2's 50,257 tokens, slow on a CPU
    result = hellaswag.evaluate(model, examples[:2], torch.device("cpu"), nullcontext())
    assert result["n"] == 2 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n=0 is invalid: must be >= 1"),
    (["--n", "many"], "argument --n: invalid int value: 'many'"),
    (["--n", "1000"], "--n=1000: the corpus yields only "),
    (["--corpus", "nope.jsonl.gz"], "--corpus=nope.jsonl.gz: no such file"),
    (["--corpus", "{tmp}/plain.gz"], "--corpus={tmp}/plain.gz: line 1: Not a gzipped file"),
    (["--out", "{tmp}"], "--out={tmp} is a folder"),
    (["--out", "{tmp}/plain.gz/s.jsonl"], "--out={tmp}/plain.gz/s.jsonl: cannot write it"),
])
def test_bad_arguments_are_one_line_errors_naming_the_option(corpus, tmp_path, args, message):
    (tmp_path / "plain.gz").write_text("not gzip\n")
    argv = ["--corpus", corpus[0], "--out", str(tmp_path / "s.jsonl"), "--n", "40"]
    argv += [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        load_standin().main(argv)
    code = e.value.code
    assert code.startswith(f"standin.py: error: {message.format(tmp=tmp_path)}") and "\n" not in code
    assert not os.path.exists(tmp_path / "s.jsonl")


def test_wrong_endings_are_the_drawn_sentences_sharing_the_most_words_with_the_context():
    """Of 10 length-matched sentences of other documents, those of documents 1, 2 and 3 share 3, 2 and 1
    words of 4+ letters with the context: they are the wrong endings, most shared first; the context's own
    document and a copy of the true ending never are, however much they share."""
    standin = load_standin()
    context = "The zebra crossed the savanna. A giraffe watched it. Dust rose."
    ending = "Then the herd moved on towards the river before the night came."
    filler = "one two six ten red big old new hot dry"  # no word of 4+ letters
    texts = {1: "zebra giraffe savanna " + filler, 2: "giraffe savanna " + filler + " and",
             3: "zebra " + filler + " was too", 0: "zebra giraffe savanna " + filler, 5: ending}
    pool = sorted((len(t.split()), d, t) for d, t in
                  {**{d: f"{filler} {d}" for d in range(4, 12)}, **texts}.items())
    assert standin.wrong_endings(random.Random(3), pool, 0, ending, context) == [texts[1], texts[2], texts[3]]
    examples = [dict(ctx=context, endings=[texts[1], ending, filler, filler], label=0),
                dict(ctx=context, endings=[texts[3], texts[1], filler, filler], label=0)]
    assert standin.overlap_baseline(examples) == 0.5
