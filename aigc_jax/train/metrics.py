"""Metrics sinks (JSONL and TensorBoard always, Weights & Biases when asked for) and the MFU peak table."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import time

import jax

from aigc_jax import fileio
from aigc_jax.errors import UserError

WANDB_ID_FILE = "wandb-id"

# Dense bf16 peak TFLOP/s per device (vendor datasheets, no sparsity). Override with train.mfu_peak_tflops.
PEAK_TFLOPS = {
    "a100": 312.0,
    "h100": 989.0,
    "h200": 989.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,  # v5e
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v6 lite": 918.0,  # v6e
}


def peak_flops_per_device(override_tflops: float = 0.0, device=None) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (MFU is then not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None


def eval_summary(nll_sum: float, tokens: float, bytes_per_token: float | None) -> dict:
    """loss (nats/token), perplexity and bits per byte (loss / ln 2 / bytes-per-token) from summed NLL."""
    loss = nll_sum / max(tokens, 1.0)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
    if bytes_per_token:
        out["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return out


class MetricsWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl (each with a unix `time`); mirrors the scalars to
    TensorBoard (workdir/tb) and, when a `wandb_project` is given, to Weights & Biases."""

    def __init__(self, workdir: str, enabled: bool = True, wandb_project: str = "", wandb_mode: str = "",
                 run_config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = self._tb = self._wandb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._file = open(self.path, "a")
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            if wandb_project:
                self._wandb = _wandb_run(workdir, wandb_project, wandb_mode, run_config)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}
        for tag, v in scalars.items():
            self._tb.add_scalar(tag, v, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def check_tracking(wandb_project: str) -> None:
    """Before anything is written: a tracker that was asked for must be importable."""
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--set wandb_project={wandb_project} needs Weights & Biases, which is not installed: "
                        "pip install wandb")


def _wandb_run(workdir: str, project: str, mode: str, run_config: dict | None):
    """A W&B run that a resumed training run continues: its id is kept in WORKDIR/wandb-id. `mode` "" leaves the
    choice to wandb (WANDB_MODE, else online); "offline" needs no network (`wandb sync` uploads later)."""
    import wandb

    id_file = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B's own id helper moved between releases; any [a-z0-9] string works
        fileio.atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", dir=workdir, mode=mode or None,
                      name=os.path.basename(os.path.abspath(workdir)), config=run_config)


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v
