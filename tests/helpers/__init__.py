"""Helpers shared by the CLI and robustness tests (real files, real tiny models, real processes)."""
