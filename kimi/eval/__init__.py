"""Evaluation suites: `kimi eval toolverse` (toolverse.py)."""
