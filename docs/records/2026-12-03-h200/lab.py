"""Lab GPU measurements of 2026-12-03 (the record's README says how they ran): sampling speed
before/after the cache, the training step's memory with and without held logits, HellaSwag's
evaluation speed."""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import ddl
from ddl import GPT, GPTConfig

VARIANTS = {
    "additive": dict(residual="additive", d_v=1),
    "delta": dict(residual="delta", d_v=1),
    "cc": dict(residual="delta", d_v=4, compressor="cc", embed_conv=True),
    "tc": dict(residual="delta", d_v=4, compressor="tc", embed_conv=True),
}
M124 = dict(n_layer=12, n_head=6, head_dim=128, n_embd=768, block_size=1024)


def uncached_generate(m, idx, n):
    """The code before the cache: a full forward of the last block_size tokens per new token."""
    for _ in range(n):
        logits = m(idx[:, -m.config.block_size:])[:, -1, :50257]
        nxt = m.sample(logits, 0.8, 200)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def timed(fn):
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return time.perf_counter() - t, out


def eager_cached(m, prompt, n):
    """The cache without the CUDA graph: one eager forward per token."""
    m.decoder = lambda cache, like: (lambda tok: m(tok, cache=cache))
    try:
        return m.generate(prompt, n, temperature=0.8, top_k=200, n_vocab=50257)
    finally:
        del m.decoder


def sampling(dev, rows):
    for name, kw in VARIANTS.items():
        torch.manual_seed(0)
        m = GPT(GPTConfig(**M124, **kw)).to(dev).eval()
        with torch.no_grad():  # equality in fp32: greedy tokens of the graph path and the full recompute
            p = torch.randint(0, 50257, (2, 7), device=dev)
            a = m.generate(p, 40, temperature=0)
            b = p
            for _ in range(40):
                b = torch.cat([b, m(b)[:, -1:].argmax(-1)], 1)
            print(name, "fp32 greedy equal:", bool(torch.equal(a, b)), flush=True)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16)
        for B in (1, 8):
            prompt = torch.randint(0, 50257, (B, 16), device=dev)
            with torch.no_grad(), ctx:
                m.generate(prompt, 8, temperature=0.8, top_k=200, n_vocab=50257)  # warm-up
                uncached_generate(m, prompt, 8)
                eager_cached(m, prompt, 8)
                t_new, _ = timed(lambda: m.generate(prompt, 256, temperature=0.8, top_k=200, n_vocab=50257))
                t_eager, _ = timed(lambda: eager_cached(m, prompt, 256))
                t_old, _ = timed(lambda: uncached_generate(m, prompt, 256))
            row = dict(task="sampling", variant=name, batch=B, new_tokens=256, graph_s=t_new,
                       eager_cache_s=t_eager,
                       uncached_s=t_old, graph_tok_s=B * 256 / t_new, eager_cache_tok_s=B * 256 / t_eager,
                       uncached_tok_s=B * 256 / t_old, speedup=t_old / t_new)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del m
        torch.cuda.empty_cache()


def hellaswag(dev, rows):
    """Evaluation speed on 2,000 examples in HellaSwag's format built from real prose (the corpus's
    held-out part): the real file cannot be downloaded on this machine."""
    import gzip
    import random
    import hellaswag as hs
    rng = random.Random(0)
    paras = []
    for line in gzip.open("corpus/part-0000.jsonl.gz", "rt"):
        paras += [p.split() for p in json.loads(line)["text"].split("\n\n") if len(p.split()) > 60]
        if len(paras) > 12000:
            break
    with open("/tmp/hs.jsonl", "w") as f:
        for i in range(2000):
            p = paras[i]
            ends = [" ".join(paras[2000 + 4 * i + j][:rng.randint(12, 30)]) for j in range(4)]
            rec = dict(ctx=" ".join(p[:rng.randint(20, 60)]), endings=ends, label=rng.randrange(4))
            f.write(json.dumps(rec) + "\n")
    examples = hs.load("/tmp/hs.jsonl")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    m = GPT(GPTConfig(**M124, residual="delta", d_v=4, compressor="cc")).to(dev)
    for name, model in (("cc", m),):
        hs.evaluate(model, examples[:64], dev, ctx)
        for be in (16, 64):
            t, out = timed(lambda: hs.evaluate(model, examples, dev, ctx, batch_examples=be))
            row = dict(task="hellaswag", variant=name, batch_examples=be, n=out["n"], seconds=t,
                       examples_per_s=out["n"] / t)
            print(json.dumps(row), flush=True)
            rows.append(row)


def memory(dev, rows, B=16):
    """The training step as train.py runs it (loss only) against the old API (logits returned and held)."""
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16)
    x, y = (torch.randint(0, 50304, (B, 1024), device=dev) for _ in range(2))
    for name in ("additive", "delta"):
        for held in (False, True):
            torch.manual_seed(0)
            raw = GPT(GPTConfig(**M124, **VARIANTS[name])).to(dev)

            def old_api(idx, targets):  # what GPT.forward returned before: (logits, loss), held by the caller
                x = F.rms_norm(raw.body(raw.wte(idx)), (768,), raw.final_norm_gain, eps=1e-5)
                logits = raw.lm_head(x)
                return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
            model = torch.compile(old_api if held else raw)
            opt = raw.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cuda")

            def step():
                with ctx:
                    out = model(x, y)
                loss = out[1] if held else out
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return out
            for _ in range(3):
                step()
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            torch.cuda.reset_peak_memory_stats(dev)
            times = []
            for _ in range(10):
                t, _ = timed(step)
                times.append(t)
            row = dict(task="memory", variant=name, batch=B, logits_held=held,
                       peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
                       ms=1000 * sorted(times)[5])
            print(json.dumps(row), flush=True)
            rows.append(row)
            del raw, model, opt
            torch._dynamo.reset()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(torch.cuda.get_device_name(dev), torch.__version__, flush=True)
    rows = []
    for task in sys.argv[1:]:
        globals()[task](dev, rows)
    out = os.path.join(os.environ.get("OUT", "/tmp"), "lab_" + "_".join(sys.argv[1:]) + ".json")
    json.dump(rows, open(out, "w"))
