"""What the reproduction scripts share: data on machines without tensorflow-datasets, timing a training run,
reading metrics, plots and result files. Nothing here is a recipe; the recipes are the scripts.

Data. `load_tokens` is `aigc_jax.data.load` (tfds-built, cached) where tensorflow-datasets is installed. Where it
is not (the H200 machine), it reads the same documents with `aigc_jax.data.sources` and tokenizes them with the
library's `encode_documents`, in memory: the same train/validation split and the same ids (tests compare both).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
H200_BF16_TFLOPS = 790.0  # an 8192^3 bf16 matmul measured on an H200 (769-798 TFLOP/s on random data)
EXPERIMENTS = REPO / "experiments"


def parser(doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser whose description is the script docstring's first paragraph."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(p: argparse.ArgumentParser, name: str) -> None:
    """--workdir / --results-dir / --data-dir / --set, with defaults derived from the experiment's name."""
    p.add_argument("--workdir", help=f"training run directory (default: runs/experiments/{name}[_VARIANT])")
    p.add_argument("--results-dir", help=f"summary.json, metrics.jsonl and plots (default: experiments/results/{name}"
                                         "[_VARIANT])")
    p.add_argument("--data-dir", default=None, help="where tfds datasets and token caches live (aigc_jax default)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a model or train config key after the recipe (repeatable), as `aigc-jax train --set`")


def default_dirs(args, name: str) -> tuple[str, str]:
    workdir = args.workdir or str(REPO / "runs" / "experiments" / name)
    results = args.results_dir or str(EXPERIMENTS / "results" / name)
    return workdir, results


def apply_overrides(model_config, train_config, items: list[str]):
    """`--set k=v` on top of a recipe, with the library's own key and type checks."""
    from aigc_jax.configs import with_overrides
    from aigc_jax.commands.train import split_overrides

    model_over, train_over = split_overrides(items)
    return with_overrides(model_config, model_over, "model."), with_overrides(train_config, train_over, "train.")


def main_guard(fn, argv=None) -> int:
    """Runs `fn(argv)`; a UserError (bad path, bad flag value, …) becomes one line on stderr and exit code 2.
    (aigc_jax is imported only on the way out, so `--help` answers without loading JAX.)"""
    try:
        return int(fn(argv) or 0)
    except Exception as e:
        from aigc_jax.errors import UserError

        if not isinstance(e, UserError):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------------- data


def has_tfds() -> bool:
    try:
        return importlib.util.find_spec("tensorflow_datasets") is not None
    except ValueError:  # a None entry in sys.modules: blocked on purpose
        return False


def load_tokens(source: str, tokenizer, data_dir: str | None = None, skip_unreadable: bool = False):
    """`aigc_jax.data.TokenData` for a `--data` source: the library's cached loader where tensorflow-datasets is
    installed, else `direct_tokens` (local files only)."""
    from aigc_jax import data

    if has_tfds() and not skip_unreadable:
        return data.load(source, tokenizer, data_dir=data_dir)
    return direct_tokens(source, tokenizer, skip_unreadable=skip_unreadable)


def direct_tokens(source: str, tokenizer, skip_unreadable: bool = False):
    """The tfds-free path: the library's split rule (`sources.documents`) and tokenization (`encode_documents`),
    held in memory. `skip_unreadable` drops documents that are not UTF-8 (counted in stats) instead of failing."""
    from aigc_jax.data import TokenData
    from aigc_jax.data.corpus import content_hash, encode_documents
    from aigc_jax.errors import UserError

    name, key, docs, stats = read_documents(source, skip_unreadable)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    splits = {}
    for split, texts in docs.items():
        ids = [np.asarray(a) for a in encode_documents(texts, tokenizer)]
        splits[split] = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)
        stats[split]["tokens"] = int(len(splits[split]))
        if not len(splits[split]):
            raise UserError(f"{name}: the {split} split has no text")
    bytes_per_token = stats["validation"]["bytes"] / stats["validation"]["tokens"]
    return TokenData(name, splits["train"], splits["validation"], bytes_per_token, tokenizer.eot_id,
                     f"direct/{key}", {"splits": stats}, content_hash(splits))


def read_documents(source: str, skip_unreadable: bool = False) -> tuple[str, str, dict[str, list[str]], dict]:
    """(name, cache key, {split: document texts}, stats) of a local or default source, without tfds."""
    from aigc_jax.data import sources
    from aigc_jax.errors import UserError

    src = sources.parse(source, sources.default_data_dir())
    if src.kind not in ("local_text", "default"):
        raise UserError(f"--data {source}: without tensorflow-datasets only local text files, directories, globs and "
                        "'default' can be read")
    docs, stats = {}, {"skipped_documents": 0}
    for split, items in sources.documents(src).items():
        docs[split] = []
        for _, read in items:
            try:
                docs[split].append(read())
            except UserError:
                if not skip_unreadable:
                    raise
                stats["skipped_documents"] += 1
        stats[split] = {"documents": len(docs[split]), "bytes": sum(len(t.encode()) for t in docs[split])}
    return src.name, src.key, docs, stats


def train_text(source: str, data_dir: str | None = None, skip_unreadable: bool = False) -> str:
    """The train split's text (documents joined by newlines), what a tokenizer is built from."""
    from aigc_jax import data

    if has_tfds() and not skip_unreadable:
        return data.load_text(source, data_dir=data_dir, split="train")
    return "\n".join(read_documents(source, skip_unreadable)[2]["train"])


def train_timed(run, log=print) -> dict:
    """Runs (or resumes) `run` with the library's loop; returns its result plus wall time and curve statistics."""
    from aigc_jax.train import loop

    t0 = time.perf_counter()
    result = loop.train(run, log=log)
    wall = time.perf_counter() - t0
    metrics = read_metrics(run.workdir)
    evals = [m for m in metrics["eval"] if "loss" in m]
    train = metrics["train"]
    steady = [m["tokens_per_sec"] for m in train[len(train) // 5 :] if "tokens_per_sec" in m]  # skip compile steps
    out = {
        "final_step": result["step"],
        "final_val_loss": result.get("val_loss"),
        "final_train_loss": result.get("loss"),
        "best_val_loss": min((m["loss"] for m in evals), default=None),
        "best_val_step": min(evals, key=lambda m: m["loss"])["step"] if evals else None,
        "wall_seconds_this_process": round(wall, 1),
        "median_tokens_per_sec": round(float(np.median(steady)), 1) if steady else None,
        "val_bits_per_byte": result.get("val_bits_per_byte"),
    }
    mfu = [m["mfu"] for m in train[len(train) // 5 :] if "mfu" in m]
    if mfu:
        out["median_mfu"] = round(float(np.median(mfu)), 4)
    return out


def read_metrics(workdir: str) -> dict[str, list[dict]]:
    """metrics.jsonl grouped by kind ("train", "eval", …); a resumed run's repeated steps keep the last record."""
    by_kind: dict[str, dict[int, dict]] = {}
    path = Path(workdir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_kind.setdefault(rec["kind"], {})[rec["step"]] = rec
    return {"train": [], "eval": [], **{k: [v[s] for s in sorted(v)] for k, v in by_kind.items()}}


def machine() -> dict:
    """Hardware and software a number was measured on."""
    import jax

    dev = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "devices": jax.device_count(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def estimate_seconds(flops_per_token: float, tokens: float, peak_tflops: float, mfu: float) -> float:
    """Training time at a model-FLOPs utilisation of a peak (FLOPs per token: `aigc_jax.model.flops_per_token`)."""
    return flops_per_token * tokens / (peak_tflops * 1e12 * mfu)


def write_results(results_dir: str, summary: dict, workdir: str | None = None) -> None:
    """summary.json (and a copy of the run's metrics.jsonl) in `results_dir`."""
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v))
        f.write("\n")
    if workdir and (Path(workdir) / "metrics.jsonl").is_file():
        lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
        lines = [ln for ln in lines if '"kind": "sample"' not in ln]
        (Path(results_dir) / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def plot_curves(curves: dict[str, dict[str, list[dict]]], path: str, title: str,
                targets: dict[str, float] | None = None, ylim: tuple[float, float] | None = None) -> None:
    """Train loss (thin line) and validation loss (markers) against step for each labelled run, plus horizontal
    lines at published targets. `curves`: label -> read_metrics(...) output."""
    try:
        import matplotlib
    except ImportError:  # a base install: pip install -e '.[bench]' for plots
        print(f"matplotlib is not installed: no plot written to {path}", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (label, m) in enumerate(curves.items()):
        color = f"C{i}"
        if m["train"]:
            ax.plot([r["step"] for r in m["train"]], [r["loss"] for r in m["train"]], color=color, alpha=0.45,
                    lw=1, label=f"{label}: train (minibatch)")
        ev = [r for r in m["eval"] if "loss" in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", color=color, ms=3.5,
                    label=f"{label}: validation")
    for j, (label, value) in enumerate((targets or {}).items()):
        ax.axhline(value, color="k", ls=("--", ":", "-.")[j % 3], lw=1, label=f"{label} = {value}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
