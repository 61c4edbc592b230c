"""test_train_step: 10 steps of pmap and shard_map on 1 and 8 devices; losses and every 97th parameter per run."""

import json
import sys

import jax
import numpy as np

from aigc_jax.train.config import TrainConfig
from helpers.train_step import batch, run_steps


def main(argv=None):
    cfg = TrainConfig(steps=10, batch_size=16, seq_len=16, lr=3e-3, warmup_steps=2)
    batches = [batch(s, 16) for s in range(10)]
    out = {}
    for mode in ("pmap", "shard_map"):
        for n in (1, 8):
            state, losses = run_steps(mode, jax.devices()[:n], 10, cfg, batches)
            flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])
            out[f"{mode}{n}"] = {"losses": losses, "params": flat[::97].tolist()}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
