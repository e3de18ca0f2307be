"""The ingest component (see README.md)."""
