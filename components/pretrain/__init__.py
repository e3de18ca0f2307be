"""The pretrain component (see README.md)."""
