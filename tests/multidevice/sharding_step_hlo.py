"""test_sharding: compiles a tiny GPT-2's train step on MESH (argv) for its HLO dump (XLA_FLAGS name the dump
directory); prints how many weight kernels the model has."""

import json
import sys

import jax
import jax.numpy as jnp

from aigc_jax import configs, sharding
from aigc_jax.train import layout, optimizer
from aigc_jax.train.config import TrainConfig


def main(argv):
    mesh = argv[0]
    cfg = configs.get_preset("tiny").replace(n_head=8, n_embd=64)
    tc = TrainConfig(batch_size=16, seq_len=32, mesh=mesh, parallel="mesh")
    lay = layout.Layout.resolve(tc, cfg)
    abstract, shardings = lay.abstract_state(optimizer.make(tc), 0, cfg)
    split = sharding.batch_sharding(lay.mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((16, 33), jnp.int32, sharding=split),
             "loss_mask": jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=split)}
    step = lay.train_step(shardings, model_config=cfg, train_config=tc, optimizer=optimizer.make(tc))
    step.lower(abstract, batch).compile()
    print(json.dumps({"kernels": cfg.n_layer * 4}))


if __name__ == "__main__":
    main(sys.argv[1:])
