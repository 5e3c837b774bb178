"""Whole-state checkpoints, written atomically (temp file + rename) by rank 0 only."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from facenet.errors import UserError
from facenet.fsutil import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_atomic(obj: dict, path: str) -> None:
    """torch.save through a temp file, fsync, rename: a crash never leaves a half-written checkpoint."""
    with atomic_write(path, fsync=True) as fh:
        torch.save(obj, fh)


def resolve_resume(resume: str | None, output: str) -> str | None:
    """--resume FILE must exist; --resume auto means OUTPUT/checkpoint.pt when present."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(output, CHECKPOINT_NAME)
        return path if os.path.isfile(path) else None
    path = os.path.abspath(os.path.expanduser(resume))
    if not os.path.isfile(path):
        raise UserError(f"--resume {resume}: no such checkpoint")
    return path


def load(path: str) -> dict:
    try:
        # Our checkpoints hold numpy RNG state and plain containers, so they are not weights-only.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"--resume {path}: cannot read checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise UserError(f"--resume {path}: not a facenet checkpoint")
    return ckpt
