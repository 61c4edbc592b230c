"""`aigc-jax <command> …` (also `python -m aigc_jax`): wires subsystems together, holds no logic of its own.

Each subsystem module listed in COMMANDS defines `register(subparsers)`, which adds its sub-commands and sets
`func` on them. Errors the user can fix arrive as `UserError` and become one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

from aigc_jax import compile_cache
from aigc_jax.errors import UserError

COMMANDS = [
    "aigc_jax.train.cli",  # train, eval
    "aigc_jax.demo",  # demo
    "aigc_jax.decode.cli",  # generate
    "aigc_jax.interop.cli",  # convert
    "aigc_jax.serve.cli",  # serve
]


class _Parser(argparse.ArgumentParser):
    # argparse already prints a one-line usage error and exits 2; keep that, but point at --help.
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aigc-jax", description="GPT-2- and Llama-family language models in JAX: train, evaluate, generate.")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not read or write JAX's persistent compilation cache (see aigc_jax/compile_cache.py)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _register_info(sub)
    for name in COMMANDS:
        if importlib.util.find_spec(name.rpartition(".")[0]) and importlib.util.find_spec(name):
            importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_closed_event_loop()
    compile_cache.enable(disabled=args.no_compile_cache)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"aigc-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aigc-jax {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_closed_event_loop() -> None:
    """A failed orbax restore closes its asyncio loop while tensorstore reads are still in flight; each late
    callback then reports "RuntimeError: Event loop is closed" as an unraisable exception, burying the one-line
    error under tracebacks. Drop exactly those; every other unraisable exception still reaches the old hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_aigc_quiet", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._aigc_quiet = True
    sys.unraisablehook = hook


def _register_info(sub) -> None:
    from aigc_jax.configs import add_model_args

    p = sub.add_parser("info", help="show a model config, its size and FLOPs; optionally run one forward pass")
    add_model_args(p)
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: n_positions)")
    p.add_argument("--forward", action="store_true", help="initialise random weights and run one forward pass")
    p.set_defaults(func=_info)


def _info(args) -> int:
    import jax
    import jax.numpy as jnp

    from aigc_jax import configs, model

    cfg = configs.model_config(args.model, args.config, configs.parse_assignments(args.set))
    seq_len = cfg.n_positions if args.seq_len is None else args.seq_len
    if not 1 <= seq_len <= cfg.n_positions:
        raise UserError(f"--seq-len must be in [1, n_positions={cfg.n_positions}], got {seq_len}")
    out = {
        "config": cfg.to_dict(),
        "params": model.param_count(cfg),
        "flops_per_token": model.flops_per_token(cfg, seq_len),
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
    }
    if args.forward:
        params = model.init_params(cfg, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (2, min(seq_len, cfg.n_positions)), 0, cfg.vocab_size)
        logits, _ = jax.jit(lambda p, t: model.forward(p, t, cfg))(params, tokens)
        out["forward"] = {"logits_shape": list(logits.shape), "logits_dtype": str(logits.dtype),
                          "mean_loss_vs_uniform": float(-jnp.mean(jax.nn.log_softmax(logits)[..., : cfg.vocab_size]))}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
