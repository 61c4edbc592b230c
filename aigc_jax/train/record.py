"""Recording a run: metrics.jsonl, TensorBoard and W&B (through `MetricsWriter`), the progress bar or lines,
sampled text and validation figures. Only the primary host writes files and shows progress."""

from __future__ import annotations

import time

import jax

from aigc_jax.decode import GenerationConfig, Generator
from aigc_jax.model import flops_per_token
from aigc_jax.prompts import Prompter
from aigc_jax.train import progress
from aigc_jax.train.metrics import MetricsWriter, peak_flops_per_device
from aigc_jax.train.prepare import Run


class Recorder:
    """Where one training run's progress goes, from step `start` on. `log` takes the lines a person reads."""

    def __init__(self, run: Run, start: int, log=print):
        cfg = run.train_config
        primary = jax.process_index() == 0
        self.run, self.log = run, log
        self.writer = MetricsWriter(run.workdir, primary, cfg.wandb_project, cfg.wandb_mode, run.record)
        self._flops = flops_per_token(run.model_config, cfg.seq_len)
        self._peak = peak_flops_per_device(cfg.mfu_peak_tflops)
        self._tokens_per_step = cfg.batch_size * cfg.seq_len
        self.bar = progress.Steps(cfg.steps, start, cfg.log_every, progress.wants_bar(cfg.progress)) if primary else None
        self._t_prev = time.perf_counter()  # when the previous step's metrics were recorded

    def fetch(self, step: int, metrics) -> dict:
        """A finished step's metrics on the host (blocking on them: the next step is already queued), with its
        time and throughput; a skipped (non-finite) step is written down at once, before any halt."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - self._t_prev
        values["step_time"] = dt
        values["tokens_per_sec"] = self._tokens_per_step / dt
        if self._peak:
            values["mfu"] = values["tokens_per_sec"] * self._flops / (self._peak * jax.device_count())
        if values["skipped"]:
            self.writer.write(step, "nonfinite", {"loss": values["loss"], "grad_norm": values["grad_norm"],
                                                  "streak": values["nonfinite_streak"]})
        return values

    def train(self, step: int, values: dict) -> None:
        """A step's line in metrics.jsonl every `log_every` steps (and at the last), and its progress."""
        cfg = self.run.train_config
        if step % cfg.log_every == 0 or step == cfg.steps:
            self.writer.write(step, "train", values)
        if self.bar is not None:
            self.bar.step(step, values)
        self._t_prev = time.perf_counter()

    def estimate(self, step: int, summary: dict) -> None:
        """A periodic validation estimate: written, and shown with the next progress line."""
        self.writer.write(step, "eval", summary)
        if self.bar is not None:
            self.bar.validation(summary["loss"])

    def final(self, step: int, summary: dict) -> None:
        self.writer.write(step, "eval", summary)

    def samples(self, params, step: int) -> None:
        """A couple of sampled continuations of an empty prompt, written to metrics.jsonl and the log. The prompt
        and the text come from the prompt path `generate` uses: a Llama tokenizer's BOS (GPT-2, which has none,
        starts from end-of-text), its EOS ids, the continuation decoded after the prompt."""
        run = self.run
        prompts = Prompter(run.tokenizer)
        prompt = prompts.encode("") or [run.tokenizer.eot_id]
        n_new = min(128, run.model_config.n_positions - len(prompt) - 15)
        generator = Generator(run.model_config, params)
        for i in range(2):
            gen = GenerationConfig(max_new_tokens=n_new, temperature=0.8, top_k=40, seed=step + i,
                                   eos_ids=prompts.stop_ids)
            (ids,) = generator.generate([prompt], gen)
            text = prompts.continuation(prompt, ids[:-1] if ids and ids[-1] in gen.eos_ids else ids)
            self.writer.write(step, "sample", {"index": i, "text": text})
            self.log(f"--- sample {i} at step {step} ---\n{text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
