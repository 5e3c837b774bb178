"""Five-point face alignment (`preprocess --align`): each face warped by the least-squares similarity
transform (rotation, uniform scale, translation) that takes its five MTCNN landmarks onto a fixed template.

The template is ArcFace's, the one arcface_torch, TFace and FaceX-Zoo train and verify on: `arcface_src` in
deepinsight/insightface python-package/insightface/utils/face_align.py (commit 0b2958e), five points on a
112 x 112 crop: left eye (38.2946, 51.6963), right eye (73.5318, 51.5014), nose tip (56.0252, 71.7366), left
mouth corner (41.5493, 92.3655), right mouth corner (70.7299, 92.2041). For a crop of S pixels with margin M
it is scaled uniformly into the central S - M pixels: point * (S - M) / 112 + M / 2 (insightface scales by
S / 112 for multiples of 112; for 160 px that is our M = 0).

The transform is Umeyama's least-squares estimate, what insightface gets from skimage's
`SimilarityTransform.estimate` (its reflection guard included); the warp is bilinear with black outside the
photo, as insightface's `cv2.warpAffine(..., borderValue=0)`. Coordinates are pixel centres (MTCNN's points,
OpenCV's convention); PIL's affine sampler is shifted by half a pixel to match. A face scaled down by more
than 2x is first reduced by an integer factor with a box filter, so the bilinear warp does not alias.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                        [70.7299, 92.2041]], dtype=np.float64)


def template(image_size: int, margin: int = 0) -> np.ndarray:
    """The five target points (5, 2) in an `image_size` crop with `margin` pixels around the face."""
    return ARCFACE_112 * (image_size - margin) / 112.0 + margin / 2.0


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """The 2 x 3 matrix M of the similarity transform minimising sum |M [src; 1] - dst|^2 (Umeyama 1991), or
    None where `src` has no extent (all points in one place) or the result is not finite."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = float((s0 ** 2).sum()) / len(src)
    if not var_s > 1e-9:
        return None
    u, sing, vt = np.linalg.svd(d0.T @ s0 / len(src))
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection is not a similarity
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float((sing * d).sum()) / var_s
    m = np.hstack([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]])
    return m if np.isfinite(m).all() and scale > 0 else None


def align_face(img: Image.Image, points: np.ndarray, image_size: int, margin: int = 0) -> Image.Image | None:
    """`img` warped so that `points` (5, 2, pixel centres in `img`) land on the template; RGB, `image_size`
    square. None where the points give no transform (the caller crops by the box instead)."""
    dst = template(image_size, margin)
    m = similarity(points, dst)
    if m is None:
        return None
    scale = math.hypot(m[0, 0], m[1, 0])
    k = int(1.0 / scale) if scale < 0.5 else 1
    if k > 1:  # reduce first (box filter): centre x in the reduced image is (x + 0.5) / k - 0.5
        img = img.reduce(k)
        m = similarity((np.asarray(points, np.float64) + 0.5) / k - 0.5, dst)
        if m is None:
            return None
    inverse = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    # PIL samples input (a (x + .5) + b (y + .5) + c) - .5 for output pixel (x, y): fold the half pixels into c, f.
    a, b, c = inverse[0]
    d, e, f = inverse[1]
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    return img.convert("RGB").transform((image_size, image_size), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                        fillcolor=(0, 0, 0))
