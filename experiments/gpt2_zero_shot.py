"""GPT-2 zero-shot language modelling (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners",
Table 3) for a local HF GPT-2 directory and local dataset files.

Published for the 117M model (the checkpoint released as "gpt2", 124M parameters counted with embeddings):
WikiText-2 ppl 29.41, PTB 65.85, WikiText-103 37.50, LAMBADA ppl 35.13 and accuracy 45.99%.

    python experiments/gpt2_zero_shot.py --model DIR --wikitext2 wiki.test.raw --ptb ptb.test.txt \
        --wikitext103 wiki.test.raw --lambada lambada_test.jsonl [--stride 512] [--max-length 1024]

Perplexity: HF's sliding-window method (huggingface.co/docs/transformers/perplexity): windows of `--max-length`
tokens every `--stride` tokens, each scoring only the tokens the previous window did not, so every token after the
first max-length ones sees at least max-length - stride tokens of context. Reported per token (exp of mean NLL
over BPE tokens) and per word (exp of total NLL / whitespace-separated words of the file as given). LAMBADA: the last
word (after the last space) is the target; accuracy = greedy decoding from the context reproduces every token of
" " + word (checked in one forward pass: the argmax at each target position is the target token); perplexity =
exp(mean over examples of the word's summed NLL). See experiments/README.md for how these relate to the paper.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence

import numpy as np

import common

# Radford et al. 2019, Table 3, row "117M".
PUBLISHED = {
    "wikitext2": {"word_ppl": 29.41},
    "ptb": {"word_ppl": 65.85},
    "wikitext103": {"word_ppl": 37.50},
    "lambada": {"ppl": 35.13, "acc": 45.99},
}
DETOKENIZERS = ("none", "wikitext", "ptb")


# ------------------------------------------------------------------------------------------------ scoring


class Scorer:
    """Next-token log-probabilities and greedy hits for batches of token rows, compiled once per length bucket.

    `score(rows)` -> for each row r of length n: (logp[n-1], hit[n-1]) where logp[t] = log p(r[t+1] | r[:t+1])
    and hit[t] = (argmax of that distribution == r[t+1]). Rows are right-padded, which a causal model ignores.
    """

    def __init__(self, config, params, batch_size: int = 8):
        import jax

        from aigc_jax.model import forward

        self.config, self.batch_size = config, batch_size
        self.params = jax.device_put(params)

        def score(params, tokens_BxT):
            import jax.numpy as jnp

            logits_BxTxV, _ = forward(params, tokens_BxT, config)
            logits_BxTxV = logits_BxTxV[:, :-1]
            nxt_BxT = tokens_BxT[:, 1:]
            logp_BxT = jnp.take_along_axis(jax.nn.log_softmax(logits_BxTxV), nxt_BxT[..., None], -1)[..., 0]
            return logp_BxT, jnp.argmax(logits_BxTxV, -1) == nxt_BxT

        self._fn = jax.jit(score)

    def _bucket(self, n: int) -> int:
        b = 16
        while b < n:
            b *= 2
        return min(b, self.config.n_positions)

    def score(self, rows: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        from aigc_jax.errors import UserError

        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i : i + self.batch_size]
            longest = max(len(r) for r in chunk)
            if longest > self.config.n_positions:
                raise UserError(f"a row of {longest} tokens exceeds the model's context of {self.config.n_positions}")
            T = self._bucket(longest)
            tokens = np.zeros((self.batch_size, T), np.int32)
            for b, r in enumerate(chunk):
                tokens[b, : len(r)] = r
            logp, hit = (np.asarray(x) for x in self._fn(self.params, tokens))
            out += [(logp[b, : len(r) - 1].astype(np.float64), hit[b, : len(r) - 1]) for b, r in enumerate(chunk)]
        return out


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """HF's perplexity windows over a stream of n tokens: (begin, end, first scored position) with
    tokens[begin:end] fed to the model and the targets tokens[first:end] scored (first >= begin + 1)."""
    if not 0 < stride <= max_length:
        from aigc_jax.errors import UserError

        raise UserError(f"--stride must be in [1, --max-length={max_length}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)  # a window's first token has no context inside it
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def sliding_window_nll(scorer: Scorer, ids: Sequence[int], max_length: int, stride: int) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of a token stream, HF's sliding-window method."""
    ids = list(ids)
    windows = sliding_windows(len(ids), max_length, stride)
    scores = scorer.score([ids[b:e] for b, e, _ in windows])
    nll, count = 0.0, 0
    for (begin, end, first), (logp, _) in zip(windows, scores):
        # logp[t] scores token begin + t + 1: the targets first..end-1 are logp[first-begin-1 : end-begin-1].
        nll -= float(logp[first - begin - 1 :].sum())
        count += end - first
    return nll, count


def last_word_scores(scorer: Scorer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[dict]:
    """For (context ids, target ids) pairs: the target's summed NLL, whether greedy decoding from the context
    yields exactly the target ids (argmax at every target position) and whether it yields the first one.
    Contexts longer than the model's window lose their oldest tokens."""
    rows, n_targets = [], []
    for ctx, tgt in pairs:
        keep = scorer.config.n_positions - len(tgt)
        rows.append((list(ctx)[-keep:] if keep > 0 else []) + list(tgt))
        n_targets.append(len(tgt))
    out = []
    for (logp, hit), k in zip(scorer.score(rows), n_targets):
        out.append({"nll": -float(logp[-k:].sum()), "tokens": k, "correct": bool(hit[-k:].all()),
                    "first_token_correct": bool(hit[-k])})
    return out


# ------------------------------------------------------------------------------------------------- text


def split_last_word(text: str) -> tuple[str, str]:
    """LAMBADA's task split: (context, " " + last word), the word being everything after the last space."""
    context, sep, word = text.strip().rpartition(" ")
    if not sep or not word:
        from aigc_jax.errors import UserError

        raise UserError(f"LAMBADA example has no space-separated last word: {text[:60]!r}")
    return context, " " + word


def read_lambada(path: str) -> list[str]:
    """Passages from a JSONL file with a "text" field per line (OpenAI's lambada_test.jsonl) or a text file with
    one passage per line."""
    from aigc_jax.errors import UserError

    if not os.path.isfile(path):
        raise UserError(f"--lambada {path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if path.endswith(".jsonl"):
        try:
            return [json.loads(ln)["text"] for ln in lines]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--lambada {path}: expected one JSON object with a 'text' field per line ({e})") from None
    return lines


def word_count(text: str) -> int:
    """Words as the file gives them: whitespace-separated tokens (the 'canonical units' of WikiText and PTB)."""
    return len(text.split())


def detokenize(text: str, kind: str) -> str:
    """Undo WikiText's or PTB's tokenization artifacts (the paper's "invertible de-tokenizers"; these are the common
    rules, not OpenAI's unreleased code)."""
    if kind == "wikitext":
        text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        for p in (":", ";", ".", "!", "?", ","):
            text = text.replace(f" {p} ", f"{p} ")
        text = re.sub(r"\(\s*([^)]*?)\s*\)", r"(\1)", text)
        text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
        text = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', text)
        text = re.sub(r"= = = =", "====", text).replace("= = =", "===").replace("= =", "==")
        text = text.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
        return text.replace(" \n", "\n").replace("\n ", "\n")
    if kind == "ptb":
        text = text.replace(" 's", "'s").replace(" n't", "n't").replace(" '", "'")
        return text.replace(" \n", "\n").replace("\n ", "\n")
    return text


def perplexity(scorer: Scorer, tokenizer, text: str, max_length: int, stride: int, detok: str = "none",
               prepend_eot: bool = True) -> dict:
    """Token- and word-level perplexity of a text; words are counted before de-tokenizing. With `prepend_eot`
    the stream starts with <|endoftext|> so its first real token is scored too."""
    words = word_count(text)
    ids = tokenizer.encode(detokenize(text, detok))
    if prepend_eot:
        ids = [tokenizer.eot_id] + ids
    nll, n = sliding_window_nll(scorer, ids, max_length, stride)
    return {"tokens": n, "words": words, "nll": nll, "token_ppl": math.exp(nll / n), "word_ppl": math.exp(nll / words),
            "max_length": max_length, "stride": stride, "detokenizer": detok, "prepend_eot": prepend_eot}


def lambada(scorer: Scorer, tokenizer, passages: Sequence[str]) -> dict:
    pairs = []
    for text in passages:
        context, target = split_last_word(text)
        pairs.append((tokenizer.encode(context), tokenizer.encode(target)))
    scores = last_word_scores(scorer, pairs)
    n = len(scores)
    return {
        "examples": n,
        "acc": 100.0 * sum(s["correct"] for s in scores) / n,
        "acc_first_token": 100.0 * sum(s["first_token_correct"] for s in scores) / n,
        "ppl": math.exp(sum(s["nll"] for s in scores) / n),
        "token_ppl": math.exp(sum(s["nll"] for s in scores) / sum(s["tokens"] for s in scores)),
    }


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--model", required=True, help="a local HF GPT-2 directory (or an aigc_jax model dir / workdir)")
    for name, what in (("wikitext2", "WikiText-2 test file (wiki.test.raw)"), ("ptb", "PTB test file (ptb.test.txt)"),
                       ("wikitext103", "WikiText-103 test file (wiki.test.raw)")):
        p.add_argument(f"--{name}", metavar="FILE", help=what)
    p.add_argument("--lambada", metavar="FILE", help="LAMBADA test passages (.jsonl with 'text', or one per line)")
    p.add_argument("--max-length", type=int, default=0, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=512, help="tokens between window starts (default 512)")
    p.add_argument("--no-detokenize", action="store_true", help="score WikiText/PTB files exactly as given")
    p.add_argument("--no-prepend-eot", action="store_true", help="do not start streams with <|endoftext|>")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="only the first N LAMBADA passages / N characters of a file")
    p.add_argument("--results-dir", default=None,
                   help="summary.json goes here (default: experiments/results/gpt2_zero_shot)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from aigc_jax import modeldir
    from aigc_jax.errors import UserError

    tasks = {k: getattr(args, k) for k in ("wikitext2", "ptb", "wikitext103", "lambada") if getattr(args, k)}
    if not tasks:
        raise UserError("name at least one dataset file: --wikitext2, --ptb, --wikitext103 or --lambada")
    config, params, tokenizer = modeldir.load_any(args.model)
    if tokenizer is None:
        raise UserError(f"--model {args.model} has no tokenizer files (vocab.json + merges.txt or tokenizer.json)")
    scorer = Scorer(config, params, args.batch_size)
    max_length = args.max_length or config.n_positions
    results = {}
    for task, path in tasks.items():
        t0 = time.perf_counter()
        if task == "lambada":
            passages = read_lambada(path)
            results[task] = lambada(scorer, tokenizer, passages[: args.limit] if args.limit else passages)
        else:
            if not os.path.isfile(path):
                raise UserError(f"--{task} {path}: no such file")
            with open(path, encoding="utf-8") as f:
                text = f.read()
            text = text[: args.limit] if args.limit else text
            detok = "none" if args.no_detokenize else ("ptb" if task == "ptb" else "wikitext")
            results[task] = perplexity(scorer, tokenizer, text, max_length, args.stride, detok,
                                       not args.no_prepend_eot)
        results[task].update(file=path, seconds=round(time.perf_counter() - t0, 1), published=PUBLISHED[task])
        print(task, json.dumps({k: v for k, v in results[task].items() if k != "published"}), flush=True)
    summary = {"experiment": "gpt2_zero_shot", "model": args.model, "results": results, "machine": common.machine(),
               "published_source": "Radford et al. 2019, Table 3, GPT-2 117M row"}
    common.write_results(args.results_dir or str(common.EXPERIMENTS / "results" / "gpt2_zero_shot"), summary)
    return 0


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
