"""
Deep Delta Learning (Zhang, Liu, Wang, Gu; arXiv 2601.00417) in one readable file.

A residual block normally adds: x <- x + F(x). DDL reads the state along a learned unit
direction k, compares the readout with a learned target v and writes the gated difference
back along k (Eq. 2.2):

    X_{l+1} = X_l + beta k (v^T - k^T X_l),    i.e.  X_{l+1} = (I - beta k k^T) X_l + beta k v^T

The shortcut A = I - beta k k^T has eigenvalue 1 - beta along k and 1 elsewhere (Prop. 2.1):
identity at beta = 0, projection at beta = 1, reflection at beta = 2.

Reading order: config, RoPE, attention, SwiGLU MLP, the delta operator, the compressors,
the block, the GPT. Backbone (paper §3, §4.1): Llama-style, pre-norm RMSNorm, RoPE, QK-norm,
SwiGLU, no biases, tied embedding and LM head.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

RESIDUALS = ("additive", "delta", "write")
COMPRESSORS = ("cc", "tc")
SUBLAYERS = ("attn", "mlp")

class ConfigError(ValueError):
    """A setting a user chose is not allowed; the message names the key, the value and what is.
    train.py prints these as one line; every other exception keeps its traceback."""

def setting(default, help):
    """A config field with its one-line description (train.py --help prints it)."""
    return field(default=default, metadata=dict(help=help))

@dataclass
class GPTConfig:
    vocab_size: int = setting(50304, "GPT-2's 50257 padded to a multiple of 64")
    n_layer: int = setting(12, "transformer blocks (each: attention + MLP sublayer)")
    n_head: int = setting(6, "attention heads")
    head_dim: int = setting(128, "width of one head")
    n_embd: int = setting(768, "model width d; must equal n_head * head_dim")
    block_size: int = setting(1024, "longest sequence (RoPE table size)")
    residual: str = setting("delta", "additive (baseline) | delta (Eq. 2.2) | write (beta k v^T only, §5)")
    d_v: int = setting(1, "value channels of the residual state X in R^{d x d_v} (§2.2)")
    compressor: str = setting("cc", "d_v > 1: cc (channel mixing) | tc (token convolution), §3.2")
    embed_conv: bool = setting(True, "d_v > 1: EC, a causal token convolution expanding the embedding")
    conv_kernel: int = setting(4, "taps of the EC and TC causal convolutions")
    beta_init: float = setting(1.0, "beta at initialisation, in [0, 2]")
    k_eps: float = setting(1e-5, "epsilon_k of k = k~ / sqrt(|k~|^2 + eps^2) (§3.1)")
    v_scale: float = setting(4.0, "v = v_scale * sigmoid(W_v c + b_v); 0: plain linear v = W_v c + b_v")
    check_spectrum: bool = setting(False, "assert Prop. 2.1 / Eq. 2.4 numerically in every forward (slow)")

    def __post_init__(self):
        def need(ok, name, allowed):
            if not ok:
                raise ConfigError(f"GPTConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")
        for f in fields(self):  # bool is an int in Python: a type check must not let True pass as 1
            value = getattr(self, f.name)
            need(type(value) is f.type or (f.type is float and type(value) is int), f.name, f"must be a {f.type.__name__}")
        for name in ("vocab_size", "n_layer", "n_head", "head_dim", "block_size", "d_v", "conv_kernel"):
            need(getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(self.n_embd == self.n_head * self.head_dim, "n_embd",
             f"must equal n_head * head_dim = {self.n_head * self.head_dim}")
        need(self.head_dim % 2 == 0, "head_dim", "must be even for RoPE")
        need(self.residual in RESIDUALS, "residual", f"allowed: {', '.join(RESIDUALS)}")
        need(self.compressor in COMPRESSORS, "compressor", f"allowed: {', '.join(COMPRESSORS)}")
        need(self.residual != "additive" or self.d_v == 1, "d_v",
             "the additive baseline has a vector state: use d_v=1, or residual='delta'/'write'")
        need(0.0 <= self.beta_init <= 2.0, "beta_init", "must lie in [0, 2]")
        need(self.k_eps > 0, "k_eps", "must be > 0")
        need(self.v_scale >= 0, "v_scale", "must be >= 0 (0 = plain linear v)")

# ----------------------------------------------------------------------------- RoPE

def rope_table(block_size, head_dim, base=10000.0):
    """cos and sin of shape (block_size, head_dim/2) for rotary position embeddings."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    """Rotate the two halves of every head vector; x is (B, T, H, D), cos/sin (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)

# ----------------------------------------------------------------------------- attention and MLP

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.c_proj.is_output_proj = True  # depth-scaled init, see GPT._init_weights
        self.q_norm = nn.Parameter(torch.ones(cfg.head_dim))  # QK RMSNorm gains
        self.k_norm = nn.Parameter(torch.ones(cfg.head_dim))
        cos, sin = rope_table(cfg.block_size, cfg.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        cos, sin = self.cos[:T], self.sin[:T]
        # RoPE then QK RMSNorm, the order of the authors' code (the norm commutes with rotation
        # up to its elementwise gain).
        q = F.rms_norm(apply_rope(q, cos, sin), (self.head_dim,), self.q_norm.to(q.dtype), eps=1e-5)
        k = F.rms_norm(apply_rope(k, cos, sin), (self.head_dim,), self.k_norm.to(k.dtype), eps=1e-5)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.hidden = math.floor(8 / 3 * cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * self.hidden, bias=False)  # fused gate and up
        self.c_proj = nn.Linear(self.hidden, cfg.n_embd, bias=False)
        self.c_proj.is_output_proj = True

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)

# ----------------------------------------------------------------------------- the delta operator

def delta_operator(k, beta):
    """A = I - beta k k^T (Eq. 2.2's shortcut), shape (..., d, d). For analysis and tests only:
    the model never builds this d x d matrix."""
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    return eye - beta[..., None, None] * k[..., :, None] * k[..., None, :]

def readout_error(X, k, v):
    """e = k^T X - v^T, the readout error of Eq. 2.4 (one sign convention everywhere), (..., d_v).
    Reduced in fp32 (or wider) whatever X's dtype."""
    acc = torch.promote_types(X.dtype, torch.float32)
    return torch.sum(k.unsqueeze(-1) * X, dim=-2, dtype=acc) - v.to(acc)

def delta_update(X, k, v, beta):
    """Eq. 2.2: X + beta k (v^T - k^T X) = X - beta k e^T, for X (..., d, d_v), k (..., d),
    v (..., d_v), beta (...). The model runs this function; autograd derives its backward."""
    e = readout_error(X, k, v)
    return X - k.unsqueeze(-1) * (beta.to(e.dtype).unsqueeze(-1) * e).to(X.dtype).unsqueeze(-2)

def write_update(X, k, v, beta):
    """The write-only control (§5): X + beta k v^T, the delta rule without its erase term."""
    acc = torch.promote_types(X.dtype, torch.float32)
    return X + k.unsqueeze(-1) * (beta.to(acc).unsqueeze(-1) * v.to(acc)).to(X.dtype).unsqueeze(-2)

def unit_direction(k_tilde, eps):
    """k = k~ / sqrt(|k~|^2 + eps^2), computed as in §3.1: RMSNorm with eps^2/d, then / sqrt(d),
    which never squares large activations in low precision."""
    d = k_tilde.shape[-1]
    return F.rms_norm(k_tilde, (d,), eps=eps * eps / d) * (1.0 / math.sqrt(d))

# ----------------------------------------------------------------------------- the compressors

def shift_tokens(x, s):
    """x (B, T, ...) delayed by s tokens along T, zeros in front: the causal shift of a conv tap."""
    if s == 0:
        return x
    if s >= x.shape[1]:
        return torch.zeros_like(x)
    return F.pad(x[:, :-s], (0, 0) * (x.dim() - 2) + (s, 0))

def causal_token_conv(x, weight):
    """Depthwise causal convolution over tokens: y[:, t] = sum_s weight[..., s] * x[:, t - s].
    x is (B, T, ...) and weight (..., K) broadcasts against x's trailing dims; tap 0 is the
    current token, so a weight of (1, 0, ..., 0) is the identity."""
    return sum(shift_tokens(x, s) * weight[..., s] for s in range(weight.shape[-1]))

class ChannelCompressor(nn.Module):
    """DDL-CC (§3.2): x_in[i] = sum_j c_ij X[i, j], a learned mix of the d_v channels per feature,
    initialised to the channel mean. Departure: the authors' CC is a short convolution along d_v
    followed by a read vector; the paper's text describes a per-feature channel mix, which we follow."""
    def __init__(self, cfg):
        super().__init__()
        self.mix = nn.Parameter(torch.full((cfg.n_embd, cfg.d_v), 1.0 / cfg.d_v))

    def forward(self, X):
        return torch.sum(X * self.mix.to(X.dtype), dim=-1)

class TokenCompressor(nn.Module):
    """DDL-TC (§3.2, App. A.2): a short causal depthwise convolution over tokens for every (i, j)
    entry of X, then a learned read vector over d_v; initialised to identity and the mean
    (departure: our choice of init, so that TC starts as CC's channel mean)."""
    def __init__(self, cfg):
        super().__init__()
        conv = torch.zeros(cfg.n_embd, cfg.d_v, cfg.conv_kernel)
        conv[..., 0] = 1.0
        self.conv = nn.Parameter(conv)
        self.read = nn.Parameter(torch.full((cfg.d_v,), 1.0 / cfg.d_v))

    def forward(self, X):
        # x_in[t, i] = sum_s sum_j read_j conv_ijs X[t - s, i, j]. Reducing over d_v before shifting
        # is the same sum, but shifts (B, T, d) tensors instead of (B, T, d, d_v) copies of the state.
        w = (self.conv * self.read[:, None]).to(X.dtype)                     # (d, d_v, K)
        taps = torch.sum(X.unsqueeze(-1) * w, dim=-2)                         # (B, T, d, K)
        return sum(shift_tokens(taps[..., s], s) for s in range(w.shape[-1]))

class EmbedConv(nn.Module):
    """EC (App. A.2): expands the embedding (B, T, d) into the state (B, T, d, d_v) with a causal
    depthwise token convolution, identity-initialised so it starts as plain repetition."""
    def __init__(self, cfg):
        super().__init__()
        w = torch.zeros(cfg.n_embd, cfg.d_v, cfg.conv_kernel)
        w[..., 0] = 1.0
        self.weight = nn.Parameter(w)

    def forward(self, x):
        return causal_token_conv(x.unsqueeze(-1), self.weight.to(x.dtype))

# ----------------------------------------------------------------------------- the block

class ResidualBranch(nn.Module):
    """One sublayer with its residual interface: compress (d_v > 1), RMSNorm to c, run F(c),
    then x + F(c) (additive) or the delta / write rewrite of the state."""
    def __init__(self, cfg, sublayer, layer):
        super().__init__()
        self.cfg, self.name = cfg, f"layer {layer} {sublayer}"
        self.norm = nn.Parameter(torch.ones(cfg.n_embd))
        self.f = CausalSelfAttention(cfg) if sublayer == "attn" else SwiGLU(cfg)
        self.compressor = None
        if cfg.d_v > 1:  # departure: one compressor per sublayer (the authors' code shares one per block)
            self.compressor = ChannelCompressor(cfg) if cfg.compressor == "cc" else TokenCompressor(cfg)
        if cfg.residual != "additive":
            # v's projection W_v (d_v x d), initialised like the other matrices, and b_v = 0
            self.W_v = nn.Parameter(torch.randn(cfg.d_v, cfg.n_embd) * (0.5 / math.sqrt(cfg.n_embd)))
            self.b_v = nn.Parameter(torch.zeros(cfg.d_v))
            # beta = 2 sigmoid(w.c + b) with w = 0 and b = logit(beta_init / 2): every token starts at
            # exactly beta_init. Departure: the authors' global init perturbs w; we start it at zero.
            p = min(max(cfg.beta_init / 2, 1e-6), 1 - 1e-6)
            self.w_beta = nn.Parameter(torch.zeros(cfg.n_embd))
            self.b_beta = nn.Parameter(torch.tensor(math.log(p / (1 - p))))
        self.record = False  # set by GPT.record_gates(): keep this forward's gate statistics in .stats
        self.stats = None

    # beta and v are written as fp32 elementwise products summed over d, not as matmuls: they stay
    # in fp32 under autocast, and torch.compile fuses them into the kernel that computes c, where
    # (d -> 1) and (d -> d_v) matrix products would each be a separate, nearly empty GEMM launch.
    def beta(self, c):
        """beta = 2 sigmoid(w_beta . c + b_beta) in (0, 2), in fp32 (§2.2)."""
        return 2 * torch.sigmoid(torch.sum(c.float() * self.w_beta, dim=-1) + self.b_beta)

    def value(self, c):
        """v in R^{d_v}, in fp32. The paper's text writes v = W_v c; the authors' code (and ours by
        default) bounds it as v = v_scale * sigmoid(W_v c + b_v), v_scale = 4; v_scale = 0 gives the
        plain linear form. Departure: v reads the normalised input c, as beta does (the authors' code
        feeds v the un-normalised compressed input)."""
        v = torch.sum(c.float().unsqueeze(-2) * self.W_v, dim=-1) + self.b_v
        return v if self.cfg.v_scale == 0 else self.cfg.v_scale * torch.sigmoid(v)

    def read(self, x_in):
        """c = RMSNorm(x_in) and the sublayer's output k~ = F(c)."""
        c = F.rms_norm(x_in, (x_in.shape[-1],), self.norm.to(x_in.dtype), eps=1e-5)
        return c, self.f(c)

    def forward(self, X):
        x_in = X if self.compressor is None else self.compressor(X)
        c, k_tilde = self.read(x_in)
        if self.cfg.residual == "additive":
            return X + k_tilde
        k, v, beta = unit_direction(k_tilde, self.cfg.k_eps), self.value(c), self.beta(c)
        state = X if self.cfg.d_v > 1 else X.unsqueeze(-1)  # d_v = 1: the same rule on (d, 1)
        rule = delta_update if self.cfg.residual == "delta" else write_update
        new_state = rule(state, k, v, beta)
        if self.record:
            self.stats = dict(beta=beta.detach(), k_norm=k_tilde.detach().float().norm(dim=-1),
                              e_pre=readout_error(state, k, v).detach().abs())
        if self.cfg.check_spectrum:
            self.check_spectrum(k_tilde, k, v, beta, state, new_state)
        return new_state if self.cfg.d_v > 1 else new_state.squeeze(-1)

    def check_spectrum(self, k_tilde, k, v, beta, state, new_state):
        """Prop. 2.1 and Eq. 2.4 in fp32: |k| = 1 where |k~| >> eps_k, 0 < beta < 2 and
        e_post = (1 - beta) e_pre (delta rule only). Raises AssertionError naming the quantity."""
        def fail(what):
            raise AssertionError(f"check_spectrum: {self.name}: {what}")
        big = k_tilde.float().norm(dim=-1) > 100 * self.cfg.k_eps
        if bool((((k.float().norm(dim=-1) - 1).abs() > 1e-2) & big).any()):
            fail("|k| != 1 where |k~| >> eps_k")
        if not bool(((beta > 0) & (beta < 2)).all()):
            fail(f"beta outside (0, 2): min {beta.min().item():.4g}, max {beta.max().item():.4g}")
        if self.cfg.residual == "delta":
            e_pre, e_post = readout_error(state.float(), k.float(), v), readout_error(new_state.float(), k.float(), v)
            want = (1 - beta.float()).unsqueeze(-1) * e_pre
            scale = 1e-3 if new_state.dtype == torch.float32 else 3e-2
            tol = scale * (1 + new_state.float().abs().amax(dim=(-2, -1), keepdim=True).squeeze(-1))
            if bool(((e_post - want).abs() > tol).any()):
                fail(f"e_post != (1 - beta) e_pre (Eq. 2.4), max error {(e_post - want).abs().max().item():.3g}")

class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn = ResidualBranch(cfg, "attn", layer)
        self.mlp = ResidualBranch(cfg, "mlp", layer)

    def forward(self, X):
        return self.mlp(self.attn(X))

# ----------------------------------------------------------------------------- the GPT

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_conv = EmbedConv(cfg) if cfg.d_v > 1 and cfg.embed_conv else None
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.readout = None  # compression before the final norm
        if cfg.d_v > 1:
            self.readout = ChannelCompressor(cfg) if cfg.compressor == "cc" else TokenCompressor(cfg)
        self.norm_f = nn.Parameter(torch.ones(cfg.n_embd))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """The authors' init: embedding N(0, 0.02), matrices N(0, 0.5/sqrt(d)), output projections
        N(0, 0.5/sqrt(d)/sqrt(L)), biases zero. Only nn.Linear / nn.Embedding are touched, so the
        gates and convolutions keep their own identity-style initialisation."""
        d, L = self.config.n_embd, self.config.n_layer
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear) and module is not self.lm_head:
            depth = math.sqrt(L) if getattr(module, "is_output_proj", False) else 1.0
            nn.init.normal_(module.weight, std=0.5 / math.sqrt(d) / depth)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self):
        """Parameters, the tied embedding / LM head matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, T):
        """Training FLOPs per token for MFU, the PaLM / nanoGPT estimate: 6N for the matrices (the tied
        embedding counted once, as the LM head) plus 12 L T d for attention scores."""
        return 6 * self.num_params() + 12 * self.config.n_layer * T * self.config.n_embd

    def configure_optimizers(self, lr, weight_decay, betas, device_type):
        """AdamW, fused on CUDA. Weight decay on every parameter of 2 or more dims: the matrices, and
        also W_v and the compressor / EC weights; none on norm gains, biases and w_beta."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")

    def check_ids(self, name, ids, low):
        """Refuse ids outside [low, vocab_size): an index error deep inside the model names nothing."""
        # eager mode only: inside torch.compile it would cost a graph break and a sync
        if not torch.compiler.is_compiling() and ids.numel():
            lo, hi = (t.item() for t in torch.aminmax(ids))  # one pass
            if lo < low or hi >= self.config.vocab_size:
                raise ValueError(f"{name} must lie in [{low}, {self.config.vocab_size}); got [{lo}, {hi}]")

    def forward(self, idx, targets=None):
        """The logits (B, T, vocab) in fp32; with targets (-1: ignored), the mean cross-entropy only."""
        cfg = self.config
        B, T = idx.shape
        if not 1 <= T <= cfg.block_size:
            raise ValueError(f"sequence length {T} must lie in [1, block_size={cfg.block_size}]")
        self.check_ids("token ids", idx, 0)
        x = self.wte(idx)
        if cfg.d_v > 1:  # expanded state X in R^{d x d_v} per token (§2.2)
            if torch.is_autocast_enabled(x.device.type):
                # as in the authors' code, the d_v-fold state lives in the autocast dtype (bf16):
                # half the memory and traffic; every reduction over it still runs in fp32
                x = x.to(torch.get_autocast_dtype(x.device.type))
            x = self.embed_conv(x) if self.embed_conv is not None else x.unsqueeze(-1).expand(-1, -1, -1, cfg.d_v)
        x = self.body(x)
        x = F.rms_norm(x, (cfg.n_embd,), self.norm_f.to(x.dtype), eps=1e-5)
        if targets is None:
            logits = self.lm_head(x)
            return logits.to(torch.promote_types(logits.dtype, torch.float32))
        self.check_ids("targets", targets, -1)  # -1: ignored positions
        # training gets the loss alone, never the (B, T, vocab) logits: a caller holding them would keep
        # them alive through the backward (3 GiB at 16 x 1024 tokens). The loss is reduced in fp32.
        logits = self.lm_head(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def body(self, X):
        """The blocks, then the readout compression (d_v > 1); fused.py's install() replaces this method."""
        for block in self.blocks:
            X = block(X)
        return X if self.readout is None else self.readout(X)

    def record_gates(self, on=True):
        """Make every residual branch keep its gate statistics from the next forwards (or stop)."""
        for m in self.modules():
            if isinstance(m, ResidualBranch):
                m.record, m.stats = on, None

    @torch.no_grad()
    def gate_stats(self, bins=10):
        """The gate audit (§5): per layer and sublayer, statistics of beta, |k~| and
        |e_pre| = |k^T X - v^T| from the last forward run after `record_gates()`, and a
        histogram of beta over [0, 2]."""
        if self.config.residual == "additive":
            raise ValueError("gate_stats: the additive baseline has no gate (residual='additive')")
        out = []
        for i, block in enumerate(self.blocks):
            for name in SUBLAYERS:
                s = getattr(block, name).stats
                if s is None:
                    raise RuntimeError("gate_stats: call model.record_gates() and run a forward first")
                row = dict(layer=i, sublayer=name,
                           beta_hist=torch.histc(s["beta"].float(), bins=bins, min=0, max=2).long().tolist())
                for key in ("beta", "k_norm", "e_pre"):
                    t = s[key].float()
                    row.update({f"{key}_min": t.min().item(), f"{key}_mean": t.mean().item(),
                                f"{key}_max": t.max().item()})
                out.append(row)
        return out

    @torch.no_grad()
    def gate_audit(self, idx):
        """gate_stats() of one forward of idx, recorded for that forward only."""
        self.record_gates()
        self(idx)
        stats = self.gate_stats()
        self.record_gates(False)
        return stats

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None):
        """Yield max_new_tokens sampled continuation tokens of idx (B, T), each (B, 1), as they come.
        temperature 0 is greedy; top_k keeps the k likeliest ids; n_vocab limits sampling to ids
        below it: the tokenizer's own vocabulary, without the padding ids it cannot decode."""
        n_vocab = self.config.vocab_size if n_vocab is None else n_vocab
        for name, value, ok, allowed in (("temperature", temperature, temperature >= 0, ">= 0"),
                                         ("top_k", top_k, top_k is None or top_k >= 1, ">= 1 or None"),
                                         ("n_vocab", n_vocab, 1 <= n_vocab <= self.config.vocab_size,
                                          f"in [1, {self.config.vocab_size}]")):
            if not ok:
                raise ConfigError(f"generate: {name}={value!r} is invalid: must be {allowed}")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :n_vocab]
            if temperature == 0 or top_k == 1:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)
            idx = torch.cat([idx, nxt], dim=1)
            yield nxt

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None):
        """idx (B, T) followed by max_new_tokens sampled tokens (generate_tokens), (B, T + max_new_tokens)."""
        return torch.cat([idx, *self.generate_tokens(idx, max_new_tokens, temperature, top_k, n_vocab)], dim=1)
