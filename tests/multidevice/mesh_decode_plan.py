"""test_mesh_decode: the collectives of the compiled decode loop on data=2,fsdp=2,tensor=2 (and of a control that
reorders beams by global rows), and memory_report / placed bytes per device on each of MESHES (argv: JSON)."""

import json
import re
import sys

import numpy as np

from aigc_jax import sharding
from aigc_jax.decode import Generator, generate, memory_report
from aigc_jax.models.cache import KVCache
from multidevice.mesh_common import BEAM, GREEDY, PROMPTS, tiny

# A collective "moves the cache" when its result has the cache's slot dimension: S = P + N = 16 + 32 = 48, a size
# no other array of this model has (n_positions 64, width 64, 8 heads of 8, vocabulary 128 = 64/32/16 per shard).
S = 48
COLLECTIVE = re.compile(r"= (\S+|\(.*?\)) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                        r"(-start)?\(")


def collectives(gen, g):
    hlo = gen.lower(PROMPTS, g, program="run").compile().as_text()
    found = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m:
            dims = [int(d) for shape in re.findall(r"\[([0-9,]*)\]", m.group(1)) for d in shape.split(",") if d]
            found.append((m.group(2), m.group(1), S in dims))
    return {"n": len(found), "cache": [f"{op} {shape}" for op, shape, cache in found if cache]}


def global_gather(self, idx_GxJ):  # the control: beams reordered by global row numbers
    G, J = idx_GxJ.shape
    return self.gather((np.arange(G)[:, None] * (self.pos.shape[0] // G) + idx_GxJ).reshape(G * J))


def main(argv):
    meshes = json.loads(argv[0])
    cfg, params = tiny("gpt2")
    greedy = GREEDY.replace(max_new_tokens=32 - 4)  # bucket N = 32, so S = 48
    beam = BEAM.replace(max_new_tokens=32 - 4)
    out = {"hlo": {}}
    gen = Generator(cfg, params, mode="mesh", mesh="data=2,fsdp=2,tensor=2")
    out["hlo"]["greedy"], out["hlo"]["beam"] = collectives(gen, greedy), collectives(gen, beam)

    KVCache.gather_groups = global_gather
    generate._PROGRAMS.clear()  # compiled programs are shared between Generators: trace the control afresh
    out["hlo"]["control"] = collectives(Generator(cfg, params, mode="mesh", mesh="data=2,fsdp=2,tensor=2"), beam)

    out["report"] = {m: memory_report(cfg, m, batch=8, prompt_len=10, new_tokens=20) for m in meshes}
    out["placed"] = {m: sharding.bytes_per_device(Generator(cfg, params, mode="mesh", mesh=m).params)
                     for m in meshes}
    out["beams"] = memory_report(cfg, "tensor=8", batch=3, prompt_len=10, new_tokens=20, num_beams=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
