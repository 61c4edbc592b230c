"""HF transformers GPT2LMHeadModel <-> aigc_jax's GPT-2: config, weight names and layouts, tokenizer files.

Our parameter tree mirrors HF's module names (`h_3/attn/c_attn/kernel` is `transformer.h.3.attn.c_attn.weight`)
and HF's Conv1D already stores weights as [in, out], the Flax kernel layout, so the mapping is a renaming plus: the
fused q|k|v is reshaped to whole heads, the token embedding is padded to `config.padded_vocab_size` rows (zeros on
import, dropped on export) and the LM head is tied to it (HF's `lm_head.weight` is checked equal to the
embedding, never stored separately).
"""

from __future__ import annotations

import os
import re

import numpy as np

from aigc_jax import fileio
from aigc_jax.dictconfig import from_dict
from aigc_jax.errors import UserError
from aigc_jax.models.gpt2.config import ACTIVATIONS, ModelConfig

ARCHITECTURE = "GPT2LMHeadModel"
MODEL_TYPES = ("gpt2",)

# GPT2Config's defaults: HF writes config.json without the keys a model leaves at their default.
_HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "tie_word_embeddings": True,
    "add_cross_attention": False,
}
_ACTIVATION_ALIASES = {"swish": "silu"}
# Non-persistent attention buffers that older transformers versions wrote into checkpoints.
_IGNORED_KEY = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


# ---------------------------------------------------------------------------------------------------------
# Config


def config_from_hf(d: dict) -> ModelConfig:
    """A GPT2Config dict (config.json) -> ModelConfig; one-line UserError for anything we don't implement.

    ModelConfig has a single `dropout` for the embedding and residual paths; when HF's `embd_pdrop` and
    `resid_pdrop` differ, `resid_pdrop` wins (it is applied twice per layer, so it dominates training).
    Dropout only matters for fine-tuning: inference is exact either way.
    """
    c = {**_HF_DEFAULTS, **d}
    unsupported = [
        (c["scale_attn_by_inverse_layer_idx"], "scale_attn_by_inverse_layer_idx=true"),
        (c["reorder_and_upcast_attn"], "reorder_and_upcast_attn=true"),
        (not c["scale_attn_weights"], "scale_attn_weights=false"),
        (c["n_inner"] is not None and c["n_inner"] != 4 * c["n_embd"], f"n_inner={c['n_inner']} (only 4*n_embd)"),
        (not c["tie_word_embeddings"], "tie_word_embeddings=false (an untied LM head)"),
        (c["add_cross_attention"], "add_cross_attention=true"),
    ]
    for bad, what in unsupported:
        if bad:
            raise UserError(f"{what} is not implemented by aigc_jax's GPT-2")
    activation = _ACTIVATION_ALIASES.get(c["activation_function"], c["activation_function"])
    if activation not in ACTIVATIONS:
        raise UserError(
            f"activation_function {c['activation_function']!r} is not implemented; "
            f"known: {', '.join(ACTIVATIONS)}"
        )
    return from_dict(
        ModelConfig,
        {
            "vocab_size": c["vocab_size"],
            "n_positions": c["n_positions"],
            "n_layer": c["n_layer"],
            "n_head": c["n_head"],
            "n_embd": c["n_embd"],
            "dropout": c["resid_pdrop"],
            "attn_dropout": c["attn_pdrop"],
            "layer_norm_epsilon": c["layer_norm_epsilon"],
            "activation": activation,
        },
    )


def config_to_hf(config: ModelConfig, eot_id: int | None = None, dtype: str = "float32") -> dict:
    """The config.json that makes `GPT2LMHeadModel` compute what our Decoder computes."""
    _check_exportable(config)
    return {
        "model_type": "gpt2",
        "architectures": [ARCHITECTURE],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_inner": None,
        "activation_function": config.activation,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.attn_dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype,
    }


def export_config(config: ModelConfig, tokenizer, dtype: str) -> dict:
    return config_to_hf(config, tokenizer.eot_id if tokenizer is not None else None, dtype)


def _check_exportable(config: ModelConfig) -> None:
    if not config.bias:
        raise UserError("this model has no biases (model.bias=false), which HF GPT-2 cannot represent")


# ---------------------------------------------------------------------------------------------------------
# Weights


def hf_name(path: tuple[str, ...]) -> str:
    """("h_3", "attn", "c_attn", "kernel") -> "h.3.attn.c_attn.weight" (without the "transformer." prefix)."""
    *modules, leaf = path
    modules = [f"h.{m[2:]}" if re.fullmatch(r"h_\d+", m) else m for m in modules]
    return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def import_state(state: dict, config: ModelConfig) -> dict:
    """Names with or without "transformer."; a stored `lm_head.weight` must be the embedding (it is tied)."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    lm_head, wte = state.pop("lm_head.weight", None), state.get("wte.weight")
    if lm_head is not None and wte is not None and not np.array_equal(lm_head, wte):
        raise UserError("lm_head.weight differs from transformer.wte.weight: untied LM heads are not supported")
    return state


def from_hf(path: tuple[str, ...], w: np.ndarray, shape: tuple[int, ...], config: ModelConfig) -> np.ndarray:
    want = (config.vocab_size, shape[1]) if path == ("wte", "embedding") else shape
    if path[-2] == "c_attn" and w.ndim == len(shape) - 2 and w.size == np.prod(shape):
        w = w.reshape(shape)  # HF's fused [D, 3D] q|k|v is our [D, 3, H, Dh] (see model.py)
    if w.shape != want:
        raise UserError(f"weight {hf_name(path)} has shape {w.shape}, config.json implies {want}")
    if path == ("wte", "embedding"):
        w = np.concatenate([w, np.zeros((shape[0] - w.shape[0], w.shape[1]), w.dtype)])
    return w


def to_hf_state(flat: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """A tied `lm_head.weight` is left out: HF's safetensors files store tied weights once (transformers re-ties
    them on load)."""
    _check_exportable(config)
    state = {}
    for path, w in flat.items():
        w = np.asarray(w)
        if path == ("wte", "embedding"):
            w = w[: config.vocab_size]
        if path[-2] == "c_attn":
            w = w.reshape(w.shape[0], -1) if path[-1] == "kernel" else w.reshape(-1)
        state["transformer." + hf_name(path)] = w
    return state


def architecture(config: ModelConfig) -> str:
    return ARCHITECTURE


def missing_hint(config: ModelConfig) -> str:
    return f"n_layer={config.n_layer}"


def ignored(name: str) -> bool:
    return bool(_IGNORED_KEY.search(name))


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def save_tokenizer(path: str, tokenizer, max_length: int) -> set[str]:
    """tokenizer.json, tokenizer_config.json and, for GPT-2-style byte-level BPE, vocab.json + merges.txt."""
    from tokenizers import models, pre_tokenizers

    written = {os.path.basename(tokenizer.save(path)), "tokenizer_config.json"}
    if tokenizer.chat_template is not None:
        written.add("chat_template.jinja")
    pre = tokenizer.hf.pre_tokenizer
    is_gpt2_bpe = (isinstance(tokenizer.hf.model, models.BPE) and isinstance(pre, pre_tokenizers.ByteLevel)
                   and pre.use_regex and not pre.add_prefix_space)
    if is_gpt2_bpe:
        written |= {os.path.basename(f) for f in tokenizer.hf.model.save(path)}
    eot = tokenizer.eot_token
    fileio.atomic_write_json(os.path.join(path, "tokenizer_config.json"), {
        # GPT2Tokenizer rebuilds GPT-2's pipeline around the file's vocab and merges; anything else (byte_level's
        # regex-free split, a character-level WordLevel model) must be taken verbatim from tokenizer.json.
        "tokenizer_class": "GPT2Tokenizer" if is_gpt2_bpe else "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "add_prefix_space": False,
        "model_max_length": max_length,
        "added_tokens_decoder": {
            str(tokenizer.eot_id): {"content": eot, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True},
        },
    })
    return written
