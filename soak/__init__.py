"""The chaos soak: `scripts/soak --minutes N` (see __main__.py, and docs/explanation/chaos-soak.md)."""
