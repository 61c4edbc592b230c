"""GPT-2 in Flax linen, written to be read in one sitting.

    tokens ─▶ wte + wpe ─▶ dropout ─▶ [ x + attn(ln_1(x)) ; x + mlp(ln_2(x)) ] × n_layer ─▶ ln_f ─▶ x·wteᵀ ─▶ logits

It matches HF transformers' GPT2LMHeadModel given the same weights (tests/test_hf_interop.py): pre-LayerNorm
blocks, tanh-GELU MLP, learned positions, LM head tied to the token embedding. Parameter names mirror HF's
(`h_3/attn/c_attn/kernel` is HF's `h.3.attn.c_attn.weight`; HF's Conv1D already stores [in, out]).

Decoding carries an explicit `KVCache` pytree through the call instead of Flax's mutable "cache"
collection, so a `lax.scan`/`while_loop` can hold it and beam search can reorder it with a gather.

Dtypes: params in `param_dtype` (fp32), activations in `dtype` (bf16 on accelerators), attention softmax,
logits and everything downstream in fp32. The vocabulary is padded to `padded_vocab_size`; the padded
ids get the most negative fp32 logit so they never win an argmax, a sample or a beam.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from aigc_jax.attention import attention, resolve_backend
from aigc_jax.configs import ModelConfig

Params = Any  # a nested dict of arrays

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` slots, filled left to right.

    Slot j of row b holds a real token iff `valid[b, j]`; left-padded prompts leave their pad slots invalid.
    `index` is the next slot to write (the same for every row: rows are aligned by left padding).
    """

    # Head-major, keys stored transposed: q·kᵀ and p·v then read the cache where it lies. With a [.., S, H, D]
    # cache XLA copied every layer's keys and values into these layouts on every decoded token. (Per-layer
    # buffers instead of one stacked array would also save slicing the layer out, but XLA's copy insertion
    # then copies every loop-carried buffer per token: measured slower on CPU.)
    k: jax.Array  # [L, B, H, D, S]
    v: jax.Array  # [L, B, H, S, D]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # [] int32

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_len: int | None = None, dtype=None) -> "KVCache":
        max_len = max_len or config.n_positions
        L, B, H, D = config.n_layer, batch_size, config.n_head, config.head_dim
        dtype = jnp.dtype(dtype or config.dtype)
        return cls(
            k=jnp.zeros((L, B, H, D, max_len), dtype),
            v=jnp.zeros((L, B, H, max_len, D), dtype),
            valid=jnp.zeros((batch_size, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def gather(self, rows_B: jax.Array) -> "KVCache":
        """Reorders/duplicates batch rows (beam search keeps the cache of the beams it continues)."""
        return self.replace(k=self.k[:, rows_B], v=self.v[:, rows_B], valid=self.valid[rows_B])


def _dense(config: ModelConfig, features: int, name: str, std: float = 0.02) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=config.bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nn.initializers.normal(std),
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
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        name=name,
    )


class Block(nn.Module):
    """One pre-LayerNorm transformer block. Returns (x, updated layer KV or None) so nn.scan can carry x."""

    config: ModelConfig
    backend: str  # resolved attention backend ("xla" or "cudnn")
    train: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, layer_kv, mask_BxTxS, cache_index):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout, deterministic=not self.train)
        a_BxTxD, new_kv = CausalSelfAttention(cfg, self.backend, self.train, name="attn")(
            _layer_norm(cfg, "ln_1")(x_BxTxD), layer_kv, mask_BxTxS, cache_index
        )
        x_BxTxD = x_BxTxD + drop(a_BxTxD)
        x_BxTxD = x_BxTxD + drop(MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x_BxTxD)))
        return x_BxTxD, new_kv


class CausalSelfAttention(nn.Module):
    config: ModelConfig
    backend: str
    train: bool

    @nn.compact
    def __call__(self, h_BxTxD, layer_kv, mask_BxTxS, cache_index):
        cfg = self.config
        B, T, D = h_BxTxD.shape
        H, Dh = cfg.n_head, cfg.head_dim
        qkv_BxTx3D = _dense(cfg, 3 * D, "c_attn")(h_BxTxD)
        q_BxTxHxD, k_BxTxHxD, v_BxTxHxD = (
            t.reshape(B, T, H, Dh) for t in jnp.split(qkv_BxTx3D, 3, axis=-1)
        )
        k_BxHxDxS, v_BxHxSxD = k_BxTxHxD.transpose(0, 2, 3, 1), v_BxTxHxD.transpose(0, 2, 1, 3)
        new_kv = None
        if layer_kv is not None:
            # Either this layer's own slices (nn.scan hands them out) or the whole stacked cache plus a layer
            # index: writing into the whole cache in place avoids re-stacking (copying)
            # every layer's keys and values on each decoded token.
            k_cache, v_cache, layer = layer_kv if len(layer_kv) == 3 else (*layer_kv, None)
            def write(cache, new, slot_axis):
                at = [0, 0, 0, 0]
                at[slot_axis] = cache_index
                if layer is None:
                    return lax.dynamic_update_slice(cache, new.astype(cache.dtype), at)
                return lax.dynamic_update_slice(cache, new.astype(cache.dtype)[None], (layer, *at))

            k_cache, v_cache = write(k_cache, k_BxHxDxS, 3), write(v_cache, v_BxHxSxD, 2)
            new_kv = (k_cache, v_cache)
            read = lambda cache: (cache if layer is None else cache[layer]).astype(q_BxTxHxD.dtype)
            k_BxHxDxS, v_BxHxSxD = read(k_cache), read(v_cache)
        rate = cfg.attn_dropout if self.train else 0.0
        o_BxTxHxD = attention(
            q_BxTxHxD,
            k_BxHxDxS,
            v_BxHxSxD,
            mask_BxTxS,
            backend=self.backend,
            dropout_rate=rate,
            dropout_rng=self.make_rng("dropout") if rate > 0 else None,
        )
        return _dense(cfg, D, "c_proj", _residual_std(cfg))(o_BxTxHxD.reshape(B, T, D)), new_kv


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD):
        cfg = self.config
        h_BxTxF = _ACTIVATIONS[cfg.activation](_dense(cfg, 4 * cfg.n_embd, "c_fc")(h_BxTxD))
        return _dense(cfg, cfg.n_embd, "c_proj", _residual_std(cfg))(h_BxTxF)


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
    ):
        """tokens_BxT: int ids. positions_BxT: defaults to cache.index + 0..T-1 (left-padded batches pass
        cumsum(mask) - 1). mask_BxT: False marks padding tokens, which no query may attend to; None = all real.
        With `cache`, the T new keys/values are written at slots [index, index + T) and queries see every
        valid earlier slot. Dropout (train=True) needs `rngs={"dropout": key}`.
        """
        cfg = self.config
        B, T = tokens_BxT.shape
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        embed = lambda n, name: nn.Embed(
            n, cfg.n_embd, dtype=dtype, param_dtype=param_dtype, embedding_init=nn.initializers.normal(0.02), name=name
        )
        wte, wpe = embed(cfg.padded_vocab_size, "wte"), embed(cfg.n_positions, "wpe")

        start = cache.index if cache is not None else 0
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BxTxD = wte(tokens_BxT) + wpe(positions_BxT)
        x_BxTxD = nn.Dropout(cfg.dropout, deterministic=not train)(x_BxTxD)

        kv = None
        if cache is not None:
            kv = (cache.k, cache.v)
            cache = cache.replace(valid=lax.dynamic_update_slice(cache.valid, _ones_or(mask_BxT, B, T), (0, start)))
        mask_BxTxS = _attention_mask(mask_BxT, cache, T)
        backend = resolve_backend(
            cfg.attention, dtype, cfg.head_dim, needs_mask=mask_BxTxS is not None, dropout=train and cfg.attn_dropout > 0
        )

        block_cls = Block
        if cfg.remat != "none":
            block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            blocks = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=cfg.n_layer,
            )(cfg, backend, train, name="h")
            x_BxTxD, kv = blocks(x_BxTxD, kv, mask_BxTxS, start)
        else:
            for i in range(cfg.n_layer):
                layer_kv = None if kv is None else (*kv, i)
                x_BxTxD, new_kv = block_cls(cfg, backend, train, name=f"h_{i}")(x_BxTxD, layer_kv, mask_BxTxS, start)
                kv = kv if new_kv is None else new_kv

        x_BxTxD = _layer_norm(cfg, "ln_f")(x_BxTxD)
        # Tied LM head; fp32 accumulation and output even when activations are bf16.
        logits_BxTxV = jnp.einsum(
            "btd,vd->btv", x_BxTxD.astype(dtype), wte.embedding.astype(dtype), preferred_element_type=jnp.float32
        )
        logits_BxTxV = mask_padded_vocab(logits_BxTxV, cfg.vocab_size)
        if cache is not None:
            cache = cache.replace(k=kv[0], v=kv[1], index=start + T)
        return logits_BxTxV, cache


def _ones_or(mask_BxT, B, T):
    return jnp.ones((B, T), bool) if mask_BxT is None else mask_BxT.astype(bool)


def _attention_mask(mask_BxT, cache: KVCache | None, T: int):
    """[B, T, S] bool "query t may see key s", or None for the plain causal case (which cuDNN serves).

    With a cache, `cache.valid` already includes the T new slots starting at `cache.index`.
    """
    if cache is None:
        if mask_BxT is None:
            return None
        causal_TxT = jnp.tril(jnp.ones((T, T), bool))
        return causal_TxT[None] & mask_BxT.astype(bool)[:, None, :]
    query_slot_T = cache.index + jnp.arange(T)
    causal_TxS = jnp.arange(cache.max_len)[None, :] <= query_slot_T[:, None]
    return causal_TxS[None] & cache.valid[:, None, :]


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """Gives ids >= vocab_size the most negative fp32 value: never chosen, and unlike -inf never a NaN source."""
    if logits.shape[-1] == vocab_size:
        return logits
    keep = jnp.arange(logits.shape[-1]) < vocab_size
    return jnp.where(keep, logits, jnp.finfo(logits.dtype).min)


# ---------------------------------------------------------------------------------------------------------
# Functional entry points.


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections N(0, 0.02/sqrt(2L)), zero biases."""
    tokens = jnp.zeros((1, min(8, config.n_positions)), jnp.int32)
    return Decoder(config).init({"params": rng}, tokens)["params"]


def forward(
    params: Params,
    tokens_BxT: jax.Array,
    config: ModelConfig,
    *,
    positions_BxT: jax.Array | None = None,
    cache: KVCache | None = None,
    mask_BxT: jax.Array | None = None,
    train: bool = False,
    dropout_rng: jax.Array | None = None,
):
    """`(logits_BxTxV, cache)`; a plain function so it can be jitted, pmapped or differentiated directly."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return Decoder(config).apply(
        {"params": params}, tokens_BxT, positions_BxT, cache, mask_BxT, train, rngs=rngs
    )


def stack_layers(params: Params, n_layer: int) -> Params:
    """Unrolled layout ({"h_0": …, "h_1": …}) -> scanned layout ({"h": leaves with a leading layer axis})."""
    params = dict(params)
    layers = [params.pop(f"h_{i}") for i in range(n_layer)]
    params["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


def unstack_layers(params: Params) -> Params:
    """Scanned layout -> unrolled layout."""
    params = dict(params)
    stacked = params.pop("h")
    n_layer = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n_layer):
        params[f"h_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return params


def match_layout(params: Params, config: ModelConfig) -> Params:
    """Returns params in the layout `config.scan_layers` asks for, whichever layout they arrive in."""
    scanned = "h" in params
    if config.scan_layers and not scanned:
        return stack_layers(params, config.n_layer)
    if not config.scan_layers and scanned:
        return unstack_layers(params)
    return params


def count_params(params: Params, config: ModelConfig) -> int:
    """Parameters as HF counts them: the vocabulary padding rows of the embedding are not counted."""
    total = sum(x.size for x in jax.tree.leaves(params))
    return total - (config.padded_vocab_size - config.vocab_size) * config.n_embd


def param_count(config: ModelConfig) -> int:
    """`count_params` without materialising the weights."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return count_params(shapes, config)


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, 6N + 12·L·d·T (PaLM appendix B / nanoGPT), N excluding position embeddings.

    The tied LM head is counted through N (its matmul is real work); the attention term counts the full
    T×T score matrix although causal kernels skip half, as nanoGPT and PaLM do, so MFU is comparable.
    """
    n = param_count(config) - config.n_positions * config.n_embd
    return 6 * n + 12 * config.n_layer * config.n_embd * seq_len
