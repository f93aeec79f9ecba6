"""Benchmarks. ``python -m bench`` runs the whole suite (see bench/__main__.py)."""
