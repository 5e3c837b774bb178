"""Data loading built for throughput.

Workers decode straight to uint8 CHW tensors (libjpeg-turbo through
torchvision.io, no float work on the CPU); the recipe's
`fixed_image_standardization` ((x - 127.5) / 128) runs on the device in
`to_device`, where it is nearly free. uint8 batches are 4x smaller to pin and
copy than the float batches of the ModelZoo loader.

An image that cannot be read never stops an epoch: training replaces it with
the next readable sample (batch shapes stay static, which matters for NPU
graph compilation and for DDP, where every rank must take the same steps);
evaluation drops it. Either way its path travels with the batch so the
trainer can count and name it. Only still images are read: an animated or
multi-page file (GIF, APNG, WebP, TIFF) is such a bad image, refused from its
header, and whatever is decoded is one [3, H, W] uint8 image.
"""

from __future__ import annotations

import heapq
import io
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from facenet import confine
from facenet.data.dataset import MAX_IMAGE_BYTES, Sample, Samples
from facenet.fsutil import cpu_cores
from facenet.images import animated, to_rgb

MAX_REPLACEMENTS = 16
# Training images are face crops (160 x 160 from preprocessing); these caps refuse, from the header and
# before any pixel is decoded, a small file that would decode to gigabytes.
MAX_FILE_BYTES = MAX_IMAGE_BYTES
MAX_PIXELS = 4096 * 4096
# What torchvision decodes straight to a tensor (libjpeg-turbo, libpng, libwebp): the fast path. Each reads one
# image whatever the file holds: decode_jpeg the primary image of an MPO (phones' 2-frame JPEGs), decode_png the
# default image of an APNG. Everything else is decoded by PIL, first frame only (torchvision's decode_gif returns
# every frame of a GIF: a 3 KB file of 200 frames of 2048 x 2048 is 2.5 GB of tensor).
FAST_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")


def decode(path: str, image_size: int, roots: confine.Roots | None = None, data: bytes | None = None) -> torch.Tensor:
    """Read one still image as uint8 RGB CHW at image_size x image_size (from `data`, its bytes, when given:
    a packed image). Raises on unreadable or refused files, and on animated or multi-page ones (ValueError
    naming the frames)."""
    from PIL import Image

    if data is None:
        data = confine.read_bytes(path, roots, "image", MAX_FILE_BYTES)
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header (and a GIF's frame headers) only
            width, height = header.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"{path}: {width}x{height} pixels, more than {MAX_PIXELS}")
            frames = animated(header)
            if frames:
                raise ValueError(f"{path}: animated {header.format} ({frames}); only still images are read")
            img = None if header.format in FAST_FORMATS else _decode_with_pil(header)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if img is None:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if img.ndim != 3 or img.shape[0] != 3:  # collate stacks [3, H, W]; anything else would end the job
        raise ValueError(f"{path}: decoded to shape {list(img.shape)}, not one RGB image")
    if img.dtype == torch.uint16:  # a 16-bit PNG: to 8 bits as preprocessing's to_rgb does, not uint16 into the model
        img = ((img.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    if img.shape[-2:] != (image_size, image_size):
        img = TF.resize(img, [image_size, image_size], antialias=True)
    return img


def _decode_with_pil(img) -> torch.Tensor:
    """The current (first) frame of an open PIL image as uint8 RGB CHW; alpha is composed on white, as
    preprocessing does."""
    img.load()
    rgb, _ = to_rgb(img)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class FaceImages(Dataset):
    """(uint8 image, label, bad paths, path fed) over samples (a `Samples`, or a list of (path, label)), indexed by
    a position or by (position, augmentation seed): the training loaders' keys (see `AugmentSeeds`), so that an
    image's flip and crop depend on the seed alone, not on which loader worker read it or what it read before."""

    def __init__(self, samples: "Samples | list[Sample]", image_size: int = 160, augment: bool = False,
                 replace_bad: bool = True, roots: confine.Roots | None = None):
        self.samples = samples
        self.roots = roots
        self.image_size = image_size
        self.augment = augment
        self.replace_bad = replace_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: "int | tuple[int, int]"):
        index, seed = key if isinstance(key, tuple) else (key, None)
        bad = []
        tries = MAX_REPLACEMENTS if self.replace_bad else 1
        reader = getattr(self.samples, "reader", None)
        for k in range(tries):
            at = (index + k) % len(self.samples)
            path, label = self.samples[at]
            try:
                data = reader.read(at, path, self.roots, MAX_FILE_BYTES) if reader is not None else None
                img = decode(path, self.image_size, self.roots, data)
            except Exception:  # corrupt, truncated, not an image, vanished: named by the trainer
                bad.append(path)
                continue
            if self.augment:
                img = self._augment(img, None if seed is None else torch.Generator().manual_seed(seed))
            return img, label, bad, path
        return None, -1, bad, None

    def _augment(self, img: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        # Off by default (the ModelZoo recipe has none): flip and a small scale/shift crop, drawn from `g` (the
        # process's global generator when indexed without a seed).
        if torch.rand((), generator=g) < 0.5:
            img = TF.horizontal_flip(img)
        size = self.image_size
        crop = int(size * (0.88 + 0.12 * float(torch.rand((), generator=g))))
        top = int(torch.randint(0, size - crop + 1, (), generator=g))
        left = int(torch.randint(0, size - crop + 1, (), generator=g))
        return TF.resized_crop(img, top, left, crop, crop, [size, size], antialias=True)


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 NCHW, readable samples only
    labels: torch.Tensor  # int64
    bad: list[str]  # paths that could not be read
    fed: list[str]  # the path of each row of `images`: what the model really saw (a bad one's replacement)


def collate(batch) -> Batch:
    """Stack readable samples into a Batch."""
    bad = [p for _, _, paths, _ in batch for p in paths]
    good = [(img, label, path) for img, label, _, path in batch if img is not None]
    if not good:
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad, [])
    images = torch.stack([img for img, _, _ in good], out=_shared_like(good[0][0], len(good)))
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.long)
    return Batch(images, labels, bad, [path for _, _, path in good])


def _shared_like(image: torch.Tensor, n: int) -> torch.Tensor | None:
    """In a loader worker, the batch's tensor in shared memory, where it goes to the trainer anyway (as torch's
    default_collate does): stacked in the worker's heap it was copied into shared memory once more, and glibc
    kept the freed 5-20 MiB blocks (1.3 GiB private per worker after an epoch at 100k photos)."""
    if torch.utils.data.get_worker_info() is None:
        return None
    storage = image.untyped_storage()._new_shared(n * image.numel() * image.element_size())
    return image.new_empty(0).set_(storage).view(n, *image.shape)


class TrainSampler(Sampler[int]):
    """Seeded shuffle of the training split, sharded over ranks, padded to whole global batches.

    Every image is read every epoch (the tail is filled by wrapping around to
    the start of the shuffled order, so a few images are read twice) and every
    step has the same shape on every rank: static shapes for NPU graph
    compilation, equal step counts for DDP. torch's DistributedSampler would
    either drop up to a global batch of images per epoch (drop_last) or leave a
    ragged last batch.
    """

    def __init__(self, length: int, rank: int, world_size: int, batch_size: int, seed: int):
        self.length, self.rank, self.world_size, self.seed = length, rank, world_size, seed
        global_batch = batch_size * world_size
        self.total = -(-length // global_batch) * global_batch  # ceil to whole global batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=g)
        if self.total > self.length:  # wrap around to the start of the shuffled order
            order = order[torch.arange(self.total) % self.length]
        return iter(order[self.rank:self.total:self.world_size].tolist())

    def __len__(self) -> int:
        return self.total // self.world_size


class IdentityBatchSampler(Sampler[int]):
    """P people x K images per process batch, for metric losses (`--loss triplet`), sharded over ranks.

    Each epoch, each person's images are shuffled and cut into groups of K (a person's last group, or a
    person with fewer than K images, is filled by repeating their images). Each batch takes one group from
    each of the P people with the most groups left (ties broken at random), and people run out together
    rather than one person filling the last batches. When fewer than P people have groups left, the batch
    is filled with groups already dealt of people not in it, so every batch holds min(P, people) different
    people (a batch of one person has no triplet). Batches are dealt to ranks in turn; the last round is filled by wrapping around to the
    first batches, as `TrainSampler` does: every image is read every epoch, every batch has the same
    shape, every rank takes the same number of steps. Use with batch_size = P x K and drop_last.
    """

    def __init__(self, labels, rank: int, world_size: int, batch_size: int, per_identity: int, seed: int):
        if batch_size % per_identity:
            raise ValueError(f"batch {batch_size} is not a multiple of {per_identity} images per identity")
        self.rank, self.world_size, self.k, self.seed = rank, world_size, per_identity, seed
        self.p = batch_size // per_identity
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        order = np.argsort(labels, kind="stable")  # each person's images in index order, as a loop would list them
        people, starts = np.unique(labels[order], return_index=True)
        ends = list(starts[1:]) + [len(order)]
        self.by_label: dict[int, np.ndarray] = {int(label): order[a:b] for label, a, b in zip(people, starts, ends)}
        # How many batches the dealing makes depends only on each person's group count, not on the shuffles
        # or the ties: count them once, so every epoch (and every rank) has the same length.
        groups = {label: -(-len(v) // per_identity) for label, v in self.by_label.items()}
        batches = sum(1 for _ in self._deal(groups, {label: 0 for label in groups}))
        self.steps = -(-batches // world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _deal(self, groups: dict[int, int], tie: dict[int, int]) -> Iterator[list[int]]:
        """The people of each batch: the P with the most groups left, ties broken by `tie` (one shuffle of the
        people per epoch). A heap of (groups left, tie, person): P pops and at most P pushes a batch, so an
        epoch is O(groups x log people), not a sort of every person per batch."""
        heap = [(-n, tie[label], label) for label, n in groups.items() if n > 0]
        heapq.heapify(heap)
        while heap:
            taken = [heapq.heappop(heap) for _ in range(min(self.p, len(heap)))]
            yield [label for _, _, label in taken]
            for n, rank, label in taken:
                if n < -1:
                    heapq.heappush(heap, (n + 1, rank, label))

    def _batches(self) -> np.ndarray:
        """This epoch's batches as a [batches, P x K] array of image indices. Each person's shuffled images are
        cut into rows of K (the last row filled with their own first images again) in one array of every
        group; the dealing picks rows of it, and one gather at the end makes the batches, so no Python object
        is made per image (at 2.5M images the lists of lists were ~250 MB and most of the epoch's time)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        labels = sorted(self.by_label)
        rows, first = [], {}
        at = 0
        for label in labels:
            items = self.by_label[label]
            order = items[torch.randperm(len(items), generator=g).numpy()]
            n_groups = -(-len(order) // self.k)
            rows.append(order[np.arange(n_groups * self.k) % len(order)].reshape(n_groups, self.k))
            first[label] = at
            at += n_groups
        groups = np.concatenate(rows) if rows else np.zeros((0, self.k), dtype=np.int64)
        left = {label: len(row) for label, row in zip(labels, rows)}
        tie = dict(zip(labels, torch.randperm(len(labels), generator=g).tolist()))
        batches: list[list[int]] = []
        dealt: list[int] = []  # every group dealt this epoch, in order, and whose it is
        owner: list[int] = []
        cursor = 0  # where the next fill looks in `dealt`: fills rotate over the people dealt before
        for people in self._deal(left, tie):
            batch = []
            for label in people:  # each person's groups are dealt from their last
                left[label] -= 1
                batch.append(first[label] + left[label])
            dealt += batch
            owner += people
            cursor = self._fill(batch, set(people), dealt, owner, cursor, min(self.p, len(labels)))
            batches.append(batch)
        return groups[np.asarray(batches, dtype=np.int64).reshape(len(batches), self.p)].reshape(len(batches), -1)

    def _fill(self, batch: list[int], present: set[int], dealt: list[int], owner: list[int], cursor: int,
              distinct: int) -> int:
        """Fill a short batch (fewer than P people had groups left) to P groups with groups already dealt this
        epoch, first of people not in it, until it holds `distinct` = min(P, people) people: a triplet batch of
        one person has no negative. Everyone not in a short batch has been dealt already (the dealing takes
        every person left with groups), so such groups exist. Returns the cursor for the next fill."""
        while len(batch) < self.p:
            if len(present) < distinct:
                while owner[cursor % len(dealt)] in present:
                    cursor += 1
            at = cursor % len(dealt)
            batch.append(dealt[at])
            present.add(owner[at])
            cursor += 1
        return cursor

    def __iter__(self) -> Iterator[int]:
        batches = self._batches()
        needed = self.steps * self.world_size
        if len(batches) < needed:  # the last round wraps around to the first batches
            batches = batches[np.arange(needed) % len(batches)]
        mine = batches[self.rank:needed:self.world_size]
        return (int(i) for row in mine for i in row.tolist())

    def __len__(self) -> int:
        return self.steps * self.p * self.k


class AugmentSeeds(Sampler[tuple[int, int]]):
    """A training sampler's indices, each with its augmentation seed: (index, seed), the seed a function of (seed,
    epoch, rank, position in this rank's epoch) only. So an image's augmentation is the same whichever worker
    reads it, however many workers there are, and whether the run was resumed: a persistent worker's own RNG
    stream runs on across epochs, so a run resumed at epoch E drew other augmentations from E on. `set_epoch`
    and `len` are the wrapped sampler's."""

    def __init__(self, sampler, rank: int, seed: int):
        self.sampler, self.rank, self.seed = sampler, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # One hashed base per (seed, epoch, rank), then base + position: no hashing per image. torch's CPU
        # generator scrambles its seed (mt19937's initialisation), so neighbouring seeds give unrelated draws.
        base = int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1, np.uint64)[0])
        return ((index, (base + position) % 2**63) for position, index in enumerate(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)


class StridedSampler(Sampler[int]):
    """rank, rank+world, ... : every held-out image exactly once over all ranks, no padding.

    (DistributedSampler pads with duplicates so ranks get equal counts, which
    skews accuracy on small sets; evaluation needs no equal counts.)
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def default_workers(world_size: int) -> int:
    """Loader processes per training process: leave a core for compute, none at all on tiny hosts.

    With 2 cores or fewer per process, worker processes only steal cycles from
    the compute threads (measured on a 2-core host: 57 img/s in-process vs 49
    with 2 workers, whose start-up also stalls the first step of each epoch);
    decoding 160x160 crops in-process costs far less.
    """
    per_process = cpu_cores() // max(1, world_size)
    return 0 if per_process <= 2 else min(8, per_process - 1)


def train_loader(samples: "Samples | list[Sample]", batch_size: int, rank: int, world_size: int, seed: int,
                 workers: int, image_size: int, augment: bool, pin_memory: bool,
                 roots: confine.Roots | None = None) -> DataLoader:
    """Shuffled, rank-sharded loader over the training subset; call sampler.set_epoch each epoch.

    The sampler indexes this dataset (the training samples only), unlike the
    ModelZoo's DistributedSampler(SubsetRandomSampler), which indexed the whole
    folder and so trained on its own validation images.
    """
    dataset = FaceImages(samples, image_size, augment, replace_bad=True, roots=roots)
    sampler = AugmentSeeds(TrainSampler(len(dataset), rank, world_size, batch_size, seed), rank, seed)
    return _loader(dataset, sampler, batch_size, workers, pin_memory, drop_last=True, seed=seed + rank)


def identity_loader(samples: "Samples | list[Sample]", batch_size: int, per_identity: int, rank: int, world_size: int,
                    seed: int, workers: int, image_size: int, augment: bool, pin_memory: bool,
                    roots: confine.Roots | None = None) -> DataLoader:
    """P people x K images per batch (see IdentityBatchSampler); `batch_size` is this process's."""
    dataset = FaceImages(samples, image_size, augment, replace_bad=True, roots=roots)
    labels = samples.labels if isinstance(samples, Samples) else [label for _, label in samples]
    sampler = AugmentSeeds(IdentityBatchSampler(labels, rank, world_size, batch_size, per_identity, seed), rank, seed)
    return _loader(dataset, sampler, batch_size, workers, pin_memory, drop_last=True, seed=seed + rank)


def eval_loader(samples: "Samples | list[Sample]", batch_size: int, rank: int, world_size: int,
                workers: int, image_size: int, pin_memory: bool, roots: confine.Roots | None = None) -> DataLoader:
    dataset = FaceImages(samples, image_size, augment=False, replace_bad=False, roots=roots)
    sampler = StridedSampler(len(dataset), rank, world_size)
    return _loader(dataset, sampler, batch_size, workers, pin_memory, drop_last=False)


def _loader(dataset, sampler, batch_size, workers, pin_memory, drop_last, seed: int = 0) -> DataLoader:
    """The DataLoader over `sampler`, with a generator of its own (seeded with `seed`): a loader draws its workers'
    base seed from its generator each time it makes an iterator, from the global RNG without one, and persistent
    workers make one iterator per run, not per epoch, so a resumed run's dropout stream was one draw off."""
    extra = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed), **extra)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW -> float on the device, with the recipe's fixed_image_standardization."""
    x = images.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x.float() - 127.5) / 128.0


def on_device(loader, device: torch.device, channels_last: bool):
    """Yield (images standardised on `device`, labels on `device`, bad paths, fed paths) per batch of `loader`.

    On an accelerator with streams (cuda, npu) the next batch's copy and standardisation run on a side stream
    while the current step computes: the step never waits for the host-to-device copy. On the CPU there is no
    copy to hide and this is `to_device` inline.
    """
    from facenet.devices import Device

    dev = Device(device.type)
    module = dev.module
    if module is None or not dev.row.side_stream:
        for images, labels, bad, fed in loader:
            yield to_device(images, device, channels_last), labels.to(device), bad, fed
        return
    side = module.Stream(device=device)
    main = module.current_stream(device)

    def stage(batch):
        images, labels, bad, fed = batch
        with module.stream(side):
            x = to_device(images, device, channels_last)
            y = labels.to(device, non_blocking=True)
        return x, y, bad, fed

    it = iter(loader)
    ahead = next(it, None)
    ahead = stage(ahead) if ahead is not None else None
    while ahead is not None:
        main.wait_stream(side)  # this batch's copy is done before the step reads it
        x, y, bad, fed = ahead
        x.record_stream(main)  # made on the side stream, used on the main one: keep its memory until then
        y.record_stream(main)
        following = next(it, None)
        ahead = stage(following) if following is not None else None
        yield x, y, bad, fed

