"""What the accelerator fast path is measured with: model FLOPs and MFU, the loader alone, and MTCNN photo by
photo against batched (`python -m facenet.bench --only detect,loader`, and MFU beside every training figure).

MFU = training images/s x FLOPs per training image / the device's dense bf16 peak. FLOPs per training image
are counted, not estimated: torch's FlopCounterMode over one forward and backward of the network (the
optimizer's few FLOPs per parameter are left out, as MFU usually does).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

# Dense bf16 tensor peaks (FLOP/s) from the vendors' data sheets (sparsity not counted).
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
PEAK_FP16_NPU = {"Ascend910B": 313e12, "Ascend910": 256e12}  # the 910A has no bf16: fp16 peak


def flops_per_training_image(image_size: int = 160, num_classes: int = 8) -> float:
    """FLOPs of one forward and backward of InceptionResnetV1 (classification head) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from facenet.model import build_model

    model = build_model(num_classes, None).train()
    x = torch.randn(2, 3, image_size, image_size)
    y = torch.tensor([0, 1])
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / 2


def device_peak(device_type: str) -> tuple[float | None, str]:
    """(dense bf16/fp16 peak in FLOP/s or None, the device's name)."""
    if device_type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return next((peak for key, peak in PEAK_BF16.items() if key in name), None), name
    if device_type == "npu":
        try:
            # The current device's SoC name, e.g. "Ascend910B3" (the index is only validated):
            # Ascend/pytorch@v26.1.0-pytorch2.12.0:torch_npu/npu/__init__.py:480.
            name = torch.npu.get_device_name(0)
        except Exception:
            return None, "npu"
        return next((peak for key, peak in PEAK_FP16_NPU.items() if key in name.replace(" ", "")), None), name
    return None, device_type


def mfu(img_per_s: float | None, flops_per_image: float, peak: float | None) -> float | None:
    if not img_per_s or not peak:
        return None
    return round(img_per_s * flops_per_image / peak, 4)


def loader_alone(data_dir: str, batch_size: int, workers: int, device: str, image_size: int = 160,
                 batches: int = 50) -> dict:
    """The trainer's input path with no model: decode, collate, copy to the device and standardise
    (`on_device`), synchronised at the end. img/s over `batches` batches after a warm-up of 3."""
    from facenet.data import loader as data_loader
    from facenet.data.dataset import load_dataset
    from facenet.devices import Device

    dev = Device(device, 0 if device != "cpu" else None)
    split = load_dataset(data_dir, 0.2, 123456)
    loader = data_loader.train_loader(split.train, batch_size, 0, 1, 123456, workers, image_size, False,
                                      dev.pin_memory, None)
    seen, t0, epoch = 0, None, 0
    while seen < batches * batch_size:
        loader.sampler.set_epoch(epoch)
        for k, (x, _y, _bad, _fed) in enumerate(data_loader.on_device(loader, dev.torch_device, dev.channels_last)):
            if t0 is None and k == 2:
                dev.synchronize()
                t0 = time.perf_counter()
            elif t0 is not None:
                seen += x.shape[0]
            if seen >= batches * batch_size:
                break
        epoch += 1
    dev.synchronize()
    seconds = time.perf_counter() - t0
    return {"img_per_s": seen / seconds, "images": seen, "seconds": seconds, "workers": workers,
            "batch_size": batch_size}


def detect_bench(raw: str, device: str, batch: int = 32, limit: int = 960, slow_limit: int = 160) -> dict:
    """MTCNN on the same photos (decoded and reduced beforehand, not timed): facenet-pytorch's `MTCNN.detect`
    photo by photo, ours photo by photo, ours batched, on `device`; and the mean IoU of each one's chosen box
    against ours on the CPU (the preprocessing reference)."""
    import glob

    from PIL import Image

    from facenet.preprocess.faces import DetectorSettings, FaceCropper, central_largest, iou

    paths = sorted(glob.glob(os.path.join(raw, "*", "*")))[:limit]
    cpu = FaceCropper(DetectorSettings())
    photos = [cpu.reduced(Image.open(p).convert("RGB"))[0] for p in paths]
    arrays = [np.asarray(p) for p in photos]

    def chosen(boxes, photo):
        if boxes is None or len(boxes) == 0:
            return None
        return [float(v) for v in boxes[central_largest(np.asarray(boxes, np.float64), photo.size)]]

    reference = [chosen(cpu.detect(p)[0], p) for p in photos]
    ours = FaceCropper(DetectorSettings(device=device))
    m = ours.mtcnn

    from facenet.devices import Device

    def sync():
        Device(device, 0 if device != "cpu" else None).synchronize()

    def timed(fn, n: int) -> tuple[float, list]:
        fn(photos[:4])  # warm-up: kernels, allocator
        sync()
        t0 = time.perf_counter()
        found = fn(photos[:n])
        sync()
        return n / (time.perf_counter() - t0), found

    def facenet_pytorch(batch_photos):
        return [chosen(m.detect(p)[0], p) for p in batch_photos]

    def per_photo(batch_photos):
        return [chosen(ours.detect(p)[0], p) for p in batch_photos]

    def batched(batch_photos):
        from facenet.preprocess.detect import detect_faces_batch

        out = []
        for at in range(0, len(batch_photos), batch):
            part = batch_photos[at:at + batch]
            found = detect_faces_batch([np.asarray(p) for p in part], [ours.min_face(p) for p in part],
                                       m.pnet, m.rnet, m.onet, m.thresholds, m.factor)
            out += [chosen(boxes, p) for (boxes, _), p in zip(found, part)]
        return out

    result = {"photos": len(arrays), "device": device, "batch": batch}
    # facenet-pytorch on a GPU manages ~15 photos/s: timed on the first `slow_limit` photos only.
    for name, fn, n in (("facenet_pytorch_per_photo", facenet_pytorch, min(slow_limit, len(photos))),
                        ("ours_per_photo", per_photo, len(photos)), ("ours_batched", batched, len(photos))):
        rate, found = timed(fn, n)
        result[name] = {"photos": n}
        both = [(a, b) for a, b in zip(found, reference) if a and b]
        result[name] |= {"photos_per_s": round(rate, 1), "faces": sum(f is not None for f in found),
                        "mean_iou_vs_cpu": round(float(np.mean([iou(a, b) for a, b in both])), 4) if both else None}
    result["faces_cpu_reference"] = sum(r is not None for r in reference)
    result["batched_vs_facenet_pytorch"] = round(result["ours_batched"]["photos_per_s"]
                                                 / result["facenet_pytorch_per_photo"]["photos_per_s"], 2)
    return result
