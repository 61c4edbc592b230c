"""Where trained weights live on disk, and one loader for every kind of model source.

Three kinds of source, told apart by their files:

- **model dir** (inference/export format, written by `convert --from-hf` and at the end of training):
  `model.json` (the ModelConfig), `params.safetensors` (flattened "h_0/attn/c_attn/kernel" keys, unrolled
  layout, padded vocab), `tokenizer.json`.
- **training workdir**: `model.json`, `tokenizer.json` and orbax checkpoints under `checkpoints/` (see
  aigc_jax/train/checkpoint.py); the latest checkpoint's params are loaded.
- **HF dir**: `config.json` with model_type gpt2, llama, qwen2 or mistral plus weights (see aigc_jax/interop/hf.py).
"""

from __future__ import annotations

import json
import os

import numpy as np

from aigc_jax import configs
from aigc_jax import tokenizers as tok
from aigc_jax.errors import UserError

MODEL_FILE = "model.json"
PARAMS_FILE = "params.safetensors"


def save_config(directory: str, config: configs.ModelConfig) -> None:
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(os.path.join(directory, MODEL_FILE), json.dumps(config.to_dict(), indent=2) + "\n")


def load_config(directory: str) -> configs.ModelConfig:
    data = read_json(os.path.join(directory, MODEL_FILE), f"{directory} is not an aigc_jax model dir or workdir")
    return configs.config_from_dict(data, "model.")


def read_json(path: str, missing_hint: str) -> dict:
    """A JSON object from `path`, or a one-line UserError naming the file (missing, corrupt, not an object)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {missing_hint}") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path} is corrupt ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is corrupt (expected a JSON object)")
    return data


def save_model_dir(directory: str, config: configs.ModelConfig, params, tokenizer: tok.Tokenizer | None) -> None:
    """Writes the inference format; params in either layer layout are stored unrolled."""
    from flax import traverse_util
    from safetensors.numpy import save_file

    from aigc_jax.model import match_layout

    params = match_layout(params, config.replace(scan_layers=False))
    # C order: safetensors writes an array's buffer as it lies, so a transposed view would be stored transposed.
    flat = {k: np.ascontiguousarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, PARAMS_FILE + ".tmp")
    save_file(flat, tmp)
    os.replace(tmp, os.path.join(directory, PARAMS_FILE))
    save_config(directory, config)
    if tokenizer is not None:
        tokenizer.save(directory)


def load_model_dir(directory: str):
    """(config, params, tokenizer or None) from a model dir; params in the layout the config asks for."""
    from flax import traverse_util
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from aigc_jax.model import match_layout

    config = load_config(directory)
    path = os.path.join(directory, PARAMS_FILE)
    try:
        flat = load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({e})") from None
    params = traverse_util.unflatten_dict(flat, sep="/")
    check_params(params, config.replace(scan_layers=False), path)
    return config, match_layout(params, config), _maybe_tokenizer(directory)


def check_params(params, config: configs.ModelConfig, where: str) -> None:
    """Raises a one-line UserError if `params` do not have exactly the shapes `config` implies."""
    import jax

    from aigc_jax.model import init_params

    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    exp_flat = _shapes(expected)
    got_flat = _shapes(params)
    if exp_flat != got_flat:
        missing = sorted(set(exp_flat) - set(got_flat))
        extra = sorted(set(got_flat) - set(exp_flat))
        wrong = sorted(k for k in set(exp_flat) & set(got_flat) if exp_flat[k] != got_flat[k])
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"{wrong[0]} has shape {got_flat[wrong[0]]}, expected {exp_flat[wrong[0]]}")
        raise UserError(f"{where}: weights do not match the model config ({detail})")


def _shapes(tree) -> dict:
    from flax import traverse_util

    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _maybe_tokenizer(directory: str) -> tok.Tokenizer | None:
    """The directory's tokenizer, None if it has no tokenizer files; a corrupt one is an error, not None."""
    if not any(os.path.exists(os.path.join(directory, f)) for f in (tok.FILE, "vocab.json", "encoder.json")):
        return None
    return tok.load(directory)


def kind(src: str) -> str:
    """"hf", "model_dir" or "workdir" for a directory; a one-line error for anything else."""
    if not os.path.exists(src):
        raise UserError(f"model source {src} does not exist (expected a model dir, a training workdir or an HF model dir)")
    if not os.path.isdir(src):
        raise UserError(f"model source {src} is a file; pass its directory")
    if os.path.isfile(os.path.join(src, PARAMS_FILE)):
        return "model_dir"
    if os.path.isfile(os.path.join(src, MODEL_FILE)):
        if any(os.path.exists(os.path.join(src, f)) for f in ("checkpoints", "run.json")):
            return "workdir"  # see aigc_jax/train/checkpoint.py
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise UserError(f"{src} has {MODEL_FILE} but no {PARAMS_FILE} file (model dir) or checkpoints/ "
                            "(training workdir): restore the weights file or point at the directory holding them")
    if os.path.isfile(os.path.join(src, "config.json")):
        return "hf"
    raise UserError(
        f"{src} is not a model: expected {PARAMS_FILE} + {MODEL_FILE} (model dir), {MODEL_FILE} + checkpoints/ "
        "(training workdir) or config.json + weights (HF model dir)"
    )


def load_any(src: str):
    """(config, params, tokenizer or None) from a model dir, a training workdir or an HF model dir."""
    k = kind(src)
    if k == "model_dir":
        return load_model_dir(src)
    if k == "workdir":
        from aigc_jax.train import checkpoint

        return checkpoint.load_inference(src)
    from aigc_jax.interop import hf

    return hf.load_hf_dir(src)


def check_output_dir(path: str, flag: str) -> None:
    """An output directory must not be a file or lie under one (makedirs would fail after work was done)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, not a directory; choose another {flag}")


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
