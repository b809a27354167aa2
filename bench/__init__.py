"""Benchmarks of loraplex; see bench/README.md. Not part of the installed package."""
