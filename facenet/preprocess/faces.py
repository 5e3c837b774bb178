"""One MTCNN per process, tuned for loosely cropped face photos, and the crop it makes.

Why it is fast: the seed builds a new MTCNN (three networks loaded from
disk) for every image and runs the detector's full image pyramid down to
20-pixel faces on the full-size photo. In a loosely cropped photo (VGGFace2)
the face fills a large part of the frame, so we detect on a copy whose
longer side is at most `detect_size` pixels and start the pyramid at
`min_face_frac` of the shorter side. The crop itself is cut from the
full-resolution image with facenet-pytorch's own box/margin arithmetic; the
three networks run channels_last (see FaceCropper), and the detector is
`detect.py`: facenet-pytorch's `detect_face` for one image with every
resample read from one integral image (the same boxes, bit for bit; 11.3 ->
8.1 ms per photo on one core).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from facenet.preprocess.align import align_face
from facenet.preprocess.detect import detect_faces, detect_faces_batch


@dataclass(frozen=True)
class DetectorSettings:
    image_size: int = 160
    margin: int = 0
    detect_size: int = 640
    min_face_frac: float = 0.1
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # facenet-pytorch's defaults, as the seed
    device: str = "cpu"
    align: bool = False  # warp by the five landmarks onto ArcFace's template (align.py) instead of the box crop


@dataclass
class Face:
    box: tuple[float, float, float, float]  # in original image pixels
    prob: float
    crop: Image.Image


class FaceCropper:
    """Build once per worker process; `find(img)` returns the chosen face or None.

    The MTCNN object is kept for its three loaded networks and settings; detection runs through
    `detect_faces`, not `MTCNN.detect`.
    """

    def __init__(self, settings: DetectorSettings):
        from facenet_pytorch import MTCNN

        self.settings = settings
        self.mtcnn = MTCNN(image_size=settings.image_size, margin=settings.margin, min_face_size=20,
                           thresholds=list(settings.thresholds), keep_all=True, select_largest=False,
                           device=settings.device)
        # No autograd graph in detection, without switching grad off for the whole process (which broke any
        # training that ran after a detector in the same process, as the GPU bench does).
        self.mtcnn.requires_grad_(False)
        from facenet.devices import Device

        if Device(settings.device).channels_last:
            # NHWC weights make every conv output NHWC, and CPU max-pooling (a third of MTCNN's time
            # in NCHW) is vectorised there: 18.6 -> 11.4 ms per photo on one core, identical boxes.
            for net in (self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet):
                net.to(memory_format=torch.channels_last)

    def find(self, img: Image.Image, scale: float = 1.0) -> Face | None:
        """Detect on a reduced copy, pick the most central large face, crop from `img`.

        `scale` maps `img` pixels back to the original file's pixels (for boxes in the manifest).
        """
        small, shrink = self.reduced(img)
        m = self.mtcnn
        found = detect_faces(np.asarray(small), self.min_face(small), m.pnet, m.rnet, m.onet, m.thresholds,
                             m.factor, points=self.settings.align)
        return self._choose(img, scale, small, shrink, *found)

    def find_batch(self, imgs: list[Image.Image], scales: list[float]) -> list[Face | None]:
        """`find` for many photos with one batched detector pass (detect_faces_batch): the same faces."""
        m = self.mtcnn
        reduced = [self.reduced(img) for img in imgs]
        found = detect_faces_batch([np.asarray(small) for small, _ in reduced],
                                   [self.min_face(small) for small, _ in reduced],
                                   m.pnet, m.rnet, m.onet, m.thresholds, m.factor, points=self.settings.align)
        return [self._choose(img, scale, small, shrink, *faces)
                for img, scale, (small, shrink), faces in zip(imgs, scales, reduced, found)]

    def _choose(self, img: Image.Image, scale: float, small: Image.Image, shrink: float, boxes: np.ndarray,
                probs: np.ndarray, points: np.ndarray | None = None) -> Face | None:
        """The most central large face, cropped by its box or (with `points`, --align) warped by its landmarks;
        a face whose landmarks give no transform (all in one place) is cropped by its box."""
        if len(boxes) == 0:
            return None
        best = central_largest(boxes.astype(np.float64), small.size)
        box = tuple(float(v) / shrink for v in boxes[best])
        s = self.settings
        crop = align_face(img, points[best] / shrink, s.image_size, s.margin) if points is not None else None
        if crop is None:
            crop = crop_face(img, box, s.image_size, s.margin)
        return Face(tuple(v * scale for v in box), float(probs[best]), crop)

    def reduced(self, img: Image.Image) -> tuple[Image.Image, float]:
        """The copy detection runs on (longer side at most detect_size) and its scale factor."""
        shrink = min(1.0, self.settings.detect_size / max(img.size))
        if shrink == 1.0:
            return img, shrink
        size = (max(1, round(img.size[0] * shrink)), max(1, round(img.size[1] * shrink)))
        return img.resize(size, Image.BILINEAR), shrink

    def min_face(self, small: Image.Image) -> int:
        """Smallest face the pyramid looks for, in `small`'s pixels."""
        return max(20, int(min(small.size) * self.settings.min_face_frac))

    def detect(self, small: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """All faces in `small`: boxes (N, 4) and probabilities (N,), as MTCNN.detect finds them."""
        m = self.mtcnn
        return detect_faces(np.asarray(small), self.min_face(small), m.pnet, m.rnet, m.onet, m.thresholds, m.factor)


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
