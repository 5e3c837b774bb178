"""Files of tensors (pretrained weights, model files, checkpoints) read the one way: a regular file, no bigger
than FaceNet's, tensors and plain containers only."""

from __future__ import annotations

import os

import torch

from facenet import confine
from facenet.errors import InputError

# InceptionResnetV1 with a 8631-way head is ~110 MB and a whole training checkpoint ~300 MB: 2 GiB is neither.
MAX_BYTES = 2 << 30


def load(path: str, roots: confine.Roots | None, what: str, hint: str = "") -> object:
    """torch.load of `path` with weights_only=True (a pickled object is refused, never run: it would run code
    from whoever could write the file, with the trainer's credentials). Opened as a regular file without
    blocking (torch.load(path) on a FIFO, or on a file swapped for one, waited for a writer forever); beneath
    `roots` through no symlink when confined, else resolved first (a link a user made is theirs to follow).
    InputError (a bad input: exit status 2) in one line naming `what` and the file; `hint` ends the message when
    the tensors do not load."""
    where = f"{what} {confine.shown(path)}"
    try:
        fd = confine.open_regular(path if roots is not None else os.path.realpath(path), roots, what)
    except OSError as exc:
        raise InputError(f"{where}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_BYTES:
            raise InputError(f"{where}: {size >> 20} MiB, more than FaceNet weights or a checkpoint "
                             f"({MAX_BYTES >> 20} MiB at most)")
        try:
            return torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's weights_only message spans many lines: its first one
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"{where}: cannot read it as tensors ({first[:160]}){hint}") from None
