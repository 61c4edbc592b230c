"""`aigc-jax generate`: prompts (or, with --chat, a conversation) in, continuations out (plain text, streamed text,
or JSON lines)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading

from aigc_jax.commands import add_weights_args
from aigc_jax.errors import UserError

CLI_MAX_NEW_TOKENS = 64  # for a model whose generation_config.json does not say
# Flag -> GenerationConfig field, for the flags passed on only when given (the model's defaults fill the rest).
_KNOBS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
          "num_beams", "num_return_sequences", "length_penalty", "early_stopping", "seed")


HELP = "generate text: greedy, sampling (--temperature), or beam search (--num-beams)"
DESCRIPTION = (
    "Continues each prompt with the model. Decoding runs on device (one compiled loop per "
    "shape bucket) and matches HF transformers' generate token for token. Decoding settings not given here "
    "come from the model's generation_config.json as HF reads it (e.g. Llama 3 Instruct samples with "
    "temperature 0.6, top-p 0.9 and HF's top-k 50); a model without one decodes greedily, as HF does."
)


def register(sub) -> None:
    p = sub.add_parser("generate", help=HELP, description=DESCRIPTION)
    add_weights_args(p, "run")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="F", help="a UTF-8 file with one prompt per line (blank lines skipped)")
    _add_chat_args(p)
    _add_decoding_args(p)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text before this string and stop generating (repeatable)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the model's EOS ids (<|endoftext|>, …)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (each prompt's samples depend only on it); default: a fresh one, reported")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per sequence: {"prompt", "text", "token_ids"}, with "seed" when sampling '
                   'and "sequence" (its number) with --num-return-sequences')
    p.add_argument("--logprobs", action="store_true",
                   help='--json also gives "logprobs": each generated token\'s log-probability under the model '
                   "(its log-softmax, before temperature, penalty or filtering)")
    p.add_argument("--stream", action="store_true", help="print text as it is produced, every --chunk tokens")
    p.add_argument("--chunk", type=int, default=16, help="tokens per streamed chunk")
    p.add_argument("--parallel", default="none", choices=["none", "pmap", "shard_map"],
                   help="split the batch of prompts over all devices")
    p.add_argument("--mesh", metavar="data=D,fsdp=F,tensor=T",
                   help="decode on a device mesh: weights and KV-cache heads split over tensor, prompts over "
                   "data x fsdp (omitted axes = 1; the product must equal the device count)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a runtime model key: dtype, attention, scan_layers (repeatable)")
    p.set_defaults(func=run)


def _add_chat_args(p) -> None:
    chat = p.add_argument_group("chat (the model's chat template, rendered as HF's apply_chat_template)")
    chat.add_argument("--chat-template", metavar="FILE",
                      help="a Jinja chat template to use instead of the model's own (as `serve --chat-template`)")
    chat.add_argument("--chat", action="store_true", help="generate the assistant's reply to a conversation given "
                      "by --messages or --system/--user/--assistant (prints the reply only)")
    chat.add_argument("--messages", metavar="F", help='JSON lines, one {"role": ..., "content": ...} per line '
                      "('-' = stdin); implies --chat")
    for role in ("system", "user", "assistant"):
        chat.add_argument(f"--{role}", metavar="TEXT", action=_Message, dest="conversation", default=[],
                          help=f"a {role} message, in order with the others (repeatable); implies --chat")


def _add_decoding_args(p) -> None:
    """The decoding settings; those not given come from the model's generation_config.json."""
    model_default = "default: the model's generation_config.json, else "
    p.add_argument("--max-new-tokens", type=int, default=None, help=model_default + str(CLI_MAX_NEW_TOKENS))
    p.add_argument("--min-new-tokens", type=int, default=None, help="end-of-text is suppressed before this many "
                   "tokens")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"> 0 samples, 0 = greedy ({model_default}greedy; --top-k/--top-p/--min-p alone sample at 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than this fraction of the most likely one's probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 discourages tokens already in the prompt or the output, as HF's (1 = off)")
    p.add_argument("--num-beams", type=int, default=None, help="> 1: beam search (deterministic)")
    p.add_argument("--num-return-sequences", type=int, default=None, metavar="N",
                   help="N continuations per prompt: N samples, or the N best beams (needs --num-beams >= N)")
    p.add_argument("--length-penalty", type=float, default=None, help="beam score = log-prob / length ** this")
    p.add_argument("--early-stopping", default=None, choices=["true", "false", "never"],
                   help="beam search stopping rule, as HF's early_stopping")


class _Message(argparse.Action):
    """--system/--user/--assistant append to one list, so the conversation keeps the order they were given in."""

    def __call__(self, parser, namespace, value, option_string=None):
        getattr(namespace, self.dest).append({"role": option_string.lstrip("-"), "content": value})


def _conversation(args: argparse.Namespace) -> list[dict] | None:
    """The messages of --chat, or None without it."""
    if not (args.chat or args.messages or args.conversation):
        return None
    if args.prompt or args.prompts_file:
        raise UserError("--chat takes its conversation from --messages or --system/--user; "
                        "drop --prompt/--prompts-file")
    if args.messages and args.conversation:
        raise UserError("give the conversation either as --messages FILE or as --system/--user flags, not both")
    if not args.messages:
        if not args.conversation:
            raise UserError("--chat needs a conversation: --user TEXT (and optionally --system TEXT), "
                            "or --messages FILE")
        return args.conversation
    try:
        if args.messages == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.messages, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --messages {args.messages}: {e}") from None
    messages = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                messages.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"--messages {args.messages} line {n} is not JSON ({e})") from None
    return messages


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
    from aigc_jax import chat as chat_templates

    messages = _conversation(args)
    prompts = _prompts(args) if messages is None else [""]
    if args.chat_template and messages is None:
        raise UserError("--chat-template applies to --chat: give the conversation with --user/--system or --messages")
    template = chat_templates.read_template_file(args.chat_template) if args.chat_template else None
    _check_output_flags(args)
    knobs = _knobs(args)
    # Flag errors before the (slow) model load (assuming sampling where the model's defaults may decide it);
    # errors that need the model's defaults or the tokenizer come after it.
    from aigc_jax.decode import GenerationConfig

    GenerationConfig(**{"temperature": 1.0, **knobs}).check(n_positions=2**31 - 1, vocab_size=2**31 - 1)
    lm = api.load(args.model, parallel=args.parallel, overrides=configs.parse_assignments(args.set), mesh=args.mesh,
                  random_init=args.random_init)
    if lm.tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer (tokenizer.json or vocab.json + merges.txt) to encode text")
    if template is not None:
        lm.use_chat_template(template)
    if "max_new_tokens" not in knobs and "max_new_tokens" not in lm.generation_defaults:
        knobs["max_new_tokens"] = CLI_MAX_NEW_TOKENS
    if args.no_eos:
        knobs["eos_ids"] = ()
    gen = lm.config_for(**knobs)
    ids = [lm.encode(p) for p in prompts] if messages is None else [lm.chat_prompt(messages)]
    if args.stream:
        if gen.strategy_kind == "beam":
            raise UserError("--stream works with greedy decoding and sampling, not beam search (its best beam changes)")
        knobs["seed"] = gen.seed  # a fresh seed was drawn unless --seed was given: every prompt uses the same one
        for i, prompt in enumerate(prompts):
            print(("\n" if i else "") + prompt, end="", flush=True)
            for piece in lm.stream(ids[i], chunk=args.chunk, **{**knobs, "eos_ids": gen.eos_ids}):
                print(piece, end="", flush=True)
            print(flush=True)
        _report_seed(args, gen)
        return 0
    n = gen.num_return_sequences
    with _said_if_slow("compiling the decoding programs for these prompt and token-count buckets (kept in the "
                       "compile cache for the next run), then decoding ..."):
        results = lm.complete(ids, gen)
    for i, c in enumerate(results):
        if args.json:
            head = {"prompt": prompts[c.prompt]} if messages is None else {"messages": messages}
            row = {**head, **({"sequence": i % n} if n > 1 else {}), "text": c.text, "token_ids": c.ids}
            row.update({"logprobs": c.logprobs} if args.logprobs else {})
            row.update({"seed": gen.seed} if gen.is_sampling else {})
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(("\n" if i else "") + prompts[c.prompt] + c.text)
    sys.stdout.flush()
    _report_seed(args, gen)
    return 0


def _check_output_flags(args) -> None:
    if args.stream and args.json:
        raise UserError("--stream prints text as it comes; --json prints whole results: choose one")
    if args.logprobs and not args.json:
        raise UserError("--logprobs is part of the --json output: add --json")
    if args.stream and args.num_return_sequences not in (None, 1):
        raise UserError("--stream prints one sequence per prompt: drop --num-return-sequences")
    if args.chunk < 1:
        raise UserError(f"--chunk must be >= 1, got {args.chunk}")


def _knobs(args) -> dict:
    """The GenerationConfig fields the flags set (only those given: the model's defaults fill the rest)."""
    knobs = {k: getattr(args, k) for k in _KNOBS if getattr(args, k) is not None}
    if "early_stopping" in knobs:
        knobs["early_stopping"] = {"true": True, "false": False}.get(knobs["early_stopping"], "never")
    if args.stop:
        knobs["stop_strings"] = tuple(args.stop)
    if args.logprobs:
        knobs["logprobs"] = True
    return knobs


def _report_seed(args, gen) -> None:
    if args.seed is None and gen.is_sampling and not args.json:  # --json carries it in every line
        print(f"seed {gen.seed} (pass --seed {gen.seed} to reproduce these samples)", file=sys.stderr)


@contextlib.contextmanager
def _said_if_slow(what: str, after_s: float = 5.0):
    """Says on stderr what a wait is once it has lasted `after_s` (a first call of new shapes compiles)."""
    timer = threading.Timer(after_s, lambda: print(f"aigc-jax generate: {what}", file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
