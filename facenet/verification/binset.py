"""insightface's verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`), read without running pickle code.

Such a file is a pickle of `(bins, issame)`: `bins` a list of 2N encoded images (JPEG or PNG bytes, 112 x 112
aligned faces), pair i being bins[2i] and bins[2i + 1], and `issame` N flags, a list of bools or a numpy bool
array. insightface scores them with 10 folds in file order (sklearn's KFold without shuffle) and, by default,
test-time flip.

A pickle is a program: `pickle.load` of a file someone else made can run anything. `read_bin` unpickles with
a loader that knows no global but three names standing in for numpy's array, dtype and `_reconstruct`,
each our own code that accepts only a 1-D bool array; every other global, and any result that is not
(list of bytes, list of bools), is refused in one line. No numpy code runs on the file's bytes.
"""

from __future__ import annotations

import io
import os
import pickle
import re

from facenet import confine
from facenet.errors import UserError
from facenet.verification.pairs import DEFAULT_FOLDS, Pair, PairSet

MAX_BIN_BYTES = 4 << 30  # agedb_30.bin is ~70 MB; a verification set is not gigabytes


class _Refused(Exception):
    pass


class _ArrayClass:
    """Stands in for numpy.ndarray: only ever passed to _reconstruct."""


class _Dtype:
    """Stands in for numpy.dtype: bool only ('b1', as numpy pickles np.bool_)."""

    def __init__(self, code, align=False, copy=False):
        if code not in ("b1", b"b1", "?", b"?"):
            raise _Refused(f"a numpy array of dtype {code!r} (only a bool array is read)")

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple):
            raise _Refused("a numpy dtype with an odd state")


class _BoolArray:
    """Stands in for the ndarray numpy's _reconstruct makes; its state sets the flags from raw bytes."""

    def __init__(self):
        self.values: list[bool] | None = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused("a numpy array with an odd state")
        _, shape, dtype, _, raw = state
        if not isinstance(dtype, _Dtype):
            raise _Refused("a numpy array of an unknown dtype")
        if not (isinstance(shape, tuple) and len(shape) == 1 and isinstance(shape[0], int)):
            raise _Refused(f"a numpy array of shape {shape!r} (only 1-D is read)")
        if isinstance(raw, str):  # protocol 2 from Python 2 stores the buffer as a latin-1 str
            raw = raw.encode("latin-1")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != shape[0] or set(raw) - {0, 1}:
            raise _Refused("a numpy bool array whose data is not one 0/1 byte per flag")
        self.values = [bool(b) for b in raw]


def _reconstruct(cls, shape, typecode):
    if cls is not _ArrayClass:
        raise _Refused("numpy's _reconstruct of something other than an ndarray")
    return _BoolArray()


def _frombuffer(buf, dtype, shape, order="C"):
    """Stands in for numpy's _frombuffer, which protocol-5 pickles of an array use."""
    array = _BoolArray()
    array.__setstate__((1, shape, dtype, False, bytes(buf) if isinstance(buf, (bytes, bytearray, memoryview)) else buf))
    return array


def _latin1(text, encoding="latin1"):
    """Stands in for _codecs.encode, which Python 3's protocol-2 pickles use to store bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode of something other than latin-1 text")
    return text.encode("latin-1")


_ALLOWED = {("_codecs", "encode"): _latin1,
            ("numpy.core.numeric", "_frombuffer"): _frombuffer, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): _ArrayClass, ("numpy", "dtype"): _Dtype}


class _Loader(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"it names {module}.{name}, which a verification set never holds") from None

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent reference")


def read_bin(path: str, roots: confine.Roots | None = None, what: str = "--bin") -> tuple[list[bytes], list[bool]]:
    """(2N image byte strings, N same-person flags) of an insightface .bin, or UserError in one line naming
    `what` (the option) and the file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")
    data = confine.read_bytes(path, roots, what, MAX_BIN_BYTES)
    try:
        obj = _Loader(io.BytesIO(data), encoding="bytes").load()
    except _Refused as exc:
        raise UserError(f"{what} {path}: refused: {exc}") from None
    except Exception as exc:  # truncated or not a pickle at all
        raise UserError(f"{what} {path}: not an insightface verification set ({type(exc).__name__}: "
                        f"{str(exc)[:100]})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise UserError(f"{what} {path}: not an insightface verification set (expected a pickled (bins, issame))")
    bins, issame = obj
    if isinstance(issame, _BoolArray):
        issame = issame.values
    if not isinstance(bins, list) or not all(isinstance(b, (bytes, bytearray)) for b in bins):
        raise UserError(f"{what} {path}: its images are not a list of encoded image bytes")
    if not isinstance(issame, list) or not all(isinstance(s, bool) for s in issame):
        raise UserError(f"{what} {path}: its same/different flags are not a list of bools or a bool array")
    if not issame or len(bins) != 2 * len(issame):
        raise UserError(f"{what} {path}: {len(bins)} images for {len(issame)} pairs (two images a pair)")
    return [bytes(b) for b in bins], issame


def set_name(path: str) -> str:
    """A verification set's name in metric names: the file's stem, lower-case, [a-z0-9_] only."""
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    return re.sub(r"[^a-z0-9_]", "_", stem) or "bin"


def load_set(path: str, roots: confine.Roots | None = None, what: str = "--bin") -> "tuple[PairSet, BinImages]":
    """A .bin's pairs and its images (embed_paths' `source`): what evaluate --bin and --verify-bin score."""
    images, issame = read_bin(path, roots, what)
    return bin_pairs(path, issame), BinImages(path, images)


def bin_pairs(path: str, issame: list[bool], folds: int = DEFAULT_FOLDS) -> PairSet:
    """The pairs in file order, `folds` contiguous folds as insightface's KFold(shuffle=False) cuts them (the
    first len % folds folds one pair longer). Image k is named `<path>#<k>`."""
    n = len(issame)
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    fold_of = [f for f, size in enumerate(sizes) for _ in range(size)]
    pairs = [Pair(f"{path}#{2 * i}", f"{path}#{2 * i + 1}", same, fold_of[i]) for i, same in enumerate(issame)]
    name = os.path.basename(path)
    return PairSet(pairs, f"{name} ({n} pairs, {min(folds, n)} folds in file order)")


class BinImages:
    """The images of a .bin as embed_paths' `source`: `select` maps `<path>#<k>` names to their bytes."""

    def __init__(self, path: str, bins: list[bytes]):
        self.path, self.bins = path, bins

    def select(self, names: list[str]) -> "_Selected":
        prefix = self.path + "#"
        ks = [int(n[len(prefix):]) for n in names if n.startswith(prefix)]
        if len(ks) != len(names) or not all(0 <= k < len(self.bins) for k in ks):
            raise ValueError("a name that is not one of this set's images")
        return _Selected(names, [self.bins[k] for k in ks])


class _Selected:
    """(name, position) samples whose bytes are in memory: what FaceImages reads through `reader`."""

    def __init__(self, names: list[str], data: list[bytes]):
        self.names, self.data = names, data
        self.reader = self

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, k: int):
        return self.names[k], k

    def read(self, k: int, name: str, roots, max_bytes: int) -> bytes:
        if len(self.data[k]) > max_bytes:
            raise ValueError(f"{name}: {len(self.data[k])} bytes, more than {max_bytes}")
        return self.data[k]
