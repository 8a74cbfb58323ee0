"""fp32 greedy generation, TF32 off: the CUDA-graph path against the full recompute, every variant."""
import torch
from ddl import GPT, GPTConfig
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
M124 = dict(n_layer=12, n_head=6, head_dim=128, n_embd=768, block_size=1024)
for name, kw in dict(additive=dict(residual="additive"), delta=dict(d_v=1), cc=dict(d_v=4, compressor="cc"),
                     tc=dict(d_v=4, compressor="tc")).items():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**M124, **kw)).cuda().eval()
    with torch.no_grad():
        p = torch.randint(0, 50257, (2, 7), device="cuda")
        a = m.generate(p, 40, temperature=0)
        b = p
        gaps = []
        for _ in range(40):
            logits = m(b)[:, -1]
            top2 = logits.topk(2).values
            gaps.append((top2[:, 0] - top2[:, 1]).min().item())
            b = torch.cat([b, logits.argmax(-1, keepdim=True)], 1)
        print(name, "equal:", bool(torch.equal(a, b)),
              "first diff at", (a != b).any(0).nonzero()[:1].tolist(),
              "smallest top-2 logit gap", min(gaps), flush=True)
