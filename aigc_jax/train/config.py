"""Training configuration: one frozen dataclass; every knob documented where it is defined."""

from __future__ import annotations

import dataclasses

from aigc_jax.configs import from_dict
from aigc_jax.errors import ConfigError
from aigc_jax.parallel import LAYOUTS

# Fields that may change when an interrupted run is re-launched in the same workdir: they do not change
# the numbers a finished run produces up to the step it reached (steps lets you extend a run).
RESUMABLE_CHANGES = frozenset(
    {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_batches", "sample_every",
     "mfu_peak_tflops", "progress", "halt_after_nonfinite", "parallel", "mesh", "wandb_project", "wandb_mode"}
)


SCHEDULES = ("cosine", "wsd", "constant")
WANDB_MODES = ("", "online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 16  # global sequences per optimizer step, over all devices and micro-batches
    seq_len: int = 0  # tokens per sequence; 0 = the model's n_positions
    grad_accum: int = 1  # micro-batches per step: each device runs batch_size / devices / grad_accum rows at once
    lr: float = 6e-4  # peak learning rate
    schedule: str = "cosine"  # after warmup: cosine (decay to the floor) | wsd (stable, then linear decay) | constant
    min_lr_ratio: float = 0.1  # cosine and wsd end at lr * min_lr_ratio (the floor)
    warmup_steps: int = 100  # linear warmup from 0
    decay_steps: int = 0  # schedule length including warmup; 0 = steps (so growing --steps stretches cosine)
    decay_fraction: float = 0.2  # wsd: the last fraction of the schedule length decays linearly to the floor
    weight_decay: float = 0.1  # AdamW decoupled decay, applied to "kernel" and "embedding" leaves only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 0  # params init, dropout and data order all derive from it
    shift_windows: bool = True  # each epoch after the first reads the text at a new seeded offset (data/batches.py)
    parallel: str = "auto"  # auto (pmap on a data-only mesh, else mesh) | pmap | shard_map | mesh (global-view jit)
    mesh: str = ""  # "data=D,fsdp=F,tensor=T" (omitted axes = 1); empty = every device on data (aigc_jax/sharding.py)
    checkpoint_every: int = 500  # also at the end and on SIGTERM/SIGINT; 0 = only those
    keep_checkpoints: int = 3  # the last K are kept
    eval_every: int = 250  # 0 = never during training
    eval_batches: int = 20  # validation batches per periodic eval; 0 = a complete pass
    log_every: int = 10
    sample_every: int = 0  # generate a few samples every N steps (and at the end when > 0)
    halt_after_nonfinite: int = 5  # a non-finite loss/grad skips the update; this many in a row halts the run
    mfu_peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look up the device in the built-in table
    progress: bool = True  # a tqdm bar when stderr is a terminal (plain lines otherwise); False: plain lines always
    wandb_project: str = ""  # log to this Weights & Biases project (needs `pip install wandb`); "" = no W&B
    wandb_mode: str = ""  # online | offline (no network; `wandb sync` later) | disabled; "" = $WANDB_MODE or online

    def __post_init__(self):
        positive = ("steps", "batch_size", "grad_accum", "log_every", "halt_after_nonfinite", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "seq_len", "warmup_steps", "decay_steps", "checkpoint_every", "eval_every", "eval_batches",
                     "sample_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0 and train.eps > 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.parallel not in ("auto", *LAYOUTS):
            raise ConfigError(f"train.parallel must be one of auto, {', '.join(LAYOUTS)}, got {self.parallel!r}")
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"train.wandb_mode must be one of online, offline, disabled, got {self.wandb_mode!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")

    @property
    def total_decay_steps(self) -> int:
        return self.decay_steps or self.steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return from_dict(cls, data, "train.")
