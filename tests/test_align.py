"""`preprocess --align`: the five-point similarity warp onto ArcFace's template (facenet/preprocess/align.py).
The transform is checked against known ones, the warp on planted points, the landmarks against
facenet-pytorch's on real photos; the setting is in the manifest and a rerun with the other one is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from facenet.samples import copy_subset
from facenet.preprocess import align


def test_similarity_recovers_a_known_transform_and_refuses_what_is_none():
    rng = np.random.default_rng(0)
    dst = align.template(160)
    for _ in range(20):
        angle, scale, shift = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5), rng.uniform(-300, 300, 2)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        src = (dst - shift) @ rot / scale  # dst = scale * rot @ src + shift
        m = align.similarity(src, dst)
        np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
        np.testing.assert_allclose(src @ m[:, :2].T + m[:, 2], dst, atol=1e-6)
    mirrored = dst * [-1, 1]  # only a reflection maps these onto dst: the best similarity is not one
    m = align.similarity(mirrored, dst)
    assert np.linalg.det(m[:, :2]) > 0
    assert align.similarity(np.full((5, 2), 7.0), dst) is None  # five points in one place
    # The template: ArcFace's 112-pixel points, scaled into the crop inside its margin.
    np.testing.assert_allclose(align.template(112), align.ARCFACE_112)
    np.testing.assert_allclose(align.template(160, margin=48), align.ARCFACE_112 + 24)


def test_a_pure_shift_warps_to_the_shifted_pixels():
    """Pixel centres are where PIL samples them: a translation by whole pixels moves every pixel whole."""
    arr = np.random.default_rng(1).integers(0, 256, (200, 240, 3), dtype=np.uint8)
    points = align.template(112) + [37.0, 21.0]
    out = np.asarray(align.align_face(Image.fromarray(arr), points, 112)).astype(int)
    assert np.abs(out - arr[21:133, 37:149]).max() <= 1  # PIL's fixed-point bilinear rounds by one at most


def test_the_warp_puts_planted_points_on_the_template():
    """Five bright dots placed where a tilted, 3x larger face would have its landmarks: after the warp (which
    reduces the photo 3x first, then warps bilinearly) each dot's centre of mass is on its template point."""
    dst = align.template(160)
    angle = np.deg2rad(25)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = 3.1 * dst @ rot.T + [180.0, 40.0]
    yy, xx = np.mgrid[0:720, 0:800]
    canvas = np.zeros((720, 800), np.float64)
    for x, y in points:
        canvas += 250 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 6.0 ** 2))
    photo = Image.fromarray(np.repeat(canvas.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2))
    out = np.asarray(align.align_face(photo, points, 160))[..., 0].astype(np.float64)
    assert out.shape == (160, 160)
    oy, ox = np.mgrid[0:160, 0:160]
    for x, y in dst:
        near = (ox - x) ** 2 + (oy - y) ** 2 < 5 ** 2
        w = out * near
        centre = np.array([(w * ox).sum(), (w * oy).sum()]) / w.sum()
        assert np.linalg.norm(centre - [x, y]) < 0.35, (centre, (x, y))


def test_landmarks_are_facenet_pytorchs(sample_root):
    """Our detector's five points (one photo and batched) are those of facenet-pytorch's MTCNN.detect(landmarks=True)."""
    from facenet_pytorch import MTCNN

    from facenet.preprocess.detect import detect_faces, detect_faces_batch
    from facenet.preprocess.faces import DetectorSettings, FaceCropper

    raw = os.path.join(sample_root, "raw")
    photos = [np.asarray(Image.open(os.path.join(raw, ident, sorted(os.listdir(os.path.join(raw, ident)))[0]))
                         .convert("RGB")) for ident in sorted(os.listdir(raw))]
    m = FaceCropper(DetectorSettings()).mtcnn
    reference = MTCNN(keep_all=True, select_largest=False, min_face_size=20)
    batched = detect_faces_batch(photos, [20] * len(photos), m.pnet, m.rnet, m.onet, m.thresholds, m.factor,
                                 points=True)
    for photo, (b_boxes, _, b_points) in zip(photos, batched):
        boxes, _, points = detect_faces(photo, 20, m.pnet, m.rnet, m.onet, m.thresholds, m.factor, points=True)
        want_boxes, _, want_points = reference.detect(Image.fromarray(photo), landmarks=True)
        assert points.shape == (len(boxes), 5, 2) == (len(want_boxes), 5, 2)
        np.testing.assert_allclose(points, np.asarray(want_points, np.float32), atol=1e-3)
        np.testing.assert_allclose(b_points, points, atol=1e-3)
        # Eyes above the nose above the mouth, left before right: the order the template assumes.
        p = points[0]
        assert p[0, 0] < p[1, 0] and p[3, 0] < p[4, 0] and max(p[0, 1], p[1, 1]) < p[2, 1] < min(p[3, 1], p[4, 1])


def test_align_is_recorded_and_a_rerun_without_it_is_refused(sample_root, tmp_path):
    raw = tmp_path / "raw"
    copy_subset(os.path.join(sample_root, "raw"), str(raw), 2, 3)
    out = tmp_path / "out"

    def preprocess(*extra):
        return subprocess.run([sys.executable, "-m", "services.cli", "preprocess", str(raw), str(out), "--workers", "1",
                               "--json", *extra], capture_output=True, text=True, cwd=REPO, timeout=300)

    res = preprocess("--align")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["faces"] == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["align"] is True
    again = preprocess("--align")
    assert again.returncode == 0 and json.loads(again.stdout)["skipped"] == 6  # a rerun repeats nothing
    refused = preprocess()
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"box crops (no --align): {out} was preprocessed with --align" in refused.stderr
    assert json.loads((out / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize("value", ["yes", 1])
def test_a_queued_align_that_is_not_a_bool_is_refused(value):
    from facenet.errors import InputError
    from facenet.preprocess.plan import Params

    with pytest.raises(InputError, match="--align"):
        Params(align=value).validate()
