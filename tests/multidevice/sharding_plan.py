"""test_sharding: per-device memory of the compiled train step of a GPT-2 on five 8-device meshes (and whether it
all-gathers); then a grouped-query Llama's train step and decode programs compiled on two meshes, whose stderr
the test reads for XLA's "involuntary full rematerialization"."""

import json
import sys

import jax
import jax.numpy as jnp

from aigc_jax import configs, sharding
from aigc_jax.decode import memory_report
from aigc_jax.train import layout, optimizer
from aigc_jax.train.config import TrainConfig


def main(argv=None):
    # Two layers, not the baby's six: every layer's leaves are split alike, so more layers only add compile time; the
    # test's bounds leave room only for the partly split leaves (one MLP matrix left whole overshoots them 6x).
    cfg = configs.get_preset("baby").replace(n_layer=2, n_head=8, n_embd=256, vocab_size=1024)
    out = {}
    for mesh in ("data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4"):
        tc = TrainConfig(batch_size=16, seq_len=64, mesh=mesh)
        opt = optimizer.make(tc)
        lay = layout.Layout.resolve(tc.__class__(**{**tc.to_dict(), "parallel": "mesh"}), cfg)
        abstract, shardings = lay.abstract_state(opt, 0, cfg)
        # Leaves not split over every device: norms and biases (whole or over tensor only), GPT-2's position table
        # (embed over fsdp only: positions have no tensor rule).
        n = lay.mesh.shape["fsdp"] * lay.mesh.shape["tensor"]
        partly_split = sum(sharding.bytes_per_device(x) for x in jax.tree.leaves(abstract.params)
                           if sharding.bytes_per_device(x) * n > x.size * x.dtype.itemsize)
        step = lay.train_step(shardings, model_config=cfg, train_config=tc, optimizer=opt)
        split = sharding.batch_sharding(lay.mesh)
        batch = {"tokens": jax.ShapeDtypeStruct((16, 65), jnp.int32, sharding=split),
                 "loss_mask": jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=split),
                 "stop": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=split)}
        compiled = step.lower(abstract, batch).compile()
        hlo = compiled.as_text()
        out[mesh] = {**layout.memory_plan(compiled, abstract), "partly_split": partly_split,
                     "all_gather": "all-gather" in hlo}
    # A grouped-query Llama with an untied head: train step and decode programs compile without XLA's "involuntary
    # full rematerialization" (the test reads this process's stderr).
    llama = configs.get_preset("llama-tiny").replace(n_head=8, n_kv_head=4, head_dim=8, n_embd=64)
    for mesh in ("data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4"):
        layout.plan(llama, TrainConfig(batch_size=16, seq_len=32, mesh=mesh), optimizer.make(TrainConfig()))
        memory_report(llama, mesh, batch=8, prompt_len=16, new_tokens=16)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
