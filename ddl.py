"""
Deep Delta Learning (Zhang, Liu, Wang, Gu; arXiv 2601.00417) in one readable file.

A residual block normally adds: x <- x + F(x). DDL reads the state along a learned unit
direction k, compares the readout with a learned target v and writes the gated difference
back along k (Eq. 2.2):

    X_{l+1} = X_l + beta k (v^T - k^T X_l),    i.e.  X_{l+1} = (I - beta k k^T) X_l + beta k v^T

The shortcut A = I - beta k k^T has eigenvalue 1 - beta along k and 1 elsewhere (Prop. 2.1):
identity at beta = 0, projection at beta = 1, reflection at beta = 2.

Reading order: config, RoPE, generation's cache, attention and MLP, the delta update, the compressors
(CC, TC, EC), the residual branch and block, the GPT. Backbone (§3, §4.1): Llama-style, pre-norm RMSNorm,
RoPE, QK-norm, SwiGLU, no biases, tied embedding and LM head. The README maps each equation to its
function and test; "departure" marks where we differ from the authors' code (docs/departures.md).

Shapes: B sequences, T tokens, d = n_embd; the state X is (B, T, d) at d_v = 1, (B, T, d, d_v) above;
the sublayer's input c and output k~, and k, are (B, T, d); v is (B, T, d_v); beta (B, T, 1).

To add a variant: a GPTConfig field (checked in __post_init__); the code it switches (ResidualBranch.update's
inputs, rank1_step's rule, COMPRESSORS); a weight-decay role per new parameter (GPT.DECAYED, NOT_DECAYED);
with_past if it mixes tokens; an entry in test_ddl.VARIANTS and a test against its own oracle. fused.py runs
a new field at its default only, until fused.SUPPORTED declares it.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

RESIDUALS = ("additive", "delta", "write")
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
    beta_bound: float = setting(2.0, "beta = beta_bound * sigmoid(.), in (0, 2]: 2 (the paper) reaches "
                                     "reflection; 1 keeps the eigenvalue 1 - beta in [0, 1]")
    beta_init: float = setting(1.0, "beta at initialisation, in [0, beta_bound]")
    k_eps: float = setting(1e-5, "epsilon_k of k = k~ / sqrt(|k~|^2 + eps^2) (§3.1)")
    v_scale: float = setting(4.0, "v = v_scale * sigmoid(W_v c + b_v); 0: plain linear v = W_v c + b_v")
    check_spectrum: bool = setting(False, "assert Prop. 2.1 / Eq. 2.4 numerically in every forward (slow)")

    def __post_init__(self):
        def need(ok, name, allowed):
            if not ok:
                raise ConfigError(f"GPTConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")
        for f in fields(self):  # bool is an int in Python: a type check must not let True pass as 1
            value = getattr(self, f.name)
            ok = type(value) is f.type or (f.type is float and type(value) is int)
            need(ok, f.name, f"must be a {f.type.__name__}")
        for name in ("vocab_size", "n_layer", "n_head", "head_dim", "block_size", "d_v", "conv_kernel"):
            need(getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(self.n_embd == self.n_head * self.head_dim, "n_embd",
             f"must equal n_head * head_dim = {self.n_head * self.head_dim}")
        need(self.head_dim % 2 == 0, "head_dim", "must be even for RoPE")
        need(self.residual in RESIDUALS, "residual", f"allowed: {', '.join(RESIDUALS)}")
        need(self.compressor in COMPRESSORS, "compressor", f"allowed: {', '.join(COMPRESSORS)}")
        need(self.residual != "additive" or self.d_v == 1, "d_v",
             "the additive baseline has a vector state: use d_v=1, or residual='delta'/'write'")
        need(0.0 < self.beta_bound <= 2.0, "beta_bound", "must lie in (0, 2]: above 2, 1 - beta < -1 "
             "would amplify the state along k")
        need(0.0 <= self.beta_init <= self.beta_bound, "beta_init",
             f"must lie in [0, beta_bound={self.beta_bound!r}]")
        need(self.k_eps > 0, "k_eps", "must be > 0")
        need(self.v_scale >= 0, "v_scale", "must be >= 0 (0 = plain linear v)")

def rms_norm(x, gain):
    """The backbone's norm layers (§3): RMSNorm over the last dim, a learned gain, eps 1e-5."""
    return F.rms_norm(x, (x.shape[-1],), gain.to(x.dtype), eps=1e-5)

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

# ----------------------------------------------------------------------------- generation's cache

class Cache:
    """What cached generation keeps between forwards of a growing sequence: only attention and the causal
    token convolutions mix tokens, so their keys and values, or last conv_kernel - 1 inputs, suffice for
    the new tokens' forward. Fixed-size buffers, positions on the device: a CUDA graph can replay a step."""
    def __init__(self, block_size):
        self.block_size, self.length, self.pos, self.buffers = block_size, 0, None, {}
        self.positions = None  # the newest tokens' positions (T,), set by advance() before each forward

    def advance(self, T, device):
        """Count T new tokens; their positions (T,) on the device, where the modules read them."""
        if self.length + T > self.block_size:
            raise ValueError(f"cached sequence length {self.length + T} exceeds block_size={self.block_size}")
        if self.pos is None:
            self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.positions = self.pos + torch.arange(T, device=device)
        self.pos += T
        self.length += T

    def buffer(self, module, name, shape, like):
        """module's buffer `name`: zeros of `shape` in like's dtype and device at first use."""
        if (module, name) not in self.buffers:
            self.buffers[module, name] = like.new_zeros(shape)
        return self.buffers[module, name]

def with_past(cache, module, x, keep):
    """x (B, T, ...) preceded by the `keep` tokens before it (zeros before the sequence's start), and
    `keep`; the cache keeps the last `keep` tokens for the next call. Without a cache: x itself and 0."""
    if cache is None:
        return x, 0
    past = cache.buffer(module, "past", (x.shape[0], keep, *x.shape[2:]), x)
    x = torch.cat([past, x], dim=1)
    past.copy_(x[:, x.shape[1] - keep:])
    return x, keep

# ----------------------------------------------------------------------------- attention and MLP

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.c_proj.is_output_proj = True  # depth-scaled init, see GPT._init_weights
        self.q_norm_gain = nn.Parameter(torch.ones(cfg.head_dim))  # QK RMSNorm gains
        self.key_norm_gain = nn.Parameter(torch.ones(cfg.head_dim))
        cos, sin = rope_table(cfg.block_size, cfg.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        at = slice(0, T) if cache is None else cache.positions  # generation: after the cached tokens
        cos, sin = self.cos[at], self.sin[at]
        # RoPE then QK RMSNorm, the order of the authors' code (the norm commutes with rotation
        # up to its elementwise gain).
        q = rms_norm(apply_rope(q, cos, sin), self.q_norm_gain)
        k = rms_norm(apply_rope(k, cos, sin), self.key_norm_gain)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the new keys join the cached ones; each query sees the keys up to its own position
            keys, values = (cache.buffer(self, name, (B, self.n_head, cache.block_size, self.head_dim), t)
                            for name, t in (("k", k), ("v", v)))
            keys.index_copy_(2, cache.positions, k)
            values.index_copy_(2, cache.positions, v)
            mask = torch.arange(cache.block_size, device=x.device) <= cache.positions[:, None]
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.hidden = math.floor(8 / 3 * cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * self.hidden, bias=False)  # fused gate and up
        self.c_proj = nn.Linear(self.hidden, cfg.n_embd, bias=False)
        self.c_proj.is_output_proj = True

    def forward(self, x, cache=None):  # per token: nothing to cache in generation
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)

# ----------------------------------------------------------------------------- the delta update

def readout_error(X, k, v):
    """e = k^T X - v^T, the readout error of Eq. 2.4 (one sign convention everywhere), (..., d_v)."""
    acc_dtype = torch.promote_types(X.dtype, torch.float32)  # summed over d in fp32 at least
    return torch.sum(k.unsqueeze(-1) * X, dim=-2, dtype=acc_dtype) - v.to(acc_dtype)

def delta_update(X, k, v, beta):
    """Eq. 2.2: X + beta k (v^T - k^T X) = X - beta k e^T, for X (..., d, d_v), k (..., d), v (..., d_v),
    beta (..., 1) (one gate per token). The model runs this function; autograd derives its backward."""
    e = readout_error(X, k, v)
    return X - k.unsqueeze(-1) * (beta.to(e.dtype) * e).to(X.dtype).unsqueeze(-2)

def write_update(X, k, v, beta):
    """The write-only control (§5): X + beta k v^T, the delta rule without its erase term."""
    acc_dtype = torch.promote_types(X.dtype, torch.float32)  # beta v in fp32 at least, as delta_update's e
    return X + k.unsqueeze(-1) * (beta.to(acc_dtype) * v.to(acc_dtype)).to(X.dtype).unsqueeze(-2)

def unit_direction(k_tilde, eps):
    """k = k~ / sqrt(|k~|^2 + eps^2), the §3.1 normalisation of k (not a norm layer: no gain), computed as
    RMSNorm with eps^2/d, then / sqrt(d), which never squares large activations in low precision."""
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

def identity_taps(cfg):
    """Weights (d, d_v, K) of a causal token convolution that starts as the identity: tap 0 (this token) 1."""
    return nn.Parameter(F.pad(torch.ones(cfg.n_embd, cfg.d_v, 1), (0, cfg.conv_kernel - 1)))

class ChannelCompressor(nn.Module):
    """DDL-CC (§3.2): x_in[i] = sum_j c_ij X[i, j], a learned mix of the d_v channels per feature,
    initialised to the channel mean. Departure: the authors' CC is a short convolution along d_v
    followed by a read vector; the paper's text describes a per-feature channel mix, which we follow."""
    def __init__(self, cfg):
        super().__init__()
        self.mix = nn.Parameter(torch.full((cfg.n_embd, cfg.d_v), 1.0 / cfg.d_v))

    def forward(self, X, cache=None):  # per token: nothing to cache in generation
        return torch.sum(X * self.mix.to(X.dtype), dim=-1)

class TokenCompressor(nn.Module):
    """DDL-TC (§3.2, App. A.2): a short causal depthwise convolution over tokens for every (i, j)
    entry of X, then a learned read vector over d_v; initialised to identity and the mean
    (departure: our choice of init, so that TC starts as CC's channel mean)."""
    def __init__(self, cfg):
        super().__init__()
        self.taps = identity_taps(cfg)
        self.channel_mix = nn.Parameter(torch.full((cfg.d_v,), 1.0 / cfg.d_v))

    def forward(self, X, cache=None):
        # x_in[t, i] = sum_s sum_j channel_mix_j taps_ijs X[t - s, i, j]. Reducing over d_v before
        # shifting is the same sum, but shifts (B, T, d) tensors instead of (B, T, d, d_v) states.
        return self.sum_taps(torch.sum(X.unsqueeze(-1) * self.tap_weights(X.dtype), dim=-2), cache)

    def tap_weights(self, dtype):
        """w[i, j, s] = channel_mix_j taps_ijs, (d, d_v, K): the read's weight on X[t - s, i, j]."""
        return (self.taps * self.channel_mix[:, None]).to(dtype)

    def sum_taps(self, per_tap, cache=None):
        """x_in[t] = sum_s per_tap[t - s, :, s], from per_tap (B, T, d, K), each token's sums over d_v."""
        K = per_tap.shape[-1]
        per_tap, n_past = with_past(cache, self, per_tap, K - 1)  # generation: earlier tokens
        return sum(shift_tokens(per_tap[..., s], s) for s in range(K))[:, n_past:]

class EmbedConv(nn.Module):
    """EC (App. A.2): expands the embedding (B, T, d) into the state (B, T, d, d_v) with a causal
    depthwise token convolution, identity-initialised so it starts as plain repetition (departure:
    our choice of init, as TC's; the paper gives none)."""
    def __init__(self, cfg):
        super().__init__()
        self.weight = identity_taps(cfg)

    def forward(self, x, cache=None):
        x, n_past = with_past(cache, self, x.unsqueeze(-1), self.weight.shape[-1] - 1)
        return causal_token_conv(x, self.weight.to(x.dtype))[:, n_past:]

COMPRESSORS = {"cc": ChannelCompressor, "tc": TokenCompressor}  # GPTConfig.compressor: a new one is an entry

def make_compressor(cfg):
    """The compression of the state (B, T, d, d_v) to a sublayer's width d (§3.2); None at d_v = 1."""
    return COMPRESSORS[cfg.compressor](cfg) if cfg.d_v > 1 else None

# ----------------------------------------------------------------------------- the block

class ResidualBranch(nn.Module):
    """One sublayer with its residual interface: compress (d_v > 1), RMSNorm to c, run the sublayer
    F(c) = k~, then x + k~ (additive) or the delta / write rewrite of the state along k."""
    def __init__(self, cfg, sublayer, layer):
        super().__init__()
        self.cfg, self.name = cfg, f"layer {layer} {sublayer}"
        self.norm_gain = nn.Parameter(torch.ones(cfg.n_embd))
        self.sublayer = CausalSelfAttention(cfg) if sublayer == "attn" else SwiGLU(cfg)
        # departure: one compressor per sublayer (the authors' code shares one per block)
        self.compressor = make_compressor(cfg)
        if cfg.residual != "additive":
            # v's projection W_v (d_v x d), initialised like the other matrices, and b_v = 0
            self.W_v = nn.Parameter(torch.randn(cfg.d_v, cfg.n_embd) * (0.5 / math.sqrt(cfg.n_embd)))
            self.b_v = nn.Parameter(torch.zeros(cfg.d_v))
            # beta = beta_bound sigmoid(w.c + b) starts at beta_init for every token: w = 0 (departure: the
            # authors' init perturbs w), b = logit(beta_init / beta_bound), clamped 1e-6 inside (0, 1).
            share = min(max(cfg.beta_init / cfg.beta_bound, 1e-6), 1 - 1e-6)  # sigmoid(b) at the start
            self.w_beta = nn.Parameter(torch.zeros(1, cfg.n_embd))
            self.b_beta = nn.Parameter(torch.full((1,), math.log(share / (1 - share))))
        self.record = False  # set by GPT.record_gates(): keep this forward's gate statistics in .stats
        self.stats = None

    def forward(self, X, cache=None):
        x_in = X if self.compressor is None else self.compressor(X, cache)
        c = self.input_norm(x_in)
        k_tilde = self.sublayer(c, cache)
        return self.update(X, k_in=k_tilde, v_in=c, beta_in=c)  # what feeds k, v and beta (Eq. 2.2)

    def input_norm(self, x_in):
        """c = RMSNorm(x_in), the sublayer's input, which also feeds v and beta."""
        return rms_norm(x_in, self.norm_gain)

    # beta and v are written as fp32 elementwise products summed over d, not as matmuls: they stay
    # in fp32 under autocast, and torch.compile fuses them into the kernel that computes c, where
    # (d -> 1) and (d -> d_v) matrix products would each be a separate, nearly empty GEMM launch.
    def gate(self, beta_in):
        """beta = beta_bound sigmoid(w_beta . c + b_beta) in (0, beta_bound), (..., 1) in fp32 (§2.2: the
        paper's beta_bound is 2; 1 is the ablation without reflection, where A's eigenvalue 1 - beta >= 0)."""
        logit = torch.sum(beta_in.float().unsqueeze(-2) * self.w_beta, dim=-1) + self.b_beta
        return self.cfg.beta_bound * torch.sigmoid(logit)

    def value(self, v_in):
        """v in R^{d_v}, in fp32: the paper's v = W_v c + b_v at v_scale = 0; by default, as the authors'
        code, v = v_scale * sigmoid(W_v c + b_v). Departure: v reads the normalised input c, as beta does
        (the authors' code feeds v the un-normalised compressed input)."""
        v = torch.sum(v_in.float().unsqueeze(-2) * self.W_v, dim=-1) + self.b_v
        return v if self.cfg.v_scale == 0 else self.cfg.v_scale * torch.sigmoid(v)

    def update(self, X, k_in, v_in, beta_in):
        """The residual update of the state X from its named inputs (the place to change what feeds the
        rule): the baseline adds k_in = F(c); DDL writes along k = k_in / sqrt(|k_in|^2 + eps_k^2) (§3.1)
        the gated difference to v(v_in), gate beta(beta_in)."""
        if self.cfg.residual == "additive":
            return X + k_in
        k, v, beta = unit_direction(k_in, self.cfg.k_eps), self.value(v_in), self.gate(beta_in)
        state = X if self.cfg.d_v > 1 else X.unsqueeze(-1)  # d_v = 1: the same rule on (d, 1)
        new_state = self.rank1_step(state, k_in, k, v, beta)
        if self.record:
            self.stats = dict(beta=beta.detach(), k_tilde_norm=k_in.detach().float().norm(dim=-1),
                              e_pre=readout_error(state, k, v).detach().abs(),
                              k=k[:1].detach().float())  # the first sequence's k: how stable k is
        return new_state if self.cfg.d_v > 1 else new_state.squeeze(-1)

    def rank1_step(self, state, k_tilde, k, v, beta):
        """One rank-1 step along k (Eq. 2.2, or write-only's X + beta k v^T), with check_spectrum on it:
        a variant with several steps per sublayer calls it once for each, so each is checked alone."""
        rule = delta_update if self.cfg.residual == "delta" else write_update
        new_state = rule(state, k, v, beta)
        if self.cfg.check_spectrum:
            self.check_spectrum(k_tilde, k, v, beta, state, new_state)
        return new_state

    def check_spectrum(self, k_tilde, k, v, beta, state, new_state):
        """The premises of one rank-1 step, in fp32: 0 < beta < beta_bound (<= 2, Prop. 2.1's range);
        |k| = 1 where |k~| >> eps_k (§3.1); for the delta rule, k^T new_state - v^T = (1 - beta |k|^2)
        (k^T state - v^T), an identity for any k: Eq. 2.4's e_post = (1 - beta) e_pre where |k| = 1.
        Raises AssertionError naming the quantity."""
        who = f"check_spectrum: {self.name}:"
        k_sq = k.float().square().sum(dim=-1, keepdim=True)
        unit = k_tilde.float().norm(dim=-1, keepdim=True) > 100 * self.cfg.k_eps
        if bool((((k_sq.sqrt() - 1).abs() > 1e-2) & unit).any()):
            raise AssertionError(f"{who} |k| != 1 where |k~| >> eps_k (§3.1)")
        if not bool(((beta > 0) & (beta < self.cfg.beta_bound)).all()):
            raise AssertionError(f"{who} beta outside (0, {self.cfg.beta_bound:g}): "
                                 f"min {beta.min().item():.4g}, max {beta.max().item():.4g}")
        if self.cfg.residual == "delta":
            e_pre = readout_error(state.float(), k.float(), v)
            e_post = readout_error(new_state.float(), k.float(), v)
            want = (1 - beta.float() * k_sq) * e_pre
            scale = 1e-3 if new_state.dtype == torch.float32 else 3e-2
            tol = scale * (1 + new_state.float().abs().amax(dim=(-2, -1), keepdim=True).squeeze(-1))
            if bool(((e_post - want).abs() > tol).any()):
                err = (e_post - want).abs().max().item()
                raise AssertionError(f"{who} e_post != (1 - beta |k|^2) e_pre (Eq. 2.4), "
                                     f"max error {err:.3g}")

class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn = ResidualBranch(cfg, "attn", layer)
        self.mlp = ResidualBranch(cfg, "mlp", layer)

    def forward(self, X, cache=None):
        return self.mlp(self.attn(X, cache), cache)

# ----------------------------------------------------------------------------- the GPT

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_conv = EmbedConv(cfg) if cfg.d_v > 1 and cfg.embed_conv else None
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.final_compressor = make_compressor(cfg)  # before the final norm
        self.final_norm_gain = nn.Parameter(torch.ones(cfg.n_embd))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """The authors' init: embedding N(0, 0.02), matrices N(0, 0.5/sqrt(d)), output projections
        N(0, 0.5/sqrt(d)/sqrt(L)). Only nn.Linear / nn.Embedding (all without biases) are touched, so
        the gates and convolutions keep their own identity-style initialisation."""
        d, L = self.config.n_embd, self.config.n_layer
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear) and module is not self.lm_head:
            depth = math.sqrt(L) if getattr(module, "is_output_proj", False) else 1.0
            nn.init.normal_(module.weight, std=0.5 / math.sqrt(d) / depth)

    def num_params(self):
        """Parameters, the tied embedding / LM head matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, T):
        """Training FLOPs per token for MFU, the PaLM / nanoGPT estimate: 6N for the matrices (the tied
        embedding counted once, as the LM head) plus 12 L T d for attention scores."""
        return 6 * self.num_params() + 12 * self.config.n_layer * T * self.config.n_embd

    # Weight decay by role, "Module.name": matrices that map features decay; gains, biases, the gate's w_beta
    # and TC's channel mix (a 1-D read over d_v, as in the authors' code) do not. Every parameter must be
    # in one of the two: its shape decides nothing.
    DECAYED = ("Linear.weight", "Embedding.weight", "ResidualBranch.W_v", "ChannelCompressor.mix",
               "TokenCompressor.taps", "EmbedConv.weight")
    NOT_DECAYED = ("CausalSelfAttention.q_norm_gain", "CausalSelfAttention.key_norm_gain",
                   "ResidualBranch.norm_gain", "GPT.final_norm_gain", "ResidualBranch.b_v",
                   "ResidualBranch.w_beta", "ResidualBranch.b_beta", "TokenCompressor.channel_mix")

    def configure_optimizers(self, lr, weight_decay, betas, device_type):
        """AdamW, fused on CUDA, with weight decay on the DECAYED roles only (see above)."""
        groups, seen = ([], []), set()
        for path, module in self.named_modules():
            for name, p in module.named_parameters(recurse=False):
                role = f"{type(module).__name__}.{name}"
                if role not in self.DECAYED + self.NOT_DECAYED:
                    raise ValueError(f"configure_optimizers: parameter {path}.{name} ({role}) has no "
                                     "weight-decay role: add it to GPT.DECAYED or GPT.NOT_DECAYED")
                if p.requires_grad and id(p) not in seen:  # the tied LM head is the embedding's weight
                    seen.add(id(p))
                    groups[role in self.NOT_DECAYED].append(p)
        return torch.optim.AdamW([dict(params=groups[0], weight_decay=weight_decay),
                                  dict(params=groups[1], weight_decay=0.0)],
                                 lr=lr, betas=betas, fused=device_type == "cuda")

    def check_ids(self, name, ids, min_id):
        """Refuse ids outside [min_id, vocab_size): an index error deep inside the model names nothing.
        Eager only, outside a CUDA graph's capture: reading the ids back would break the compiled graph
        (is_compiling() comes first: torch.compile cannot trace the capture query)."""
        if torch.compiler.is_compiling() or ids.numel() == 0 or (
                torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
            return
        lo, hi = (t.item() for t in torch.aminmax(ids))  # one pass
        if lo < min_id or hi >= self.config.vocab_size:
            raise ValueError(f"{name} must lie in [{min_id}, {self.config.vocab_size}); got [{lo}, {hi}]")

    def forward(self, idx, targets=None, cache=None):
        """The logits (B, T, vocab) in fp32; with targets (-1: ignored), the mean cross-entropy only.
        With a Cache (generation): idx holds only the new tokens, and the logits are the last one's."""
        cfg = self.config
        B, T = idx.shape
        if not 1 <= T <= cfg.block_size:
            raise ValueError(f"sequence length {T} must lie in [1, block_size={cfg.block_size}]")
        self.check_ids("token ids", idx, 0)
        if cache is not None:
            cache.advance(T, idx.device)
        x = self.wte(idx)
        if cfg.d_v > 1:  # expanded state X in R^{d x d_v} per token (§2.2)
            if torch.is_autocast_enabled(x.device.type):
                # as in the authors' code, the d_v-fold state lives in the autocast dtype (bf16):
                # half the memory and traffic; every reduction over it still runs in fp32
                x = x.to(torch.get_autocast_dtype(x.device.type))
            x = self.embed_conv(x, cache) if cfg.embed_conv else x.unsqueeze(-1).expand(*x.shape, cfg.d_v)
        x = self.body(x, cache)
        x = rms_norm(x, self.final_norm_gain)
        if cache is not None:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if targets is None:
            return logits.to(torch.promote_types(logits.dtype, torch.float32))
        self.check_ids("targets", targets, -1)  # -1: ignored positions
        # the loss alone (fp32), never the logits: a caller holding them keeps them through the backward
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def body(self, X, cache=None):
        """The blocks, then the final compression (d_v > 1); fused.py's install() replaces this method."""
        for block in self.blocks:
            X = block(X, cache)
        return X if self.final_compressor is None else self.final_compressor(X, cache)

    # The gate audit (§5): record_gates() sets each ResidualBranch's `record` flag, under which it keeps
    # tensors in `stats`; gate_stats() turns them into rows; gate_audit(idx) does both around one forward.
    def record_gates(self, on=True):
        """Make every residual branch keep its gate statistics from the next forwards (or stop)."""
        for m in self.modules():
            if isinstance(m, ResidualBranch):
                m.record, m.stats = on, None

    def recorded_k(self):
        """Each residual branch's k on the first sequence of the last recorded forward, in block order."""
        return [getattr(block, name).stats["k"] for block in self.blocks for name in SUBLAYERS]

    @torch.no_grad()
    def gate_stats(self, bins=10, k_before=None, k_step=None):
        """The gate audit (§5) of the last recorded forward, per layer and sublayer: min/mean/max of beta,
        |k~| and |e_pre| = |k^T X - v^T|, a histogram of beta over [0, 2], and the mean cosine over the
        first sequence's tokens of the attention k against the MLP k (k_cos_attn_mlp) and of each k against
        the same token's k in two earlier recorded_k()s: k_before (k_cos_before) and k_step (k_cos_step),
        each None without it."""
        if self.config.residual == "additive":
            raise ValueError("gate_stats: the additive baseline has no gate (residual='additive')")
        out, mean_cosine = [], lambda a, b: F.cosine_similarity(a, b, dim=-1).mean().item()  # k in fp32
        # row n's k against row n of an earlier recorded_k(), where there is one
        against = lambda k, earlier, n: None if earlier is None else mean_cosine(k, earlier[n])
        for i, block in enumerate(self.blocks):
            for name in SUBLAYERS:
                n, s = len(out), getattr(block, name).stats  # n: this row's index
                if s is None:
                    raise RuntimeError("gate_stats: call model.record_gates() and run a forward first")
                row = dict(layer=i, sublayer=name,
                           beta_hist=torch.histc(s["beta"].float(), bins=bins, min=0, max=2).long().tolist(),
                           k_cos_attn_mlp=mean_cosine(block.attn.stats["k"], block.mlp.stats["k"]),
                           k_cos_before=against(s["k"], k_before, n), k_cos_step=against(s["k"], k_step, n))
                for key in ("beta", "k_tilde_norm", "e_pre"):
                    t = s[key].float()
                    row.update({f"{key}_min": t.min().item(), f"{key}_mean": t.mean().item(),
                                f"{key}_max": t.max().item()})
                out.append(row)
        return out

    @torch.no_grad()
    def gate_audit(self, idx, k_before=None, k_step=None):
        """gate_stats(k_before=k_before, k_step=k_step) of one forward of idx, recorded for that forward
        only, and its recorded_k() (a later audit's k_before or k_step)."""
        self.record_gates()
        self(idx)
        stats, k = self.gate_stats(k_before=k_before, k_step=k_step), self.recorded_k()
        self.record_gates(False)
        return stats, k

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None):
        """Yield max_new_tokens sampled continuation tokens of idx (B, T), each (B, 1), as they come.
        temperature 0 is greedy; top_k keeps the k likeliest ids; n_vocab limits sampling to the
        tokenizer's own ids (not the padding). Cached: one forward of the prompt, then one per new token
        (Cache); past block_size, as nanoGPT, the last block_size tokens, recomputed without the cache."""
        n_vocab = self.config.vocab_size if n_vocab is None else n_vocab
        for name, value, ok, allowed in (("temperature", temperature, temperature >= 0, ">= 0"),
                                         ("top_k", top_k, top_k is None or top_k >= 1, ">= 1 or None"),
                                         ("n_vocab", n_vocab, 1 <= n_vocab <= self.config.vocab_size,
                                          f"in [1, {self.config.vocab_size}]")):
            if not ok:
                raise ConfigError(f"generate: {name}={value!r} is invalid: must be {allowed}")
        block_size, cache, decode = self.config.block_size, Cache(self.config.block_size), None
        logits = self(idx[:, -block_size:], cache=cache)
        for n in range(max_new_tokens):
            nxt = self.sample(logits[:, -1, :n_vocab], temperature, top_k)
            yield nxt
            if n + 1 < max_new_tokens:
                idx = torch.cat([idx, nxt], dim=1)
                if idx.shape[1] > block_size:  # nanoGPT's window: every position has moved
                    logits = self(idx[:, -block_size:])
                else:
                    decode = decode or self.decoder(cache, nxt)
                    logits = decode(nxt)

    def decoder(self, cache, like):
        """A function of the next tokens (B, 1) giving their logits through cache. On CUDA one step is a
        captured CUDA graph: a token's forward is hundreds of small kernels, whose launches are its cost."""
        if not like.is_cuda:
            return lambda tok: self(tok, cache=cache)
        side = torch.cuda.Stream()  # a warm-up step on a scratch cache, as torch.cuda.graphs asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self(like, cache=Cache(cache.block_size))
        torch.cuda.current_stream().wait_stream(side)
        tok, graph = like.clone(), torch.cuda.CUDAGraph()
        # autocast's weight cache must be off while capturing (the graph would keep freed copies)
        dtype, autocast = torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda")
        with torch.cuda.graph(graph), torch.autocast("cuda", dtype, enabled=autocast, cache_enabled=False):
            logits = self(tok, cache=cache)
        cache.length -= 1  # the capture counted a token that it recorded but did not run

        def step(next_tokens):
            tok.copy_(next_tokens)
            graph.replay()  # moves cache.pos on by one, on the device
            cache.length += 1
            return logits
        return step

    @staticmethod
    def sample(logits, temperature, top_k):
        """One id per row of logits (B, V): the argmax at temperature 0 or top_k 1, else a draw from
        softmax(logits / temperature) over the top_k largest."""
        if temperature == 0 or top_k == 1:
            return logits.argmax(dim=-1, keepdim=True)
        if top_k is None:
            return torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
        # a draw among the top_k alone: the same distribution, without a softmax over the whole vocabulary
        top, ids = torch.topk(logits, min(top_k, logits.size(-1)))
        return ids.gather(-1, torch.multinomial(F.softmax(top / temperature, dim=-1), 1))

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None):
        """idx (B, T) followed by max_new_tokens sampled tokens (generate_tokens), (B, T + max_new_tokens)."""
        new = self.generate_tokens(idx, max_new_tokens, temperature, top_k, n_vocab)
        return torch.cat([idx, *new], dim=1)
