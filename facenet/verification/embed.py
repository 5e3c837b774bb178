"""Embeddings: images -> L2-normalised 512-d vectors from the model's embedding layer."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from facenet import confine
from facenet.data.loader import FaceImages, collate, to_device


@contextlib.contextmanager
def embedding_mode(model: torch.nn.Module):
    """InceptionResnetV1 returns logits when `classify` is set and the normalised embedding otherwise;
    evaluate in eval mode, embedding out, and put both back afterwards."""
    net = model.module if hasattr(model, "module") else model
    was_training, was_classify = net.training, net.classify
    net.eval()
    net.classify = False
    try:
        yield net
    finally:
        net.classify = was_classify
        net.train(was_training)


def embed_paths(model: torch.nn.Module, paths: list[str], device: torch.device, image_size: int,
                batch_size: int = 128, flip: bool = False, workers: int = 0, channels_last: bool = False,
                autocast=contextlib.nullcontext, roots: confine.Roots | None = None,
                progress=None, source=None) -> tuple[np.ndarray, list[str]]:
    """(embeddings float32 [len(paths), 512] in the order of `paths`, unreadable paths). A row whose
    image could not be read is all zeros; the caller drops what uses it and names it. With `flip`, each
    embedding is the normalised sum of the image's and its mirror image's (insightface's test-time
    flip). `progress(images done since the last call, total)` is called after each batch. `source` (a
    pack's `pair_images`) reads the paths it holds from the pack's shards."""
    samples = source.select(paths) if source is not None else None  # a pack's images, read from its shards
    if samples is None:
        samples = [(p, i) for i, p in enumerate(paths)]
    loader = DataLoader(FaceImages(samples, image_size, augment=False, replace_bad=False, roots=roots),
                        batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    out = np.zeros((len(paths), 512), dtype=np.float32)
    bad: list[str] = []
    with embedding_mode(model) as net, torch.inference_mode():
        for images, index, unreadable, _ in loader:
            bad += unreadable
            if len(index):
                x = to_device(images, device, channels_last)
                with autocast():
                    e = net(x).float()
                    if flip:
                        e = e + net(torch.flip(x, dims=[3])).float()
                out[index.numpy()] = torch.nn.functional.normalize(e, dim=1).cpu().numpy()
            if progress:
                progress(len(index) + len(unreadable), len(paths))
    return out, bad


def distances(a: np.ndarray, b: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Row-wise distance of unit vectors: Euclidean in [0, 2], or cosine distance 1 - cos in [0, 2]."""
    if metric == "euclidean":
        return np.linalg.norm(a - b, axis=1)
    if metric == "cosine":
        return 1.0 - np.sum(a * b, axis=1)
    raise ValueError(f"unknown distance {metric!r} (euclidean or cosine)")


def images_under(folder: str) -> list[str]:
    """Every image file below `folder`, sorted (hidden files and folders skipped)."""
    from facenet.data.dataset import IMAGE_EXTENSIONS

    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(here, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)


def write_embeddings(path: str, rel_paths: list[str], embeddings: np.ndarray, meta: dict) -> None:
    """OUT.npz (arrays `paths`, `embeddings`, and `meta` as a JSON string) or OUT.parquet (columns `path`,
    `embedding` as a list of float32; `meta` in the schema's metadata), written atomically."""
    import json

    from facenet.fsutil import atomic_write

    if path.endswith(".npz"):
        with atomic_write(path) as fh:
            np.savez(fh, paths=np.array(rel_paths, dtype=str), embeddings=embeddings.astype(np.float32),
                     meta=np.array(json.dumps(meta)))
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"path": pa.array(rel_paths, pa.string()),
                          "embedding": pa.array(list(embeddings.astype(np.float32)), pa.list_(pa.float32()))})
        table = table.replace_schema_metadata({"facenet": json.dumps(meta)})
        with atomic_write(path) as fh:
            pq.write_table(table, fh)
    else:
        raise ValueError(f"{path}: write .npz or .parquet")
