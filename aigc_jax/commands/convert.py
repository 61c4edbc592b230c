"""`aigc-jax convert`: HF dir (GPT-2, Llama, Qwen2, Mistral) -> aigc_jax model dir, and any model source -> HF dir.

--from-hf DIR: HF GPT-2/Llama/Qwen2/Mistral dir (config.json + model.safetensors, sharded safetensors or
pytorch_model.bin + tokenizer files) -> aigc_jax model dir. --to-hf SRC: a model dir, training workdir or HF dir ->
an HF dir that transformers' AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load.
"""

from __future__ import annotations

import json
import os

from aigc_jax.configs import DTYPES
from aigc_jax.errors import UserError


HELP = "convert between HF directories (GPT-2, Llama, Qwen2, Mistral) and aigc_jax model dirs"
DESCRIPTION = " ".join(__doc__.split("\n\n", 1)[1].split())  # the help is the docstring's second part


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help=HELP, description=DESCRIPTION)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="local HF model directory to import")
    src.add_argument("--to-hf", metavar="SRC", help="model dir, training workdir or HF dir to export")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory (new, empty, or the same kind)")
    p.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="--from-hf: compute dtype recorded in model.json (params stay fp32); "
        "--to-hf: storage dtype of the exported weights (default float32)",
    )
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from aigc_jax import modeldir
    from aigc_jax.interop import hf
    from aigc_jax.model import count_params

    src = args.from_hf or args.to_hf
    if os.path.isdir(src) and os.path.isdir(args.out) and os.path.samefile(src, args.out):
        raise UserError(f"--out {args.out} is the source directory; write to a new directory")
    if args.from_hf:
        _check_out(args.out, "model_dir")
        config, params, tokenizer = hf.load_hf_dir(args.from_hf, dtype=args.dtype)
        modeldir.save_model_dir(args.out, config, params, tokenizer)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
            stale = os.path.join(args.out, name)
            if tokenizer is None and os.path.isfile(stale):  # from an earlier conversion: it would be loaded as ours
                os.remove(stale)
        kind = "aigc_jax model dir"
    else:
        _check_out(args.out, "hf")
        config, params, tokenizer = modeldir.load_any(args.to_hf)
        hf.save_hf_dir(args.out, config, params, tokenizer, dtype=args.dtype or "float32")
        kind = "HF dir"
    print(json.dumps({
        "wrote": kind,
        "out": args.out,
        "params": count_params(params, config),
        "vocab_size": config.vocab_size,
        "tokenizer": tokenizer is not None,
    }))
    return 0


def _check_out(out: str, want: str) -> None:
    """Only an absent/empty directory, or one holding the same kind of output, may be written into."""
    from aigc_jax import fileio, modeldir
    from aigc_jax.interop import hf

    fileio.check_output_dir(out, "--out")
    if not os.path.exists(out):
        return
    if not os.listdir(out):
        return
    marker = modeldir.PARAMS_FILE if want == "model_dir" else hf.CONFIG_FILE
    if not os.path.isfile(os.path.join(out, marker)):
        what = "an aigc_jax model dir" if want == "model_dir" else "an HF model dir"
        raise UserError(f"--out {out} is not empty and not {what}; refusing to overwrite it (choose a new directory)")
