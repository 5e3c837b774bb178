"""Whole-state checkpoints, written atomically (temp file + rename) by rank 0 only."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

from facenet import weights
from facenet.errors import UserError
from facenet.fsutil import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    """The RNG states in types torch.load(weights_only=True) accepts (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def state_digest(state: dict) -> str:
    """sha256 (hex) of a state dict: each tensor's name, dtype, shape and values in logical order, by name. Equal
    tensors give equal digests whatever their device or memory layout (a channels_last weight hashes as its
    contiguous copy); any changed value, name, dtype or shape changes it."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{tuple(state[name].shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    ckpt = weights.load(path, None, "--resume", "; a checkpoint written by an older version or by other code "
                        "is refused")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise UserError(f"--resume {path}: not a facenet checkpoint")
    return ckpt
