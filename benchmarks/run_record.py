"""What every benchmark's JSON records about the run: the package versions and the checkout's commit."""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def versions() -> dict:
    """Python, torch (and its CUDA), triton, transformers and peft, None where not installed."""
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "transformers", "peft"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def checkout_commit() -> str | None:
    """The checkout's commit, `+dirty` when tracked files differ from it; None without git. (The
    device's copy of the tree has a stale HEAD: scripts run there take the commit as an argument.)"""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")
