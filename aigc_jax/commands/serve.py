"""`aigc-jax serve`: the OpenAI-compatible server (uvicorn + app.py over engine.py)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
import time

from aigc_jax.commands import add_weights_args
from aigc_jax.errors import UserError

API_KEY_ENV = "AIGC_JAX_API_KEY"


HELP = "serve a model over an OpenAI-compatible HTTP API (continuous batching)"
DESCRIPTION = (
    "Serves /v1/completions, /v1/chat/completions, /v1/models and /health. Requests join the "
    "running decode batch as slots free up. There is no authentication unless --api-key is given: keep the "
    "default loopback --host, or put the server behind one that authenticates."
)


def register(sub) -> None:
    p = sub.add_parser("serve", help=HELP, description=DESCRIPTION)
    add_weights_args(p, "serve", needs=" (with a tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="decode slots: sequences generated at once")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait for a slot; beyond it requests get 429 with Retry-After")
    p.add_argument("--chunk", type=int, default=4,
                   help="decode steps per device call (tokens are streamed, and slots refilled, between calls)")
    p.add_argument("--max-prefill", type=int, default=4, help="prompts prefilled per device call")
    p.add_argument("--mesh", metavar="data=D,fsdp=F,tensor=T",
                   help="serve on a device mesh: weights and KV-cache heads split over tensor, the slots over "
                   "data x fsdp (omitted axes = 1; the product must equal the device count)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template (default: the model's own, if it has one)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: SRC's basename)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds SIGTERM/SIGINT waits for running requests before ending them")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted (413 beyond)")
    p.add_argument("--no-warmup", action="store_true",
                   help="compile programs on first use instead of before listening")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a runtime model key: dtype, attention (repeatable)")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_batch", "max_queue", "chunk", "max_prefill"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.grace >= 0:
        raise UserError(f"--grace must be >= 0 seconds, got {args.grace}")
    if not args.max_body_mb > 0:
        raise UserError(f"--max-body-mb must be > 0, got {args.max_body_mb}")


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the (slow) model load so a taken port is a one-line error at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _stop_when_engine_dies(engine, http) -> None:
    """A server whose engine failed (say, compiling during warm-up) stops rather than answer 503 forever."""
    while not http.should_exit:
        if not engine.alive:
            http.should_exit = True
            return
        time.sleep(0.5)


class _WarmupReport:
    """Compile progress on stderr: a line every few seconds and one when serving starts."""

    def __init__(self, every_s: float = 5.0):
        self.t0 = self.shown = time.perf_counter()
        self.every_s = every_s

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total:
            print(f"aigc-jax serve: ready: {total} programs compiled in {now - self.t0:.1f} s", file=sys.stderr,
                  flush=True)
        elif now - self.shown >= self.every_s:
            self.shown = now
            print(f"aigc-jax serve: compiling programs {done}/{total} ({now - self.t0:.0f} s)", file=sys.stderr,
                  flush=True)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from aigc_jax import api, chat, configs

    api.check_source(args.model, args.random_init)
    overrides = configs.parse_assignments(args.set)
    if "scan_layers" in overrides:
        raise UserError("--set scan_layers does not apply to serving (decoding always runs unrolled layers)")
    template = chat.read_template_file(args.chat_template) if args.chat_template else None
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.mesh is not None:
        from aigc_jax.decode import mesh as decode_mesh

        args.mesh = decode_mesh.resolve(args.mesh)  # a bad --mesh is an error before the (slow) model load
    sock = _listen(args.host, args.port)
    try:
        return _serve(args, sock, api, chat, overrides, template, api_key)
    finally:
        sock.close()


def _serve(args, sock, api, chat, overrides, template, api_key) -> int:
    import uvicorn

    from aigc_jax.prompts import Prompter
    from aigc_jax.serve.app import create_app
    from aigc_jax.serve.engine import Engine
    from aigc_jax.serve.server import Server

    lm = api.load(args.model, overrides=overrides, random_init=args.random_init)
    if lm.tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer (tokenizer.json or vocab.json + merges.txt) to serve text")
    if template is None and os.path.isdir(args.model):
        template = chat.load_template(args.model)  # e.g. a GPT-2 dir with vocab.json + merges.txt and a template
    # The offline API's prompt path, so served prompts, chat renderings and stop ids are what `generate` uses.
    prompts = Prompter(lm.tokenizer, chat_template=template)
    engine = Engine(lm.config, lm.params, eos_ids=prompts.stop_ids, max_batch=args.max_batch,
                    max_queue=args.max_queue, chunk=args.chunk, max_prefill=args.max_prefill, mesh=args.mesh).start()
    try:
        name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
        server = Server(engine, prompts, name, api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20),
                        aliases=(args.model,))
        host, port = sock.getsockname()[:2]
        if not _is_loopback(args.host) and api_key is None:
            print(f"aigc-jax serve: warning: listening on {args.host} without authentication (no --api-key)",
                  file=sys.stderr)
        warming = "" if args.no_warmup else "; compiling its programs first (/health says 'warming' until then)"
        print(f"aigc-jax serve: {name} on http://{host}:{port}/v1 ({args.max_batch} slots){warming}",
              file=sys.stderr, flush=True)
        if not args.no_warmup:
            # The engine thread compiles every program before it serves; requests that come meanwhile wait.
            engine.warmup(progress=_WarmupReport(), wait=False)
        config = uvicorn.Config(create_app(server), log_level=args.log_level, lifespan="off",
                                timeout_graceful_shutdown=args.grace, access_log=False)
        # uvicorn drains on SIGTERM/SIGINT (stops listening, waits up to --grace for running requests) and then
        # re-raises the signal to the handler it found. Let that be a no-op, so a drained server exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        http = uvicorn.Server(config)
        threading.Thread(target=_stop_when_engine_dies, args=(engine, http), daemon=True).start()
        http.run(sockets=[sock])
    finally:
        engine.close()
    if engine.error is not None:
        print(f"aigc-jax serve: the engine failed: {engine.error!r}", file=sys.stderr)
        return 1
    return 0
