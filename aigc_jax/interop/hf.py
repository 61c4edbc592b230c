"""HF transformers checkpoints <-> aigc_jax: config, weights and tokenizer, in both directions.

GPT-2 (this file's name map) and the Llama family (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM: the
name map in hf_llama.py), told apart by config.json's model_type; reading and writing directories is shared.

GPT-2: our parameter tree mirrors HF's module names (`h_3/attn/c_attn/kernel` is
`transformer.h.3.attn.c_attn.weight`) and HF's Conv1D already stores weights as [in, out], the Flax kernel layout,
so the mapping is a renaming plus: the token embedding is padded to `config.padded_vocab_size` rows (zeros on
import, dropped on export) and the LM head is tied to it (HF's `lm_head.weight` is checked equal to the
embedding, never stored separately).

An HF directory is read from config.json plus model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin (fp32, fp16 or bf16 weights). `.bin` files are pickles: they are opened only by
`torch.load(weights_only=True)`, which refuses arbitrary objects, and never by anything else. Exports larger
than MAX_SHARD_BYTES are written as shards with an index, as `save_pretrained` writes them.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from aigc_jax import configs, fileio, model
from aigc_jax import tokenizers as tok
from aigc_jax.configs import ModelConfig
from aigc_jax.errors import UserError
from aigc_jax.interop import hf_llama

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "encoder.json")
MAX_SHARD_BYTES = 5 * 10**9  # larger exports are split into shards of at most this many bytes ("5GB")
MODEL_TYPES = ("gpt2", *configs.HF_LLAMA_TYPES)

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


def config_from_hf(d: dict):
    """A config.json dict -> ModelConfig (gpt2) or LlamaConfig (llama, qwen2, mistral); one-line UserError for
    anything we don't implement."""
    if d.get("model_type") in configs.HF_LLAMA_TYPES:
        return hf_llama.config_from_hf(d)
    return _gpt2_config_from_hf(d)


def _gpt2_config_from_hf(d: dict) -> ModelConfig:
    """A GPT2Config dict (config.json) -> ModelConfig; one-line UserError for anything we don't implement.

    ModelConfig has a single `dropout` for the embedding and residual paths; when HF's `embd_pdrop` and
    `resid_pdrop` differ, `resid_pdrop` wins (it is applied twice per layer, so it dominates training).
    Dropout only matters for fine-tuning: inference is exact either way.
    """
    if d.get("model_type") != "gpt2":
        raise UserError(f"model_type is {d.get('model_type')!r}; supported model types: {', '.join(MODEL_TYPES)}")
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
    if activation not in configs.ACTIVATIONS:
        raise UserError(
            f"activation_function {c['activation_function']!r} is not implemented; "
            f"known: {', '.join(configs.ACTIVATIONS)}"
        )
    return configs.from_dict(
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
        "architectures": ["GPT2LMHeadModel"],
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


# ---------------------------------------------------------------------------------------------------------
# Weights


def _hf_name(path: tuple[str, ...]) -> str:
    """("h_3", "attn", "c_attn", "kernel") -> "h.3.attn.c_attn.weight" (without the "transformer." prefix)."""
    *modules, leaf = path
    modules = [f"h.{m[2:]}" if re.fullmatch(r"h_\d+", m) else m for m in modules]
    return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def _expected_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our unrolled parameter paths and shapes, read off the model itself so the mapping cannot drift from it."""
    tree = jax.eval_shape(lambda: model.init_params(config.replace(scan_layers=False), jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def params_from_hf(state: dict, config):
    """HF weights -> params in the layout `config` asks for (GPT-2 names with or without "transformer.")."""
    if config.family == "llama":
        return _llama_params_from_hf(state, config)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    lm_head = state.pop("lm_head.weight", None)
    param_dtype = _np_dtype(config.param_dtype)
    flat = {}
    for path, shape in _expected_shapes(config).items():
        name = _hf_name(path)
        if name not in state:
            raise UserError(f"weight {name} is missing from the checkpoint (config.json says n_layer={config.n_layer})")
        w = _to_numpy(state.pop(name))
        want = (config.vocab_size, shape[1]) if path == ("wte", "embedding") else shape
        if path[-2] == "c_attn" and w.ndim == len(shape) - 2 and w.size == np.prod(shape):
            w = w.reshape(shape)  # HF's fused [D, 3D] q|k|v is our [D, 3, H, Dh] (see models/gpt2.py)
        if w.shape != want:
            raise UserError(f"weight {name} has shape {w.shape}, config.json implies {want}")
        if path == ("wte", "embedding"):
            if lm_head is not None and not np.array_equal(_to_numpy(lm_head), w):
                raise UserError("lm_head.weight differs from transformer.wte.weight: untied LM heads are not supported")
            w = np.concatenate([w, np.zeros((shape[0] - w.shape[0], w.shape[1]), w.dtype)])
        flat[path] = w.astype(param_dtype)
    _refuse_unexpected(state, lambda k: bool(_IGNORED_KEY.search(k)), "GPT2LMHeadModel")
    return model.match_layout(traverse_util.unflatten_dict(flat), config)


def _llama_params_from_hf(state: dict, config):
    state = hf_llama.untie(state, config)
    flat = {}
    for path, shape in _expected_shapes(config).items():
        name = hf_llama.hf_name(path)
        if name not in state:
            raise UserError(f"weight {name} is missing from the checkpoint (config.json says n_layer={config.n_layer}"
                            f", tie_word_embeddings={str(config.tie_word_embeddings).lower()})")
        w = hf_llama.from_hf(path, _to_numpy(state.pop(name)), shape, config.vocab_size)
        # C order: a transposed view would reach safetensors (model dirs) as its raw, transposed buffer.
        flat[path] = np.ascontiguousarray(w.astype(_np_dtype(config.param_dtype)))
    _refuse_unexpected(state, hf_llama.ignored, hf_llama.ARCHITECTURES[config.hf_model_type])
    return model.match_layout(traverse_util.unflatten_dict(flat), config)


def _refuse_unexpected(state: dict, ignored, architecture: str) -> None:
    unexpected = sorted(k for k in state if not ignored(k))
    if unexpected:
        raise UserError(
            f"unexpected weight {unexpected[0]} in the checkpoint ({len(unexpected)} in all): "
            f"not a {architecture} matching config.json"
        )


def _check_exportable(config: ModelConfig) -> None:
    if not config.bias:
        raise UserError("this model has no biases (model.bias=false), which HF GPT-2 cannot represent")


def to_hf_state_dict(params, config, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Params (either layout) -> HF state dict (GPT-2: "transformer." names), vocab padding dropped.

    A tied `lm_head.weight` is left out: HF's safetensors files store tied weights once (transformers re-ties
    them on load).
    """
    out_dtype = _np_dtype(dtype)
    flat = traverse_util.flatten_dict(model.match_layout(params, config.replace(scan_layers=False)))
    if config.family == "llama":
        return {hf_llama.hf_name(path): np.ascontiguousarray(hf_llama.to_hf(path, np.asarray(w), config.vocab_size)
                                                              .astype(out_dtype)) for path, w in flat.items()}
    _check_exportable(config)
    state = {}
    for path, w in flat.items():
        w = np.asarray(w)
        if path == ("wte", "embedding"):
            w = w[: config.vocab_size]
        if path[-2] == "c_attn":
            w = w.reshape(w.shape[0], -1) if path[-1] == "kernel" else w.reshape(-1)
        state["transformer." + _hf_name(path)] = np.ascontiguousarray(w.astype(out_dtype))
    return state


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # a JAX dependency; numpy has no bfloat16 of its own

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _to_numpy(w) -> np.ndarray:
    if hasattr(w, "detach"):  # a torch tensor; numpy cannot hold torch.bfloat16, so widen it first
        w = w.detach().cpu()
        return (w.float() if str(w.dtype) == "torch.bfloat16" else w).numpy()
    return np.asarray(w)


# ---------------------------------------------------------------------------------------------------------
# Directories


def load_hf_dir(path: str | os.PathLike, dtype: str | None = None):
    """(config, params, Tokenizer or None) from a local HF GPT-2, Llama, Qwen2 or Mistral directory.

    `dtype` sets the compute dtype of the returned config (params stay in `param_dtype`, fp32).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise UserError(f"HF model directory {path} {what}")
    config_path = os.path.join(path, CONFIG_FILE)
    hf_config = _read_json(config_path)
    try:
        config = config_from_hf(hf_config)
    except UserError as e:
        raise UserError(f"{config_path}: {e}") from None
    if dtype is not None:
        config = configs.with_overrides(config, {"dtype": dtype}, "")
    state, weights_path = _read_weights(path)
    try:
        params = params_from_hf(state, config)
    except UserError as e:
        raise UserError(f"{weights_path}: {e}") from None
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)
    return config, params, tok.load(path) if has_tokenizer else None


def save_hf_dir(path: str | os.PathLike, config, params, tokenizer: tok.Tokenizer | None = None,
                dtype: str = "float32", max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes a directory that transformers' `from_pretrained` (GPT2LMHeadModel, LlamaForCausalLM, … as
    config.json names) and, with a tokenizer, `AutoTokenizer` load.

    `dtype` is the storage dtype of the weights (float32, bfloat16 or float16); weights larger than
    `max_shard_bytes` are split into shards with a model.safetensors.index.json.
    """
    if dtype not in configs.DTYPES:
        raise UserError(f"dtype must be one of {', '.join(configs.DTYPES)}; got {dtype!r}")
    if config.family == "llama":
        bos, eos = (tokenizer.bos_id, tokenizer.eos_ids) if tokenizer is not None else (None, ())
        hf_config = hf_llama.config_to_hf(config, bos, eos, dtype)  # before any file is written: it may refuse
    else:
        hf_config = config_to_hf(config, tokenizer.eot_id if tokenizer is not None else None, dtype)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    written = _save_weights(path, to_hf_state_dict(params, config, dtype), max_shard_bytes) | {CONFIG_FILE}
    _write_json(os.path.join(path, CONFIG_FILE), hf_config)
    if tokenizer is not None:
        save_tokenizer = _save_llama_tokenizer if config.family == "llama" else _save_hf_tokenizer
        written |= save_tokenizer(path, tokenizer, config.n_positions)
    # Files from an earlier export into this directory would shadow or contradict the new ones.
    for stale in os.listdir(path):
        if stale not in written and (stale in _EXPORT_FILES or re.fullmatch(r"model-\d+-of-\d+\.safetensors", stale)):
            os.remove(os.path.join(path, stale))


_EXPORT_FILES = (TORCH_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, "tokenizer.json", "vocab.json", "merges.txt",
                 "encoder.json", "vocab.bpe", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja")


def _save_weights(path: str, state: dict[str, np.ndarray], max_shard_bytes: int) -> set[str]:
    """model.safetensors, or shards model-0000i-of-0000N.safetensors + index when larger than max_shard_bytes
    (each written atomically: a reader never sees half a file)."""
    shards, size = [{}], 0
    for name, w in state.items():
        if shards[-1] and size + w.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    # "format": "pt" is what transformers checks to accept a safetensors file as a PyTorch checkpoint.
    if len(shards) == 1:
        fileio.atomic_save(os.path.join(path, SAFETENSORS_FILE), lambda t: save_file(state, t, metadata={"format": "pt"}))
        return {SAFETENSORS_FILE}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        fileio.atomic_save(os.path.join(path, name), lambda t, shard=shard: save_file(shard, t, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(w.nbytes for w in state.values())
    _write_json(os.path.join(path, SAFETENSORS_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return {*names, SAFETENSORS_INDEX}


def _save_llama_tokenizer(path: str, tokenizer: tok.Tokenizer, max_length: int) -> set[str]:
    """tokenizer.json verbatim (PreTrainedTokenizerFast takes its whole pipeline from it), the special tokens,
    generation_config.json's BOS/EOS ids and the chat template."""
    tokenizer.save(path)
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens, "model_max_length": max_length,
    })
    eos = list(tokenizer.eos_ids)
    _write_json(os.path.join(path, "generation_config.json"), {
        "bos_token_id": tokenizer.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0], **tokenizer.generation,
    })
    written = {tok.FILE, "tokenizer_config.json", "generation_config.json"}
    return written | ({"chat_template.jinja"} if tokenizer.chat_template is not None else set())


def _save_hf_tokenizer(path: str, tokenizer: tok.Tokenizer, max_length: int) -> set[str]:
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
    _write_json(os.path.join(path, "tokenizer_config.json"), {
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


def _read_json(path: str) -> dict:
    return fileio.read_json(path, "not an HF model directory")


def _write_json(path: str, data: dict) -> None:
    fileio.atomic_write_json(path, data)


def _read_weights(directory: str) -> tuple[dict, str]:
    """(name -> array, the file it came from), preferring safetensors over pickles."""
    single = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.isfile(single):
        return _read_safetensors(single), single
    index = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} is corrupt (no weight_map)")
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_safetensors(os.path.join(directory, shard)))
        return state, index
    pickle = os.path.join(directory, TORCH_FILE)
    if os.path.isfile(pickle):
        return _read_torch(pickle), pickle
    raise UserError(f"no weights in {directory}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {TORCH_FILE}")


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise UserError(f"{path} is missing")
    try:
        state = {}
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                if f.get_slice(name).get_dtype() == "BF16":
                    state[name] = _read_bf16(path, name)
                else:
                    state[name] = f.get_tensor(name)
        return state
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({_one_line(str(e))})") from None


def _read_bf16(path: str, name: str) -> np.ndarray:
    # safetensors' numpy backend cannot represent bfloat16; its Flax backend can (via ml_dtypes).
    from safetensors import safe_open

    with safe_open(path, framework="flax") as f:
        return np.asarray(f.get_tensor(name))


def _read_torch(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path} is a PyTorch pickle and torch is not installed: pip install torch, or convert it to "
            f"{SAFETENSORS_FILE} (aigc_jax never unpickles without torch.load(weights_only=True))"
        ) from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise, not the user's problem
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        raise UserError(
            f"{path} holds more than tensors, and torch.load(weights_only=True) refused it ({reason}); "
            f"re-save its state dict as {SAFETENSORS_FILE} where you trust it"
        ) from None
    except Exception as e:  # RuntimeError, EOFError, … for truncated or foreign files
        raise UserError(f"{path} is corrupt ({_one_line(str(e))})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a state dict (got {type(state).__name__})")
    return state


def _one_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), "unknown error")


def _unpickler_reason(message: str) -> str:
    # torch wraps the reason in advice to retry with weights_only=False, i.e. to run the file's code: keep the reason.
    boilerplate = ("Weights only load failed", "Check the documentation")
    reasons = [line.strip().rpartition("WeightsUnpickler error:")[2].strip() for line in message.splitlines()
               if line.strip() and not line.strip().startswith(boilerplate)]
    return "; ".join(r for r in reasons if r) or "not a plain state dict"
