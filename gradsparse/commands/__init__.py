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


def add_run_folder_flags(p: argparse.ArgumentParser, *, overwrite: str, resume: str, skip_damaged: str) -> None:
    """The flags of every command that writes a run folder: --overwrite, --resume, --skip-damaged
    (each with the command's own help text) and --quiet."""
    p.add_argument("--overwrite", action="store_true", help=overwrite)
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--skip-damaged", action="store_true", help=skip_damaged)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_run_out(out: Path, *, resume: bool, overwrite: bool, skip_damaged: bool = False) -> None:
    """The checks every command that writes a run folder makes of ``--out`` and its flags, before
    anything is read: --out is a folder (or absent), --resume and --overwrite exclude each other,
    --skip-damaged needs --resume."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in --out and "
                         "--overwrite replaces it; give one of them")
    if skip_damaged and not resume:
        raise ValueError("--skip-damaged applies to --resume only")
