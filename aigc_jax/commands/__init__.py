"""The `aigc-jax` sub-commands, one module each (`register(subparsers)` adds its flags; `run(args)` runs it): the top
layer. They turn flags into calls of the library (train/, decode/, serve/, interop/, api.py) and nothing imports
them back."""
