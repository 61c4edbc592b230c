"""HF transformers checkpoints <-> aigc_jax: config, weights and tokenizer, in both directions, for every
family in aigc_jax/models/registry.py (config.json's model_type picks it). Each family's folder holds its name
map, layouts, config translation and refusals (models/<family>/hf.py); reading and writing directories is here.

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
from aigc_jax.errors import UserError
from aigc_jax.models import registry

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "encoder.json")
MAX_SHARD_BYTES = 5 * 10**9  # larger exports are split into shards of at most this many bytes ("5GB")


def config_from_hf(d: dict):
    """A config.json dict -> its family's config; one-line UserError for anything we don't implement."""
    family = registry.for_hf(d.get("model_type"))
    if family is None:
        raise UserError(f"model_type is {d.get('model_type')!r}; supported model types: "
                        f"{', '.join(registry.hf_model_types())}")
    return family.hf.config_from_hf(d)


def config_to_hf(config, tokenizer: tok.Tokenizer | None = None, dtype: str = "float32") -> dict:
    """The config.json that makes the family's HF class compute what our Decoder computes; the special token ids
    come from `tokenizer`. Refuses, by name, what that class cannot represent."""
    return registry.for_config(config).hf.export_config(config, tokenizer, dtype)


# ---------------------------------------------------------------------------------------------------------
# Weights


def _expected_shapes(config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our unrolled parameter paths and shapes, read off the model itself so the mapping cannot drift from it."""
    tree = jax.eval_shape(lambda: model.init_params(config.replace(scan_layers=False), jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def params_from_hf(state: dict, config):
    """HF weights -> params in the layout `config` asks for."""
    conversion = registry.for_config(config).hf
    state = conversion.import_state({k: _to_numpy(v) for k, v in state.items()}, config)
    flat = {}
    for path, shape in _expected_shapes(config).items():
        name = conversion.hf_name(path)
        if name not in state:
            raise UserError(f"weight {name} is missing from the checkpoint (config.json says "
                            f"{conversion.missing_hint(config)})")
        w = conversion.from_hf(path, state.pop(name), shape, config)
        # C order: a transposed view would reach safetensors (model dirs) as its raw, transposed buffer.
        flat[path] = np.ascontiguousarray(w.astype(_np_dtype(config.param_dtype)))
    unexpected = sorted(k for k in state if not conversion.ignored(k))
    if unexpected:
        raise UserError(
            f"unexpected weight {unexpected[0]} in the checkpoint ({len(unexpected)} in all): "
            f"not a {conversion.architecture(config)} matching config.json"
        )
    return model.match_layout(traverse_util.unflatten_dict(flat), config)


def to_hf_state_dict(params, config, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Params (either layout) -> HF state dict, vocab padding dropped; a tied LM head is stored once, as HF's
    safetensors files store it (transformers re-ties it on load)."""
    out_dtype = _np_dtype(dtype)
    flat = traverse_util.flatten_dict(model.match_layout(params, config.replace(scan_layers=False)))
    state = registry.for_config(config).hf.to_hf_state(flat, config)
    return {name: np.ascontiguousarray(w.astype(out_dtype)) for name, w in state.items()}


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
    hf_config = config_to_hf(config, tokenizer, dtype)  # before any file is written: it may refuse
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    written = _save_weights(path, to_hf_state_dict(params, config, dtype), max_shard_bytes) | {CONFIG_FILE}
    _write_json(os.path.join(path, CONFIG_FILE), hf_config)
    if tokenizer is not None:
        written |= registry.for_config(config).hf.save_tokenizer(path, tokenizer, config.n_positions)
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
