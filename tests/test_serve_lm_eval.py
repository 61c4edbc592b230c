"""lm-evaluation-harness scores a model through the server: its `local-completions` model sends token ids with
`echo` + `logprobs` (+ one generated token) and reads the prompt log-probabilities back. A small multiple-choice
task written here must score exactly as the project's own evaluation (the train/eval loss of the same text)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from serve_util import ROOT

from aigc_jax import api
from aigc_jax.train.step import loss_sums

DOCS = [
    {"question": "The cat sat on the", "choices": [" mat", " moon", " idea"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " blue", " seven hundred"], "answer": 0},
    {"question": "Water boils at one hundred degrees", "choices": [" Celsius", " tomorrow", " north"], "answer": 0},
    {"question": "The opposite of hot is", "choices": [" cold", " seventeen", " loud"], "answer": 0},
    {"question": "Paris is the capital of", "choices": [" France", " soup", " Tuesday"], "answer": 0},
    {"question": "Q: What do bees make?\nA:", "choices": [" honey", " bricks", " rain"], "answer": 0},
]

TASK = """task: aigc_serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def own_loglikelihood(lm, context: str, continuation: str) -> float:
    """log p(continuation | context) from the project's evaluation step (minus the masked next-token loss)."""
    ctx, cont = lm.encode(context), lm.encode(context + continuation)[len(lm.encode(context)):]
    ids = ctx + cont
    mask = np.zeros((1, len(ids) - 1), np.float32)
    mask[0, len(ctx) - 1:] = 1.0  # the predictions of the continuation's tokens
    nll, _ = loss_sums(lm.generator.params, {"tokens": jnp.asarray([ids]), "loss_mask": jnp.asarray(mask)},
                       lm.generator.config)
    return -float(nll)


def test_lm_eval_local_completions_equals_own_evaluation(served, serve_model, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")  # lm-eval's tokenizer for the requests
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "aigc_serve_mc.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "out"
    model_args = (f"base_url={served.url}/v1/completions,model=tiny-gpt2,tokenizer={serve_model},"
                  "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=4,max_retries=1,timeout=120")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "aigc_serve_mc", "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
         "--batch_size", "1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["aigc_serve_mc"]
    samples = [json.loads(line) for line in next(out.rglob("samples_aigc_serve_mc_*.jsonl")).read_text().splitlines()]
    assert len(samples) == len(DOCS)

    lm = api.load(str(serve_model))
    correct = []
    for s in samples:
        # Each sample's requests are (context, continuation) pairs; lm-eval's answers are (loglikelihood, greedy).
        pairs = [tuple(a[:2]) for a in _arguments(s)]
        theirs = [float(r[0][0]) if isinstance(r[0], list) else float(r[0]) for r in s["resps"]]
        ours = [own_loglikelihood(lm, c, x) for c, x in pairs]
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
        correct.append(float(int(np.argmax(ours)) == s["doc"]["answer"]))
    assert results["acc,none"] == pytest.approx(np.mean(correct), abs=1e-9)


def _arguments(sample):
    """The (context, continuation) arguments of each request of a logged sample (lm-eval logs them as a dict
    {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, …} or as lists, depending on the version)."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [[a["arg_0"], a["arg_1"]] for a in args.values()]
    return args
