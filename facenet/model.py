"""The model: facenet-pytorch's InceptionResnetV1 with a classification head, as the recipe."""

from __future__ import annotations

import os

import torch
from facenet_pytorch import InceptionResnetV1

from facenet import confine, weights
from facenet.errors import UserError
from facenet.spec import default_pretrained_path


def resolve_pretrained(pretrained: str | None, roots: confine.Roots | None = None) -> tuple[str | None, str]:
    """Return (weights file or None, a sentence saying what will happen).

    "auto" uses the seed's cache path when it exists and trains from scratch
    otherwise; a file named explicitly must exist, and for a queued job (`roots`) lie inside the data
    roots (checked before anything is said about whether it exists). Nothing is ever downloaded.
    """
    if pretrained in (None, "", "none"):
        return None, "no pretrained weights requested: training from scratch"
    if pretrained == "auto":
        path = default_pretrained_path()
        if os.path.isfile(path):
            return path, f"pretrained vggface2 weights: {path}"
        return None, (f"no pretrained vggface2 weights at {path} (pass --pretrained FILE to use some): "
                      "training from scratch")
    path = confine.check(pretrained, roots, "--pretrained")
    if not os.path.exists(path):
        raise UserError(f"--pretrained {pretrained}: no such file")
    if not os.path.isfile(path):
        raise UserError(f"--pretrained {pretrained}: not a regular file")
    return path, f"pretrained weights: {path}"


def build_model(num_classes: int, pretrained_file: str | None, dropout: float = 0.6,
                roots: confine.Roots | None = None) -> torch.nn.Module:
    """InceptionResnetV1(classify=True) with a fresh `num_classes` head.

    vggface2 weights (an 8631-way head) load into everything but `logits`,
    which the recipe always replaces.
    """
    model = InceptionResnetV1(classify=True, num_classes=num_classes, dropout_prob=dropout)
    if pretrained_file:
        # The seed's cache path lies outside the data roots: read unconfined, as a user's own file.
        confined = roots is not None and pretrained_file != default_pretrained_path()
        state = weights.load(pretrained_file, roots if confined else None, "--pretrained")
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # one of our own checkpoints
        if not isinstance(state, dict):
            raise UserError(f"--pretrained {pretrained_file}: not a state dict")
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("logits.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("logits.")]
        if missing or unexpected:
            raise UserError(f"--pretrained {pretrained_file}: not InceptionResnetV1 weights "
                            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                            f"{(missing + unexpected)[0]})")
    return model
