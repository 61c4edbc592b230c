"""Driving `aigc-jax train` from tests: its arguments on the shared corpus, a background process, the final params
and a content snapshot of a directory."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
ROOT = Path(__file__).resolve().parents[2]

TINY = ["--model", "tiny", "--batch-size", "8", "--seq-len", "32", "--eval-every", "0", "--no-progress"]


def train_args(corpus, workdir, *extra):
    return ["train", *TINY, "--data", corpus["data"], "--data-dir", corpus["data_dir"], "--workdir", str(workdir),
            *extra]


def final_params(workdir) -> dict:
    from flax import traverse_util

    from aigc_jax.modeldir import load_workdir as load_inference

    _, params, _ = load_inference(str(workdir))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def popen_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "aigc_jax", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
