"""What an Ascend host runs, checked where no NPU is: each device type's row (npu included), the one training
step and optimizer of every type, the zeroing rule of fused optimizers, HCCL's job shapes and settings, npu-smi
as real hosts printed it, the NPU system metrics in a real MLflow, and `facenet-cli doctor` for real on the CPU
(with a real Redis and MLflow, and a device worker that failed it)."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from facenet import devices
from facenet.devices import ROWS, Device
from tests.conftest import REPO

FIXTURES = os.path.join(REPO, "tests", "fixtures", "npu_smi")


def fixture(name: str) -> str:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as fh:
        return fh.read()


# -- the device table -------------------------------------------------------------------------------------------

def test_every_device_type_has_a_row_and_the_npu_row_says_where_each_value_comes_from():
    assert set(ROWS) == {"npu", "cuda", "cpu"}
    npu, cuda, cpu = ROWS["npu"], ROWS["cuda"], ROWS["cpu"]
    assert (npu.backend, cuda.backend, cpu.backend) == ("hccl", "nccl", "gloo")
    assert (npu.visible_env, cuda.visible_env, cpu.visible_env) == ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", None)
    # NPU: no fused Adam kernel (foreach), NMS beside the chip on the CPU, float32 scalars for HCCL, torchair graphs,
    # fp16 where there is no bf16 (910A), HCCL's own settings over several nodes, npu-smi for the chip metrics.
    assert npu.adam_kernel == "foreach" and cuda.adam_kernel == cpu.adam_kernel == "fused"
    assert npu.nms_on == "cpu" and cuda.nms_on == cpu.nms_on == "device"
    assert npu.scalar_dtype == torch.float32 and cpu.scalar_dtype == torch.float64
    assert npu.compile_backend == "torchair" and npu.compile_auto is None and not npu.cuda_graphs
    assert cuda.compile_auto == "reduce-overhead" and cuda.cuda_graphs
    assert npu.no_bf16_dtype == torch.float16 and npu.bf16_probe == "module"
    assert (npu.nic_env, npu.connect_timeout_env, npu.exec_timeout_env) == \
        ("HCCL_IF_IP", "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT")
    assert npu.chip_monitor == "npu-smi" and cuda.chip_monitor is None
    assert not npu.channels_last and npu.pin_memory and npu.side_stream and not npu.backend_device_id
    assert cuda.backend_device_id and not cpu.side_stream
    # Every value in which the npu row differs from another row names its source (repository, tag or path).
    fields = [f for f in npu.__dataclass_fields__ if f not in ("type", "sources")]
    differs = {f for f in fields if any(getattr(npu, f) != getattr(r, f) for r in (cuda, cpu))} - {"pin_memory"}
    cited = dict(npu.sources)
    for name in differs:
        if name in ("backend", "backend_device_id", "side_stream"):
            continue  # hccl is the backend's name; the stream API is cited under "module"
        assert name in cited, f"ROWS['npu'].{name} differs from the other rows and cites no source"
    for name, where in cited.items():
        assert re.search(r"torch_npu[:/]|op-plugin|hiascend|Ascend/|npu_smi|tests/fixtures", where), (name, where)
    # One zeroing rule everywhere (see test_a_fused_optimizer_is_never_zeroed_with_set_to_none).
    assert not any(r.zero_grad_to_none for r in ROWS.values())


def test_an_npu_device_answers_from_its_row_without_the_hardware():
    npu = Device("npu", 3)
    assert npu.dist_backend == "hccl" and not npu.channels_last and npu.pin_memory
    assert npu.compile_mode("auto") == (None, "compile auto: eager on npu (--compile default compiles here too)")
    assert npu.compile_mode("reduce-overhead")[0] == "default"  # no CUDA graphs on Ascend
    assert npu.autocast_dtype("fp16") == torch.float16 and npu.autocast_dtype("bf16") == torch.bfloat16
    assert devices.nms_device("npu") == torch.device("cpu") and devices.nms_device("cpu") is None
    # torch has no `npu` here: asking the hardware is the only thing that needs torch_npu.
    with pytest.raises(AttributeError):
        npu.has_bf16()


@pytest.mark.parametrize("device_type", ["npu", "cuda", "cpu"])
def test_each_rows_optimizer_is_torch_optims_with_its_kernel(device_type):
    """The optimizer each row builds: torch.optim's Adam with that row's kernel (foreach, fused), and SGD."""
    row_device = Device(device_type, 0 if device_type != "cpu" else None)
    for kind in ("adam", "sgd"):
        params = [torch.nn.Parameter(torch.randn(4, 4))]
        opt = row_device.make_optimizer(kind, params, 1e-3, 0.0)
        assert type(opt).__module__.startswith("torch.optim"), type(opt)
        if kind == "adam":
            assert opt.defaults[ROWS[device_type].adam_kernel] is True


# One step run for each Adam kernel a row uses (the cuda and cpu rows share "fused": the same optimizer, the same
# step); fp16 on a CPU is slow (~15 s a step at 1 thread), and 80 px (the smallest InceptionResnetV1 takes) runs the
# same code as 160.
KERNEL_ROWS = {kernel: sorted(name for name, row in ROWS.items() if row.adam_kernel == kernel)
               for kernel in sorted({row.adam_kernel for row in ROWS.values()})}


@pytest.mark.parametrize("kernel", sorted(KERNEL_ROWS))
def test_the_step_trains_in_fp16_with_each_rows_adam_kernel(kernel):
    """The trainer's own step (Step.train: zero in place, autocast, scaler, backward, step) on CPU tensors with the
    optimizer a row builds: the code an NPU runs, the NPU's fp16 + GradScaler recipe (910A) included."""
    from facenet.spec import TrainSpec
    from facenet.train import probe

    assert {"npu", "cuda", "cpu"} <= {name for names in KERNEL_ROWS.values() for name in names}
    device_type = KERNEL_ROWS[kernel][0]
    row_device = Device(device_type, 0 if device_type != "cpu" else None)
    # The step on the CPU with this row's optimizer kernel and the NPU's no-bf16 dtype through the loss scaler.
    cpu = Device("cpu")
    spec = TrainSpec(data="synthetic", amp=True, amp_dtype="fp16", batch_size=2, lr=1e-3)
    p = probe.build(cpu, 2, spec, image_size=80)
    p.optimizer = row_device.make_optimizer("adam", p.step.model.parameters(), 1e-3, 0.0)
    assert p.optimizer.defaults[kernel] is True
    assert p.amp.scaler.is_enabled() and p.amp.dtype == torch.float16
    before, losses = probe.snapshot(p), []
    while not probe.parameters_moved(p, before) and len(losses) < 12:
        losses.append(p.run())  # the first steps overflow at 2**16 and are skipped: the scaler halves its scale
    assert all(torch.isfinite(torch.tensor(losses))) and probe.parameters_moved(p, before), losses
    assert 0 < p.amp.scaler.get_scale() < 2.0**16  # at least one overflow was skipped on the way


def test_a_fused_optimizer_is_never_zeroed_with_set_to_none(small_faces, tmp_path, monkeypatch):
    """torch_npu's fused optimizers raise on zero_grad(set_to_none=True) (npu_fused_optim_base.py:127-131); ours
    zero every optimizer in place. A real training run records every zero_grad: a fused Adam (the CPU row's), never
    set_to_none=True; and nothing in the trainer zeroes grads but Device.zero_grad."""
    from facenet.spec import TrainSpec
    from facenet.train import engine

    calls = []
    original = torch.optim.Optimizer.zero_grad

    def recording(self, set_to_none: bool = True):
        calls.append((type(self).__name__, bool(self.defaults.get("fused")), set_to_none))
        return original(self, set_to_none)

    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", recording)
    monkeypatch.delenv("RANK", raising=False)
    spec = TrainSpec(data=small_faces, epochs=1, batch_size=8, device="cpu", image_size=96, workers=0,
                     output=str(tmp_path / "out"), pretrained=None, log_model=False, verify_every=0)
    summary = engine.run(spec)
    assert summary["epochs"] == 1
    assert calls and all(name == "Adam" and fused for name, fused, _ in calls), calls[:3]
    assert not any(to_none for _, _, to_none in calls), "a fused optimizer was zeroed with set_to_none=True"
    for path in glob.glob(os.path.join(REPO, "facenet", "**", "*.py"), recursive=True):
        if path.endswith("devices.py"):
            continue
        text = open(path, encoding="utf-8").read()
        assert not re.search(r"(?<!device)\.zero_grad\(", text), f"{path} zeroes grads itself; use Device.zero_grad"


# -- HCCL's shapes and settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("npus", [1, 2, 3, 4, 5, 6, 7, 8])
def test_atlas_a2_takes_any_count_from_1_to_8_per_node(npus):
    from facenet.spec import TrainSpec, check_npu_count

    check_npu_count("npu", npus, 1)
    TrainSpec(data="d", npus=npus, batch_size=8 * npus, device="npu").validate()
    check_npu_count("npu", npus * 3, 3)  # (1-8) x N over nodes


def test_counts_beyond_a_node_are_refused_in_one_line():
    from facenet.errors import InputError
    from facenet.spec import check_npu_count

    for npus, nnodes, said in ((9, 1, "--npus 9: an Ascend A2 node trains on 1 to 8"),
                               (18, 2, "uses 1 to 8 NPUs on each (9 asked)"), (0, 1, "--npus 0")):
        with pytest.raises(InputError, match=re.escape(said)):
            check_npu_count("npu", npus, nnodes)
    check_npu_count("cpu", 9, 1)  # the rule is HCCL's, not the CPU's


def test_hccl_settings_of_a_job_follow_the_advertised_address_and_the_collective_timeout(monkeypatch):
    for name in ("HCCL_IF_IP", "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    env = devices.collective_env("npu", 2, "10.0.0.2", 600)
    # HCCL gives up on a collective (and writes its plog) before our 600 s watchdog: torch_npu warns when the
    # watchdog timeout is at or below HCCL_EXEC_TIMEOUT (ProcessGroupHCCL.cpp:1290-1296, default 1836 s).
    assert env == {"HCCL_IF_IP": "10.0.0.2", "HCCL_CONNECT_TIMEOUT": "300", "HCCL_EXEC_TIMEOUT": "540"}
    assert int(env["HCCL_EXEC_TIMEOUT"]) * 1000 < 600 * 1000
    assert devices.collective_env("npu", 1, "10.0.0.2", 600) == {"HCCL_EXEC_TIMEOUT": "540"}
    assert devices.collective_env("npu", 2, None, 60)["HCCL_CONNECT_TIMEOUT"] == "120"  # HCCL's lowest
    monkeypatch.setenv("HCCL_IF_IP", "192.168.1.9")  # the operator's own setting wins
    assert "HCCL_IF_IP" not in devices.collective_env("npu", 2, "10.0.0.2", 600)
    assert devices.collective_env("cpu", 2, "10.0.0.2", 600) == devices.collective_env("cuda", 2, "x", 600) == {}


# -- npu-smi ----------------------------------------------------------------------------------------------------

def test_npu_smi_tables_parse_as_hosts_printed_them():
    from facenet.npu_smi import parse

    busy = parse(fixture("910b3x8_busy.txt"))
    assert busy.version == "24.1.0" and [c.npu for c in busy.chips] == list(range(8))
    c0 = busy.chips[0]
    assert (c0.name, c0.health, c0.power_w, c0.temp_c, c0.aicore_pct) == ("910B3", "OK", 153.7, 45.0, 39.0)
    assert (c0.hbm_used_mb, c0.hbm_total_mb, c0.bus_id) == (62810, 65536, "0000:C1:00.0")
    assert len(c0.processes) == 8 and c0.processes[1] == {"pid": 842, "name": "/usr/local/pyth", "memory_mb": 59017}
    assert busy.chips[7].temp_c == 67.0 and busy.chips[7].processes[0]["pid"] == 849

    mixed = parse(fixture("910b3x8_one_busy.txt"))
    assert [len(c.processes) for c in mixed.chips] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert mixed.chips[2].hbm_used_mb == 41052 and mixed.chips[2].processes[0]["name"] == ""
    assert mixed.chips[3].hbm_used_mb == 3390  # "3390 / 65536": the spacing of a 4-digit value

    a910 = parse(fixture("910a_x2_idle.txt"))  # the old narrow layout, no process table
    assert a910.version == "21.0.4" and [(c.name, c.memory_used_mb, c.memory_total_mb) for c in a910.chips] == \
        [("910A", 839, 15170), ("910A", 1274, 15171)]
    assert all(c.healthy for c in parse(fixture("910proB_x8_idle.txt")).chips)
    one = parse(fixture("910b4_x1_container.txt"))
    assert [(c.npu, c.name, c.hbm_total_mb) for c in one.chips] == [(5, "910B4", 32768)]
    wide = parse(fixture("910b4_x1_wide_26.txt"))
    assert wide.version == "26.0.rc1" and wide.chips[0].hbm_used_mb == 2871 and wide.chips[0].power_w == 82.6
    a3 = parse(fixture("a3_x16_busy.txt"))  # two dies per NPU: Chip and Phy-ID, the second die without power
    assert len(a3.chips) == 16 and [(c.npu, c.chip, c.phy_id) for c in a3.chips[:3]] == [(0, 0, 0), (0, 1, 1), (1, 0, 2)]
    assert a3.chips[1].power_w is None and a3.chips[0].power_w == 232.5
    assert [p["memory_mb"] for p in a3.chips[1].processes] == [50119]
    assert parse("npu-smi: command not found\n").chips == []


def test_a_jobs_chips_map_to_npu_smi_rows_and_metric_names(monkeypatch):
    from facenet.npu_smi import chip_metrics, held_chips, parse

    report = parse(fixture("910b3x8_one_busy.txt"))
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    assert [(i, c.npu) for i, c in held_chips(report, [0, 2])] == [(0, 0), (2, 2)]
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "2,5")  # the process sees chips 2 and 5 as 0 and 1
    assert [(i, c.npu) for i, c in held_chips(report, [0, 1])] == [(0, 2), (1, 5)]
    m = chip_metrics(0, held_chips(report, [0])[0][1])
    assert m == {"npu_0_utilization_percentage": 0.0, "npu_0_memory_usage_megabytes": 41052.0,
                 "npu_0_memory_total_megabytes": 65536.0, "npu_0_memory_usage_percentage": 62.6,
                 "npu_0_power_usage_watts": 92.3, "npu_0_temperature_celsius": 32.0, "npu_0_healthy": 1.0}


def _fake_npu_smi(tmp_path, name: str) -> str:
    """An executable that prints one recorded `npu-smi info` (no NPU here: what a host printed is what we have)."""
    tool = tmp_path / "npu-smi"
    tool.write_text(f"#!/bin/sh\n[ \"$1\" = info ] || exit 3\ncat {os.path.join(FIXTURES, name)}\n")
    tool.chmod(0o755)
    return str(tool)


def test_npu_chips_metrics_reach_a_real_mlflow_on_its_system_metrics_cadence(mlflow_server, tmp_path, monkeypatch):
    """The monitor the trainer adds on npu (facenet.npu_smi, run through `npu-smi info` as on a host) beside
    MLflow's own: only the job's chips, as system/npu_<i>_... metrics of the run."""
    from facenet import npu_smi
    from facenet.tracking import Tracker

    monkeypatch.setenv(npu_smi.NPU_SMI_ENV, _fake_npu_smi(tmp_path, "910b3x8_busy.txt"))
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    assert len(npu_smi.read().chips) == 8
    tracker = Tracker(mlflow_server.uri, "npu-metrics", run_name="npu-smi")
    tracker.start_system_metrics(0.5, chips=[lambda: npu_smi.monitor_class()([1, 6])])
    client = mlflow_server.client()
    deadline = time.time() + 60
    while time.time() < deadline:
        keys = set(client.get_run(tracker.run_id).data.metrics)
        if "system/npu_6_power_usage_watts" in keys:
            break
        time.sleep(1)
    tracker.close("FINISHED", timeout=30)
    metrics = client.get_run(tracker.run_id).data.metrics
    assert metrics["system/npu_1_utilization_percentage"] == 39.0
    assert metrics["system/npu_6_memory_usage_megabytes"] == 62697.0 and metrics["system/npu_6_power_usage_watts"] == 160.1
    assert metrics["system/npu_6_temperature_celsius"] == 50.0
    assert not any(k.startswith("system/npu_0_") for k in metrics), "a chip the job does not hold"
    assert any(k.startswith("system/cpu_") for k in metrics)  # MLflow's own monitors still run beside it
    # npu-smi failing at start: the chip monitor is left out, said, and the run goes on.
    monkeypatch.setenv(npu_smi.NPU_SMI_ENV, str(tmp_path / "absent"))
    with pytest.raises(npu_smi.NpuSmiError, match="npu-smi not found"):
        npu_smi.read()


# -- doctor -----------------------------------------------------------------------------------------------------

def doctor(*args: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "doctor", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})})


def test_doctor_on_the_cpu_trains_reduces_detects_and_probes_for_real(redis_url, mlflow_server):
    env = {"FACENET_REDIS_URL": redis_url, "FACENET_MLFLOW_URI": mlflow_server.uri}
    res = doctor("--device", "cpu", "--npus", "2", "--probe-seconds", "3", "--image-size", "96", "--json", env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == ["versions", "chips", "train step", "all-reduce", "nms",
                                                     "throughput", "redis", "mlflow"]
    assert report["ok"] and all(c["status"] == "PASS" for c in report["checks"]), \
        [(c["name"], c["status"], c["detail"]) for c in report["checks"]]
    ranks = checks["train step"]["data"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["moved"] and r["loss"] > 0 for r in ranks)
    assert all(r["optimizer"] == "torch.optim.adam.Adam(fused)" for r in ranks)
    reduce = checks["all-reduce"]["data"]
    assert reduce["busbw_gb_s"] > 0 and all(r["correct"] for r in reduce["ranks"])
    assert "gloo over 2 processes" in checks["all-reduce"]["detail"]
    probe = checks["throughput"]["data"]
    assert probe["img_per_s"] > 0 and probe["batch_size"] == 32 and probe["steps"] >= 3
    assert probe["seed_1p_img_per_s"] == 2568.4 and "2568 img/s" in checks["throughput"]["detail"]
    assert checks["nms"]["data"]["nms_on"] == "device"
    assert report["seconds"] < 300

    # The same run as an operator reads it: one line per check, the verdict last, no JSON.
    res = doctor("--device", "cpu", "--npus", "2", "--probe-seconds", "0", "--image-size", "96", env=env)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and lines[-1].endswith("this host can train"), res.stdout
    assert any(line.startswith("SKIP  throughput") for line in lines)


def test_doctor_says_what_fails_and_how_to_fix_it(redis_url, tmp_path):
    # No GPU here: the CUDA checks fail in one line with the fix, the rest is skipped, the exit status says so.
    res = doctor("--device", "cuda", "--json", "--no-services")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    report = json.loads(res.stdout)
    first = report["checks"][0]
    assert not report["ok"] and first["status"] == "FAIL" and "no CUDA device" in first["detail"] and first["fix"]
    assert {c["status"] for c in report["checks"][1:]} == {"SKIP"}
    # Redis and MLflow unreachable: FAIL lines with the fix, on a host that could otherwise train.
    dead = f"redis://:x@127.0.0.1:{_closed_port()}/0"
    res = doctor("--device", "cpu", "--npus", "1", "--probe-seconds", "0", "--image-size", "96",
                 env={"FACENET_REDIS_URL": dead, "FACENET_MLFLOW_URI": f"http://127.0.0.1:{_closed_port()}",
                      "FACENET_STATE_DIR": str(tmp_path)})
    assert res.returncode == 1, res.stdout
    assert re.search(r"^FAIL  redis .*does not answer", res.stdout, re.M) and "fix: `facenet-cli stack up`" in res.stdout
    assert re.search(r"^FAIL  mlflow .*unreachable", res.stdout, re.M)
    assert re.search(r"^SKIP  all-reduce  one process", res.stdout, re.M)
    assert res.stdout.strip().splitlines()[-1].endswith("cannot train: fix the FAIL lines above")


def _closed_port() -> int:
    from facenet.fsutil import free_port

    return free_port()


def test_doctor_reads_driver_and_cann_versions_and_checks_them_against_the_table(tmp_path, monkeypatch):
    """The files an Ascend host has (their formats as hosts show them), and the pins against TorchNPU's table."""
    from facenet import doctor as d

    root = tmp_path / "Ascend"
    (root / "driver").mkdir(parents=True)
    (root / "driver" / "version.info").write_text("Version=24.1.rc2.2\nascendhal_version=7.35.23\n"
                                                   "package_version=24.1.rc2.2\n")
    (root / "cann" / "aarch64-linux").mkdir(parents=True)  # CANN 8.5 and later
    (root / "cann" / "aarch64-linux" / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=9.1.0\narch=aarch64\n")
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    assert d.driver_version(str(root)) == "24.1.rc2.2" and d.cann_version(str(root)) == "9.1.0"
    old = tmp_path / "Old"
    (old / "driver").mkdir(parents=True)
    (old / "driver" / "version.info").write_text("Version=23.0.0\n")  # before package_version=
    (old / "ascend-toolkit" / "latest" / "x86_64-linux").mkdir(parents=True)
    (old / "ascend-toolkit" / "latest" / "x86_64-linux" / "ascend_toolkit_install.info").write_text("version=8.3.RC2\n")
    assert d.driver_version(str(old)) == "23.0.0" and d.cann_version(str(old)) == "8.3.RC2"
    assert d.cann_version(str(tmp_path / "none")) is None

    table, pins = d.compat_table()
    found = {"torch": pins["ASCEND_TORCH"] + "+cpu", "torch_npu": pins["TORCH_NPU"], "cann": "9.1.0",
             "driver": "25.2.0", "python": "3.11"}
    assert d.compare_versions(found, table, pins).status == "PASS"
    wrong = d.compare_versions({**found, "cann": "8.5.0"}, table, pins)
    assert wrong.status == "FAIL" and "needs CANN 9.1.0 with torch 2.12.0" in wrong.detail and "make up" in wrong.fix
    other = d.compare_versions({**found, "torch": "2.9.0", "torch_npu": "2.9.0.post2", "cann": "9.0.0"}, table, pins)
    assert other.status == "WARN" and "not the one this checkout pins" in other.detail
    assert d.compare_versions({**found, "driver": "?"}, table, pins).status == "WARN"


def test_a_device_worker_that_fails_its_doctor_takes_no_jobs_and_says_why(redis_url, tmp_path):
    """FACENET_WORKER_DOCTOR=1 (compose sets it for Ascend workers): the worker runs doctor on its devices first.
    This one is told to check CUDA on a host without a GPU, which fails for real: it starts, takes no jobs (it
    consumes no train queue and registers no devices), and `workers`, submit and Flower's view of its
    configuration (`inspect conf`) say why."""
    from services.queue.registry import Registry, connect

    env = {**os.environ, "FACENET_REDIS_URL": redis_url, "FACENET_DEVICE_TYPE": "cpu", "FACENET_DEVICES": "0",
           "FACENET_WORKER_NAME": "cpu-unfit@test", "FACENET_WORKER_DOCTOR": "1",
           "FACENET_DOCTOR_ARGS": "--device cuda --no-services", "FACENET_STATE_DIR": str(tmp_path / "state")}
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "services.stack.entrypoints", "worker-device"], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        reg = Registry(connect(redis_url), 30)
        deadline = time.time() + 120
        while time.time() < deadline and not any(w["node"] == "cpu-unfit@test" for w in reg.workers()):
            assert proc.poll() is None, open(tmp_path / "worker.log").read()[-3000:]
            time.sleep(1)
        worker = next(w for w in reg.workers() if w["node"] == "cpu-unfit@test")
        assert "versions: --device cuda: no CUDA device" in worker["unfit"]
        assert worker["queues"] == ["unfit.cpu"] and "devices" not in worker and "device_type" not in worker
        cli_env = {**env, "FACENET_WORKER_DOCTOR": "0"}
        listing = subprocess.run([sys.executable, "-m", "services.cli", "workers"], capture_output=True, text=True,
                                 env=cli_env, cwd=REPO, timeout=60)
        assert "none: failed doctor (versions: --device cuda" in listing.stdout, listing.stdout
        from services.queue.jobs import pick_device_type
        from facenet.errors import UserError

        with pytest.raises(UserError, match="cpu-unfit@test: no devices, it failed its doctor check"):
            pick_device_type(reg, "cpu", 1)
        code = ("import json; from services.queue.app import app; "
                "print(json.dumps(app.control.inspect(timeout=10).conf() or {}))")
        conf = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, cwd=REPO,
                              timeout=120)
        answers = json.loads(conf.stdout.strip().splitlines()[-1])
        assert "no CUDA device" in answers["cpu-unfit@test"]["facenet_unfit"], answers
        assert "doctor failed, taking no jobs" in open(tmp_path / "worker.log").read()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()
