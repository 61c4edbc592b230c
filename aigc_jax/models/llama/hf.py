"""HF transformers LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM <-> aigc_jax's Llama family: config,
weight names and layouts, tokenizer files.

The name map: our `layers_3/self_attn/q_proj/kernel` is HF's `model.layers.3.self_attn.q_proj.weight`, `scale` is
an RMSNorm's `weight`, `lm_head/kernel` is `lm_head.weight`. HF's nn.Linear weights are [out, in]: they are
transposed, and q/k/v/o reshaped to whole heads ([D, heads, Dh], o_proj [H, Dh, D]). The embedding (and an untied
head) get `padded_vocab_size` rows (zeros on import, dropped on export); a tied head is never stored twice.

config.json comes in two forms, both read: transformers v5's `rope_parameters` and the older top-level
`rope_theta` + `rope_scaling` (with `type` or `rope_type`). Keys left at a class default may be absent, so each
model type has its transformers 5.24 defaults. Settings aigc_jax does not implement are refused by name.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from aigc_jax import fileio
from aigc_jax.dictconfig import from_dict
from aigc_jax.errors import UserError
from aigc_jax.models.llama.config import HF_LLAMA_TYPES, LlamaConfig

MODEL_TYPES = HF_LLAMA_TYPES
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# The defaults of LlamaConfig / Qwen2Config / MistralConfig in transformers 5.24 (tests check them against it).
_COMMON = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu", "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "attention_dropout": 0.0}
_DEFAULTS = {
    "llama": {**_COMMON, "intermediate_size": 11008, "max_position_embeddings": 2048, "attention_bias": False,
              "mlp_bias": False, "pretraining_tp": 1},
    "qwen2": {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768,
              "num_key_value_heads": 32, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28, "layer_types": None},
    "mistral": {**_COMMON, "intermediate_size": 14336, "max_position_embeddings": 4096 * 32,
                "num_key_value_heads": 8, "sliding_window": 4096},
}
_ROPE_KEYS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
# Non-persistent RoPE buffers that older transformers versions wrote into checkpoints.
_IGNORED_KEY = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------------------
# Config


def config_from_hf(d: dict) -> LlamaConfig:
    """A Llama/Qwen2/Mistral config.json dict -> LlamaConfig; one-line UserError for what we don't implement."""
    model_type = d.get("model_type")
    c = {**_DEFAULTS[model_type], **d}
    if c["hidden_act"] not in ("silu", "swish"):
        raise UserError(f"hidden_act={c['hidden_act']!r} is not implemented (the Llama family uses silu)")
    if c.get("pretraining_tp", 1) not in (None, 1):
        raise UserError(f"pretraining_tp={c['pretraining_tp']} is not implemented (only 1)")
    for key in ("quantization_config", "partial_rotary_factor"):
        if d.get(key) not in (None, 1, 1.0):
            raise UserError(f"{key} is not implemented by aigc_jax's Llama family")
    heads = c["num_attention_heads"]
    out = {
        "hf_model_type": model_type,
        "vocab_size": c["vocab_size"],
        "n_positions": c["max_position_embeddings"],
        "n_layer": c["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": c["num_key_value_heads"] or heads,
        "head_dim": c["head_dim"] or c["hidden_size"] // heads,
        "n_embd": c["hidden_size"],
        "n_inner": c["intermediate_size"],
        "rms_norm_eps": c["rms_norm_eps"],
        "tie_word_embeddings": c["tie_word_embeddings"],
        "attn_dropout": c["attention_dropout"],
        **_rope_from_hf(c),
        **_biases_and_windows(model_type, c),
    }
    return from_dict(LlamaConfig, out, "config.json: ")


def _rope_from_hf(c: dict) -> dict:
    # As transformers: rope_scaling (older files) wins over rope_parameters; rope_theta may sit beside either.
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    if any(k in params for k in ("full_attention", "sliding_attention")):
        raise UserError("rope_parameters per layer type are not implemented (one RoPE for every layer)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise UserError(f"rope_scaling type {rope_type!r} is not implemented; supported: {', '.join(_ROPE_KEYS)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"partial_rotary_factor={params['partial_rotary_factor']} is not implemented (only 1)")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
    missing = [k for k in _ROPE_KEYS[rope_type] if params.get(k) is None]
    if missing:
        raise UserError(f"rope_scaling of type {rope_type} needs {', '.join(missing)}")
    theta = params.get("rope_theta") or c.get("rope_theta") or 10000.0
    out = {"rope_type": rope_type, "rope_theta": theta}
    names = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
             "high_freq_factor": "rope_high_freq_factor",
             "original_max_position_embeddings": "rope_original_max_positions"}
    out.update({names[k]: params[k] for k in _ROPE_KEYS[rope_type]})
    return out


def _biases_and_windows(model_type: str, c: dict) -> dict:
    if model_type == "llama":
        return {"qkv_bias": c["attention_bias"], "o_bias": c["attention_bias"], "mlp_bias": c["mlp_bias"]}
    if model_type == "mistral":  # every layer slides when sliding_window is set (MistralModel ignores layer_types)
        return {"sliding_window": c["sliding_window"]}
    # Qwen2: q/k/v biases always; a window only with use_sliding_window, on layers >= max_window_layers.
    window = c["sliding_window"] if c["use_sliding_window"] else None
    types = c["layer_types"] or ["sliding_attention" if window is not None and i >= c["max_window_layers"]
                                 else "full_attention" for i in range(c["num_hidden_layers"])]
    if window is None and "sliding_attention" in types:
        raise UserError("layer_types names sliding_attention layers but use_sliding_window is false")
    return {"qkv_bias": True, "sliding_window": window if "sliding_attention" in types else None,
            "layer_types": tuple(types) if "sliding_attention" in types else ()}


def config_to_hf(config: LlamaConfig, bos_id: int | None, eos_ids: tuple[int, ...], dtype: str) -> dict:
    """The config.json (older rope_theta/rope_scaling form, which transformers 4.x and 5.x both read) that makes
    `config.hf_model_type`'s HF class compute what our Decoder computes."""
    kind = config.hf_model_type
    _check_exportable(config)
    rope = None
    if config.rope_type != "default":
        rope = {"rope_type": config.rope_type, "factor": config.rope_factor}
        if config.rope_type == "llama3":
            rope.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                        original_max_position_embeddings=config.rope_original_max_positions)
    out = {
        "model_type": kind,
        "architectures": [ARCHITECTURES[kind]],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.n_inner,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.n_positions,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": config.attn_dropout,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": list(eos_ids) if len(eos_ids) > 1 else (eos_ids[0] if eos_ids else None),
        "torch_dtype": dtype,
    }
    if kind == "llama":
        out.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif kind == "mistral":
        out.update(sliding_window=config.sliding_window)
    else:
        sliding = [w is not None for w in config.windows]
        out.update(use_sliding_window=any(sliding), sliding_window=config.sliding_window,
                   max_window_layers=sliding.index(True) if any(sliding) else config.n_layer,
                   layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
    return out


def export_config(config: LlamaConfig, tokenizer, dtype: str) -> dict:
    bos, eos = (tokenizer.bos_id, tokenizer.eos_ids) if tokenizer is not None else (None, ())
    return config_to_hf(config, bos, eos, dtype)


def architecture(config: LlamaConfig) -> str:
    return ARCHITECTURES[config.hf_model_type]


def _check_exportable(config: LlamaConfig) -> None:
    """What config.hf_model_type's HF class cannot represent, by name."""
    kind, sliding = config.hf_model_type, {w is not None for w in config.windows}
    problems = {
        "llama": [(config.qkv_bias != config.o_bias, "q/k/v biases without an o_proj bias (use qwen2)"),
                  (True in sliding, "sliding-window attention (use mistral or qwen2)")],
        "qwen2": [(not config.qkv_bias or config.o_bias, "q/k/v biases must be on and o_proj's off"),
                  (config.mlp_bias, "mlp biases")],
        "mistral": [(config.qkv_bias or config.o_bias or config.mlp_bias, "biases"),
                    (len(sliding) > 1, "a mix of full and sliding-window layers (use qwen2)")],
    }[kind]
    for bad, what in problems:
        if bad:
            raise UserError(f"HF {ARCHITECTURES[kind]} cannot represent {what}: model.hf_model_type={kind}")


# ---------------------------------------------------------------------------------------------------------
# Weights


def hf_name(path: tuple[str, ...]) -> str:
    """("layers_3", "self_attn", "q_proj", "kernel") -> "model.layers.3.self_attn.q_proj.weight"."""
    *modules, leaf = path
    if modules == ["lm_head"]:
        return "lm_head.weight"
    modules = [f"layers.{m[7:]}" if re.fullmatch(r"layers_\d+", m) else m for m in modules]
    return "model." + ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def _in_dims(path: tuple[str, ...]) -> int:
    """How many leading dims of our kernel are the Linear's input (o_proj reads [H, Dh])."""
    return 2 if path[-2] == "o_proj" else 1


def from_hf(path: tuple[str, ...], w: np.ndarray, shape: tuple[int, ...], config: LlamaConfig) -> np.ndarray:
    """One HF tensor in our layout `shape` (a UserError naming it if its size does not fit)."""
    name, leaf, vocab_size = hf_name(path), path[-1], config.vocab_size
    if path == ("embed_tokens", "embedding") or path == ("lm_head", "kernel"):
        want = (vocab_size, shape[1] if leaf == "embedding" else shape[0])
        if w.shape != want:
            raise UserError(f"weight {name} has shape {w.shape}, config.json implies {want}")
        padded = np.zeros((shape[0] if leaf == "embedding" else shape[1], want[1]), w.dtype)
        padded[:vocab_size] = w
        return padded if leaf == "embedding" else padded.T
    if leaf == "kernel":
        n_in = int(np.prod(shape[:_in_dims(path)]))
        if w.shape != (math.prod(shape) // n_in, n_in):
            raise UserError(f"weight {name} has shape {w.shape}, config.json implies "
                            f"{(math.prod(shape) // n_in, n_in)}")
        return w.T.reshape(shape)
    if w.size != math.prod(shape) or w.ndim != 1:
        raise UserError(f"weight {name} has shape {w.shape}, config.json implies {(math.prod(shape),)}")
    return w.reshape(shape)


def to_hf_state(flat: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
    return {hf_name(path): _to_hf(path, np.asarray(w), config.vocab_size) for path, w in flat.items()}


def _to_hf(path: tuple[str, ...], w: np.ndarray, vocab_size: int) -> np.ndarray:
    if path == ("embed_tokens", "embedding"):
        return w[:vocab_size]
    if path == ("lm_head", "kernel"):
        return w[:, :vocab_size].T
    if path[-1] == "kernel":
        n_in = int(np.prod(w.shape[:_in_dims(path)]))
        return w.reshape(n_in, -1).T
    return w.reshape(-1)


def import_state(state: dict, config: LlamaConfig) -> dict:
    """A tied model's checkpoint may or may not carry lm_head.weight; if it does it must be the embedding."""
    if not config.tie_word_embeddings or "lm_head.weight" not in state:
        return state
    state = dict(state)
    head, embed = state.pop("lm_head.weight"), state.get("model.embed_tokens.weight")
    if embed is not None and not np.array_equal(np.asarray(head), np.asarray(embed)):
        raise UserError("lm_head.weight differs from model.embed_tokens.weight although tie_word_embeddings is true")
    return state


def ignored(name: str) -> bool:
    return bool(_IGNORED_KEY.search(name))


def missing_hint(config: LlamaConfig) -> str:
    return f"n_layer={config.n_layer}, tie_word_embeddings={str(config.tie_word_embeddings).lower()}"


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def save_tokenizer(path: str, tokenizer, max_length: int) -> set[str]:
    """tokenizer.json verbatim (PreTrainedTokenizerFast takes its whole pipeline from it), the special tokens,
    generation_config.json's BOS/EOS ids and the chat template."""
    written = {os.path.basename(tokenizer.save(path)), "tokenizer_config.json", "generation_config.json"}
    fileio.atomic_write_json(os.path.join(path, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens, "model_max_length": max_length,
    })
    eos = list(tokenizer.eos_ids)
    fileio.atomic_write_json(os.path.join(path, "generation_config.json"), {
        "bos_token_id": tokenizer.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0], **tokenizer.generation,
    })
    return written | ({"chat_template.jinja"} if tokenizer.chat_template is not None else set())
