"""`facenet-cli doctor`: can this host train? The first command an operator runs on a new host.

Each check runs the project's own code on the host's devices and ends in one PASS, WARN, FAIL or SKIP line
with the fix for a FAIL:

  versions      torch (and torch_npu, CANN, the driver) against TorchNPU's table, images/ascend/compat.json
  chips         the devices torch sees (and npu-smi's list and health of each chip)
  train step    one real AMP training step of InceptionResnetV1 on every chip, in N processes at once, with
                the optimizer and loss scaler training uses (facenet.train.probe: the trainer's Step)
  all-reduce    over the N processes through the job's backend (hccl, nccl, gloo), with its bus bandwidth
  nms           MTCNN's NMS on the device, as preprocessing runs it (facenet.preprocess.detect.nms), against
                torchvision's on the CPU
  throughput    the recipe's step for --probe-seconds on one device: img/s per device and MFU, beside the
                seed's 1p figure
  (redis, mlflow: added by the CLI, which knows the stack's settings)

The exit status says whether the host can train: 0 when nothing FAILed. It runs for real on the CPU (the test
suite runs it); on a GPU or an NPU host it is the script an operator hands back to us (`--json`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

# The seed's 1p figure (PyTorch 1.8.1, O2; ../shared/seed README: 2568.4 img/s) and its 8p per-device share.
SEED_1P_IMG_S = 2568.4
SEED_8P_IMG_S = 17267.7
# The recipe's per-device batch: train_performance_1p.sh runs 512, the 8p script 4096 over 8 (512 each).
RECIPE_BATCH = 512
CPU_PROBE_BATCH = 32  # the CPU's share: 512 crops of 160 px take ~20 GB of activations in fp32
PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
ASCEND_ROOT_ENV = "FACENET_ASCEND_ROOT"  # where the driver and CANN are installed (default /usr/local/Ascend)
PINS_DIR_ENV = "FACENET_ASCEND_PINS_DIR"  # images/ascend (compat.json, pins.env); the Ascend image sets it
GROUP_TIMEOUT_S = 240  # the N-process check: one step and the all-reduce, first-call kernel builds included


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None
    seconds: float = 0.0
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        text = f"{self.status:<5} {self.name:<11} {self.detail}"
        return text + (f"\n      fix: {self.fix}" if self.fix else "")


@dataclass
class Options:
    device: str = "auto"
    npus: int | None = None  # None: every visible device (2 processes on a CPU)
    probe_seconds: float = 30.0
    probe_batch: int | None = None  # None: the recipe's 512 on an accelerator, 32 on a CPU
    step_batch: int = 8  # per chip, for the one-step check
    image_size: int = 160
    allreduce_mb: int | None = None  # None: 256 MiB on an accelerator, 16 MiB on a CPU


def run(opts: Options, extra: list[tuple[str, Callable[[], Check]]] = (), say: Callable[[Check], None] = lambda c: None) -> dict:
    """Every check, in order, each said as it ends; returns the report ({"ok", "device", "checks", ...})."""
    from facenet import devices

    checks: list[Check] = []

    def add(check: Check) -> Check:
        checks.append(check)
        say(check)
        return check

    t_start = time.perf_counter()
    device_type, why = _device_type(opts.device)
    if device_type is None:
        add(Check("versions", FAIL, why, fix=_device_fix(opts.device)))
        for name in ("chips", "train step", "all-reduce", "nms", "throughput"):
            add(Check(name, SKIP, f"no usable {opts.device} device"))
    else:
        add(_timed("versions", lambda: check_versions(device_type)))
        chips = add(_timed("chips", lambda: check_chips(device_type, opts)))
        npus = chips.data.get("npus", 0)
        if chips.status == FAIL or not npus:
            for name in ("train step", "all-reduce"):
                add(Check(name, SKIP, "no chips to run on"))
        else:
            for check in _timed_group(device_type, npus, opts):
                add(check)
        add(_timed("nms", lambda: check_nms(device_type)))
        add(_timed("throughput", lambda: check_throughput(device_type, opts)) if npus
            else Check("throughput", SKIP, "no chips"))
    for name, fn in extra:
        add(_timed(name, fn))
    return {"ok": not any(c.status == FAIL for c in checks), "device": device_type or opts.device,
            "host": platform.node(), "seconds": round(time.perf_counter() - t_start, 1),
            "versions": devices.versions(), "checks": [asdict(c) for c in checks]}


def _timed(name: str, fn: Callable[[], Check]) -> Check:
    t0 = time.perf_counter()
    try:
        check = fn()
    except Exception as exc:  # a check that breaks is a FAIL with its reason, never the end of the report
        check = Check(name, FAIL, f"{type(exc).__name__}: {_first_line(exc)}",
                      data={"traceback": traceback.format_exc(limit=6)})
    check.seconds = round(time.perf_counter() - t0, 2)
    return check


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _device_type(requested: str) -> tuple[str | None, str]:
    from facenet import devices
    from facenet.errors import UserError

    try:
        return devices.resolve_device_type(requested), ""
    except UserError as exc:
        return None, str(exc)


def _device_fix(requested: str) -> str:
    return {"npu": "run it in the Ascend image (`make up PROFILE=npu`, then `docker compose exec worker-npu "
                   "facenet-cli doctor`): it has CANN, torch and torch_npu of one row of TorchNPU's table; on the "
                   "host, `source /usr/local/Ascend/ascend-toolkit/set_env.sh` and check `npu-smi info`",
            "cuda": "check `nvidia-smi`, the NVIDIA container toolkit (`make up PROFILE=gpu`) and "
                    "CUDA_VISIBLE_DEVICES"}.get(requested, "choose --device auto, npu, cuda or cpu")


# -- versions -------------------------------------------------------------------------------------------------------

def ascend_root() -> str:
    return os.environ.get(ASCEND_ROOT_ENV, "/usr/local/Ascend")


def pins_dir() -> str:
    return os.environ.get(PINS_DIR_ENV) or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        "images", "ascend")


def _key_values(path: str, lower: bool = True) -> dict[str, str]:
    """KEY=VALUE lines of a file (version.info, an install record, pins.env); {} when it cannot be read."""
    out = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.strip().partition("=")
                if sep and not key.startswith("#"):
                    out[key.strip().lower() if lower else key.strip()] = value.strip()
    except OSError:
        pass
    return out


def driver_version(root: str | None = None) -> str | None:
    """The Ascend driver's release: driver/version.info's package_version (Version= on drivers before 24.1.rc2)."""
    info = _key_values(os.path.join(root or ascend_root(), "driver", "version.info"))
    return info.get("package_version") or info.get("version")


def cann_version(root: str | None = None) -> str | None:
    """The CANN toolkit's version= from its install record: cann/<arch>-linux/ (CANN 8.5 and later) or
    ascend-toolkit/latest/<arch>-linux/ (before), hiascend instg_0044."""
    import glob

    root = root or ascend_root()
    homes = [os.environ["ASCEND_TOOLKIT_HOME"]] if os.environ.get("ASCEND_TOOLKIT_HOME") and root == "/usr/local/Ascend" \
        else []  # the CANN images set it (Ascend/cann-container-image cann/*/Dockerfile: /usr/local/Ascend/cann-X)
    patterns = [os.path.join(h, "*-linux", "ascend_toolkit_install.info") for h in homes] + [
        os.path.join(root, p) for p in ("cann/*-linux/ascend_toolkit_install.info",
                                        "ascend-toolkit/latest/*-linux/ascend_toolkit_install.info",
                                        "cann-*/*-linux/ascend_toolkit_install.info")]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            version = _key_values(path).get("version")
            if version:
                return version
    return None


def compat_table() -> tuple[dict, dict[str, str]]:
    """(images/ascend/compat.json, images/ascend/pins.env) from pins_dir()."""
    folder = pins_dir()
    with open(os.path.join(folder, "compat.json"), encoding="utf-8") as fh:
        table = json.load(fh)
    pins = _key_values(os.path.join(folder, "pins.env"), lower=False)
    return table, pins


def _release(version: str) -> str:
    return version.split("+")[0].lower()


def check_versions(device_type: str) -> Check:
    import torch

    from facenet import devices

    found = {"torch": torch.__version__, "python": platform.python_version()}
    if device_type == "cuda":
        found["cuda"] = torch.version.cuda or "?"
        return Check("versions", PASS, f"torch {found['torch']}, CUDA {found['cuda']}, Python {found['python']}",
                     data=found)
    if device_type == "cpu":
        bf16 = "with" if devices.cpu_has_bf16() else "without"
        return Check("versions", PASS, f"torch {found['torch']}, Python {found['python']}, a CPU {bf16} native bf16",
                     data=found)
    import torch_npu  # its __version__: Ascend/pytorch@v26.1.0-pytorch2.12.0:torch_npu/__init__.py:44

    found.update(torch_npu=getattr(torch_npu, "__version__", "?"), cann=cann_version() or "?",
                 driver=driver_version() or "?")
    try:
        table, pins = compat_table()
    except OSError as exc:
        return Check("versions", WARN, f"{_said(found)}; TorchNPU's table not found ({exc})",
                     fix=f"set {PINS_DIR_ENV} to the checkout's images/ascend", data=found)
    return compare_versions(found, table, pins)


def _said(found: dict) -> str:
    return (f"torch {found['torch']}, torch_npu {found['torch_npu']}, CANN {found['cann']}, driver {found['driver']}, "
            f"Python {found['python']}")


def compare_versions(found: dict, table: dict, pins: dict[str, str]) -> Check:
    """An Ascend host's versions (torch, torch_npu, cann, driver) against TorchNPU's table and this checkout's
    pins: FAIL when no row pairs them, WARN when a row does but not the pinned one or the driver is unreadable."""
    said = _said(found)
    row = {"torch_npu": _release(found["torch_npu"]), "torch": _release(found["torch"]), "cann": found["cann"].lower()}
    rows = [{k: r[k].lower() for k in row} for r in table["rows"]]
    pinned = {"torch_npu": pins.get("TORCH_NPU", ""), "torch": pins.get("ASCEND_TORCH", "")}
    if row not in rows:
        match = [r for r in table["rows"] if r["torch_npu"].lower() == row["torch_npu"]]
        want = f"CANN {match[0]['cann']} with torch {match[0]['torch']}" if match else "a row of the table"
        return Check("versions", FAIL, f"{said}: no row of TorchNPU's table pairs these (torch_npu {row['torch_npu']} "
                     f"needs {want})",
                     fix=f"use the Ascend image (`make up PROFILE=npu`): torch {pinned['torch']}, torch_npu "
                         f"{pinned['torch_npu']} on its CANN base ({pins.get('CANN_IMAGE', '?')})", data=found)
    if (row["torch_npu"], row["torch"]) != (pinned["torch_npu"], pinned["torch"]):
        return Check("versions", WARN, f"{said}: a row of TorchNPU's table, but not the one this checkout pins "
                     f"(torch {pinned['torch']}, torch_npu {pinned['torch_npu']})", data=found)
    if found["driver"] == "?":
        return Check("versions", WARN, f"{said}: the driver's version.info is not readable here",
                     fix=f"mount {ascend_root()}/driver (the compose file does)", data=found)
    return Check("versions", PASS, said + " (a row of TorchNPU's table)", data=found)


# -- chips ----------------------------------------------------------------------------------------------------------

def check_chips(device_type: str, opts: Options) -> Check:
    from facenet import devices
    from facenet.fsutil import cpu_cores

    visible = devices.device_count(device_type)
    if devices.row(device_type).module is None:  # the CPU: processes stand in for chips
        npus = opts.npus or 2
        return Check("chips", PASS, f"{cpu_cores()} core(s); {npus} processes stand in for {npus} devices",
                     data={"npus": npus, "cores": cpu_cores()})
    npus = opts.npus or visible
    data: dict = {"npus": npus, "visible": visible}
    problems, fix = [], None
    if npus > visible:
        problems.append(f"--npus {npus} but torch sees {visible}")
        fix = f"map the chips into the container (/dev/{'davinci' if device_type == 'npu' else 'nvidia'}N)"
    detail = f"torch sees {visible} {device_type} device(s)"
    if device_type == "cuda":
        import torch

        names = sorted({torch.cuda.get_device_name(i) for i in range(visible)})
        detail += f": {', '.join(names)}"
    else:
        from facenet import npu_smi

        try:
            report = npu_smi.read()
        except npu_smi.NpuSmiError as exc:
            data["npu_smi"] = str(exc)
            status = FAIL if problems else WARN
            return Check("chips", status, f"{detail}; {exc}" + (f"; {problems[0]}" if problems else ""),
                         fix=fix or "mount npu-smi into the container (compose finds the host's: NPU_SMI)",
                         data=data)
        held = npu_smi.held_chips(report, list(range(npus)))
        data["chips"] = [c.as_dict() for _, c in held]
        data["npu_smi_version"] = report.version
        unhealthy = [f"NPU {c.npu} chip {c.chip}: {c.health}" for _, c in held if not c.healthy]
        if unhealthy:
            problems.append("unhealthy: " + ", ".join(unhealthy))
            fix = fix or "`npu-smi info -t health -i N` names the error; reset or replace the chip, or leave it out " \
                         "(--device-list, NPUS)"
        busy = [f"NPU {c.npu} ({c.hbm_used_mb} MB HBM used by {len(c.processes)} process(es))"
                for _, c in held if c.processes]
        names = sorted({c.name for _, c in held})
        detail += f"; npu-smi {report.version} lists {len(report.chips)} chip(s) ({', '.join(names)})"
        if busy:
            detail += "; in use: " + ", ".join(busy)
    if problems:
        return Check("chips", FAIL, f"{detail}: {'; '.join(problems)}", fix=fix, data=data)
    return Check("chips", PASS, detail, data=data)



# -- one step on every chip, and an all-reduce over them ------------------------------------------------------------

def _group_member(rank: int, world: int, device_type: str, port: int, out_dir: str, opts: Options) -> None:
    """One process of the group: its chip, one training step, then the all-reduce; results to a JSON file."""
    import torch

    from facenet import devices
    from facenet.fsutil import cpu_cores
    from facenet.train import distributed, probe

    result: dict = {"rank": rank}
    try:
        if device_type == "cpu":
            torch.set_num_threads(max(1, cpu_cores() // world))
        device = devices.setup_device(device_type, rank, None)
        # The trainer's own set-up of its process group (as torchrun's environment would give it).
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        os.environ.setdefault(distributed.COLLECTIVE_TIMEOUT_ENV, str(GROUP_TIMEOUT_S))
        os.environ.update(devices.collective_env(device_type, 1, None, distributed.collective_timeout()))
        distributed.init(distributed.from_env(), device.dist_backend, device.torch_device)
        p = probe.build(device, opts.step_batch, image_size=opts.image_size, seed=rank)
        before = probe.snapshot(p)
        t0 = time.perf_counter()
        loss = p.run()
        result.update(step_seconds=time.perf_counter() - t0, loss=loss, moved=probe.parameters_moved(p, before),
                      precision=p.amp.label, scaler=p.amp.scaler.is_enabled(), note=p.amp.note,
                      optimizer=f"{type(p.optimizer).__module__}.{type(p.optimizer).__name__}"
                                f"({devices.row(device_type).adam_kernel})")
        result["allreduce"] = _bandwidth(device, world, opts)
        distributed.shutdown()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)


def _bandwidth(device, world: int, opts: Options) -> dict:
    """All-reduce of a float32 buffer, 2 warm-up + 5 timed calls: algorithm bandwidth (bytes / time) and bus
    bandwidth (x 2(n-1)/n, as nccl-tests reports it), and whether the sum is right."""
    import torch
    import torch.distributed as dist

    mb = opts.allreduce_mb or (16 if device.type == "cpu" else 256)
    if not dist.is_initialized():  # one process: no group (the trainer's init makes none for world size 1)
        return {"megabytes": mb, "correct": True}
    n = mb * 2**20 // 4
    buf = torch.ones(n, dtype=torch.float32, device=device.torch_device)
    for _ in range(2):
        dist.all_reduce(buf)
    device.synchronize()
    correct = bool(buf[0].item() == world ** 2)
    times = []
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        device.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    algbw = n * 4 / seconds / 1e9
    return {"megabytes": mb, "seconds": seconds, "algbw_gb_s": round(algbw, 3),
            "busbw_gb_s": round(algbw * 2 * (world - 1) / world, 3), "correct": correct}


def _timed_group(device_type: str, npus: int, opts: Options) -> list[Check]:
    t0 = time.perf_counter()
    try:
        checks = _group(device_type, npus, opts)
    except Exception as exc:
        checks = [Check("train step", FAIL, f"{type(exc).__name__}: {_first_line(exc)}"),
                  Check("all-reduce", SKIP, "the group did not start")]
    for c in checks:
        c.seconds = round(time.perf_counter() - t0, 2)
    return checks


def _group(device_type: str, npus: int, opts: Options) -> list[Check]:
    import multiprocessing as mp

    from facenet import devices

    backend = devices.row(device_type).backend
    ctx = mp.get_context("spawn")  # a fresh interpreter per chip: nothing of this process' device state
    with tempfile.TemporaryDirectory(prefix="facenet-doctor-") as out_dir:
        from facenet.fsutil import free_port

        port = free_port()
        procs = [ctx.Process(target=_group_member, args=(r, npus, device_type, port, out_dir, opts), daemon=True)
                 for r in range(npus)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + GROUP_TIMEOUT_S + 30
        for proc in procs:
            proc.join(max(1.0, deadline - time.monotonic()))
        hung = [r for r, proc in enumerate(procs) if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        results = []
        for r, proc in enumerate(procs):
            path = os.path.join(out_dir, f"rank{r}.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    results.append(json.load(fh))
            else:
                why = "no answer" if r in hung else f"exited {proc.exitcode}"
                results.append({"rank": r, "error": f"{why} within {GROUP_TIMEOUT_S} s"})
    return [_step_check(device_type, results), _allreduce_check(backend, npus, results)]


def _step_check(device_type: str, results: list[dict]) -> Check:
    import math

    bad = [f"chip {r['rank']}: {r['error']}" for r in results if "error" in r and "loss" not in r]
    bad += [f"chip {r['rank']}: loss {r['loss']}" for r in results if "loss" in r and not math.isfinite(r["loss"])]
    bad += [f"chip {r['rank']}: no parameter changed" for r in results if r.get("moved") is False]
    if bad:
        return Check("train step", FAIL, "; ".join(bad),
                     fix="run `facenet-cli doctor --json` and send it to us; on an NPU, the plog "
                         "(~/ascend/log) names the failing operator", data={"ranks": results})
    first = results[0]
    slowest = max(r["step_seconds"] for r in results)
    note = f" ({first['note']})" if first.get("note") else ""
    return Check("train step", PASS,
                 f"one {first['precision']}{' + GradScaler' if first['scaler'] else ''} step on each of "
                 f"{len(results)} chip(s) with {first['optimizer']}: loss {first['loss']:.3f}, the slowest "
                 f"{slowest:.1f} s (first-call kernel builds included){note}", data={"ranks": results})


def _allreduce_check(backend: str, world: int, results: list[dict]) -> Check:
    if any("allreduce" not in r for r in results):
        errors = [f"rank {r['rank']}: {r.get('error', 'no result')}" for r in results if "allreduce" not in r]
        return Check("all-reduce", FAIL, f"{backend} over {world} process(es): {'; '.join(errors)}",
                     fix="HCCL: `npu-smi info -t topo`, and hccn_tool -i N -link -g per chip; NCCL: NCCL_DEBUG=INFO",
                     data={"ranks": results})
    bw = [r["allreduce"] for r in results]
    if not all(b["correct"] for b in bw):
        return Check("all-reduce", FAIL, f"{backend} over {world}: the sum is wrong", data={"ranks": bw})
    if world == 1:
        return Check("all-reduce", SKIP, f"one process: {backend} has nothing to reduce", data=bw[0])
    busbw = min(b["busbw_gb_s"] for b in bw)
    return Check("all-reduce", PASS, f"{backend} over {world} processes, {bw[0]['megabytes']} MiB: bus bandwidth "
                 f"{busbw:.2f} GB/s (algorithm {bw[0]['algbw_gb_s']:.2f} GB/s)", data={"busbw_gb_s": busbw, "ranks": bw})


# -- NMS ------------------------------------------------------------------------------------------------------------

def check_nms(device_type: str) -> Check:
    import torch
    from torchvision import ops

    from facenet import devices
    from facenet.preprocess.detect import nms

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2000, 2, generator=g) * 600
    wh = torch.rand(2000, 2, generator=g) * 80 + 8
    boxes, scores = torch.cat([xy, xy + wh], 1), torch.rand(2000, generator=g)
    groups = torch.randint(0, 6, (2000,), generator=g)
    device = devices.setup_device(device_type, 0, None)
    on = device.torch_device
    t0 = time.perf_counter()
    keep = nms(boxes.to(on), scores.to(on), 0.5, groups.to(on))
    keep_all = nms(boxes.to(on), scores.to(on), 0.7)
    device.synchronize()
    seconds = time.perf_counter() - t0
    same = torch.equal(keep.cpu(), ops.batched_nms(boxes, scores, groups, 0.5)) and \
        torch.equal(keep_all.cpu(), ops.nms(boxes, scores, 0.7))
    where = devices.row(device_type).nms_on
    said = "on the device" if where == "device" else "on the CPU beside it (no NMS kernel there)"
    if not same:
        return Check("nms", FAIL, f"NMS {said} keeps other boxes than torchvision's on the CPU",
                     fix="send `facenet-cli doctor --json`; preprocess on the CPU (--device cpu) meanwhile")
    return Check("nms", PASS, f"2000 boxes, per-scale and across scales, {said}: the CPU's boxes, {1000 * seconds:.0f} ms",
                 data={"nms_on": where, "seconds": seconds})



# -- throughput -----------------------------------------------------------------------------------------------------

def check_throughput(device_type: str, opts: Options) -> Check:
    from facenet import devices
    from facenet.bench.device_bench import device_peak, flops_per_training_image, mfu
    from facenet.train import probe

    if opts.probe_seconds <= 0:
        return Check("throughput", SKIP, "--probe-seconds 0")
    batch = opts.probe_batch or (CPU_PROBE_BATCH if device_type == "cpu" else RECIPE_BATCH)
    device = devices.setup_device(device_type, 0, None)
    p = probe.build(device, batch, image_size=opts.image_size)
    times = p.timed(seconds=opts.probe_seconds)
    rate = probe.median_rate(batch, times)
    flops = flops_per_training_image(opts.image_size)
    peak, name = device_peak(device_type)
    util = mfu(rate, flops, peak)
    data = {"img_per_s": round(rate, 1), "batch_size": batch, "steps": len(times), "precision": p.amp.label,
            "mfu": util, "device_name": name, "seed_1p_img_per_s": SEED_1P_IMG_S,
            "vs_seed_1p": round(rate / SEED_1P_IMG_S, 3), "flops_per_image": flops}
    memory = device.max_memory_mb()
    if memory is not None:
        data["device_memory_mb"] = round(memory)
    mfu_text = f", MFU {util:.1%}" if util is not None else ""
    return Check("throughput", PASS,
                 f"{rate:.1f} img/s per device ({name}, batch {batch}, {p.amp.label}, {len(times)} steps in "
                 f"{sum(times):.0f} s{mfu_text}); the seed's 1p: {SEED_1P_IMG_S:.0f} img/s on an Ascend 910 "
                 f"(x{rate / SEED_1P_IMG_S:.2f})", data=data)



def format_report(report: dict) -> str:
    verdict = "this host can train" if report["ok"] else "this host cannot train: fix the FAIL lines above"
    return f"{report['device']} on {report['host']}, {report['seconds']:.0f} s: {verdict}"


def summary_of_failures(report: dict) -> str:
    """One line naming each failed check (what a worker that failed its doctor says in status and Flower)."""
    failed = [c for c in report["checks"] if c["status"] == FAIL]
    return "; ".join(c["name"] + ": " + re.sub(r"\s+", " ", c["detail"])[:300] for c in failed)
