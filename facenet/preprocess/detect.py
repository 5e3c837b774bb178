"""MTCNN's three stages for one image, every resample read from one integral image.

Adapted from facenet-pytorch 2.5.3, `models/utils/detect_face.py` (`detect_face`,
`generateBoundingBox`, `bbreg`, `rerec`, `pad`, `nms_numpy`), MIT License,
Copyright (c) 2019 Timothy Esler. Same networks, thresholds, pyramid and box
arithmetic; what differs is only how the work is done:

- facenet-pytorch resamples with `interpolate(mode="area")`: once per pyramid
  scale, and once per candidate box in the RNet and ONet stages (~35 small
  calls per photo). We take the image's integral (summed-area table) once and
  read every window sum from it: the pyramid levels separably, all boxes of a
  stage in one gather. The results are bit for bit what `interpolate` gives
  (see the note above `_integral`).
- PNet's output cells are thresholded in numpy (torch's per-op overhead
  dominated those tiny arrays), same float32 arithmetic.
- per-scale NMS runs as one `batched_nms` with the scale as the category,
  which keeps within each scale exactly the boxes the per-scale calls keep.
- one image, not a batch: no per-image bookkeeping, and a candidate box that
  lies wholly outside the image is dropped (facenet-pytorch drops its crop but
  not the box, which misaligns boxes and scores).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import ops

from facenet.devices import nms_device


def detect_faces(img: np.ndarray, minsize: float, pnet, rnet, onet, thresholds, factor: float = 0.709,
                 points: bool = False):
    """Faces in an 8-bit RGB image (H, W, 3): (boxes (N, 4) float32 x1 y1 x2 y2, probs (N,) float32), and with
    `points` their five landmarks (N, 5, 2) float32 x y: left eye, right eye, nose, left and right mouth corner
    (as the person faces the camera: "left" is on the image's left), as `MTCNN.detect(landmarks=True)` gives them.

    Boxes are in the order facenet-pytorch's `MTCNN.detect` returns them with select_largest=False.
    """
    device = next(pnet.parameters()).device
    dtype = next(pnet.parameters()).dtype
    h, w = img.shape[:2]
    table = _integral(img).to(device)

    # First stage: PNet over the image pyramid, from faces of `minsize` pixels up.
    found = []
    for scale in _scales(h, w, minsize, factor):
        reg, probs = pnet(_normalise(_pyramid_level(table, (int(h * scale + 1), int(w * scale + 1))), dtype))
        found.append(_candidates(reg, probs, scale, thresholds[0]))
    empty = _EMPTY_POINTS if points else _EMPTY
    if not found:
        return empty
    boxes, windows = _inside(_merge_scales(found, device), w, h)

    # Second stage: RNet on 24x24 resamples of every candidate.
    if len(boxes) == 0:
        return empty
    reg, probs = rnet(_normalise(_box_resample(table, windows, (24, 24)), dtype))
    boxes, windows = _inside(_refine(boxes, reg, probs, thresholds[1]), w, h)

    # Third stage: ONet on 48x48 resamples; the final NMS divides by the smaller area ("Min").
    if len(boxes) == 0:
        return empty
    reg, landmarks, probs = onet(_normalise(_box_resample(table, windows, (48, 48)), dtype))
    return _final(boxes, reg, probs, thresholds[2], landmarks if points else None)


def detect_faces_batch(imgs: list[np.ndarray], minsizes: list[float], pnet, rnet, onet, thresholds,
                       factor: float = 0.709, pnet_batch: int = 32, points: bool = False) -> list[tuple]:
    """`detect_faces` of many photos at once: [(boxes, probs)] per photo (with `points`, (boxes, probs,
    landmarks)), the same boxes and landmarks.

    Each network call serves many photos (on a GPU each photo alone is a few hundred tiny launches): PNet runs
    on a stack of up to `pnet_batch` photos of the same size (and smallest face) per pyramid scale, RNet and
    ONet on the candidates of all photos in one call each. The per-photo steps in between (thresholds, NMS)
    are detect_faces' own.
    """
    device = next(pnet.parameters()).device
    dtype = next(pnet.parameters()).dtype
    tables = [_integral(img).to(device) for img in imgs]
    found: list[list[np.ndarray]] = [[] for _ in imgs]
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(imgs):
        groups.setdefault((img.shape[0], img.shape[1], minsizes[i]), []).append(i)
    for (h, w, minsize), members in groups.items():
        scales = _scales(h, w, minsize, factor)
        for at in range(0, len(members), pnet_batch):
            chunk = members[at:at + pnet_batch]
            stack = torch.stack([tables[i] for i in chunk])
            for scale in scales:
                reg, probs = pnet(_normalise(_pyramid_level(stack, (int(h * scale + 1), int(w * scale + 1))), dtype))
                for b, i in enumerate(chunk):
                    found[i].append(_candidates(reg[b:b + 1], probs[b:b + 1], scale, thresholds[0]))
    results: list = [_EMPTY_POINTS if points else _EMPTY] * len(imgs)
    stage = {}  # photo -> (boxes, windows) still in play
    for i, img in enumerate(imgs):
        if found[i]:
            stage[i] = _inside(_merge_scales(found[i], device), img.shape[1], img.shape[0])
    for size, net in (((24, 24), rnet), ((48, 48), onet)):
        stage = {i: bw for i, bw in stage.items() if len(bw[0])}
        if not stage:
            break
        order = list(stage)
        windows = torch.cat([stage[i][1] for i in order])
        counts = [len(stage[i][1]) for i in order]
        flat = torch.cat([tables[i].view(-1, 3) for i in order])
        starts = np.cumsum([0] + [tables[i].shape[0] * tables[i].shape[1] for i in order])[:-1]
        width = torch.tensor(np.repeat([tables[i].shape[1] for i in order], counts), device=device)
        base = torch.tensor(np.repeat(starts, counts), device=device)
        out = net(_normalise(_resample_windows(flat, windows, width, base, size), dtype))
        parts = [torch.split(t, counts) for t in out]
        for k, i in enumerate(order):
            boxes = stage[i][0]
            if net is rnet:
                stage[i] = _inside(_refine(boxes, parts[0][k], parts[1][k], thresholds[1]),
                                   imgs[i].shape[1], imgs[i].shape[0])
            else:
                results[i] = _final(boxes, parts[0][k], parts[2][k], thresholds[2], parts[1][k] if points else None)
    return results


_EMPTY = (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))
_EMPTY_POINTS = (*_EMPTY, np.zeros((0, 5, 2), np.float32))


def _scales(h: int, w: int, minsize: float, factor: float) -> list[float]:
    """The pyramid's scales: faces of `minsize` pixels up to the whole shorter side."""
    m = 12.0 / minsize
    scales, minl = [], min(h, w) * m
    while minl >= 12:
        scales.append(m * factor ** len(scales))
        minl *= factor
    return scales


def _merge_scales(found: list[np.ndarray], device) -> torch.Tensor:
    """One photo's PNet candidates of every scale: NMS within each scale, then across scales; regressed and
    squared boxes (N, 5) x1 y1 x2 y2 score."""
    scale_ids = torch.from_numpy(np.concatenate([np.full(len(f), k) for k, f in enumerate(found)])).to(device)
    boxes = torch.from_numpy(np.concatenate(found)).to(device)
    boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.5, scale_ids)]  # within each scale
    boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]  # across scales
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]], dim=1)
    return _square(boxes)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float, groups: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's NMS (within each of `groups` when given) where the device row says it runs: on the boxes'
    device, or on the CPU for a device with no NMS kernel (npu, see facenet.devices.ROWS); the kept indices come
    back on the boxes' device."""
    where = nms_device(boxes.device.type)
    if where is not None:
        keep = nms(boxes.to(where), scores.to(where), iou, None if groups is None else groups.to(where))
        return keep.to(boxes.device)
    if groups is None:
        return ops.nms(boxes, scores, iou)
    return ops.batched_nms(boxes, scores, groups, iou)


def _refine(boxes: torch.Tensor, reg: torch.Tensor, probs: torch.Tensor, thresh: float) -> torch.Tensor:
    """RNet's verdict on one photo's candidates: keep the confident ones, NMS, regress, square."""
    keep = probs[:, 1] > thresh
    boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
    reg = reg[keep]
    pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
    return _square(_regress(boxes[pick], reg[pick]))


def _final(boxes: torch.Tensor, reg: torch.Tensor, probs: torch.Tensor, thresh: float,
           landmarks: torch.Tensor | None = None):
    """ONet's verdict on one photo's candidates: (boxes (N, 4), probs (N,)) after the "Min" NMS, and with
    `landmarks` (ONet's second output) the five points (N, 5, 2), placed in the box ONet saw before its
    regression, as facenet-pytorch's detect_face places them (x = width * px + x1 - 1, width inclusive)."""
    keep = probs[:, 1] > thresh
    seen = boxes[keep, :4]
    boxes = _regress(torch.cat([seen, probs[keep, 1:2]], dim=1), reg[keep])
    boxes = boxes.cpu().numpy()
    pick = _nms_min(boxes[:, :4], boxes[:, 4], 0.7)
    if landmarks is None:
        return boxes[pick, :4], boxes[pick, 4]
    lm = landmarks[keep]
    w = (seen[:, 2] - seen[:, 0] + 1)[:, None]
    h = (seen[:, 3] - seen[:, 1] + 1)[:, None]
    xy = torch.stack([w * lm[:, :5] + seen[:, 0:1] - 1, h * lm[:, 5:] + seen[:, 1:2] - 1], dim=2)
    return boxes[pick, :4], boxes[pick, 4], xy.float().cpu().numpy()[pick]


# Area resampling (`interpolate(mode="area")`) is adaptive average pooling: output row i averages
# input rows [floor(i*H/out), ceil((i+1)*H/out)), and the same for columns. With the summed-area
# table every such window sum is an exact integer from four lookups; dividing it in float32 by the
# window's height, then by its width, is how adaptive_avg_pool2d divides, so the results below are
# bit for bit the ones `interpolate` gives.

def _integral(img: np.ndarray) -> torch.Tensor:
    """(H+1, W+1, 3) summed-area table of an 8-bit image (H, W, 3): table[y, x] = img[:y, :x].sum((0, 1)).

    int32 while every sum fits (images up to 8.4M pixels): half the memory traffic of int64 in the gathers.
    """
    h, w, c = img.shape
    dtype = np.int32 if h * w * 255 < 2 ** 31 else np.int64
    table = np.zeros((h + 1, w + 1, c), dtype)
    np.cumsum(img, 0, dtype=dtype, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], 1, out=table[1:, 1:])
    return torch.from_numpy(table)


def _pyramid_level(table: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`interpolate(img, size, mode="area")` of the whole image: (1, 3, out_h, out_w) float32, channels_last.
    `table` may also be a stack of same-size tables (B, H+1, W+1, 3): then (B, 3, out_h, out_w).

    One window grid for the whole image, so rows and columns are read separably (whole-row copies).
    """
    d = table.dim() - 3  # 1 for a stack
    r0, r1 = _bins(torch.tensor([0]), torch.tensor([table.shape[d] - 1]), size[0])
    c0, c1 = _bins(torch.tensor([0]), torch.tensor([table.shape[d + 1] - 1]), size[1])
    r0, r1, c0, c1 = (t[0].to(table.device) for t in (r0, r1, c0, c1))
    rows = table.index_select(d, r1) - table.index_select(d, r0)  # ([B,] out_h, W + 1, 3)
    sums = rows.index_select(d + 1, c1) - rows.index_select(d + 1, c0)  # ([B,] out_h, out_w, 3)
    means = sums.to(torch.float32) / (r1 - r0).to(torch.float32)[:, None, None] / (c1 - c0).to(torch.float32)[:, None]
    return means.permute(0, 3, 1, 2) if d else means.permute(2, 0, 1)[None]


def _box_resample(table: torch.Tensor, windows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`interpolate(img[:, :, y0:y1, x0:x1], size, mode="area")` for every window (N, 4) = y0, y1, x0, x1.

    Returns (N, 3, out_h, out_w) float32, channels_last in memory (what the channels_last nets want).
    """
    return _resample_windows(table.view(-1, table.shape[2]), windows, table.shape[1], 0, size)


def _resample_windows(flat: torch.Tensor, windows: torch.Tensor, width, base, size: tuple[int, int]) -> torch.Tensor:
    """`_box_resample` over flattened tables (rows of 3 sums): window i reads the table that starts at row
    `base[i]` of `flat` and is `width[i]` wide (scalars: one table for all)."""
    r0, r1 = _bins(windows[:, 0], windows[:, 1], size[0])
    c0, c1 = _bins(windows[:, 2], windows[:, 3], size[1])
    if isinstance(width, torch.Tensor):
        width, base = width[None, None, :, None, None], base[None, None, :, None, None]
    # All four corners of all windows in one gather (one call is cheaper than four).
    corners = base + torch.stack([r1, r0])[:, None, :, :, None] * width + torch.stack([c1, c0])[None, :, :, None, :]
    at = flat.index_select(0, corners.reshape(-1)).view(2, 2, len(windows), size[0], size[1], -1)
    sums = (at[0, 0] - at[0, 1]) - (at[1, 0] - at[1, 1])
    rows = (r1 - r0).to(torch.float32)[:, :, None, None]
    cols = (c1 - c0).to(torch.float32)[:, None, :, None]
    return (sums.to(torch.float32) / rows / cols).permute(0, 3, 1, 2)


def _bins(start: torch.Tensor, end: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive pooling's [lo, hi) input ranges for `out` bins over [start, end), per window: (N, out) each."""
    i = torch.arange(out, device=start.device)
    length = (end - start)[:, None]
    lo = start[:, None] + torch.div(i * length, out, rounding_mode="floor")
    hi = start[:, None] + torch.div((i + 1) * length + out - 1, out, rounding_mode="floor")
    return lo, hi


def _normalise(x: torch.Tensor, dtype) -> torch.Tensor:
    return ((x - 127.5) * 0.0078125).to(dtype)


def _candidates(reg: torch.Tensor, probs: torch.Tensor, scale: float, thresh: float) -> np.ndarray:
    """PNet cells scoring at least `thresh` as (K, 9) rows: x1 y1 x2 y2 score dx1 dy1 dx2 dy2 (generateBoundingBox).

    In numpy: a handful of tiny array ops per scale, where torch's per-op overhead dominated;
    the float32 arithmetic is the same.
    """
    stride, cellsize = 2, 12
    face = probs[0, 1].cpu().numpy()
    ys, xs = np.nonzero(face >= thresh)
    xy = np.stack([xs, ys], axis=1).astype(np.float32)
    q1 = np.floor((stride * xy + 1) / np.float32(scale))
    q2 = np.floor((stride * xy + cellsize - 1 + 1) / np.float32(scale))
    offsets = reg[0].cpu().numpy()[:, ys, xs].T
    return np.concatenate([q1, q2, face[ys, xs, None], offsets], axis=1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """bbreg: move the corners by the net's offsets, in units of the (inclusive) box size."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out = boxes.clone()
    out[:, :4] = boxes[:, :4] + reg[:, :4] * torch.stack([w, h, w, h], dim=1)
    return out


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """rerec: grow each box to a square on its longer side, same centre."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.max(w, h)
    out = boxes.clone()
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2:4] = out[:, :2] + side[:, None]
    return out


def _inside(boxes: torch.Tensor, w: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pad: the part of each box inside the image, as windows y0, y1, x0, x1 (the crop
    img[y - 1:ey, x - 1:ex]); boxes with no pixel inside are dropped with their windows."""
    b = boxes[:, :4].trunc().to(torch.int64)
    x, y = b[:, 0].clamp(min=1), b[:, 1].clamp(min=1)
    ex, ey = b[:, 2].clamp(max=w), b[:, 3].clamp(max=h)
    windows = torch.stack([y - 1, ey, x - 1, ex], dim=1)
    ok = (windows[:, 1] > windows[:, 0]) & (windows[:, 3] > windows[:, 2])
    return boxes[ok], windows[ok]


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """nms_numpy with method "Min": overlap is intersection over the smaller box (inclusive pixels)."""
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)
    pick = []
    while order.size > 0:
        i, rest = order[-1], order[:-1]
        pick.append(i)
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        order = rest[iw * ih / np.minimum(area[i], area[rest]) <= threshold]
    return np.asarray(pick, dtype=np.int64)
