"""test_mesh_decode: greedy and beam ids of FAMILY on one device and on each of MESHES (argv: FAMILY, MESHES as
JSON); for gpt2 also sampled ids streamed on a mesh, and the one-line error for heads a mesh cannot split."""

import json
import sys

from aigc_jax.decode import Generator
from multidevice.mesh_common import BEAM, GREEDY, PROMPTS, SAMPLE, error, tiny


def main(argv):
    family, meshes = argv[0], json.loads(argv[1])
    cfg, params = tiny(family)
    decode = lambda gen: {"greedy": gen.generate(PROMPTS, GREEDY), "beam": gen.generate(PROMPTS, BEAM)}  # noqa: E731
    out = {"one": decode(Generator(cfg, params))}
    for m in meshes:
        out[m] = decode(Generator(cfg, params, mode="mesh", mesh=m))
    if family == "gpt2":
        # Sampling keys are per global row; streaming hands the (sharded, donated) state across calls.
        out["one"]["sample"] = Generator(cfg, params).generate(PROMPTS, SAMPLE)
        chunks = list(Generator(cfg, params, mode="mesh", mesh="data=2,fsdp=2,tensor=2").stream(PROMPTS, SAMPLE,
                                                                                                chunk=8))
        out["stream"] = [sum((c[i] for c in chunks), []) for i in range(len(PROMPTS))]
        out["heads_error"] = error(lambda: Generator(*tiny("gpt2", n_head=2), mode="mesh", mesh="data=2,tensor=4"))
    else:
        out["heads_error"] = error(lambda: Generator(*tiny("llama", n_head=8, n_kv_head=2), mode="mesh",
                                                     mesh="data=2,tensor=4"))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
