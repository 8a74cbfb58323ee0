"""
A HellaSwag-format stand-in made from the corpus's held-out part: it is NOT HellaSwag (Zellers et al. 2019),
and its accuracies compare checkpoints with each other, never with published HellaSwag figures. HellaSwag's
file cannot be downloaded on this project's offline machines; this file has its format (JSON lines: ctx,
endings, label), so hellaswag.py and train.py's --hellaswag score it as they would the real one.

    python docs/standin.py --corpus ../shared/corpus/part-0000.jsonl.gz --out data/standin/standin_val.jsonl
    python hellaswag.py --out_dir=out --file=data/standin/standin_val.jsonl

An example: in a paragraph without line breaks (prose; code and verse keep theirs), 3 consecutive whole
sentences are the context and the sentence after them the true ending (hellaswag.py appends an ending after a
space, as it follows in the text). The 3 wrong endings are sentences of 3 other documents of the same
collection (`source` up to its first '/': wikipedia, gutenberg, ...: style is no cue), each of 80-120 % of
the true ending's word count (length is little cue), and of 64 such sentences drawn, the 3 sharing the most
words of 4+ letters with the context (the most on-topic); the label, the true ending's place, is random.
A document's windows do not overlap, and documents take turns (one window of each, in a shuffled order, then
a second, ...), to spread the examples over as many documents as possible. The same input and seed give the
same file, byte for byte. Use only the held-out part-0000: the other parts are training text.
That choice is a crude stand-in for HellaSwag's adversarial filtering. On part-0000 the rule "take the
ending sharing the most such words with the context" picks the true one 38 % of the time, against 73 %
with distractors chosen without regard to the topic; the script prints that share for every file it
writes. The stand-in is still easier than HellaSwag: its endings are real sentences that a language
model rejects on grammar and discourse too.
"""
import argparse
import bisect
import gzip
import json
import os
import random
import re
import sys

CTX_SENTENCES = 3
MIN_WORDS, MAX_WORDS = 8, 40  # a true ending's words: fragments ("Chapter IV.") say too little to score
# a break after . ! or ? (a closing quote or bracket may follow it), before what starts a sentence
SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)]))\s+(?=[\"'\u201c\u2018(]?[A-Z])")
ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Rev|Gen|Col|Capt|No|Vol|Fig|vs|etc|[A-Z])\.$")

class StandinError(ValueError):
    """A bad option or input: reported in one line."""

def read_corpus(path):
    """(collection, text) per document of a .jsonl.gz (or .jsonl) corpus file."""
    if not os.path.isfile(path):
        raise StandinError(f"--corpus={path}: no such file")
    docs, opener = [], gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise StandinError(f"--corpus={path}: line {len(docs) + 1}: no 'text' string")
                docs.append((str(rec.get("source", "")).split("/")[0], rec["text"]))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:  # not gzip, cut, not JSON
        raise StandinError(f"--corpus={path}: line {len(docs) + 1}: {e}") from None
    return docs

def sentences(paragraph):
    """The paragraph's sentences; a break after an abbreviation or an initial ("Mr.", "J.") is undone."""
    out = []
    for piece in SENTENCE_BREAK.split(paragraph.strip()):
        if out and ABBREVIATION.search(out[-1]):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out

def prose(text):
    """The sentences of each paragraph of text that holds no line break."""
    return [sentences(p) for p in text.split("\n\n") if p.strip() and "\n" not in p.strip()]

def windows(paragraphs):
    """(context, true ending) per non-overlapping run of CTX_SENTENCES + 1 sentences of one paragraph."""
    out = []
    for sents in paragraphs:
        for i in range(0, len(sents) - CTX_SENTENCES, CTX_SENTENCES + 1):
            ending = sents[i + CTX_SENTENCES]
            if MIN_WORDS <= len(ending.split()) <= MAX_WORDS:
                out.append((" ".join(sents[i:i + CTX_SENTENCES]), ending))
    return out

CANDIDATES = 64  # length-matched sentences drawn per example, of which the 3 closest to the context are kept

def content_words(text):
    """The lower-cased words of 4+ letters of text: what a topic shares."""
    return set(re.findall(r"[a-z]{4,}", text.lower()))

def wrong_endings(rng, pool, doc, ending, context):
    """3 sentences of pool (sorted (words, doc, text)) from 3 documents other than doc, each of 80-120 % of
    ending's words and unlike it: of up to CANDIDATES such sentences drawn from distinct documents, the 3
    sharing the most content words with the context (the most on-topic, as HellaSwag's adversarial
    filtering keeps the endings hardest to reject); None where fewer than 3 are found in 8 x CANDIDATES
    draws (a rare length in a small collection)."""
    words = len(ending.split())
    lo = bisect.bisect_left(pool, ((4 * words + 4) // 5,))  # ceil(0.8 w) to floor(1.2 w), in integers
    hi = bisect.bisect_left(pool, (6 * words // 5 + 1,))
    drawn = {}
    for _ in range(8 * CANDIDATES if hi > lo else 0):
        _, d, text = pool[rng.randrange(lo, hi)]
        if d != doc and d not in drawn and text != ending and text not in drawn.values():
            drawn[d] = text
            if len(drawn) == CANDIDATES:
                break
    if len(drawn) < 3:
        return None
    topic = content_words(context)
    ranked = sorted(drawn.values(), key=lambda text: -len(topic & content_words(text)))  # stable: draw order
    return ranked[:3]

def overlap_baseline(examples):
    """The share of examples whose true ending shares the most content words with the context (ties broken
    towards the first ending): how far a model-free topic cue goes on this file."""
    right = 0
    for ex in examples:
        topic = content_words(ex["ctx"])
        shared = [len(topic & content_words(e)) for e in ex["endings"]]
        right += shared.index(max(shared)) == ex["label"]
    return right / len(examples)

def sentence_pools(docs, paragraphs):
    """Per collection, every prose sentence as (words, document, text), sorted for wrong_endings' bisect."""
    pools = {}
    for d, ((collection, _), paras) in enumerate(zip(docs, paragraphs)):
        pools.setdefault(collection, []).extend((len(s.split()), d, s) for p in paras for s in p)
    return {collection: sorted(pool) for collection, pool in pools.items()}

def make_examples(docs, n, rng):
    """n examples in HellaSwag's format, and the number of documents their contexts come from."""
    paragraphs = [prose(text) for _, text in docs]
    pools = sentence_pools(docs, paragraphs)
    turns = [windows(p) for p in paragraphs]
    for w in turns:
        rng.shuffle(w)
    order = list(range(len(docs)))
    rng.shuffle(order)
    examples, used = [], set()
    for turn in range(max(map(len, turns), default=0)):
        for d in (d for d in order if turn < len(turns[d])):
            ctx, ending = turns[d][turn]
            endings = wrong_endings(rng, pools[docs[d][0]], d, ending, ctx)
            if endings:
                label = rng.randrange(4)
                endings.insert(label, ending)
                examples.append(dict(ctx=ctx, endings=endings, label=label))
                used.add(d)
                if len(examples) == n:
                    return examples, len(used)
    raise StandinError(f"--n={n}: the corpus yields only {len(examples)} examples")

def write_atomic(path, examples):
    """One JSON line per example, under a temporary name then renamed: no partial file has the final name."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples)
        os.replace(path + ".tmp", path)
    except OSError as e:  # a file where a folder should be, no permission, a full disk
        raise StandinError(f"--out={path}: cannot write it: {e}") from None

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"standin.py: error: {message}")  # one line, without the usage
    p.add_argument("--corpus", required=True, help="the held-out corpus file, part-0000.jsonl.gz")
    p.add_argument("--out", required=True, help="the JSON-lines file to write")
    p.add_argument("--n", type=int, default=2000, help="examples, >= 1 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = p.parse_args(argv)
    if args.n < 1:
        raise StandinError(f"--n={args.n} is invalid: must be >= 1")
    if os.path.isdir(args.out):
        raise StandinError(f"--out={args.out} is a folder: name the file to write")
    return args

def main(argv=None):
    try:
        args = parse_args(argv)
        examples, n_docs = make_examples(read_corpus(args.corpus), args.n, random.Random(args.seed))
        write_atomic(args.out, examples)
    except StandinError as e:
        sys.exit(f"standin.py: error: {e}")
    ctx_words = sum(len(ex["ctx"].split()) for ex in examples) / len(examples)
    ending_words = sum(len(e.split()) for ex in examples for e in ex["endings"]) / (4 * len(examples))
    print(f"standin.py: {len(examples)} examples from {n_docs} documents -> {args.out} | mean words: context "
          f"{ctx_words:.1f}, ending {ending_words:.1f} | the most-shared-words rule: "
          f"{overlap_baseline(examples):.3f} (chance 0.25) | seed {args.seed}")


if __name__ == "__main__":
    main()
