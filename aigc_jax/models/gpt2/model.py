"""GPT-2 in Flax linen, written to be read in one sitting.

    tokens ─▶ wte + wpe ─▶ dropout ─▶ [ x + attn(ln_1(x)) ; x + mlp(ln_2(x)) ] × n_layer ─▶ ln_f ─▶ x·wteᵀ ─▶ logits

It matches HF transformers' GPT2LMHeadModel given the same weights (tests/test_hf_interop.py): pre-LayerNorm
blocks, tanh-GELU MLP, learned positions, LM head tied to the token embedding. Parameter names mirror HF's
(`h_3/attn/c_attn/kernel` is HF's `h.3.attn.c_attn.weight`; HF's Conv1D already stores [in, out]). One layout
differs: the fused q|k|v projection is stored [D, 3, H, Dh] rather than [D, 3D] (a reshape of HF's weight), so
a tensor-parallel shard holds whole heads of q, k and v instead of a slice straddling the q|k boundary.

Dtypes: params in `param_dtype` (fp32), activations in the compute dtype (`dtype`; "auto" = bf16 on GPU/TPU,
fp32 on CPU), attention softmax, logits and everything downstream in fp32. The vocabulary is padded to
`padded_vocab_size`; the padded ids get the most negative fp32 logit so they never win an argmax, a sample or a
beam. The KV cache and the attention mask are shared with every family (models/cache.py); the decoder builds
one `LayerInputs` per call (models/inputs.py: positions, segment ids of packed examples, the mask, the cache index,
dropout rows) and every block reads it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from aigc_jax.attention import attention, resolve_backend
from aigc_jax.models import layers
from aigc_jax.models.base import compute_dtype
from aigc_jax.models.gpt2.config import ModelConfig
from aigc_jax.models.cache import KVCache, attention_mask, update_layer
from aigc_jax.models.inputs import LayerInputs
from aigc_jax.sharding import constrain, gathered

LAYER_PREFIX = "h"  # layers are h_0, h_1, … (unrolled) or one stacked "h" (scan_layers)

# Logical axes of every parameter (unrolled layout; the scanned one adds "layers" in front), mapped to mesh axes by
# aigc_jax/sharding.py. The fused q|k|v kernel keeps heads as their own axis, so a tensor shard holds whole heads.
PARAM_AXES = {
    r"wte/embedding": ("vocab", "embed"),
    r"wpe/embedding": ("positions", "embed"),
    r"(h_\d+/ln_[12]|ln_f)/(scale|bias)": ("norm",),
    r"h_\d+/attn/c_attn/kernel": ("embed", "qkv", "heads", "head_dim"),
    r"h_\d+/attn/c_attn/bias": ("qkv", "heads", "head_dim"),
    r"h_\d+/attn/c_proj/kernel": ("heads", "embed"),  # its input is the heads' outputs, side by side
    r"h_\d+/(attn|mlp)/c_proj/bias": ("norm",),  # added after the all-reduce: whole on every device
    r"h_\d+/mlp/c_fc/kernel": ("embed", "mlp"),
    r"h_\d+/mlp/c_fc/bias": ("mlp",),
    r"h_\d+/mlp/c_proj/kernel": ("mlp", "embed"),
}

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def _dense(parent: nn.Module, config: ModelConfig, features, name: str, std: float = 0.02) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        features,
        use_bias=config.bias,
        dtype=compute_dtype(config),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nn.initializers.normal(std),
        # On a mesh the kernel is gathered over fsdp for the matmul; [B, T] rows are one matrix (layers.dense_dot).
        dot_general=layers.dense_dot([*parent.scope.path, name], PARAM_AXES, LAYER_PREFIX),
        name=name,
    )


def _residual_std(config: ModelConfig) -> float:
    # GPT-2 scales the init of the two residual projections by 1/sqrt(2 * n_layer).
    return 0.02 / math.sqrt(2 * config.n_layer)


def _layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
    # Flax computes LayerNorm statistics in fp32 even for bf16 inputs.
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        use_bias=config.bias,
        dtype=compute_dtype(config),
        param_dtype=jnp.dtype(config.param_dtype),
        name=name,
    )


class Block(nn.Module):
    """One pre-LayerNorm transformer block. Returns (x, updated layer KV or None) so nn.scan can carry x."""

    config: ModelConfig
    backend: str  # resolved attention backend ("xla" or "cudnn")
    train: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, layer_kv, inputs: LayerInputs):
        cfg = self.config
        drop = lambda x: layers.row_dropout(self, x, cfg.dropout, inputs.rows_B, not self.train)
        a_BxTxD, new_kv = CausalSelfAttention(cfg, self.backend, self.train, name="attn")(
            _layer_norm(cfg, "ln_1")(x_BxTxD), layer_kv, inputs
        )
        x_BxTxD = x_BxTxD + drop(a_BxTxD)
        x_BxTxD = x_BxTxD + drop(MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x_BxTxD)))
        return constrain(x_BxTxD, ("batch", None, None)), new_kv


class CausalSelfAttention(nn.Module):
    config: ModelConfig
    backend: str
    train: bool

    @nn.compact
    def __call__(self, h_BxTxD, layer_kv, inputs: LayerInputs):
        cfg = self.config
        B, T, D = h_BxTxD.shape
        H, Dh = cfg.n_head, cfg.head_dim
        qkv_BxTx3xHxD = constrain(_dense(self, cfg, (3, H, Dh), "c_attn")(h_BxTxD), ("batch", None, "qkv", "heads", None))
        q_BxTxHxD, k_BxTxHxD, v_BxTxHxD = (qkv_BxTx3xHxD[:, :, i] for i in range(3))
        k_BxHxDxT, v_BxHxTxD = k_BxTxHxD.transpose(0, 2, 3, 1), v_BxTxHxD.transpose(0, 2, 1, 3)
        new_kv, (k_BxHxDxS, v_BxHxSxD) = update_layer(layer_kv, k_BxHxDxT, v_BxHxTxD, inputs.cache_index,
                                                       q_BxTxHxD.dtype)
        rate = cfg.attn_dropout if self.train else 0.0
        o_BxTxHxD = attention(
            q_BxTxHxD,
            k_BxHxDxS,
            v_BxHxSxD,
            inputs.mask_BxTxS,
            backend=self.backend,
            dropout_rate=rate,
            dropout_rng=self.make_rng("dropout") if rate > 0 else None,
            rows_B=inputs.rows_B,
        )
        return _dense(self, cfg, D, "c_proj", _residual_std(cfg))(o_BxTxHxD.reshape(B, T, D)), new_kv


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD):
        cfg = self.config
        h_BxTxF = constrain(_ACTIVATIONS[cfg.activation](_dense(self, cfg, 4 * cfg.n_embd, "c_fc")(h_BxTxD)),
                            ("batch", None, "mlp"))
        return _dense(self, cfg, cfg.n_embd, "c_proj", _residual_std(cfg))(h_BxTxF)


class Decoder(nn.Module):
    """The GPT-2 language model. `__call__` returns (fp32 logits over the padded vocab, updated cache or None)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        cache: KVCache | None = None,
        mask_BxT: jax.Array | None = None,
        train: bool = False,
        rows_B: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
    ):
        """tokens_BxT: int ids. positions_BxT: defaults to cache.index + 0..T-1 (left-padded batches pass
        cumsum(mask) - 1). mask_BxT: False marks padding tokens, which no query may attend to; None = all real.
        With `cache`, the T new keys/values are written at slots [index, index + T) and queries see every
        earlier position in the cache. Dropout (train=True) needs `rngs={"dropout": key}`; `rows_B` are the rows'
        places in the global batch, which (with the key) decide each row's dropout masks (default 0..B-1).
        segment_ids_BxT: int ids of the examples packed into each row (no cache): a token attends only to tokens
        of its own example, whose positions the caller restarts at 0.
        """
        cfg = self.config
        dtype, param_dtype = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)
        embed = lambda n, name: nn.Embed(
            n, cfg.n_embd, dtype=dtype, param_dtype=param_dtype, embedding_init=nn.initializers.normal(0.02), name=name
        )
        wte, wpe = embed(cfg.padded_vocab_size, "wte"), embed(cfg.n_positions, "wpe")

        positions_BxT = layers.default_positions(tokens_BxT, positions_BxT, cache)
        # The lookup and the tied head read the table in its compute layout (split over tensor, whole over fsdp).
        table_VxD = gathered(wte.embedding, PARAM_AXES["wte/embedding"], lookup=True).astype(dtype)
        positions_PxD = gathered(wpe.embedding, PARAM_AXES["wpe/embedding"], lookup=True).astype(dtype)
        x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0) + jnp.take(positions_PxD, positions_BxT, axis=0)
        x_BxTxD = constrain(x_BxTxD, ("batch", None, None))
        x_BxTxD = layers.row_dropout(self, x_BxTxD, cfg.dropout, rows_B, not train)

        kv, start, cache = layers.open_cache(cache, positions_BxT, mask_BxT)
        segment_ids_BxT = None if segment_ids_BxT is None else jnp.asarray(segment_ids_BxT)
        mask_BxTxS = attention_mask(positions_BxT, mask_BxT, cache, segment_ids_BxT=segment_ids_BxT)
        backend = resolve_backend(
            cfg.attention, dtype, cfg.head_dim, needs_mask=mask_BxTxS is not None, dropout=train and cfg.attn_dropout > 0
        )
        inputs = LayerInputs(positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT, cache_index=start,
                             rows_B=rows_B, mask_BxTxS=mask_BxTxS)
        x_BxTxD, kv = layers.run_blocks(Block, cfg, LAYER_PREFIX, (cfg, backend, train), x_BxTxD, kv, inputs)

        x_BxTxD = _layer_norm(cfg, "ln_f")(x_BxTxD)
        # Tied LM head; fp32 accumulation and output even when activations are bf16.
        logits_BxTxV = jnp.einsum("btd,vd->btv", x_BxTxD.astype(dtype), table_VxD, preferred_element_type=jnp.float32)
        logits_BxTxV = layers.mask_padded_vocab(constrain(logits_BxTxV, ("batch", None, "vocab")), cfg.vocab_size)
        if cache is not None:
            cache = cache.replace(k=kv[0], v=kv[1]).advanced(tokens_BxT.shape[1])
        return logits_BxTxV, cache


def lookup_params(config: ModelConfig) -> int:
    """Parameters used by lookup, not matmul (excluded from 6N): the learned position embeddings."""
    return config.n_positions * config.n_embd
