"""The engine's decoder: Llama / Qwen2 / Qwen3 in plain PyTorch over the paged KV cache.

One forward serves every phase (prefill, chunked prefill, decode, speculative verify): the step's
tokens of all sequences are packed along one dimension ([T], no batch dimension, no padding), and
attention reads keys and values from the paged cache described in `slipstream.kernels.reference`.

    x = embed(input_ids)
    for each layer:
        h = rms_norm(x)
        q, k, v = split(h @ W_qkv + b_qkv)          # Qwen2: q/k/v bias
        q, k = rms_norm(q), rms_norm(k)              # Qwen3 only, per head
        q, k = rope(q, positions), rope(k, positions)
        store k, v in the cache at slot_mapping; o = paged causal attention(q, cache)
        x = x + o @ W_o
        x = x + down(silu(gate(rms_norm(x))) * up(rms_norm(x)))
    return rms_norm(x)                               # logits: compute_logits(hidden)

q/k/v and gate/up are fused into one matmul each; `load_weights` takes Hugging Face parameter
names and copies each tensor into its slice in place, so buffers held elsewhere (CUDA graphs)
stay valid when the trainer pushes new weights.

Numerics follow the Hugging Face modules: RMSNorm in float32 then cast back to the weight dtype,
RoPE angles in float32 with cos/sin cast to the activation dtype, attention math in float32
(the reference kernel), logits cast to float32 after the lm_head matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from slipstream.kernels.decode_linear import linear, norm_linear, norm_qkv_rope
from slipstream.kernels.fused_ops import rms_norm, rope_cos_sin
from slipstream.kernels.reference import paged_attention_ref
from slipstream.models.registry import ModelLoadError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AttentionMetadata",
    "Decoder",
    "DecoderConfig",
    "UnknownWeightError",
    "UnsupportedModelError",
    "attention_fn",
    "rope_inv_freq",
]

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class UnsupportedModelError(ModelLoadError):
    """A checkpoint whose architecture (or one of its features) this decoder does not implement."""


class UnknownWeightError(KeyError):
    """A parameter name that maps to nothing in the decoder."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _supported() -> str:
    return ", ".join(f"{t} ({a})" for t, a in SUPPORTED_MODEL_TYPES.items())


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # The scaling entries of the rope parameters (factor, low_freq_factor, beta_fast, ...).
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v
    o_proj_bias: bool = False  # bias on the attention output (Llama's attention_bias sets both)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE

    @classmethod
    def from_hf(cls, hf_config) -> "DecoderConfig":
        """From a transformers config (or the dict of a config.json) of a Llama, Qwen2 or Qwen3 model."""
        get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported by the decoder; supported: {_supported()}"
            )
        for arch in get("architectures") or ():
            if arch not in SUPPORTED_MODEL_TYPES.values():
                raise UnsupportedModelError(
                    f"architecture {arch!r} is not supported by the decoder; supported: {_supported()}"
                )
        if (get("hidden_act") or "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {get('hidden_act')!r} is not supported (only silu)")
        if any(t != "full_attention" for t in (get("layer_types") or ())) or get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention layers are not supported by the decoder")

        num_heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // num_heads
        rope_theta, rope_type, rope_scaling = _rope_from_hf(get)
        attention_bias = bool(get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=get("intermediate_size"),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else attention_bias,
            o_proj_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
        )


def _rope_from_hf(get) -> tuple[float, str, dict]:
    """(theta, rope type, scaling entries) from `rope_parameters` (transformers 5) or rope_theta + rope_scaling."""
    params = get("rope_parameters") or get("rope_scaling") or {}
    params = dict(params)
    if set(params) & {"full_attention", "sliding_attention"}:
        raise UnsupportedModelError("per-layer-type rope parameters are not supported by the decoder")
    theta = float(params.pop("rope_theta", None) or get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    partial = params.pop("partial_rotary_factor", None) or get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported (RoPE over the whole head)")
    if rope_type in ("llama3", "yarn") and params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = get("original_max_position_embeddings") or get(
            "max_position_embeddings"
        )
    return theta, rope_type, params


def rope_inv_freq(config: DecoderConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the factor on cos/sin, for the config's rope type.

    dynamic (NTK) is static here: at lengths up to max_position_embeddings it is the default RoPE.
    """
    dim, base, s = config.head_dim, config.rope_theta, config.rope_scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    kind = config.rope_type

    if kind in ("default", "dynamic"):
        return inv_freq, 1.0

    if kind == "linear":
        return inv_freq / s["factor"], 1.0

    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        # long wavelengths: divided by factor; short ones: unchanged; in between: interpolated
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0

    # yarn
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or config.max_position_embeddings / old_len

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension that turns `rotations` times over old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
    pos_freqs = base**exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


# ----------------------------------------------------------------------------------------------
# Attention metadata and the attention switch


@dataclass
class AttentionMetadata:
    """Where the step's packed tokens sit; see `slipstream.kernels.reference` for the contract.

    cu_seqlens_q int32 [S+1]: sequence s owns query rows cu_seqlens_q[s]:cu_seqlens_q[s+1].
    seq_lens int32 [S]: context of sequence s after this step (cached tokens + the new ones).
    block_tables int32 [S, max_blocks]: cache blocks of each sequence, in order.
    slot_mapping int64 [T]: flat cache slot of each new token (block * block_size + offset; < 0 skips).
    max_q_len: the largest query length of the step (for the kernels' launch grids).
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_q_len: int
    # Skip-softmax (BLASST): 0 is dense. `counters` [2] accumulates (skipped, visited) key tiles.
    skip_scale: float = 0.0
    counters: torch.Tensor | None = None

    @classmethod
    def build(cls, q_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
              device=None) -> "AttentionMetadata":
        """From plain lists: each sequence's new tokens are its last q_lens[s] of seq_lens[s] positions."""
        cu = [0]
        slots = []
        for q_len, seq_len, table in zip(q_lens, seq_lens, block_tables):
            cu.append(cu[-1] + q_len)
            for pos in range(seq_len - q_len, seq_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0)
        tables = [list(t) + [0] * (width - len(t)) for t in block_tables]
        return cls(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device).reshape(len(tables), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_q_len=max(q_lens, default=0),
        )


try:  # the engine's op (Triton on GPU, the reference on CPU) where it exists; else the torch reference
    from slipstream.kernels.attention import paged_attention as _paged_attention_kernel
except ImportError:
    _paged_attention_kernel = None


def attention_fn(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttentionMetadata,
                 scale: float) -> torch.Tensor:
    """Causal attention of packed queries [T, heads, head_dim] over one layer's paged cache."""
    if _paged_attention_kernel is not None:
        return _paged_attention_kernel(q, k_cache, v_cache, attn.cu_seqlens_q, attn.seq_lens, attn.block_tables,
                                       scale, max_q_len=attn.max_q_len, skip_scale=attn.skip_scale,
                                       counters=attn.counters)
    if attn.skip_scale > 0:
        raise RuntimeError("skip-softmax attention needs slipstream.kernels.attention (Triton or its CPU reference)")
    return paged_attention_ref(q, k_cache, v_cache, attn.cu_seqlens_q, attn.seq_lens, attn.block_tables, scale)


# ----------------------------------------------------------------------------------------------
# Model


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, layer.weight, layer.bias)  # decode-sized batches: a kernel that streams the weight faster


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)[0]

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual) in one kernel on GPU."""
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig, dtype=None, device=None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.scale = c.head_dim**-0.5
        kw = dict(dtype=dtype, device=device)
        self.qkv_proj = skip_init(nn.Linear, c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.attention_bias, **kw)
        self.o_proj = skip_init(nn.Linear, self.q_size, c.hidden_size, bias=c.o_proj_bias, **kw)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, q: torch.Tensor, attn: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]):
        """o_proj(attention) of the tokens whose rotated queries are `q` [T, heads, D] (their K/V
        already in the cache: `norm_qkv_rope` in Layer.forward)."""
        out = attention_fn(q, *kv_cache, attn, self.scale)
        return _linear(self.o_proj, out.reshape(q.shape[0], self.q_size))


class MLP(nn.Module):
    def __init__(self, c: DecoderConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=c.mlp_bias, dtype=dtype, device=device)
        self.gate_up_proj = skip_init(nn.Linear, c.hidden_size, 2 * c.intermediate_size, **kw)
        self.down_proj = skip_init(nn.Linear, c.intermediate_size, c.hidden_size, **kw)

    def forward(self, act):
        """down_proj of SiLU(gate) * up (computed with the gate/up projection, see Layer.forward)."""
        return _linear(self.down_proj, act)


class Layer(nn.Module):
    def __init__(self, c: DecoderConfig, dtype=None, device=None):
        super().__init__()
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype, device=device)
        self.attention = Attention(c, dtype=dtype, device=device)
        self.post_attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = MLP(c, dtype=dtype, device=device)

    def forward(self, x, residual, cos, sin, attn, kv_cache):
        """(this layer's MLP output, the residual stream before it); the next norm adds the two.

        Each residual add is deferred into the next RMSNorm, and each norm runs with the projection
        after it (`norm_linear`: one kernel for decode steps where that is faster, as is SiLU(gate)
        * up with the gate/up projection, and RoPE and the K/V store with the q/k/v projection:
        `norm_qkv_rope`); `residual` is None at the first layer, whose `x` is the embeddings.
        """
        a, m = self.attention, self.mlp
        n1, n2 = self.input_norm, self.post_attention_norm
        qk_norm = (a.q_norm.weight, a.k_norm.weight, a.q_norm.eps) if a.q_norm is not None else None
        q, new_residual = norm_qkv_rope(x, n1.weight, n1.eps, a.qkv_proj.weight, a.qkv_proj.bias, residual, cos, sin,
                                        a.num_heads, a.num_kv_heads, *kv_cache, attn.slot_mapping, qk_norm)
        residual = x if residual is None else new_residual
        act, residual = norm_linear(a(q, attn, kv_cache), n2.weight, n2.eps, m.gate_up_proj.weight,
                                    m.gate_up_proj.bias, residual, swiglu=True)
        return m(act), residual


class Decoder(nn.Module):
    """Llama / Qwen2 / Qwen3 decoder over packed tokens and a paged KV cache (inference only).

    Parameters are created uninitialised, in `dtype` on `device`, with requires_grad off; fill them
    with `load_weights` (or `slipstream.models.weights.load_decoder` / `decoder_from_hf_module`).
    The RoPE frequencies stay float32 whatever dtype the weights have.
    """

    def __init__(self, config: DecoderConfig, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        c = self.config = config
        device = torch.device(device) if device is not None else torch.get_default_device()
        kw = dict(dtype=dtype, device=device)
        self.embed = skip_init(nn.Embedding, c.vocab_size, c.hidden_size, **kw)
        self.layers = nn.ModuleList(Layer(c, **kw) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        # tied: the logits read embed.weight, there is no separate lm_head parameter
        self.lm_head = None if c.tie_word_embeddings else skip_init(nn.Linear, c.hidden_size, c.vocab_size,
                                                                     bias=False, **kw)
        inv_freq, self.rope_scale = rope_inv_freq(c)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` casts floating buffers too; keep the RoPE frequencies in float32
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.embed.weight.device)
        return self

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.inv_freq, self.rope_scale, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], capture_layers: tuple[int, ...] = ()):
        """Final-normed hidden states [T, hidden] of the packed tokens.

        With `capture_layers`, returns (hidden, {index: residual [T, hidden]}): index i in
        0..num_layers-1 is the residual stream after layer i (Hugging Face's hidden_states[i + 1],
        except for the last layer, whose entry there is already final-normed); -1 and num_layers
        both name the output of the last layer, before the final norm. The dict keys are the
        indices as given.
        """
        n = self.config.num_layers
        wanted: dict[int, list[int]] = {}
        for key in capture_layers:
            if not -1 <= key <= n:
                raise ValueError(f"capture layer {key} out of range: use 0..{n - 1}, or -1 / {n} for the last")
            wanted.setdefault(n - 1 if key in (-1, n) else key, []).append(key)

        x = self.embed(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        captured = {}
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, attn, kv_caches[i])
            if i in wanted and i < n - 1:
                stream = x + residual
                for key in wanted[i]:
                    captured[key] = stream
        # The final norm's kernel also returns the last layer's stream: no separate sum for it.
        hidden, stream = self.norm.add_forward(x, residual)
        for key in wanted.get(n - 1, ()):
            captured[key] = stream
        return (hidden, captured) if capture_layers else hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 (matmul in the weights' dtype, then cast)."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight, out_dtype=torch.float32)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                          device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One zeroed (k_cache, v_cache) pair per layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        c = self.config
        dtype = dtype or self.embed.weight.dtype
        device = device if device is not None else self.embed.weight.device
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(c.num_layers)]

    # -- weights under Hugging Face names ----------------------------------------------------

    def hf_parameter_names(self) -> list[str]:
        """Every Hugging Face parameter name the decoder needs (lm_head.weight only when untied)."""
        c = self.config
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not c.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
            names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
            if c.attention_bias:
                names += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
            if c.o_proj_bias:
                names.append(p + "self_attn.o_proj.bias")
            if c.mlp_bias:
                names += [p + f"mlp.{n}_proj.bias" for n in ("gate", "up", "down")]
            if c.qk_norm:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        return names

    def hf_target(self, name: str) -> torch.Tensor:
        """The decoder tensor (a view into a fused parameter where needed) that HF parameter `name` fills."""
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            return self.embed.weight
        if name == "lm_head.weight":  # tied: the embedding (the two names carry the same tensor)
            return self.embed.weight if self.lm_head is None else self.lm_head.weight
        if name == "model.norm.weight":
            return self.norm.weight
        if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
                and int(parts[2]) < len(self.layers):
            layer = self.layers[int(parts[2])]
            module, kind = ".".join(parts[3:-1]), parts[-1]
            attn, mlp = layer.attention, layer.mlp
            if kind == "weight" and module == "input_layernorm":
                return layer.input_norm.weight
            if kind == "weight" and module == "post_attention_layernorm":
                return layer.post_attention_norm.weight
            if kind == "weight" and module in ("self_attn.q_norm", "self_attn.k_norm") and attn.q_norm is not None:
                return (attn.q_norm if module.endswith("q_norm") else attn.k_norm).weight
            qkv = getattr(attn.qkv_proj, kind, None)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") and qkv is not None:
                q, kv = attn.q_size, attn.kv_size
                start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[module[len("self_attn.")]]
                return qkv[start : start + size]
            if module == "self_attn.o_proj" and getattr(attn.o_proj, kind, None) is not None:
                return getattr(attn.o_proj, kind)
            gate_up = getattr(mlp.gate_up_proj, kind, None)
            if module in ("mlp.gate_proj", "mlp.up_proj") and gate_up is not None:
                size = gate_up.shape[0] // 2
                return gate_up[:size] if module == "mlp.gate_proj" else gate_up[size:]
            if module == "mlp.down_proj" and getattr(mlp.down_proj, kind, None) is not None:
                return getattr(mlp.down_proj, kind)
        raise UnknownWeightError(
            f"unknown weight name {name!r} for a {self.config.model_type} decoder with {self.config.num_layers} "
            "layers (expected Hugging Face names such as model.layers.0.self_attn.q_proj.weight)"
        )

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy tensors given under Hugging Face names into the decoder, in place; returns the names loaded.

        Tensors are cast to the decoder's dtype and device. RoPE buffers (`*.rotary_emb.inv_freq`)
        are skipped; any other name the decoder does not have raises UnknownWeightError.
        """
        loaded = set()
        for name, tensor in named_tensors:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            target = self.hf_target(name)
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the decoder expects "
                                 f"{tuple(target.shape)}")
            target.copy_(tensor)
            loaded.add(name)
        return loaded
