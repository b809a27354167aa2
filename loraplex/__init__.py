"""loraplex: multi-adapter LLM serving. This package holds only the root CLI and the version."""

__version__ = "0.1.0"
