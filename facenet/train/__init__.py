"""The training engine: `python -m facenet.train` (or `facenet-cli train`)."""

from facenet.train.launch import main

__all__ = ["main"]
