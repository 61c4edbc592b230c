"""Training: per-device steps (step.py), optax optimizer (optimizer.py), orbax checkpoints (aigc_jax/checkpoints.py),
run preparation (prepare.py), the loop (loop.py), recording (record.py, metrics.py), validation (evaluate.py) and
the CLI (cli.py). Importing this package does not import tfds."""

from aigc_jax.train.config import TrainConfig
from aigc_jax.train.step import TrainState, eval_step, init_state, loss_sums, train_step

__all__ = ["TrainConfig", "TrainState", "eval_step", "init_state", "loss_sums", "train_step"]
