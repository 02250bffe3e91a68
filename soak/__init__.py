"""The chaos soak: `scripts/soak --minutes N` (see __main__.py, and README "Chaos soak")."""
