"""Adapter identity: versions, aliases, artifact stores and validation of adapter files.

Entry points: `registry.service.Registry.open(RegistrySettings)` (register, fetch), its `.store`
(`registry.store.RegistryStore`: resolve, routing_snapshot, promote, rollback, history) and its
`.artifacts` (`registry.artifacts.ArtifactStore`). Importing this package imports nothing heavy.
"""
