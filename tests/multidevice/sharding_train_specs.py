"""test_sharding: trains every spec of ARGS["specs"] into ARGS["root"]/<name> on ARGS["text"] (argv: ARGS as JSON).
A spec with "resume_from" first copies that (already trained) workdir to its own and resumes it there.

Adam's eps is 1e-4 and decay_steps=4: see the comment above `_train` in test_sharding.py."""

import json
import shutil
import sys

from aigc_jax import compile_cache, configs
from aigc_jax.train import loop
from aigc_jax.train.config import TrainConfig


def main(argv):
    args = json.loads(argv[0])
    # As `aigc-jax train` does: specs that compile the same program (the same mesh and model twice) read it back.
    compile_cache.enable()
    for s in args["specs"]:
        mcfg = configs.with_overrides(configs.get_preset(s["preset"]), {**s["model"], "scan_layers": s["scan"]},
                                      "model.")
        tc = TrainConfig(steps=s["steps"], batch_size=16, seq_len=16, grad_accum=s["accum"], lr=1e-2, warmup_steps=0,
                         decay_steps=4, eps=1e-4, eval_every=0, checkpoint_every=s.get("checkpoint_every", 0),
                         log_every=1, progress=False, mesh=s["mesh"])
        workdir = f"{args['root']}/{s['name']}"
        if s.get("resume_from"):
            shutil.copytree(f"{args['root']}/{s['resume_from']}", workdir)
        run = loop.prepare(workdir, mcfg, tc, args["text"], f"{args['root']}/data", "byte")
        loop.train(run, log=lambda *_: None)
    print(json.dumps({"done": len(args["specs"])}))


if __name__ == "__main__":
    main(sys.argv[1:])
