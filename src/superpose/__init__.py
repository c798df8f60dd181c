"""superpose: Token Superposition Training (TST) for decoder-only language models."""

__version__ = "0.1.0"
