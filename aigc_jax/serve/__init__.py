"""Serving: an OpenAI-compatible HTTP server (app.py, cli.py) over a continuous-batching engine (engine.py) that
runs compiled device programs (programs.py). The engine does not depend on the HTTP stack."""
