"""One module per schema revision; the newest must equal registry.db.SCHEMA_HEAD."""
