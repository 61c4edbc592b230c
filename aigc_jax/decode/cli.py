"""`aigc-jax generate`: prompts in, continuations out (plain text, streamed text, or JSON lines)."""

from __future__ import annotations

import argparse
import json
import sys

from aigc_jax.errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text: greedy (--temperature 0), sampling, or beam search (--num-beams)",
        description="Continues each prompt with the model. Decoding runs on device (one compiled loop per "
        "shape bucket) and matches HF transformers' generate token for token.",
    )
    p.add_argument("--model", required=True, metavar="SRC",
                   help="aigc_jax model dir, training workdir, or HF GPT-2 dir; or a preset name for random weights")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="F", help="a UTF-8 file with one prompt per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0, help="end-of-text is suppressed before this many tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1: sampling)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (deterministic)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob / length ** this")
    p.add_argument("--early-stopping", default="false", choices=["true", "false", "never"],
                   help="beam search stopping rule, as HF's early_stopping")
    p.add_argument("--no-eos", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (each prompt's samples depend only on it); default: a fresh one, reported")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per prompt: {"prompt", "text", "token_ids", "seed"}')
    p.add_argument("--stream", action="store_true", help="print text as it is produced, every --chunk tokens")
    p.add_argument("--chunk", type=int, default=16, help="tokens per streamed chunk")
    p.add_argument("--parallel", default="none", choices=["none", "pmap", "shard_map"],
                   help="split the batch of prompts over all devices")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a runtime model key: dtype, attention, scan_layers (repeatable)")
    p.set_defaults(func=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line for line in f.read().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts-file {args.prompts_file}: {e}") from None
    if not prompts:
        if args.prompts_file:
            raise UserError(f"--prompts-file {args.prompts_file} has no prompts (it is empty or all blank lines); "
                            "write one prompt per line")
        raise UserError("give at least one --prompt TEXT or a --prompts-file")
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty: give at least one character of text")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"prompt {i} is not valid UTF-8 text: pass it in a UTF-8 locale or via a UTF-8 "
                            "--prompts-file") from None
    return prompts


def run(args: argparse.Namespace) -> int:
    from aigc_jax import api, configs

    prompts = _prompts(args)
    if args.stream and args.json:
        raise UserError("--stream prints text as it comes; --json prints whole results: choose one")
    if args.stream and args.num_beams > 1:
        raise UserError("--stream works with greedy decoding and sampling, not beam search (its best beam changes)")
    if args.chunk < 1:
        raise UserError(f"--chunk must be >= 1, got {args.chunk}")
    knobs = dict(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams, length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False}.get(args.early_stopping, args.early_stopping), seed=args.seed,
    )
    # Flag errors before the (slow) model load; token-count errors need the tokenizer and come after it.
    from aigc_jax.decode import GenerationConfig

    GenerationConfig(**knobs).check(n_positions=2**31 - 1, vocab_size=2**31 - 1)
    lm = api.load(args.model, parallel=args.parallel, overrides=configs.parse_assignments(args.set))
    if lm.tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer (tokenizer.json or vocab.json + merges.txt) to encode text")
    if args.no_eos:
        knobs["eos_ids"] = ()
    gen = lm.config_for(**knobs)
    knobs["seed"] = gen.seed  # a fresh seed was drawn unless --seed was given: every prompt uses the same one
    ids = [lm.encode(p) for p in prompts]
    if args.stream:
        for i, prompt in enumerate(prompts):
            print(("\n" if i else "") + prompt, end="", flush=True)
            for piece in lm.stream(ids[i], chunk=args.chunk, **{**knobs, "eos_ids": gen.eos_ids}):
                print(piece, end="", flush=True)
            print(flush=True)
        _report_seed(args, gen)
        return 0
    outputs = lm.generator.generate(ids, gen)
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        text = lm.decode(lm.strip_eos(out, gen.eos_ids))
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": out, "seed": gen.seed}, ensure_ascii=False))
        else:
            print(("\n" if i else "") + prompt + text)
    sys.stdout.flush()
    _report_seed(args, gen)
    return 0


def _report_seed(args, gen) -> None:
    if args.seed is None and gen.strategy_kind == "sample" and not args.json:  # --json carries it in every line
        print(f"seed {gen.seed} (pass --seed {gen.seed} to reproduce these samples)", file=sys.stderr)
