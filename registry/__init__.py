"""Adapter identity: versions, aliases, artifact stores and validation of adapter files."""
