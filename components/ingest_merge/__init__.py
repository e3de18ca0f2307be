"""The ingest_merge component (see README.md)."""
