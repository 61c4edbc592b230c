"""`aigc-jax <command> …` (also `python -m aigc_jax`): wires subsystems together, holds no logic of its own.

Each subsystem module listed in COMMANDS defines `register(subparsers)`, which adds its sub-commands and sets
`func` on them. Errors the user can fix arrive as `UserError` and become one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from aigc_jax import compile_cache
from aigc_jax.errors import UserError

COMMANDS = [
    "aigc_jax.commands.info",  # info
    "aigc_jax.commands.train",  # train, eval
    "aigc_jax.commands.demo",  # demo
    "aigc_jax.commands.generate",  # generate
    "aigc_jax.commands.convert",  # convert
    "aigc_jax.commands.serve",  # serve
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


if __name__ == "__main__":
    sys.exit(main())
