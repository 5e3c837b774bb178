"""The training engine: `python -m facenet.train` (or `facenet-cli train`).

`main` loads on first use: `facenet.train.options` (the CLI parses queued jobs' options with it) must not
import torch."""


def __getattr__(name: str):
    if name == "main":
        from facenet.train.launch import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["main"]
