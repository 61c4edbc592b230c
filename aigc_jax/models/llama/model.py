"""The Llama family (Llama 1-3, Qwen2/2.5, Mistral) in Flax linen: one config-driven decoder.

    tokens ─▶ embed ─▶ [ x + attn(rmsnorm(x)) ; x + swiglu(rmsnorm(x)) ] × n_layer ─▶ rmsnorm ─▶ lm_head ─▶ logits

What changes against GPT-2 (models/gpt2/model.py), and nothing else:
- no position table: RoPE rotates q and k by their positions (HF's `rotate_half` layout, so HF weights load
  unpermuted), with `rope_theta` and linear / llama3 frequency scaling;
- RMSNorm instead of LayerNorm, in HF's order: normalise in fp32, cast to the compute dtype, then scale;
- SwiGLU MLP: down(silu(gate(x)) * up(x));
- grouped-query attention: n_kv_head <= n_head key/value heads; the KV cache stores only those;
- optional biases (q/k/v: Qwen2, Llama attention_bias; o: Llama attention_bias; mlp_bias), a tied or untied
  LM head, and sliding-window layers (Mistral; Qwen2's layer_types).

Layouts: q/k/v kernels are [D, heads, Dh] and o_proj's [H, Dh, D] (HF's [out, in] Linear weights transposed and
reshaped on import/export), so a tensor-parallel shard holds whole heads. `PARAM_AXES` names every dimension.
It matches transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM (tests/test_llama.py).
Every block reads one `LayerInputs` (models/inputs.py) built per call, which here also carries the sliding-window
layers' mask and RoPE's cos/sin tables.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.attention import attention, resolve_backend
from aigc_jax.models import layers
from aigc_jax.models.base import compute_dtype
from aigc_jax.models.llama.config import LlamaConfig
from aigc_jax.models.cache import KVCache, attention_mask, update_layer
from aigc_jax.models.inputs import LayerInputs
from aigc_jax.sharding import constrain, gathered

LAYER_PREFIX = "layers"  # layers_0, layers_1, … (unrolled) or one stacked "layers" (scan_layers)

# Logical axis names of every parameter (unrolled layout; a regex over the "/"-joined path), one per dimension:
# the sharding rules map these names onto mesh axes.
PARAM_AXES = {
    r"embed_tokens/embedding": ("vocab", "embed"),
    r"layers_\d+/(input|post_attention)_layernorm/scale": ("norm",),
    r"layers_\d+/self_attn/q_proj/kernel": ("embed", "heads", "head_dim"),
    r"layers_\d+/self_attn/q_proj/bias": ("heads", "head_dim"),
    r"layers_\d+/self_attn/(k|v)_proj/kernel": ("embed", "kv_heads", "head_dim"),
    r"layers_\d+/self_attn/(k|v)_proj/bias": ("kv_heads", "head_dim"),
    r"layers_\d+/self_attn/o_proj/kernel": ("heads", "head_dim", "embed"),
    r"layers_\d+/self_attn/o_proj/bias": ("embed",),
    r"layers_\d+/mlp/(gate|up)_proj/kernel": ("embed", "mlp"),
    r"layers_\d+/mlp/(gate|up)_proj/bias": ("mlp",),
    r"layers_\d+/mlp/down_proj/kernel": ("mlp", "embed"),
    r"layers_\d+/mlp/down_proj/bias": ("embed",),
    r"norm/scale": ("norm",),
    r"lm_head/kernel": ("embed", "vocab"),
}

_INIT = nn.initializers.normal(0.02)  # HF's initializer_range for every matrix; biases 0, norms 1


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """RoPE's [head_dim / 2] inverse frequencies, computed as transformers computes them (fp32)."""
    dim = config.head_dim
    f32 = np.float32
    inv_freq = f32(1.0) / (f32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    if config.rope_type == "linear":
        return inv_freq / f32(config.rope_factor)
    if config.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor, low, high = (f32(config.rope_factor), f32(config.rope_low_freq_factor),
                             f32(config.rope_high_freq_factor))
        old_len = f32(config.rope_original_max_positions)
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(f32)
    return inv_freq


def rope_tables(config: LlamaConfig, positions_BxT: jax.Array, dtype):
    """(cos, sin) [B, T, head_dim]: angles in fp32, then cast to the activation dtype (as HF)."""
    angles_BxTxD2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(config))
    angles_BxTxD = jnp.concatenate([angles_BxTxD2, angles_BxTxD2], axis=-1)
    return jnp.cos(angles_BxTxD).astype(dtype), jnp.sin(angles_BxTxD).astype(dtype)


def apply_rope(x_BxTxHxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
    """x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1] for the halves x1, x2 of the head dimension."""
    x1, x2 = jnp.split(x_BxTxHxD, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BxTxHxD * cos_BxTxD[:, :, None] + rotated * sin_BxTxD[:, :, None]


class RMSNorm(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        scale = self.param("scale", nn.initializers.ones, (x_BxTxD.shape[-1],), jnp.dtype(cfg.param_dtype))
        x32 = x_BxTxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        # HF casts back to the input dtype *before* the scale (Flax's nn.RMSNorm scales in fp32: bf16 differs).
        dtype = compute_dtype(cfg)
        return scale.astype(dtype) * normed.astype(dtype)


def _dense(parent: nn.Module, features, name: str, bias: bool, axis=-1) -> nn.DenseGeneral:
    config = parent.config
    # On a mesh the kernel is gathered over fsdp for the matmul; [B, T] rows are one matrix (layers.dense_dot).
    return nn.DenseGeneral(features, axis=axis, use_bias=bias, dtype=compute_dtype(config),
                           param_dtype=jnp.dtype(config.param_dtype), kernel_init=_INIT, name=name,
                           dot_general=layers.dense_dot([*parent.scope.path, name], PARAM_AXES, LAYER_PREFIX))


class Attention(nn.Module):
    config: LlamaConfig
    backend: str
    train: bool
    window: int | None  # this layer's sliding window (None: full causal attention)

    @nn.compact
    def __call__(self, h_BxTxD, layer_kv, inputs: LayerInputs):
        cfg = self.config
        H, Hkv, Dh = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # Column-parallel projections: each tensor shard computes whole heads (and their KV heads).
        q_BxTxHxD = constrain(_dense(self, (H, Dh), "q_proj", cfg.qkv_bias)(h_BxTxD), ("batch", None, "heads", None))
        k_BxTxHxD = constrain(_dense(self, (Hkv, Dh), "k_proj", cfg.qkv_bias)(h_BxTxD),
                              ("batch", None, "kv_heads", None))
        v_BxTxHxD = constrain(_dense(self, (Hkv, Dh), "v_proj", cfg.qkv_bias)(h_BxTxD),
                              ("batch", None, "kv_heads", None))
        q_BxTxHxD, k_BxTxHxD = apply_rope(q_BxTxHxD, *inputs.rope), apply_rope(k_BxTxHxD, *inputs.rope)
        k_BxHxDxT, v_BxHxTxD = k_BxTxHxD.transpose(0, 2, 3, 1), v_BxTxHxD.transpose(0, 2, 1, 3)
        new_kv, (k_BxHxDxS, v_BxHxSxD) = update_layer(layer_kv, k_BxHxDxT, v_BxHxTxD, inputs.cache_index,
                                                       q_BxTxHxD.dtype)
        rate = cfg.attn_dropout if self.train else 0.0
        o_BxTxHxD = attention(q_BxTxHxD, k_BxHxDxS, v_BxHxSxD, inputs.mask_for(self.window), backend=self.backend,
                              dropout_rate=rate, dropout_rng=self.make_rng("dropout") if rate > 0 else None,
                              window=self.window, rows_B=inputs.rows_B)
        return _dense(self, cfg.n_embd, "o_proj", cfg.o_bias, axis=(-2, -1))(o_BxTxHxD), new_kv


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, h_BxTxD):
        cfg = self.config
        gate_BxTxF = _dense(self, cfg.n_inner, "gate_proj", cfg.mlp_bias)(h_BxTxD)
        up_BxTxF = _dense(self, cfg.n_inner, "up_proj", cfg.mlp_bias)(h_BxTxD)
        hidden_BxTxF = constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF, ("batch", None, "mlp"))
        return _dense(self, cfg.n_embd, "down_proj", cfg.mlp_bias)(hidden_BxTxF)


class Block(nn.Module):
    """One pre-norm block; `window` (static, per layer) picks its attention mask out of the shared inputs."""

    config: LlamaConfig
    backend: str
    train: bool = False
    window: int | None = None

    @nn.compact
    def __call__(self, x_BxTxD, layer_kv, inputs: LayerInputs):
        cfg = self.config
        drop = lambda x: layers.row_dropout(self, x, cfg.dropout, inputs.rows_B, not self.train)
        a_BxTxD, new_kv = Attention(cfg, self.backend, self.train, self.window, name="self_attn")(
            RMSNorm(cfg, name="input_layernorm")(x_BxTxD), layer_kv, inputs
        )
        x_BxTxD = x_BxTxD + drop(a_BxTxD)
        x_BxTxD = x_BxTxD + drop(MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(x_BxTxD)))
        return constrain(x_BxTxD, ("batch", None, None)), new_kv


class LMHead(nn.Module):
    """An untied LM head's [D, V_padded] kernel (the matmul is the Decoder's, shared with the tied case)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        return self.param("kernel", _INIT, (cfg.n_embd, cfg.padded_vocab_size), jnp.dtype(cfg.param_dtype))


class Decoder(nn.Module):
    """The Llama-family language model: (fp32 logits over the padded vocab, updated cache or None).

    Same call as models/gpt2/model.Decoder: positions default to cache.index + 0..T-1 (left-padded batches pass
    cumsum(mask) - 1); mask_BxT False marks padding; with a cache the T new keys/values are written at
    [index, index + T); segment_ids_BxT (no cache) packs examples into a row, each attending only to its own tokens
    (positions restart at 0 per example)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT=None, cache: KVCache | None = None, mask_BxT=None, train=False,
                 rows_B=None, segment_ids_BxT=None):
        cfg = self.config
        dtype, param_dtype = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)
        embed = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=dtype, param_dtype=param_dtype,
                         embedding_init=_INIT, name="embed_tokens")
        positions_BxT = layers.default_positions(tokens_BxT, positions_BxT, cache)
        # The lookup and a tied head read the table in its compute layout (split over tensor, whole over fsdp).
        table_VxD = gathered(embed.embedding, PARAM_AXES["embed_tokens/embedding"], lookup=True).astype(dtype)
        x_BxTxD = constrain(jnp.take(table_VxD, tokens_BxT, axis=0), ("batch", None, None))
        x_BxTxD = layers.row_dropout(self, x_BxTxD, cfg.dropout, rows_B, not train)

        kv, start, cache = layers.open_cache(cache, positions_BxT, mask_BxT)
        segment_ids_BxT = None if segment_ids_BxT is None else jnp.asarray(segment_ids_BxT)
        full_mask = attention_mask(positions_BxT, mask_BxT, cache, segment_ids_BxT=segment_ids_BxT)
        backend = resolve_backend(cfg.attention, dtype, cfg.head_dim, needs_mask=full_mask is not None,
                                  dropout=train and cfg.attn_dropout > 0)
        window = next((w for w in cfg.windows if w is not None), None)
        # cuDNN applies the window itself (local_window_size); XLA reads it from the mask.
        window_mask = None if window is None or backend == "cudnn" else attention_mask(
            positions_BxT, mask_BxT, cache, window, segment_ids_BxT)
        inputs = LayerInputs(positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT, cache_index=start,
                             rows_B=rows_B, mask_BxTxS=full_mask, window_mask_BxTxS=window_mask,
                             rope=rope_tables(cfg, positions_BxT, dtype))
        x_BxTxD, kv = layers.run_blocks(Block, cfg, LAYER_PREFIX, (cfg, backend, train), x_BxTxD, kv, inputs,
                                        layer_args=lambda i: (cfg.windows[i],))

        x_BxTxD = RMSNorm(cfg, name="norm")(x_BxTxD)
        head_DxV = table_VxD.T if cfg.tie_word_embeddings else gathered(LMHead(cfg, name="lm_head")(),
                                                                         PARAM_AXES["lm_head/kernel"])
        # fp32 accumulation and output even when activations are bf16.
        logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD.astype(dtype), head_DxV.astype(dtype),
                                  preferred_element_type=jnp.float32)
        logits_BxTxV = layers.mask_padded_vocab(constrain(logits_BxTxV, ("batch", None, "vocab")), cfg.vocab_size)
        if cache is not None:
            cache = cache.replace(k=kv[0], v=kv[1]).advanced(tokens_BxT.shape[1])
        return logits_BxTxV, cache


def lookup_params(config: LlamaConfig) -> int:
    """Parameters used by lookup, not matmul (excluded from 6N): an untied token embedding."""
    return 0 if config.tie_word_embeddings else config.vocab_size * config.n_embd
