"""The llama.cpp runtime: load models in supervised worker processes, generate, release.

Knows nothing of NATS or SQLite. See ``engine.runtime.Engine`` for the one API.
"""
