"""insightface's verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`), read without running pickle code.

Such a file is a pickle of `(bins, issame)`: `bins` a list of 2N encoded images (JPEG or PNG, 112 x 112 aligned
faces), pair i being bins[2i] and bins[2i + 1], and `issame` N flags, a list of bools or a numpy bool array. The
images are byte strings (insightface's published sets, written by Python 2) or numpy uint8 arrays of the bytes,
shape (n, 1) or (n,): what `cv2.imencode` returns and insightface's own `build_eval_pack.py` pickles with
HIGHEST_PROTOCOL (deepinsight/insightface@7fadd420:recognition/arcface_mxnet/common/build_eval_pack.py L131-136).
insightface scores them with 10 folds in file order (sklearn's KFold without shuffle) and, by default, test-time
flip.

A pickle is a program: `pickle.load` of a file someone else made can run anything. `read_bin` unpickles with
a loader that knows no global but stand-ins of our own for numpy's array, dtype, `_reconstruct` and `_frombuffer`
(and `_codecs.encode`, how Python 3 pickles bytes at protocol 2). They accept only a bool array (the flags) or a
uint8 array of shape (n,) or (n, 1) (an image), whose shape must match the bytes the file holds for it: no numpy
code runs on the file and nothing is allocated by a shape the file declares. Every other global, and any result
that is not (list of images, flags), is refused in one line. A pickle can name an object again by its memo in
two bytes, so nothing is copied per name: an image the file holds once is one bytes object however often it is
named, and the images together never take more memory than the file.

A program that runs no code can still ask for memory: one byte of pickle can make a 216-byte set, five bytes
(LONG_BINPUT 2**32 - 1) a memo of 2**33 slots (64 GiB, which CPython's unpickler allocates and zeroes), and a
50 MB file 10 million pairs. So the opcodes are read first, before the unpickler makes anything (`_scan`): only
those a verification set's writers use, at most MAX_PICKLE_OPS of them, every memo index below the opcodes read
so far. Then the bounds below, each counted over every time the file names an image (an image named 20,000
times is held once and, its bytes being the same, embedded once; the bounds count it 20,000 times all the same).
Every refusal is one line naming the option and the file.

The bounds. insightface's public sets (faces_emore and its other training sets ship them): LFW, AgeDB-30,
CALFW and CPLFW 6,000 pairs each (12,000 images), CFP-FP and CFP-FF 7,000, VGG2-FP 5,000; 43,000 pairs in all.
Their images are 112 x 112 JPEGs of about 5 KB: lfw.bin is 61.7 MB for its 12,000 (leondgarse/Keras_insightface
issue #110 gives 61.7 MB for insightface's and 61.5 MB for another build); at that density CFP's 14,000 images
are ~72 MB. We found no public .bin of ~400 MB, nor of more than about 100 MB. Embedding is the time a set
costs (one forward pass an image named, at every verification), so the pair bounds bound the time; the pixel
bound keeps each decode as cheap as a face crop's.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import weakref

from facenet import confine
from facenet.confine import shown
from facenet.errors import UserError, clipped
from facenet.verification.metrics import kfold_folds
from facenet.verification.pairs import DEFAULT_FOLDS, Pair, PairSet

# insightface's procedure cuts a set into 10 folds in order (KFold(10) needs a pair a fold) and ours needs 2
# folds: a set of fewer pairs cannot be scored at all, so it is refused when read, not at the first verification.
MIN_BIN_PAIRS = DEFAULT_FOLDS
# ~3x the biggest public set (CFP-FP, 7,000 pairs): room for one's own set, and at most 40,000 images to embed
# a verification (a few MB of 10**6 pairs of one 8 x 8 JPEG were ~18 h of CPU embedding, 10**7 pairs passed
# 3 GB of Python objects before the first image was decoded).
MAX_BIN_PAIRS = 20_000
# One image: a 112 x 112 JPEG is ~5 KB; 1 MiB holds even an uncompressed image of MAX_BIN_IMAGE_PIXELS (a
# 512 x 512 RGB BMP is 768 KiB). A 16 MiB buffer is no face crop.
MAX_BIN_IMAGE_BYTES = 1 << 20
# One image's pixels (read from its header before it is decoded; a larger one is an unreadable image, dropped
# and named like any other): 512 x 512 is 21x insightface's 112 x 112 crop and 10x facenet's 160 x 160, while a
# 4096 x 4096 image (the loader's own cap; a 50 KB PNG of one colour) is 1,300x a crop's pixels to decode and
# would make the pair bound no bound on the time.
MAX_BIN_IMAGE_PIXELS = 512 * 512
# The file, read whole into memory: 40,000 images (MAX_BIN_PAIRS) of ~6 KB, 4x lfw.bin's 61.7 MB. Reading holds
# at most twice the file (the file and the objects made of it, then those and the bytes made of any bytearrays).
MAX_BIN_BYTES = 256 << 20
# The images' bytes counted every time the file names one (distinct objects with the same bytes are each made
# bytes and hashed; identical images are embedded once, `first_of_each`): the same as the file's bound.
MAX_BIN_REFERENCED_BYTES = 256 << 20
# Pickle opcodes: an image takes 9 (bytes at protocol 2) to 35 (a numpy array at protocol 0) and a flag 1 or 2,
# so a set of MAX_BIN_PAIRS pairs written by any of insightface's or numpy's writers needs at most ~72 a pair.
# Each opcode makes at most one small object (no sets or dicts pass the scan), so this bounds what the unpickler
# allocates beyond the file's own bytes (measured: a 200 MiB peak for a file of nothing but the costliest
# opcodes, tests/test_hostile_bins.py) and the scan's time (~1 us an opcode: ~2 s at most).
MAX_PICKLE_OPS = 100 * MAX_BIN_PAIRS
# The sets one process holds at once (training's --verify-bin takes 16; each is embedded every verification):
# all seven public sets (43,000 pairs, ~450 MB) fit; 16 sets of the per-set bounds do not.
MAX_HELD_BIN_PAIRS = 50_000
MAX_HELD_BIN_BYTES = 768 << 20

# The opcodes a verification set's writers use (Python 2's and 3's pickle at protocols 0 to 5, numpy's arrays
# among them); POP, POP_MARK and DUP make nothing, and the out-of-band buffer ones fail for want of a buffer.
# No dict, set, frozenset, float, instance (INST, OBJ, NEWOBJ), extension code or persistent id.
_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "NEXT_BUFFER", "READONLY_BUFFER"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_KINDS = {"b1": "bool", "?": "bool", "u1": "uint8"}  # numpy's pickled type codes: np.bool_ and np.uint8


class _Refused(Exception):
    pass


def _brief(value) -> str:
    """A value from the file as a message quotes it: short, without making the repr of a big one first."""
    if isinstance(value, (bytes, bytearray, str)):
        return clipped(repr(value[:40]), 60)
    if type(value) is int and abs(value) < 10 ** 30:
        return repr(value)
    if isinstance(value, tuple) and len(value) <= 4 and all(type(v) is int and abs(v) < 10 ** 30 for v in value):
        return repr(value)
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} items"
    return f"a {type(value).__name__}"


class _ArrayClass:
    """Stands in for numpy.ndarray: only ever passed to _reconstruct."""


class _Dtype:
    """Stands in for numpy.dtype: bool ('b1', as numpy pickles np.bool_) or uint8 ('u1')."""

    __slots__ = ("kind",)

    def __init__(self, code, align=False, copy=False):
        name = code.decode("latin-1") if isinstance(code, bytes) else code  # bytes: Python 2's str
        if not isinstance(name, str) or name not in _KINDS:
            raise _Refused(f"a numpy array of dtype {_brief(code)} (only bool flags and uint8 image bytes are read)")
        self.kind = _KINDS[name]

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple):
            raise _Refused("a numpy dtype with an odd state")


class _Array:
    """Stands in for the ndarray numpy's _reconstruct or _frombuffer makes: its kind ('bool' or 'uint8') and its
    data, the bytes object the file holds (a reference, never a copy: the file may name it many times)."""

    __slots__ = ("kind", "data")

    def __init__(self):
        self.kind: str | None = None
        self.data: bytes | bytearray | None = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused("a numpy array with an odd state")
        _, shape, dtype, _, raw = state
        self.set(shape, dtype, raw)

    def set(self, shape, dtype, raw) -> None:
        if not isinstance(dtype, _Dtype):
            raise _Refused("a numpy array of an unknown dtype")
        if not (isinstance(shape, tuple) and shape and all(type(n) is int and n >= 0 for n in shape)):
            raise _Refused(f"a numpy array of shape {_brief(shape)}")
        if dtype.kind == "bool" and len(shape) != 1:
            raise _Refused(f"a bool array of shape {_brief(shape)} (flags are read 1-D)")
        if dtype.kind == "uint8" and not (len(shape) == 1 or shape[1:] == (1,)):
            raise _Refused(f"a uint8 array of shape {_brief(shape)} (an image's bytes are read as (n,) or (n, 1))")
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused(f"a numpy array whose data is a {type(raw).__name__}, not bytes")
        if len(raw) != shape[0]:  # one byte an item; checked before anything is made of it
            raise _Refused(f"a numpy array of shape {_brief(shape)} but {len(raw)} bytes of data")
        self.kind, self.data = dtype.kind, raw


def _reconstruct(cls, shape, typecode):
    if cls is not _ArrayClass:
        raise _Refused("numpy's _reconstruct of something other than an ndarray")
    return _Array()


def _frombuffer(buf, dtype, shape, order="C"):
    """Stands in for numpy's _frombuffer, which protocol-5 pickles of an array use (buf: the in-band bytearray)."""
    array = _Array()
    array.set(shape, dtype, buf)
    return array


_ALLOWED = {("numpy.core.numeric", "_frombuffer"): _frombuffer, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): _ArrayClass, ("numpy", "dtype"): _Dtype}


def _scan(data: bytes) -> None:
    """Read the pickle's opcodes without making anything: _Refused for an opcode no verification set holds
    (`_OPCODES`), for more than MAX_PICKLE_OPS, or for a memo index past the opcodes read so far (CPython's
    unpickler sizes its memo by the largest index it is given: 5 bytes can ask for 64 GiB). Whatever the scan
    cannot parse (ValueError), the unpickler would not either."""
    for count, (op, arg, _) in enumerate(pickletools.genops(data), 1):
        if count > MAX_PICKLE_OPS:
            raise _Refused(f"more than {MAX_PICKLE_OPS} pickle opcodes, more than a set of {MAX_BIN_PAIRS} "
                           "pairs takes")
        if op.name not in _OPCODES:
            raise _Refused(f"it holds the pickle opcode {op.name}, which a verification set never holds")
        if op.name in _PUTS and not (type(arg) is int and 0 <= arg < count):
            raise _Refused(f"its pickle stores memo slot {_brief(arg)} after {count} opcodes (a pickle numbers "
                           "its memo from 0)")


class _Loader(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._encoded: dict[int, tuple[str, bytes]] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return self._latin1
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"it names {clipped(module, 60)}.{clipped(name, 60)}, which a verification set never "
                           "holds") from None

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent reference")

    def _latin1(self, text, encoding="latin1"):
        """Stands in for _codecs.encode, which Python 3's protocol-2 pickles use to store bytes. A text the file
        names many times is encoded once (kept with its text, so that its id stays its own)."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _Refused("_codecs.encode of something other than latin-1 text")
        if id(text) not in self._encoded:
            self._encoded[id(text)] = (text, text.encode("latin-1"))
        return self._encoded[id(text)][1]


def _unpickle(data: bytes, where: str):
    try:
        _scan(data)
        return _Loader(data).load()
    except _Refused as exc:
        raise UserError(f"{where}: refused: {exc}") from None
    except Exception as exc:  # truncated, not a pickle at all, or out of memory after all
        raise UserError(f"{where}: not an insightface verification set ({type(exc).__name__}: "
                        f"{clipped(str(exc), 100)})") from None


def read_bin(path: str, roots: confine.Roots | None = None, what: str = "--bin") -> tuple[list[bytes], list[bool]]:
    """(2N image byte strings, N same-person flags) of an insightface .bin, or UserError in one line naming
    `what` (the option) and the file. An image the file holds once is one bytes object, however often named.
    Refused: a file of more than MAX_BIN_BYTES, more than MAX_BIN_PAIRS pairs, an image of more than
    MAX_BIN_IMAGE_BYTES, images of more than MAX_BIN_REFERENCED_BYTES counted every time they are named, and
    (`_scan`) a pickle of more than MAX_PICKLE_OPS opcodes or of opcodes no such set holds."""
    where = f"{what} {shown(path)}"
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file")
    obj = _unpickle(confine.read_bytes(path, roots, what, MAX_BIN_BYTES), where)  # the file's bytes freed here
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise UserError(f"{where}: not an insightface verification set (expected a pickled (bins, issame))")
    bins, flags = obj
    del obj
    if not isinstance(bins, list):
        raise UserError(f"{where}: its images are not a list of encoded image bytes (bytes or uint8 arrays)")
    n = _flag_count(flags)
    if n is None:
        raise UserError(f"{where}: its same/different flags are not a list of bools or a bool array")
    if n > MAX_BIN_PAIRS:
        raise UserError(f"{where}: {n} pairs, more than the {MAX_BIN_PAIRS} allowed (the biggest public sets hold "
                        "7,000; every image is embedded at every verification)")
    if not n or len(bins) != 2 * n:
        raise UserError(f"{where}: {len(bins)} images for {n} pairs (two images a pair)")
    images = _images(bins, where)
    if images is None:
        raise UserError(f"{where}: its images are not a list of encoded image bytes (bytes or uint8 arrays)")
    issame = _flags(flags)
    if issame is None:
        raise UserError(f"{where}: its same/different flags are not a list of bools or a bool array")
    return images, issame


def _images(bins: list, where: str) -> list[bytes] | None:
    """Each image's bytes, or None when `bins` is not a list of byte strings and uint8 arrays; UserError for an
    image over MAX_BIN_IMAGE_BYTES or, counting an image every time it is named, images over
    MAX_BIN_REFERENCED_BYTES. Each buffer is made bytes once (bytes(b) of a bytes object is that object), so the
    distinct ones add up to no more than the file holds, however many times it names them."""
    made: dict[int, bytes] = {}
    out = []
    total = 0
    for k, b in enumerate(bins):
        raw = b.data if isinstance(b, _Array) and b.kind == "uint8" else b
        if not isinstance(raw, (bytes, bytearray)):
            return None
        if len(raw) > MAX_BIN_IMAGE_BYTES:
            raise UserError(f"{where}: image {k} is {len(raw)} bytes, more than the {MAX_BIN_IMAGE_BYTES} allowed "
                            "for one image (a 112 x 112 face crop is ~5 KB)")
        total += len(raw)
        if total > MAX_BIN_REFERENCED_BYTES:
            raise UserError(f"{where}: its first {k + 1} images are more than {MAX_BIN_REFERENCED_BYTES} bytes, "
                            "counting an image every time the file names it (each is decoded every time); "
                            "that is the most allowed")
        if id(raw) not in made:  # every raw is alive in `bins`, so ids are not reused
            made[id(raw)] = bytes(raw)
        out.append(made[id(raw)])
    return out


def _flag_count(issame) -> int | None:
    """How many flags `issame` holds, or None when it is not a list or a bool array (nothing made of it yet)."""
    if isinstance(issame, _Array):
        return len(issame.data) if issame.kind == "bool" else None
    return len(issame) if isinstance(issame, list) else None


def _flags(issame) -> list[bool] | None:
    """The same-person flags of a list of bools or a bool array of 0/1 bytes, or None."""
    if isinstance(issame, _Array):
        if issame.kind != "bool" or set(issame.data) - {0, 1}:
            return None
        return [bool(b) for b in issame.data]
    if isinstance(issame, list) and all(isinstance(s, bool) for s in issame):
        return issame
    return None


def set_name(path: str) -> str:
    """A verification set's name in metric names: the file's stem, lower-case, [a-z0-9_] only."""
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    return re.sub(r"[^a-z0-9_]", "_", stem) or "bin"


def load_set(path: str, roots: confine.Roots | None = None, what: str = "--bin") -> "tuple[PairSet, BinImages]":
    """A .bin's pairs and its images (embed_paths' `source`): what evaluate --bin and --verify-bin score.
    Refused in one line besides read_bin's refusals: fewer than MIN_BIN_PAIRS pairs (nothing could score them),
    and more than MAX_HELD_BIN_PAIRS pairs or MAX_HELD_BIN_BYTES bytes together with the sets this process
    still holds (training holds every --verify-bin set and embeds them all at each verification)."""
    where = f"{what} {shown(path)}"
    images, issame = read_bin(path, roots, what)
    if len(issame) < MIN_BIN_PAIRS:
        raise UserError(f"{where}: {len(issame)} pair(s); a set needs at least {MIN_BIN_PAIRS}: insightface's "
                        f"procedure scores pairs in {DEFAULT_FOLDS} folds, one pair a fold at least")
    source = BinImages(path, images, len(issame))
    sets_held, pairs_held, bytes_held = _held()
    if pairs_held + source.pairs > MAX_HELD_BIN_PAIRS or bytes_held + source.referenced > MAX_HELD_BIN_BYTES:
        raise UserError(f"{where}: {source.pairs} pairs of {source.referenced} bytes, with the {sets_held} set(s) "
                        f"read before it ({pairs_held} pairs, {bytes_held} bytes), pass the {MAX_HELD_BIN_PAIRS} "
                        f"pairs or {MAX_HELD_BIN_BYTES} bytes of .bin sets allowed at once (all seven public sets "
                        "are 43,000 pairs)")
    _HELD.add(source)
    return bin_pairs(path, issame, same_as=first_of_each(images)), source


def first_of_each(images: list[bytes]) -> list[int]:
    """For each image, the position of the first image with the same bytes. A set names most images more than
    once (a photo in several of LFW's pairs; a set built from a few people's photos, many times over): each
    distinct image is then decoded and embedded once, not at every place it is named."""
    first: dict[bytes, int] = {}
    return [first.setdefault(b, k) for k, b in enumerate(images)]


def bin_pairs(path: str, issame: list[bool], folds: int = DEFAULT_FOLDS, same_as: list[int] | None = None) -> PairSet:
    """The pairs in file order, `folds` contiguous folds as insightface's KFold(shuffle=False) cuts them (the
    first len % folds folds one pair longer), marked for insightface's own accuracy too (`PairSet.insightface`).
    Image k is named `<path>#<k>`, or `<path>#<same_as[k]>` (`first_of_each`: the same bytes, the same name)."""
    n = len(issame)
    fold_of = kfold_folds(n, folds)
    at = same_as or range(2 * n)
    pairs = [Pair(f"{path}#{at[2 * i]}", f"{path}#{at[2 * i + 1]}", same, fold_of[i]) for i, same in enumerate(issame)]
    name = os.path.basename(path)
    return PairSet(pairs, f"{name} ({n} pairs, {min(folds, n)} folds in file order)", insightface=True)


class BinImages:
    """The images of a .bin as embed_paths' `source`: `select` maps `<path>#<k>` names to their bytes. `pairs`
    and `referenced` (its images' bytes, counted every time named) count toward what a process holds at once."""

    def __init__(self, path: str, bins: list[bytes], pairs: int | None = None):
        self.path, self.bins = path, bins
        self.pairs = len(bins) // 2 if pairs is None else pairs
        self.referenced = sum(len(b) for b in bins)

    def select(self, names: list[str]) -> "_Selected":
        prefix = self.path + "#"
        ks = [int(n[len(prefix):]) for n in names if n.startswith(prefix)]
        if len(ks) != len(names) or not all(0 <= k < len(self.bins) for k in ks):
            raise ValueError("a name that is not one of this set's images")
        return _Selected(names, [self.bins[k] for k in ks])


# The sets this process holds (load_set's); one is forgotten when nothing uses it any more.
_HELD: "weakref.WeakSet[BinImages]" = weakref.WeakSet()


def _held() -> tuple[int, int, int]:
    """(sets, pairs, bytes counted every time named) this process holds: numbers only, so that an error raised
    after it keeps no set alive in its traceback."""
    held = list(_HELD)
    return len(held), sum(s.pairs for s in held), sum(s.referenced for s in held)


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
        """The image's bytes; ValueError (an unreadable image: dropped and named) for one of more than
        `max_bytes` or, by its header, of more than MAX_BIN_IMAGE_PIXELS pixels."""
        from PIL import Image

        data = self.data[k]
        if len(data) > max_bytes:
            raise ValueError(f"{name}: {len(data)} bytes, more than {max_bytes}")
        with Image.open(io.BytesIO(data)) as header:  # the header only
            width, height = header.size
        if width * height > MAX_BIN_IMAGE_PIXELS:
            raise ValueError(f"{name}: {width}x{height} pixels, more than the {MAX_BIN_IMAGE_PIXELS} of a .bin's image")
        return data
