"""One MTCNN per process, tuned for loosely cropped face photos, and the crop it makes.

Why it is fast: the seed builds a new MTCNN (three networks loaded from
disk) for every image and runs the detector's full image pyramid down to
20-pixel faces on the full-size photo. In a loosely cropped photo (VGGFace2)
the face fills a large part of the frame, so we detect on a copy whose
longer side is at most `detect_size` pixels and start the pyramid at
`min_face_frac` of the shorter side. The crop itself is cut from the
full-resolution image with facenet-pytorch's own box/margin arithmetic; the
three networks run channels_last (see FaceCropper).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class DetectorSettings:
    image_size: int = 160
    margin: int = 0
    detect_size: int = 640
    min_face_frac: float = 0.1
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # facenet-pytorch's defaults, as the seed
    device: str = "cpu"


@dataclass
class Face:
    box: tuple[float, float, float, float]  # in original image pixels
    prob: float
    crop: Image.Image


class FaceCropper:
    """Build once per worker process; `find(img)` returns the chosen face or None."""

    def __init__(self, settings: DetectorSettings):
        from facenet_pytorch import MTCNN

        self.settings = settings
        torch.set_grad_enabled(False)
        self.mtcnn = MTCNN(image_size=settings.image_size, margin=settings.margin, min_face_size=20,
                           thresholds=list(settings.thresholds), keep_all=True, select_largest=False,
                           device=settings.device)
        if settings.device in ("cpu", "cuda"):
            # NHWC weights make every conv output NHWC, and CPU max-pooling (a third of MTCNN's time
            # in NCHW) is vectorised there: 18.6 -> 11.4 ms per photo on one core, identical boxes.
            for net in (self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet):
                net.to(memory_format=torch.channels_last)

    def find(self, img: Image.Image, scale: float = 1.0) -> Face | None:
        """Detect on a reduced copy, pick the most central large face, crop from `img`.

        `scale` maps `img` pixels back to the original file's pixels (for boxes in the manifest).
        """
        s = self.settings
        shrink = min(1.0, s.detect_size / max(img.size))
        small = img if shrink == 1.0 else img.resize(
            (max(1, round(img.size[0] * shrink)), max(1, round(img.size[1] * shrink))), Image.BILINEAR)
        self.mtcnn.min_face_size = max(20, int(min(small.size) * s.min_face_frac))
        boxes, probs = self.mtcnn.detect(small)
        if boxes is None or len(boxes) == 0:
            return None
        best = central_largest(np.asarray(boxes, dtype=np.float64), small.size)
        box = tuple(float(v) / shrink for v in boxes[best])
        crop = crop_face(img, box, s.image_size, s.margin)
        return Face(tuple(v * scale for v in box), float(probs[best]), crop)


def central_largest(boxes: np.ndarray, size: tuple[int, int]) -> int:
    """davidsandberg/facenet's choice: box area minus twice the squared offset from the image centre."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    centre = np.array([size[0] / 2, size[1] / 2])
    offsets = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 - centre[0], (boxes[:, 1] + boxes[:, 3]) / 2 - centre[1]])
    return int(np.argmax(area - 2.0 * np.sum(offsets ** 2, axis=0)))


def crop_face(img: Image.Image, box, image_size: int, margin: int) -> Image.Image:
    """facenet-pytorch's extract_face arithmetic (margin in output pixels), returned as an 8-bit image."""
    from facenet_pytorch.models.utils.detect_face import crop_resize

    mx = margin * (box[2] - box[0]) / (image_size - margin)
    my = margin * (box[3] - box[1]) / (image_size - margin)
    clipped = [int(max(box[0] - mx / 2, 0)), int(max(box[1] - my / 2, 0)),
               int(min(box[2] + mx / 2, img.size[0])), int(min(box[3] + my / 2, img.size[1]))]
    return crop_resize(img, clipped, image_size)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
