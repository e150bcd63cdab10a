"""Argument types shared by several commands."""

from __future__ import annotations

import argparse

__all__ = ["group_size"]


def group_size(value: str) -> int | None:
    """``--group-size``: a positive integer, or ``none`` / ``channel`` for one scale per output channel.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    if value.lower() in {"none", "channel", "per-channel"}:
        return None
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-size must be a positive integer or 'none', got {value!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"--group-size must be a positive integer or 'none', got {value!r}")
    return size
