"""One call on a lent GPU (issue 24): every accelerator figure from one process, in priority order, under a
deadline, with the JSON rewritten after each phase, so a call cut short still brings back what it measured.

    python -m facenet.bench.device_run --out $OUT --crops CROPS --raw RAW --deadline 480

Phases: the card's own ceilings (a bf16 matrix product, a device-to-device copy), ours eager and compiled at
batch 512 with their held-out accuracy per epoch, the compute-only ceiling (fp32 NCHW, ours eager, ours
compiled), the facenet-pytorch fine-tune loop, the loader alone, MTCNN (facenet-pytorch, ours per photo, ours
batched, each against the CPU path), a profiler trace of a few steps, and batch 1024. A phase that fails is
recorded with its error and the next one runs; one that would not fit in what is left is recorded as skipped.

CROPS is an identity-folder data set of distinct crops; `--copies K` links each crop K times under new names
(hard links, so the loader decodes K x as many files), which is how 4,000 crops carried to the machine train
as 20,000. The held-out images are then mostly copies of training ones: the accuracy curves compare compiled
with eager, they say nothing of generalisation (ORL does that, on the CPU).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
import traceback

import torch


class Phases:
    """Runs named phases under one deadline and rewrites OUT/bench_gpu.json after each."""

    def __init__(self, out_dir: str, deadline_s: float):
        self.out_dir, self.deadline, self.t0 = out_dir, deadline_s, time.monotonic()
        self.results: dict = {"phases": {}}
        os.makedirs(out_dir, exist_ok=True)

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.t0)

    def run(self, name: str, fn, needs_s: float):
        if self.left() < needs_s:
            self.results["phases"][name] = {"skipped": f"{self.left():.0f} s left, needs about {needs_s:.0f} s"}
            print(f"[phase] {name}: skipped ({self.left():.0f} s left)", flush=True)
            self.write()
            return None
        print(f"[phase] {name}: start at {time.monotonic() - self.t0:.0f} s", flush=True)
        t = time.monotonic()
        value, error = None, None
        try:
            value = fn()
        except Exception as exc:  # a bench phase that breaks is a result too; the next phase still runs
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
            traceback.print_exc()
        seconds = round(time.monotonic() - t, 1)
        self.results["phases"][name] = {"seconds": seconds, **({"error": error} if error else {})}
        if value is not None:
            self.results[name] = value
        print(f"[phase] {name}: {seconds} s{' FAILED: ' + error.splitlines()[-1] if error else ''}", flush=True)
        self.write()
        return value

    def write(self) -> None:
        path = os.path.join(self.out_dir, "bench_gpu.json")
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(self.results, fh, indent=2, default=str)
        os.replace(path + ".tmp", path)


def card_ceilings(device: str) -> dict:
    """The card as found: an 8192^3 bf16 matrix product (random data) and a 2 GiB device-to-device copy, each
    the median of 10 timed runs after 3 warm-ups, timed with device events."""
    dev = torch.device(device)

    def timed(fn, reps: int = 10) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return sorted(times)[len(times) // 2]

    def matmul_rate(n: int = 8192) -> float:
        x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        return 2 * n ** 3 / timed(lambda: x @ y)

    def copy_rate(numel: int = 2 ** 29) -> float:  # 2 GiB of float32
        src = torch.randn(numel, device=dev)
        dst = torch.empty_like(src)
        return 2 * numel * 4 / timed(lambda: dst.copy_(src))

    matmul, copy = matmul_rate(), copy_rate()
    torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "bf16_matmul_tflops": round(matmul / 1e12, 1),
            "copy_tb_per_s": round(copy / 1e12, 2)}


def linked_dataset(crops: str, dest: str, copies: int) -> dict:
    """DEST/<identity>/c<k>_<name>: each crop of CROPS linked `copies` times (copied where links fail)."""
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    distinct = made = 0
    for ident in sorted(os.listdir(crops)):
        src_dir = os.path.join(crops, ident)
        if not os.path.isdir(src_dir):
            continue
        os.makedirs(os.path.join(dest, ident))
        for name in sorted(os.listdir(src_dir)):
            distinct += 1
            for k in range(copies):
                target = os.path.join(dest, ident, f"c{k}_{name}")
                try:
                    os.link(os.path.join(src_dir, name), target)
                except OSError:
                    shutil.copyfile(os.path.join(src_dir, name), target)
                made += 1
    return {"distinct_crops": distinct, "files": made, "copies": copies}


def ceiling(batch_size: int, device: str, compile_mode: str | None, steps: int = 12) -> dict:
    """The trainer's own step on one synthetic batch (facenet.train.probe): fp32 NCHW, ours eager, ours
    compiled; img/s from the median step after the first third."""
    from facenet.spec import TrainSpec
    from facenet.train import probe

    dev = _device(device)
    out = {}
    runs = [("fp32_nchw", False, False, None), ("ours_eager", True, dev.channels_last, None)]
    if compile_mode:
        runs.append(("ours_compiled", True, dev.channels_last, compile_mode))
    for name, amp, channels_last, mode in runs:
        spec = TrainSpec(data="synthetic", amp=amp, lr=1e-3, batch_size=batch_size)
        p = probe.build(dev, batch_size, spec, channels_last=channels_last, compile_mode=mode)
        times = p.timed(steps=steps, warmup=2)
        out[name] = round(probe.median_rate(batch_size, times[steps // 3:]), 1)
        del p
        _free(device)
    return out


def profile_steps(batch_size: int, device: str, compile_mode: str | None, out_dir: str, steps: int = 5) -> dict:
    """A torch.profiler trace of `steps` steps of the probe, eager and compiled: the chrome traces (gzip) and
    the top kernels go to OUT; per variant, the device's busy time over the steps' wall time (launch-bound
    when far under 1 on a synthetic batch: no loader is involved)."""
    from torch.profiler import ProfilerActivity, profile

    from facenet.spec import TrainSpec
    from facenet.train import probe

    dev = _device(device)
    result = {}
    tables = []
    for name, mode in (("eager", None), ("compiled", compile_mode)):
        if name == "compiled" and not mode:
            continue
        p = probe.build(dev, batch_size, TrainSpec(data="synthetic", amp=True, batch_size=batch_size),
                        compile_mode=mode)
        p.timed(steps=3, warmup=0)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                p.run()
            wall = time.perf_counter() - t
        events = prof.key_averages()
        on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, copies
        busy_us = sum(e.self_device_time_total for e in on_device)
        kernels = sum(e.count for e in on_device)
        result[name] = {"steps": steps, "wall_ms_per_step": round(1e3 * wall / steps, 2),
                        "device_busy_ms_per_step": round(busy_us / 1e3 / steps, 2),
                        "device_busy_fraction": round(busy_us / 1e6 / wall, 3),
                        "kernels_per_step": round(kernels / steps)}
        tables.append(f"== {name} ==\n" + events.table(sort_by="self_device_time_total", row_limit=30))
        trace = os.path.join(out_dir, f"trace_{name}.json")
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
        del p
        _free(device)
    with open(os.path.join(out_dir, "profile.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(tables))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facenet.bench.device_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for bench_gpu.json, traces and profile.txt")
    p.add_argument("--crops", required=True, help="identity folders of distinct face crops (training data)")
    p.add_argument("--copies", type=int, default=5, help="links per crop in the training set")
    p.add_argument("--raw", required=True, help="identity folders of raw photos (MTCNN)")
    p.add_argument("--work", default="build/device-run", help="scratch folder (links, checkpoints)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--deadline", type=float, default=480, help="seconds for all phases; later ones are skipped")
    p.add_argument("--epochs", type=int, default=6, help="epochs of ours eager and compiled")
    p.add_argument("--reference-epochs", type=int, default=3, help="epochs of the facenet-pytorch loop")
    p.add_argument("--workers", type=int, default=12, help="loader workers")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=512, help="the headline batch size")
    p.add_argument("--big-batch", type=int, default=1024, help="the second batch size")
    p.add_argument("--compile", default="auto", help="--compile of the compiled runs (auto: reduce-overhead)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from facenet.bench.device_bench import detect_bench, device_peak, flops_per_training_image, loader_alone, mfu
    from facenet.bench.train_bench import first_epoch_reaching, ours_run, reference_run

    ph = Phases(args.out, args.deadline)
    mode = _device(args.device).compile_mode(args.compile)[0]
    data = os.path.join(args.work, "train")
    ph.results["config"] = {"argv": sys.argv[1:], "batch": args.batch, "big_batch": args.big_batch,
                            "compile_mode": mode, "workers": args.workers, "cpu_cores": os.cpu_count()}
    ph.run("card", lambda: card_ceilings(args.device), 10)
    ph.run("data", lambda: linked_dataset(args.crops, data, args.copies), 5)
    flops = flops_per_training_image(160, len(os.listdir(data)))
    peak, name = device_peak(args.device)
    ph.results["flops_per_training_image"], ph.results["peak_bf16_flops"] = flops, {"name": name, "value": peak}

    def ours(batch: int, compile_mode: str, epochs: int):
        def go():
            r = ours_run(data, epochs, batch, args.lr, args.workers, 123456, 0.2,
                         os.path.join(args.work, f"ours-{compile_mode}-{batch}"), args.device, compile_mode)
            r["mfu"] = mfu(r["img_per_s_steady"], flops, peak)
            r["epochs_to_acc1_0.95"] = first_epoch_reaching(r["acc1_per_epoch"], 0.95)
            return r
        return go

    def reference(batch: int):
        def go():
            r = reference_run(data, args.reference_epochs, batch, args.lr, args.workers, 123456, 0.2, args.device)
            r["mfu"] = mfu(r["img_per_s"], flops, peak)
            return r
        return go

    def ceil(batch: int):
        def go():
            c = ceiling(batch, args.device, mode)
            return c | {"mfu": {k: mfu(v, flops, peak) for k, v in c.items()}}
        return go

    b, big = args.batch, args.big_batch
    ph.run("eager_512", ours(b, "off", args.epochs), 40)
    ph.run("compiled_512", ours(b, args.compile, args.epochs), 120)
    ph.run("ceiling_512", ceil(b), 60)
    ph.run("reference_512", reference(b), 60)
    ph.run("loader_512", lambda: loader_alone(data, b, args.workers, args.device, batches=60), 20)
    ph.run("detect", lambda: detect_bench(args.raw, args.device, 32), 60)
    ph.run("profile_512", lambda: profile_steps(b, args.device, mode, args.out), 40)
    ph.run("eager_1024", ours(big, "off", 3), 30)
    ph.run("ceiling_1024", ceil(big), 60)
    ph.run("compiled_1024", ours(big, args.compile, 3), 120)
    ph.run("reference_1024", reference(big), 60)
    print_table(ph.results)
    return 0


def print_table(res: dict) -> None:
    """The README's table, from the results (a dash where a phase did not run)."""
    def rate(phase: str, key: str = "img_per_s_steady"):
        r = res.get(phase) or {}
        return r.get(key) or r.get("img_per_s"), r.get("mfu")

    print(f"{'training (bf16 unless said)':<34} {'b512 img/s':>11} {'MFU':>6} {'b1024 img/s':>12} {'MFU':>6}")
    for label, stem in (("facenet-pytorch loop (fp32)", "reference"), ("ours eager", "eager"),
                        ("ours compiled", "compiled")):
        cells = [rate(f"{stem}_{b}") for b in (512, 1024)]
        print(f"{label:<34} " + " ".join(f"{_num(v):>11} {_pct(m):>6}" for v, m in cells))
    for key, label in (("fp32_nchw", "ceiling fp32 NCHW"), ("ours_eager", "ceiling ours eager"),
                       ("ours_compiled", "ceiling ours compiled")):
        cells = [((res.get(f"ceiling_{b}") or {}).get(key), ((res.get(f"ceiling_{b}") or {}).get("mfu") or {}).get(key))
                 for b in (512, 1024)]
        print(f"{label:<34} " + " ".join(f"{_num(v):>11} {_pct(m):>6}" for v, m in cells))
    if res.get("loader_512"):
        print(f"{'loader alone (b512)':<34} {_num(res['loader_512']['img_per_s']):>11}")
    d = res.get("detect") or {}
    for key in ("facenet_pytorch_per_photo", "ours_per_photo", "ours_batched"):
        if key in d:
            print(f"MTCNN {key:<28} {d[key]['photos_per_s']:>9} photos/s, mean IoU vs CPU {d[key]['mean_iou_vs_cpu']}")
    for stem in ("eager_512", "compiled_512"):
        if res.get(stem):
            print(f"held-out Acc@1 per epoch, {stem}: {res[stem]['acc1_per_epoch']}")


def _device(device: str):
    from facenet.devices import Device

    return Device(device, None if device == "cpu" else 0)


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _num(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
