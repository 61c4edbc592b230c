"""Continuous batching: a fixed set of slots (rows of one KV cache) refilled with new sequences as others finish.

    submit() ─▶ waiting ─▶ (a slot frees) prefill into it ─▶ decode chunks with every other busy slot ─▶ events
    cancel() ─▶ the slot is freed at the next chunk boundary        score() ─▶ prompt log-probabilities (echo)

One thread owns the device: it admits waiting sequences into free slots (a few prefills per chunk while others
decode, so running streams keep flowing), runs a chunk of at most `chunk` decode steps for all slots, and hands
each sequence its new tokens through the sequence's `emit` callback. A chunk returns early when a slot finishes
while sequences wait, so a freed slot is refilled after one step, not after the chunk. Other threads (HTTP
handlers) only call `submit`, `cancel`, `score` and `close`, which go through a queue: the engine knows nothing
of HTTP and is tested on its own.

Shapes come from buckets (programs.py), so after `warmup()` serving compiles nothing; `stats()["compiles"]` says
how many executables were built. What the engine takes and reports (Sequence, Sampling, the events) is
sequences.py; its device programs are programs.py.

Over 300 lines because its one thread's schedule (admit, prefill, decode a chunk, emit, cancel, drain, shut down)
works on one shared state, which one class keeps in one place.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

import jax
import numpy as np

from aigc_jax.decode import mesh as decode_mesh
from aigc_jax.decode.sampling import Knobs
from aigc_jax.decode.step import for_decoding
from aigc_jax.errors import UserError
from aigc_jax.serve.programs import Programs, Schedule
from aigc_jax.serve.sequences import (CANCELLED, LENGTH, SHUTDOWN, STOP, EngineClosed, Finished, QueueFull,
                                      RequestError, Scored, Sequence, Tokens)

class Engine:
    """Serves one model with `max_batch` slots. Start with `start()` (or use as a context manager)."""

    def __init__(self, config, params, *, eos_ids=(), max_batch: int = 8, max_queue: int = 256, chunk: int = 4,
                 max_prefill: int = 4, poll_s: float = 0.05, mesh=None):
        """`mesh`: a (data, fsdp, tensor) mesh or "data=D,fsdp=F,tensor=T" to serve tensor-parallel with the slots
        split over data x fsdp (decode/mesh.py); None: one device."""
        if max_batch < 1 or max_queue < 1 or chunk < 1 or max_prefill < 1:
            raise UserError("max_batch, max_queue, chunk and max_prefill must be >= 1")
        config, params = for_decoding(config, params)
        self.config = config
        self.eos_ids = np.asarray(tuple(eos_ids) or (-1,), np.int32)  # -1: an id that never occurs
        self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, chunk
        self.max_prefill = min(max_prefill, max_batch)
        mesh = None if mesh is None else decode_mesh.resolve(mesh)
        self.programs = Programs(config, params, max_batch, chunk, self.max_prefill, mesh)
        self._poll_s = poll_s
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0  # sequences and score jobs submitted, not yet started (guarded by _lock)
        self._closing = False
        self._deadline = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # Engine-thread state.
        self._waiting: deque[Sequence] = deque()
        self._scores: deque = deque()
        self._slot_seq: list[Sequence | None] = [None] * max_batch
        self._slots = None
        self._counts = {"chunks": 0, "steps": 0, "prefills": 0, "scores": 0, "tokens": 0}
        self._warming: list[int] | None = None  # [programs compiled, programs to compile] during warm-up

    # -- life cycle ---------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._slots = self.programs.empty_slots()
        self._thread = threading.Thread(target=self._run, name="aigc-jax-engine", daemon=True)
        self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def close(self, grace_s: float = 0.0) -> None:
        """Stops taking work, lets running and waiting sequences finish for up to `grace_s` seconds, then ends the
        rest with Finished(SHUTDOWN) and stops the thread."""
        self._inbox.put(("close", time.monotonic() + grace_s))
        with self._lock:  # after the put: whoever sees `closing` knows the engine thread will read it
            self._closing = True
        if self._thread is not None:
            self._thread.join()

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine thread (a bug), if any."""
        return self._error

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the calls other threads make -------------------------------------------------------------------------------

    def check(self, prompt: list[int], max_tokens: int) -> None:
        """Raises RequestError unless `prompt` can be continued by `max_tokens` tokens (HF's rule: the last new
        token is never fed back, so prompt + max_tokens - 1 positions must fit the context)."""
        n, ctx, vocab = len(prompt), self.config.n_positions, self.config.vocab_size
        if n == 0:
            raise RequestError("the prompt is empty: give at least one token", "prompt")
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the model's vocabulary [0, {vocab})", "prompt")
        if n > ctx:
            raise RequestError(f"the prompt has {n} tokens, more than the model's context of {ctx} tokens", "prompt")
        if max_tokens < 0 or n + max_tokens - 1 > ctx:
            raise RequestError(f"the prompt has {n} tokens and max_tokens is {max_tokens}: together more than the "
                               f"model's context of {ctx} tokens (use max_tokens <= {ctx - n + 1})", "max_tokens")

    def submit(self, seqs: list[Sequence]) -> None:
        """Queues sequences (all or none). Raises UserError (bad prompt or budget), QueueFull or EngineClosed."""
        for s in seqs:
            self.check(s.prompt, s.max_tokens)
            if s.max_tokens < 1:
                raise RequestError("max_tokens must be >= 1 to generate (0 only scores the prompt)", "max_tokens")
        self._enqueue("submit", seqs, len(seqs))

    def score(self, prompt: list[int], emit: Callable) -> None:
        """Queues scoring of `prompt` (>= 1 token); `emit(Scored)` is called from the engine thread."""
        self.check(prompt, 0)
        self._enqueue("score", (list(prompt), emit), 1)

    def cancel(self, seq: Sequence) -> None:
        """Ends `seq` (waiting or running) at the next chunk boundary; it gets Finished(CANCELLED)."""
        seq.cancelled = True
        self._inbox.put(("wake", None))

    def stats(self) -> dict:
        busy = sum(s is not None for s in self._slot_seq)
        with self._lock:
            queued = self._queued
        warming = self._warming
        return {"slots": self.max_batch, "busy_slots": busy, "queued": queued, "compiles": self.programs.compiles,
                "closing": self._closing, "alive": self.alive, "warming": warming is not None,
                **({"warmup": {"compiled": warming[0], "programs": warming[1]}} if warming else {}), **self._counts}

    def _enqueue(self, kind: str, item, n: int) -> None:
        with self._lock:
            if self._closing or not self.alive:
                raise EngineClosed("the server is shutting down")
            if self._queued + n > self.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting (the limit is {self.max_queue})")
            self._queued += n
        self._inbox.put((kind, item))

    # -- warm-up ----------------------------------------------------------------------------------------------------

    def warmup(self, score: bool = True, progress: Callable[[int, int], None] | None = None,
               wait: bool = True) -> int:
        """Compiles every program and bucket serving can reach, on the engine thread before it serves anything
        (requests submitted meanwhile wait in the queue); `progress(done, total)` is called as programs finish.
        wait=False returns at once (stats() says "warming" until it is done). Returns the compile count."""
        done = threading.Event()
        self._warming = [0, 0]  # "warming" from now on, not from when the engine thread gets to it
        self._inbox.put(("warmup", (score, progress, done)))
        if not wait:
            return 0
        while not done.wait(0.5):
            if not self.alive:
                raise RuntimeError("the engine stopped during warm-up") from self._error
        return self.programs.compiles

    def _warmup(self, score: bool, progress) -> None:
        # XLA compiles outside the GIL: several programs at once use the cores a lone compile leaves idle.
        jobs = self.programs.warmup_jobs(self._slots, *self._knobs(np.zeros(self.max_batch, bool), False), score)
        self._warming = [0, len(jobs)]
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="aigc-jax-compile") as pool:
            for _ in as_completed([pool.submit(job) for job in jobs]):
                self._warming[0] += 1
                if progress is not None:
                    progress(*self._warming)
        self._warming = None

    # -- the engine thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                busy = any(s is not None for s in self._slot_seq)
                self._drain_inbox(block=not (busy or self._waiting or self._scores))
                if self._deadline is not None:
                    idle = not (busy or self._waiting or self._scores)
                    if idle or time.monotonic() >= self._deadline:
                        break
                self._drop_cancelled()
                self._run_scores()
                self._admit()
                if any(s is not None for s in self._slot_seq):
                    self._decode()
        except BaseException as e:  # a bug: every sequence learns it ended, and the server reports unhealthy
            self._error = e
            raise
        finally:
            with self._lock:
                self._closing = True
            self._end_all(SHUTDOWN)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self._poll_s) if block else self._inbox.get_nowait()
            while True:
                kind, payload = item
                if kind == "submit":
                    self._waiting.extend(payload)
                elif kind == "score":
                    self._scores.append(payload)
                elif kind == "close":
                    self._deadline = payload
                elif kind == "warmup":
                    score, progress, done = payload
                    self._warmup(score, progress)
                    done.set()
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _started(self, n: int = 1) -> None:
        with self._lock:
            self._queued -= n

    def _drop_cancelled(self) -> None:
        for i, seq in enumerate(self._slot_seq):
            if seq is not None and seq.cancelled:
                self._free(i, CANCELLED)
        kept = deque()
        for seq in self._waiting:
            if seq.cancelled:
                self._started()
                seq.emit(Finished(CANCELLED))
            else:
                kept.append(seq)
        self._waiting = kept

    def _free(self, i: int, reason: str) -> None:
        seq, self._slot_seq[i] = self._slot_seq[i], None
        seq.emit(Finished(reason))

    def _run_scores(self) -> None:
        # One per iteration while sequences decode (each is one forward of a whole prompt), all of them otherwise.
        busy = any(s is not None for s in self._slot_seq)
        for _ in range(min(len(self._scores), 1 if busy else len(self._scores))):
            prompt, emit = self._scores.popleft()
            self._started()
            P = self.programs.prefix_bucket(len(prompt))
            tokens = np.zeros((1, P), np.int32)
            tokens[0, : len(prompt)] = prompt
            lp, top_ids, top_lp = jax.device_get(self.programs.score(tokens))
            n = len(prompt)
            top = [list(zip(top_ids[0, j].tolist(), top_lp[0, j].tolist())) for j in range(n)]
            self._counts["scores"] += 1
            emit(Scored(logprobs=lp[0, : n - 1].tolist(), top=top))

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self._slot_seq) if s is None]
        busy = len(free) < self.max_batch
        # While others decode, admit one prefill batch per chunk (running streams keep their pace); else fill up.
        n = min(len(free), len(self._waiting), self.max_prefill if busy else len(free))
        if not n:
            return
        new = [self._waiting.popleft() for _ in range(n)]
        self._started(n)
        by_bucket: dict[int, list[Sequence]] = {}
        for seq in new:
            by_bucket.setdefault(self.programs.prefix_bucket(len(seq.prompt) - 1), []).append(seq)
        for P, group in by_bucket.items():
            for start in range(0, len(group), self.max_prefill):
                part = group[start:start + self.max_prefill]
                rows = [free.pop(0) for _ in part]
                self._prefill(P, part, rows)

    def _prefill(self, P: int, seqs: list[Sequence], rows: list[int]) -> None:
        b = self.programs.prefill_batch(len(seqs))
        tokens = np.zeros((b, P), np.int32)
        lengths, last = np.zeros(b, np.int32), np.zeros(b, np.int32)
        slot_rows = np.full(b, self.max_batch, np.int32)  # filler rows are dropped
        for j, (seq, row) in enumerate(zip(seqs, rows)):
            n = len(seq.prompt) - 1
            tokens[j, :n], lengths[j], last[j], slot_rows[j] = seq.prompt[:-1], n, seq.prompt[-1], row
            self._slot_seq[row] = seq
        self._slots = self.programs.prefill(self._slots, tokens, lengths, last, slot_rows)
        self._counts["prefills"] += 1

    def _knobs(self, active: np.ndarray, stop_early: bool) -> tuple[Knobs, Schedule]:
        """Each slot's sampling knobs and the chunk's schedule; rows without an active sequence get neutral values."""
        B, V = self.max_batch, self.config.vocab_size
        budget, step, greedy, use_eos = np.zeros(B, np.int32), np.zeros(B, np.int32), np.ones(B, bool), np.ones(B, bool)
        temperature, top_k = np.ones(B, np.float32), np.full(B, V, np.int32)
        top_p_threshold, seed, row = np.zeros(B, np.float32), np.zeros(B, np.uint32), np.zeros(B, np.int32)
        logprobs = False
        for i, seq in enumerate(self._slot_seq):
            if seq is None or not active[i]:
                continue
            s = seq.sampling
            budget[i], step[i] = seq.max_tokens - seq.generated, seq.generated
            greedy[i] = s.temperature == 0
            temperature[i] = s.temperature if s.temperature > 0 else 1.0
            top_k[i] = s.top_k if s.top_k > 0 else V
            # 1 - top_p in float64, as HF's Python float (sampling.make_knobs does the same).
            top_p_threshold[i] = np.float32(1.0 - float(s.top_p))
            seed[i], row[i] = s.seed % 2**32, s.row
            use_eos[i] = not seq.ignore_eos
            logprobs |= seq.logprobs
        knobs = Knobs(temperature=temperature, top_k=top_k, top_p_threshold=top_p_threshold, seed=seed, greedy=greedy,
                      row=row, eos_ids=self.eos_ids)
        schedule = Schedule(active_B=active, budget_B=budget, step_B=step, use_eos_B=use_eos,
                            n_steps=np.int32(self.chunk), stop_early=np.bool_(stop_early), logprobs=np.bool_(logprobs))
        return knobs, schedule

    def _decode(self) -> None:
        seqs = self._slot_seq
        active = np.array([s is not None for s in seqs])
        # Row i feeds position len(prompt) - 1 + generated; this chunk writes up to `chunk` slots from there.
        reach = max(len(s.prompt) - 1 + s.generated for s in seqs if s is not None) + self.chunk
        span = self.programs.span_bucket(reach)
        rows = self.programs.rows_bucket(max(i for i, s in enumerate(seqs) if s is not None) + 1)
        self._slots, chunk = self.programs.decode(self._slots, *self._knobs(active, bool(self._waiting)), span, rows)
        chunk = jax.device_get(chunk)
        self._counts["chunks"] += 1
        self._counts["steps"] += int(chunk.n_B.max(initial=0))
        for i, seq in enumerate(seqs):
            n = int(chunk.n_B[i]) if seq is not None else 0
            if not n:
                continue
            ids = chunk.tokens_BxK[i, :n].tolist()
            event = Tokens(ids)
            if seq.logprobs:
                top = [list(zip(chunk.top_ids_BxKxT[i, t].tolist(), chunk.top_logprob_BxKxT[i, t].tolist()))
                       for t in range(n)]
                event = Tokens(ids, chunk.logprob_BxK[i, :n].tolist(), top)
            seq.generated += n
            self._counts["tokens"] += n
            seq.emit(event)
            if chunk.eos_B[i]:
                self._free(i, STOP)
            elif seq.generated >= seq.max_tokens:
                self._free(i, LENGTH)

    def _end_all(self, reason: str) -> None:
        for i, seq in enumerate(self._slot_seq):
            if seq is not None:
                self._free(i, reason)
        for seq in self._waiting:
            seq.emit(Finished(reason))
        self._waiting.clear()
        for _, emit in self._scores:
            emit(Finished(reason))
        self._scores.clear()
        while True:  # work that arrived after the loop ended
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                for seq in payload:
                    seq.emit(Finished(reason))
            elif kind == "score":
                payload[1](Finished(reason))
            elif kind == "warmup":
                payload[1].set()
