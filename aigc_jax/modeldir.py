"""Where trained weights live on disk, and one loader for every kind of model source.

Three kinds of source, told apart by their files:

- **model dir** (inference/export format, written by `convert --from-hf`): `model.json` (the
  model config), `params.safetensors` (flattened "h_0/attn/c_attn/kernel" keys, unrolled layout, padded vocab),
  `tokenizer.json`.
- **training workdir** (written by `aigc-jax train`): `run.json`, `model.json`, `tokenizer.json` and orbax
  checkpoints under `checkpoints/` (aigc_jax/checkpoints.py); the latest checkpoint's params are loaded.
- **HF dir**: `config.json` with model_type gpt2, llama, qwen2 or mistral plus weights (aigc_jax/interop/hf.py).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from aigc_jax import checkpoints, configs, fileio, model
from aigc_jax import tokenizers as tok
from aigc_jax.errors import UserError
from aigc_jax.interop import hf

MODEL_FILE = "model.json"
PARAMS_FILE = "params.safetensors"


def save_config(directory: str, config) -> None:
    os.makedirs(directory, exist_ok=True)
    fileio.atomic_write_json(os.path.join(directory, MODEL_FILE), config.to_dict())


def load_config(directory: str):
    data = fileio.read_json(os.path.join(directory, MODEL_FILE), f"{directory} is not an aigc_jax model dir or workdir")
    return configs.config_from_dict(data, "model.")


def save_model_dir(directory: str, config, params, tokenizer: tok.Tokenizer | None) -> None:
    """Writes the inference format; params in either layer layout are stored unrolled."""
    params = model.match_layout(params, config.replace(scan_layers=False))
    # C order: safetensors writes an array's buffer as it lies, so a transposed view would be stored transposed.
    flat = {k: np.ascontiguousarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    os.makedirs(directory, exist_ok=True)
    fileio.atomic_save(os.path.join(directory, PARAMS_FILE), lambda tmp: save_file(flat, tmp))
    save_config(directory, config)
    if tokenizer is not None:
        tokenizer.save(directory)


def load_model_dir(directory: str):
    """(config, params, tokenizer or None) from a model dir; params in the layout the config asks for."""
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
    return config, model.match_layout(params, config), _maybe_tokenizer(directory)


def load_workdir(workdir: str, step: int | None = None, sharding=None):
    """(config, params, tokenizer or None) from a training workdir's latest (or given) checkpoint."""
    config = load_config(workdir)
    params, _ = checkpoints.restore_params(workdir, config, step, sharding)
    return config, params, _maybe_tokenizer(workdir)


def check_params(params, config, where: str) -> None:
    """Raises a one-line UserError if `params` do not have exactly the shapes `config` implies."""
    expected = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
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
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _maybe_tokenizer(directory: str) -> tok.Tokenizer | None:
    """The directory's tokenizer, None if it has no tokenizer files; a corrupt one is an error, not None."""
    if not any(os.path.exists(os.path.join(directory, f)) for f in (tok.FILE, "vocab.json", "encoder.json")):
        return None
    return tok.load(directory)


def kind(src: str) -> str:
    """"hf", "model_dir" or "workdir" for a directory; a one-line error for anything else."""
    if not os.path.exists(src) and src in configs.PRESETS:
        raise configs.preset_is_not_weights(src, f"train it from random weights with --model {src}")
    if not os.path.exists(src):
        raise UserError(f"model source {src} does not exist (expected a model dir, a training workdir or an HF model dir)")
    if not os.path.isdir(src):
        raise UserError(f"model source {src} is a file; pass its directory")
    if os.path.isfile(os.path.join(src, PARAMS_FILE)):
        return "model_dir"
    if os.path.isfile(os.path.join(src, MODEL_FILE)):
        if any(os.path.exists(os.path.join(src, f)) for f in (checkpoints.CHECKPOINTS, checkpoints.RUN_FILE)):
            return "workdir"
        if not os.path.isfile(os.path.join(src, hf.CONFIG_FILE)):
            raise UserError(f"{src} has {MODEL_FILE} but no {PARAMS_FILE} file (model dir) or checkpoints/ "
                            "(training workdir): restore the weights file or point at the directory holding them")
    if os.path.isfile(os.path.join(src, hf.CONFIG_FILE)):
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
        return load_workdir(src)
    return hf.load_hf_dir(src)
