"""Adapters that bring TST into other training stacks (``superpose.integrations.transformers``: the HF Trainer)."""
