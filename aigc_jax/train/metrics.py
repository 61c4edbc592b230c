"""Metrics sinks (JSONL always, TensorBoard when tensorboardX is installed) and the MFU peak table."""

from __future__ import annotations

import json
import math
import os

import jax

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
    """Appends one JSON object per line to workdir/metrics.jsonl; mirrors scalars to TensorBoard if available."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                pass

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v
