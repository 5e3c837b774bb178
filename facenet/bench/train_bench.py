"""Training benchmark: the facenet-pytorch fine-tune recipe against our engine, same data, same process.

Reference = what users ran before: facenet-pytorch's `examples/finetune`
loop (`training.pass_epoch`, float32, `np.float32 -> ToTensor ->
fixed_image_standardization`, Adam, MultiStepLR([5, 10]), ImageFolder +
SubsetRandomSampler). Ours = `facenet.train` with `--amp` (bf16 autocast +
channels_last on CPU). Both train on the same images, evaluate on the same
held-out images, with the same batch size, lr and loader worker count.

img/s is measured the same way for both: training images / wall seconds of
the training passes (all steps, data loading included; evaluation excluded).
Ours also reports its steady-state FPS (warm-up steps left out, as its
summary does).
"""

from __future__ import annotations

import contextlib
import io
import os
import time

import numpy as np
import torch

from facenet.data.dataset import load_dataset


def reference_run(data_dir: str, epochs: int, batch_size: int, lr: float, workers: int, seed: int,
                  holdout: float, device: str = "cpu") -> dict:
    """The facenet-pytorch fine-tune example, verbatim in its parts, on our train/held-out split."""
    from facenet_pytorch import InceptionResnetV1, fixed_image_standardization, training
    from torch.utils.data import DataLoader, SubsetRandomSampler
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    split = load_dataset(data_dir, holdout, seed)
    trans = transforms.Compose([np.float32, transforms.ToTensor(), fixed_image_standardization])
    dataset = datasets.ImageFolder(data_dir, transform=trans)
    index = {os.path.abspath(path): i for i, (path, _) in enumerate(dataset.samples)}
    train_inds = [index[os.path.abspath(p)] for p, _ in split.train]
    val_inds = [index[os.path.abspath(p)] for p, _ in split.test]
    train_loader = DataLoader(dataset, num_workers=workers, batch_size=batch_size,
                              sampler=SubsetRandomSampler(train_inds))
    val_loader = DataLoader(dataset, num_workers=workers, batch_size=batch_size,
                            sampler=SubsetRandomSampler(val_inds))
    resnet = InceptionResnetV1(classify=True, num_classes=len(dataset.class_to_idx)).to(device)
    optimizer = torch.optim.Adam(resnet.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [5, 10])
    loss_fn = torch.nn.CrossEntropyLoss()
    metrics = {"fps": training.BatchTimer(), "acc": training.accuracy}

    train_seconds, acc_per_epoch = 0.0, []
    for _ in range(epochs):
        with contextlib.redirect_stdout(io.StringIO()):  # pass_epoch prints a line per batch
            resnet.train()
            t0 = time.perf_counter()
            training.pass_epoch(resnet, loss_fn, train_loader, optimizer, scheduler,
                                batch_metrics=metrics, show_running=True, device=device)
            train_seconds += time.perf_counter() - t0
            resnet.eval()
            acc_per_epoch.append(_held_out_accuracy(resnet, val_loader, device))
    images = epochs * len(train_inds)
    return {"img_per_s": images / train_seconds, "train_seconds": train_seconds, "train_images": images,
            "acc1_per_epoch": acc_per_epoch, "acc1": acc_per_epoch[-1], "precision": "fp32"}


@torch.no_grad()
def _held_out_accuracy(model, loader, device: str) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / total


def ours_run(data_dir: str, epochs: int, batch_size: int, lr: float, workers: int, seed: int, holdout: float,
             output: str, device: str = "cpu", compile_mode: str = "off") -> dict:
    from facenet.spec import TrainSpec
    from facenet.train.engine import run

    spec = TrainSpec(data=data_dir, epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adam", amp=True,
                     workers=workers, seed=seed, holdout=holdout, output=output, pretrained=None,
                     device=device, log_every=1000, compile=compile_mode)
    spec.validate()
    summary = run(spec)
    with open(os.path.join(output, "events.jsonl"), encoding="utf-8") as fh:
        import json

        epochs_done = [json.loads(line) for line in fh if '"event": "epoch"' in line]
    train_seconds = sum(e["train_seconds"] for e in epochs_done)
    images = sum(e["train_images"] for e in epochs_done)
    return {"img_per_s": images / train_seconds, "img_per_s_steady": summary["fps"], "train_seconds": train_seconds,
            "train_images": images, "acc1_per_epoch": [e["acc1"] for e in epochs_done], "acc1": summary["acc1"],
            "precision": summary["precision"], "compiled": summary["compiled"]}


def step_ceiling(batch_size: int, device: str, steps: int = 10) -> dict:
    """The loop with everything else removed (nanoGPT's bench.py): img/s of the trainer's own step
    (facenet.train.probe: forward, loss, backward, Adam) on a synthetic batch, fp32 NCHW (the reference's
    math) vs ours (autocast dtype, channels_last). The ratio of these two bounds what any loader or
    bookkeeping work can add."""
    from facenet.devices import Device
    from facenet.spec import TrainSpec
    from facenet.train import probe

    dev = Device(device, 0 if device != "cpu" else None)
    out = {}
    for name, amp, channels_last in (("fp32_nchw", False, False), ("ours", True, dev.channels_last)):
        spec = TrainSpec(data="synthetic", amp=amp, lr=1e-3,
                         batch_size=batch_size)
        p = probe.build(dev, batch_size, spec, channels_last=channels_last)
        times = p.timed(steps=steps, warmup=0)
        out[name] = probe.median_rate(batch_size, times[steps // 3:])
    out["ratio"] = out["ours"] / out["fp32_nchw"]
    return out


def first_epoch_reaching(accs: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accs) if a >= target), None)


def run_benchmark(data_dir: str, output: str, epochs: int = 8, batch_size: int = 32, lr: float = 0.001,
                  workers: int = 0, seed: int = 123456, holdout: float = 0.2, device: str = "cpu",
                  ceiling_steps: int = 10, compile_mode: str = "auto") -> dict:
    """Reference, ours eager, and ours compiled when `compile_mode` compiles on this device (auto: on cuda),
    with the compute-only ceiling; every training figure with its MFU where the device's peak is known."""
    from facenet.bench.device_bench import device_peak, flops_per_training_image, mfu
    from facenet.devices import Device

    split = load_dataset(data_dir, holdout, seed)
    ref = reference_run(data_dir, epochs, batch_size, lr, workers, seed, holdout, device)
    ours = ours_run(data_dir, epochs, batch_size, lr, workers, seed, holdout, os.path.join(output, "ours-train"),
                    device)
    compiled = None
    if Device(device, 0 if device != "cpu" else None).compile_mode(compile_mode)[0]:
        compiled = ours_run(data_dir, epochs, batch_size, lr, workers, seed, holdout,
                            os.path.join(output, "ours-compiled"), device, compile_mode)
    for r in (ref, ours, compiled):
        if r:
            r["epochs_to_acc1_0.95"] = first_epoch_reaching(r["acc1_per_epoch"], 0.95)
    ceiling = step_ceiling(batch_size, device, max(3, ceiling_steps))
    ratio = ours["img_per_s"] / ref["img_per_s"]
    flops = flops_per_training_image(160, split.num_classes)
    peak, device_name = device_peak(device)
    for r in (ref, ours, compiled):
        if r:
            r["mfu"] = mfu(r.get("img_per_s_steady") or r["img_per_s"], flops, peak)
    ceiling["mfu"] = {k: mfu(ceiling[k], flops, peak) for k in ("fp32_nchw", "ours")}
    return {
        "benchmark": "train",
        "what": "img/s = training images / wall seconds of the training passes, same data/batch/lr/workers",
        "config": {"device": device, "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": "adam", "workers": workers,
                   "seed": seed, "identities": split.num_classes, "train_images": len(split.train),
                   "held_out_images": len(split.test), "data": data_dir, "pretrained": None},
        "host": _host(),
        "reference": ref,
        "ours": ours,
        "ours_compiled": compiled,
        "ratio": ratio,
        "ratio_compiled": compiled["img_per_s"] / ref["img_per_s"] if compiled else None,
        "flops_per_training_image": flops,
        "device_peak_flops": {"name": device_name, "bf16_dense": peak},
        "step_ceiling": ceiling,
        "goals": {"ratio >= 3": ratio >= 3, "ours acc1 >= 0.95 after 8 epochs": ours["acc1"] >= 0.95},
    }


def _host() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
