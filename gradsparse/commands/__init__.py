"""The subcommands of ``gradsparse`` (one module each) and the argument types they share."""

from __future__ import annotations

import argparse
from pathlib import Path


def path_arg(text: str) -> Path:
    """An argparse ``type`` for file and folder flags: a Path, never from an empty string (which
    would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a file or folder path, got {text!r} (empty); "
                                         "write . for the current folder")
    return Path(text)
