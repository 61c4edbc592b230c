"""test_mesh_decode: the serving Engine on one device and on MESH (argv), 14 sequences for 8 slots (greedy with and
without logprobs, seeded samples) and a scored prompt: tokens and logprobs per key; and the slots error."""

import json
import sys
import threading

from aigc_jax.serve.engine import Engine
from aigc_jax.serve.sequences import Sampling, Scored, Sequence, Tokens
from multidevice.mesh_common import error, rng, tiny


def main(argv):
    mesh_arg = argv[0]
    cfg, params = tiny("gpt2")
    prompts = [rng.integers(0, 61, n).tolist() for n in (3, 7, 1, 12, 5, 20, 9, 2, 30, 4)]

    def serve(mesh):
        tokens, logprobs, done, lock = {}, {}, threading.Semaphore(0), threading.Lock()

        def emitter(key):
            def emit(event):
                with lock:
                    if isinstance(event, Tokens):
                        tokens.setdefault(key, []).extend(event.ids)
                        logprobs.setdefault(key, []).extend(event.logprobs or [])
                    elif isinstance(event, Scored):  # a prompt's log-probabilities (echo)
                        logprobs[key] = event.logprobs
                        tokens[key] = [[i for i, _ in top] for top in event.top]
                        done.release()
                    else:
                        done.release()
            return emit

        with Engine(cfg, params, eos_ids=(7,), max_batch=8, chunk=4, max_prefill=2, mesh=mesh) as engine:
            seqs = [Sequence(p, 15, emitter(f"greedy{i}"), logprobs=i % 3 == 0) for i, p in enumerate(prompts)]
            seqs += [Sequence(p, 15, emitter(f"sample{i}"), sampling=Sampling(temperature=0.9, top_k=20, seed=4))
                     for i, p in enumerate(prompts[:4])]
            engine.submit(seqs)  # 14 sequences for 8 slots: some join while others decode
            engine.score(prompts[8], emitter("score"))
            for _ in range(len(seqs) + 1):
                assert done.acquire(timeout=300), "a sequence did not finish"
        return {"tokens": tokens, "logprobs": logprobs}

    slots_error = error(lambda: Engine(cfg, params, max_batch=6, mesh="data=4,tensor=2"))
    print(json.dumps({"one": serve(None), "mesh": serve(mesh_arg), "slots_error": slots_error}))


if __name__ == "__main__":
    main(sys.argv[1:])
