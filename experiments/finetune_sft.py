"""Supervised fine-tuning on prompt→completion JSONL with the prompt masked out of the loss, shown on a small task
this script generates, with the exact-match accuracy of greedy completions before and after.

Tasks (words are random lowercase strings of 3-8 letters; test words never occur in training):
    upper    "word: hello\\nupper:" -> " HELLO"
    reverse  "word: hello\\nreverse:" -> " olleh"
    cipher   "word: hello\\ncode:" -> the word through a fixed secret letter substitution (a tiny "translation")

    # start from the checkpoint of experiments/shakespeare_char.py --variant cpu-small (a character model)
    python experiments/finetune_sft.py --init-from runs/experiments/shakespeare_char_cpu_small --task upper
    python experiments/finetune_sft.py --init-from random --task upper      # same shape, random weights

The JSONL goes through aigc_jax's loader (`--data FILE.jsonl`): each example is prompt + completion + <|endoftext|>,
one per row, and only the completion and the end-of-text token are in the loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time

import common

TASKS = ("upper", "reverse", "cipher")
_LABELS = {"upper": "upper", "reverse": "reverse", "cipher": "code"}


def cipher_table(seed: int = 1234) -> dict[str, str]:
    letters = list(string.ascii_lowercase)
    shuffled = letters[:]
    random.Random(seed).shuffle(shuffled)
    return dict(zip(letters, shuffled))


def answer(task: str, word: str) -> str:
    if task == "upper":
        return word.upper()
    if task == "reverse":
        return word[::-1]
    if task == "cipher":
        table = cipher_table()
        return "".join(table[c] for c in word)
    from aigc_jax.errors import UserError

    raise UserError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")


def example(task: str, word: str) -> dict:
    return {"prompt": f"word: {word}\n{_LABELS[task]}:", "completion": " " + answer(task, word)}


def make_split(task: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test examples over distinct random words, deterministic in `seed`."""
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n_train + n_test:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return [example(task, w) for w in words[:n_train]], [example(task, w) for w in words[n_train:]]


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Writes the rows, leaving an identical existing file untouched (its cached tokens stay valid)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def exact_match(lm, rows: list[dict], max_new_tokens: int = 12) -> tuple[float, list[dict]]:
    """Percentage of prompts whose greedy completion (up to end-of-text) equals the expected completion exactly."""
    outs = lm.generate([r["prompt"] for r in rows], max_new_tokens=max_new_tokens, temperature=0)
    graded = [{**r, "output": o, "correct": o == r["completion"]} for r, o in zip(rows, outs)]
    return 100.0 * sum(g["correct"] for g in graded) / len(graded), graded


def parse_args(argv=None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--init-from", required=True, metavar="SRC",
                   help="a model dir, training workdir or HF GPT-2 dir to fine-tune; or 'random' for random weights "
                        "of the shakespeare_char cpu-small shape")
    p.add_argument("--task", choices=TASKS, default="upper")
    p.add_argument("--train-examples", type=int, default=4000)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    common.add_common_args(p, "finetune_sft")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from aigc_jax import api, configs
    from aigc_jax import tokenizers as tok
    from aigc_jax.model import init_params
    from aigc_jax.train import loop
    from aigc_jax.train.config import TrainConfig

    name = f"finetune_sft_{args.task}_" + ("random" if args.init_from == "random" else "pretrained")
    workdir, results_dir = common.default_dirs(args, name)
    train_rows, test_rows = make_split(args.task, args.train_examples, args.test_examples)
    data_files = workdir.rstrip("/") + ".data"  # beside the workdir (not in results: they are regenerated exactly)
    train_file = os.path.join(data_files, "train.jsonl")
    write_jsonl(train_file, train_rows)
    write_jsonl(os.path.join(data_files, "test.jsonl"), test_rows)

    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                               warmup_steps=max(1, args.steps // 10), min_lr_ratio=0.1, beta2=0.99, weight_decay=0.1,
                               eval_every=max(1, args.steps // 5), eval_batches=0, checkpoint_every=0, log_every=5)
    if args.init_from == "random":
        import shakespeare_char

        # The shape of the shakespeare_char cpu-small model; the vocabulary is the task's characters + end-of-text.
        model_config, _ = shakespeare_char.configs_for("cpu-small", None, [], jax.default_backend())
        model_config, train_config = common.apply_overrides(model_config, train_config, args.set)
        tokenizer_dir = workdir.rstrip("/") + ".tokenizer"
        tok.char_level(string.ascii_letters + " \n:").save(tokenizer_dir)
        run = loop.prepare(workdir, model_config, train_config, train_file, args.data_dir, tokenizer_dir)
        before_lm = api.LM(run.model_config, init_params(run.model_config, jax.random.key(train_config.seed)),
                           run.tokenizer)  # exactly the weights the run starts from
    else:
        # The source's architecture and runtime settings; this recipe fine-tunes without dropout, plus any --set.
        from aigc_jax.commands.train import split_overrides

        model_over, train_over = split_overrides(args.set)
        train_config = configs.with_overrides(train_config, train_over, "train.")
        run = loop.prepare(workdir, None, train_config, train_file, args.data_dir, init_from=args.init_from,
                           model_overrides={"dropout": 0.0, "attn_dropout": 0.0, **model_over})
        before_lm = api.load(args.init_from)

    before, _ = exact_match(before_lm, test_rows)
    print(f"{name}: exact match before fine-tuning {before:.1f}% on {len(test_rows)} held-out words", flush=True)
    t0 = time.perf_counter()
    result = common.train_timed(run)
    after, graded = exact_match(api.load(workdir), test_rows)
    print(f"{name}: exact match after {result['final_step']} steps {after:.1f}% "
          f"({time.perf_counter() - t0:.0f} s of training and evaluation)", flush=True)
    summary = {
        "experiment": name, "task": args.task, "init_from": args.init_from,
        "exact_match_before": before, "exact_match_after": after, "test_examples": len(test_rows),
        "train_examples": len(train_rows), **result,
        "examples_after": graded[:8],
        "model": run.model_config.to_dict(), "train": run.train_config.to_dict(), "machine": common.machine(),
    }
    common.write_results(results_dir, summary, workdir)
    common.plot_curves({name: common.read_metrics(workdir)}, os.path.join(results_dir, "loss.png"),
                       f"{name}: completion loss; exact match {before:.0f}% -> {after:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
