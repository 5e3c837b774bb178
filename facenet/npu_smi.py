"""Ascend chips as `npu-smi info` reports them, and MLflow system metrics from it.

MLflow's system metrics read NVIDIA GPUs through pynvml; nothing reads Ascend chips. Here `npu-smi info` (the
driver's tool, on every Ascend host) is run and its table parsed: per chip its health, power, temperature,
AI Core utilisation and HBM use. The table's layout is not a stable interface: it is parsed by its two-line
chip rows (`| NPU Name | Health | Power Temp Hugepages |` then `| Chip [Phy-ID] | Bus-Id | AICore Memory HBM |`),
which every published version has kept (npu-smi 21.0.4 to 26.0.rc1, 910A, 910B, A3: tests/fixtures/npu_smi).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

# Hosts keep the tool in one of these (Ascend Docker Runtime mounts /usr/local/bin/npu-smi,
# Ascend/ascend-docker-runtime:build/scripts/base.list; Atlas A2/200 hosts have /usr/local/sbin/npu-smi,
# hiascend MindCluster "mxdlug_appendices_002").
NPU_SMI_PLACES = ("/usr/local/sbin/npu-smi", "/usr/local/bin/npu-smi")
NPU_SMI_ENV = "FACENET_NPU_SMI"  # where this host's npu-smi is, when it is in none of those places

_NUM = r"(-|[0-9]+(?:\.[0-9]+)?)"
# | 0     910B3               | OK            | 153.7       45                0    / 0             |
_FIRST = re.compile(r"^\|\s*(\d+)\s+(\S+)\s*\|\s*([A-Za-z]+)\s*\|\s*" + _NUM + r"\s+" + _NUM + r"\s+"
                    r"(\d+)\s*/\s*(\d+)\s*\|\s*$")
# | 0                         | 0000:C1:00.0  | 39          0    / 0          62810/ 65536         |
# | 0     0                   | 0000:9D:00.0  | 17          0    / 0          53444/ 65536         |  (A3: Phy-ID)
_SECOND = re.compile(r"^\|\s*(\d+)(?:\s+(\d+))?\s*\|\s*([0-9A-Fa-f:.]+)\s*\|\s*" + _NUM + r"\s+"
                     r"(\d+)\s*/\s*(\d+)\s+(\d+)\s*/\s*(\d+)\s*\|\s*$")
_VERSION = re.compile(r"npu-smi\s+(\S+)\s+Version:\s*(\S+)")


@dataclass
class Chip:
    """One chip's row of `npu-smi info`. Numbers npu-smi leaves out ("-": an A3's second die has no power
    reading of its own) are None."""

    npu: int
    chip: int
    name: str
    health: str  # OK, Warning, Alarm, Critical or UNKNOWN
    power_w: float | None
    temp_c: float | None
    bus_id: str
    aicore_pct: float | None
    memory_used_mb: int
    memory_total_mb: int
    hbm_used_mb: int
    hbm_total_mb: int
    phy_id: int | None = None
    processes: list[dict] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.health.upper() == "OK"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    version: str | None
    chips: list[Chip]


def _number(text: str) -> float | None:
    return None if text == "-" else float(text)


def parse(text: str) -> Report:
    """`npu-smi info` output -> its chips in the order listed, with the processes of the table below them.
    A text with no chip row gives no chips (the caller says what that means)."""
    lines = [line.rstrip() for line in text.splitlines()]
    version = next((m.group(2) for m in map(_VERSION.search, lines) if m), None)
    chips: list[Chip] = []
    pending = None
    in_processes = False
    for line in lines:
        if re.match(r"^\|\s*NPU\s+Chip\s+\|\s*Process id", line):
            in_processes = True
            continue
        if in_processes:
            _add_process(line, chips)
            continue
        first = _FIRST.match(line)
        if first:
            pending = first
            continue
        second = _SECOND.match(line)
        if second and pending is not None:
            npu, name, health, power, temp = pending.group(1, 2, 3, 4, 5)
            chip, phy, bus, aicore, mem_used, mem_total, hbm_used, hbm_total = second.groups()
            chips.append(Chip(int(npu), int(chip), name, health, _number(power), _number(temp), bus,
                              _number(aicore), int(mem_used), int(mem_total), int(hbm_used), int(hbm_total),
                              int(phy) if phy is not None else None))
        pending = None
    return Report(version, chips)


def _add_process(line: str, chips: list[Chip]) -> None:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) < 4 or not re.fullmatch(r"\d+\s+\d+", cells[0]) or not cells[1].isdigit():
        return
    npu, chip = map(int, cells[0].split())
    memory = cells[3].split()[0] if cells[3] else ""
    for c in chips:
        if c.npu == npu and c.chip == chip:
            c.processes.append({"pid": int(cells[1]), "name": cells[2],
                                "memory_mb": int(memory) if memory.isdigit() else None})
            return


def search() -> str | None:
    """npu-smi on PATH, else in one of the places hosts keep it; None if in none."""
    return shutil.which("npu-smi") or next((p for p in NPU_SMI_PLACES if os.access(p, os.X_OK)), None)


def find_tool() -> str | None:
    """Path of this host's npu-smi: FACENET_NPU_SMI, else search(); None if absent."""
    explicit = os.environ.get(NPU_SMI_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return search()


class NpuSmiError(RuntimeError):
    pass


def read(timeout: float = 20.0) -> Report:
    """Run `npu-smi info` and parse it; NpuSmiError in one line when the tool is missing, fails or lists no chip."""
    tool = find_tool()
    if tool is None:
        raise NpuSmiError(f"npu-smi not found (looked in PATH and {', '.join(NPU_SMI_PLACES)}; "
                          f"{NPU_SMI_ENV} names another place)")
    try:
        res = subprocess.run([tool, "info"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NpuSmiError(f"{tool} info: {type(exc).__name__}: {exc}") from None
    if res.returncode != 0:
        said = (res.stderr or res.stdout).strip().splitlines()
        raise NpuSmiError(f"{tool} info exited {res.returncode}: {said[-1] if said else 'no output'}")
    report = parse(res.stdout)
    if not report.chips:
        raise NpuSmiError(f"{tool} info listed no chip (is the driver loaded, are /dev/davinci* mounted?)")
    return report


def held_chips(report: Report, logical_ids: list[int]) -> list[tuple[int, Chip]]:
    """The chips of `logical_ids` (what torch.npu numbers 0..n-1: the visible chips in the order npu-smi lists
    them, narrowed by ASCEND_RT_VISIBLE_DEVICES when it is set) as (logical id, chip)."""
    chips = report.chips
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible:
        wanted = [int(v) for v in visible.split(",") if v.strip().isdigit()]
        chips = [chips[i] for i in wanted if i < len(chips)]
    return [(i, chips[i]) for i in logical_ids if 0 <= i < len(chips)]


def chip_metrics(logical: int, chip: Chip) -> dict[str, float]:
    """MLflow system-metric names for one chip, in the style of MLflow's GPU monitor (gpu_0_...)."""
    out: dict[str, float] = {}
    prefix = f"npu_{logical}_"
    if chip.aicore_pct is not None:
        out[prefix + "utilization_percentage"] = chip.aicore_pct
    used, total = (chip.hbm_used_mb, chip.hbm_total_mb) if chip.hbm_total_mb else \
        (chip.memory_used_mb, chip.memory_total_mb)  # 310-class cards have DDR, no HBM
    if total:
        out[prefix + "memory_usage_megabytes"] = float(used)
        out[prefix + "memory_total_megabytes"] = float(total)
        out[prefix + "memory_usage_percentage"] = round(100.0 * used / total, 1)
    if chip.power_w is not None:
        out[prefix + "power_usage_watts"] = chip.power_w
    if chip.temp_c is not None:
        out[prefix + "temperature_celsius"] = chip.temp_c
    out[prefix + "healthy"] = 1.0 if chip.healthy else 0.0
    return out


def monitor_class():
    """An MLflow system-metrics monitor of the chips a job holds (MLflow's BaseMetricsMonitor, as its GPU
    monitor is): `NpuMonitor(logical_ids)` runs `npu-smi info` at each of MLflow's samples, and the run gets
    system/npu_<i>_utilization_percentage, _memory_usage_megabytes, _memory_usage_percentage,
    _power_usage_watts, _temperature_celsius and _healthy, averaged over the logging interval. Built lazily:
    MLflow is imported only where a run is logged."""
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor

    class NpuMonitor(BaseMetricsMonitor):
        def __init__(self, logical_ids: list[int], reader=read):
            super().__init__()
            self.logical_ids, self.reader, self.last_error = list(logical_ids), reader, None
            held_chips(self.reader(), self.logical_ids)  # fails here, at start, if npu-smi does not work

        def collect_metrics(self) -> None:
            try:
                report = self.reader()
            except NpuSmiError as exc:  # one missed sample; MLflow's loop goes on
                self.last_error = str(exc)
                return
            for logical, chip in held_chips(report, self.logical_ids):
                for key, value in chip_metrics(logical, chip).items():
                    self._metrics[key].append(value)

        def aggregate_metrics(self) -> dict[str, float]:
            return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items() if v}

    return NpuMonitor
