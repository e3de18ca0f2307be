"""The pack component (see README.md)."""
