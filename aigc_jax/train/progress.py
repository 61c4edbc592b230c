"""Progress a person reads: a tqdm bar in a terminal, plain lines everywhere else.

A bar redraws itself with carriage returns: in a log file, a CI console or `tee` that is one endless line of
overwritten updates, so outside a terminal (or with --no-progress) training prints nanoGPT-style lines instead:

    step 100/600 | loss 2.345 | 123 ms/step | 4,567 tok/s | val loss 2.100
"""

from __future__ import annotations

import sys


def wants_bar(enabled: bool, stream=None) -> bool:
    """A bar only where it redraws in place: progress enabled and the stream a terminal."""
    stream = stream or sys.stderr
    return enabled and hasattr(stream, "isatty") and stream.isatty()


class Steps:
    """Training steps: a bar, or a plain line every `every` steps (and at the last) with the time per step and
    the throughput averaged since the previous line."""

    def __init__(self, total: int, initial: int, every: int, bar: bool, stream=None):
        self.total, self.every, self.stream = total, every, stream or sys.stderr
        self._val_loss = None  # the latest validation estimate, shown on the next line
        self._seconds = self._tokens = self._steps = 0.0  # since the previous line
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream)

    def step(self, step: int, values: dict) -> None:
        if self._bar is not None:
            shown = {"loss": f"{values['loss']:.4f}"}
            if self._val_loss is not None:
                shown["val_loss"] = f"{self._val_loss:.4f}"
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
            return
        self._seconds += values["step_time"]
        self._tokens += values["step_time"] * values["tokens_per_sec"]
        self._steps += 1
        if step % self.every == 0 or step == self.total:
            print(self._line(step, values["loss"]), file=self.stream, flush=True)
            self._seconds = self._tokens = self._steps = 0.0
            self._val_loss = None

    def _line(self, step: int, loss: float) -> str:
        parts = [f"step {step}/{self.total}", f"loss {loss:.4f}", f"{self._seconds / self._steps * 1e3:,.0f} ms/step",
                 f"{self._tokens / max(self._seconds, 1e-9):,.0f} tok/s"]
        if self._val_loss is not None:
            parts.append(f"val loss {self._val_loss:.4f}")
        return " | ".join(parts)

    def validation(self, loss: float) -> None:
        self._val_loss = loss  # a bar keeps showing it; a plain line shows it once

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Tokens:
    """A long pass over a split (the final validation): a bar in tokens, or a plain line at each quarter."""

    def __init__(self, what: str, total: int, bar: bool, stream=None):
        self.what, self.total, self.done, self.stream = what, total, 0, stream or sys.stderr
        self._next_line = 1  # the next quarter (1..4) at which a plain line is due
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=what, unit="tok", unit_scale=True, dynamic_ncols=True,
                             file=self.stream, leave=False)
        else:
            print(f"{what}: {total:,} tokens", file=self.stream, flush=True)

    def update(self, tokens: int) -> None:
        self.done = min(self.done + tokens, self.total)
        if self._bar is not None:
            self._bar.update(tokens)
            return
        while self._next_line <= 4 and self.done * 4 >= self._next_line * self.total:
            print(f"{self.what}: {self.done:,}/{self.total:,} tokens ({self.done / max(self.total, 1):.0%})",
                  file=self.stream, flush=True)
            self._next_line += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
