"""The OpenAI-compatible serving layer of loraplex."""
