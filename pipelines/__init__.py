"""Pipelines chaining the components (full.py) and helpers of the DVC stages."""
