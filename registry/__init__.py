"""Adapter identity: versions, aliases, artifact stores and validation of adapter files.

Entry points: `registry.service.Registry.open(RegistrySettings)` (register, fetch, sweep_orphans),
its `.store` (`registry.store.RegistryStore`: resolve, routing_snapshot, promote, rollback,
history), its `.artifacts` (`registry.artifacts.ArtifactStore`) and its `.base`
(`registry.base_model.BaseModel`: the served model adapters are checked against). Importing this
package imports nothing heavy.
"""
