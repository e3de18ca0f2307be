"""The finetune component (see README.md)."""
