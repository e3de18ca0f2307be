"""The split_groups component (see README.md)."""
