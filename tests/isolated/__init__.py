"""Scripts that must run in a fresh interpreter (what a module imports, or blocks, before anything else does): each is
`python -m isolated.NAME [args]` (conftest.python_module), printing what its test reads."""
