"""The one place that quiets the Hugging Face hub's libraries while they fetch for us.

They log every retry and cache miss (huggingface_hub, datasets, fsspec, urllib3); our own progress and one-line
errors say what matters. Model loading adds transformers' own logs on top (``models.quiet_transformers``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

HUB_LOGGERS = ("huggingface_hub", "datasets", "fsspec", "urllib3")


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Only errors from the hub's loggers inside the block; their levels are restored after it."""
    loggers = [logging.getLogger(name) for name in HUB_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
