"""Scripts the multi-device tests run in a subprocess with N fake CPU devices (conftest.run_module): each is
`python -m multidevice.NAME [JSON args]`, with a `main(argv)` that prints its result as one JSON line, last."""
