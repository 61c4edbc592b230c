"""The `aigc-jax` sub-commands, one module each (`register(subparsers)` adds its flags; `run(args)` runs it): the top
layer. They turn flags into calls of the library (train/, decode/, serve/, interop/, api.py) and nothing imports
them back."""


def add_weights_args(p, verb: str, needs: str = "") -> None:
    """--model SRC (trained weights) and --random-init (a preset's random weights): the commands that run a model."""
    p.add_argument("--model", required=True, metavar="SRC",
                   help=f"aigc_jax model dir, training workdir, or HF GPT-2/Llama/Qwen2/Mistral dir{needs}; a preset "
                   "name only with --random-init")
    p.add_argument("--random-init", action="store_true",
                   help=f"--model names a preset: {verb} it with random weights (smoke tests, timing)")
