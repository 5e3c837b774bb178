"""One small abstraction over Ascend NPUs, NVIDIA GPUs and CPUs, and what differs between them as data.

The training loop only ever talks to a `Device`: where tensors go, which collective backend, which autocast
dtype, which optimizer kernel, how to synchronize before reading a clock. Everything that differs between
device types is a field of that type's `Row` in `ROWS` (tests/test_ascend.py checks each row, npu included,
without the hardware); the code that uses a row is the same for every type, so the CPU tests run the code an
NPU runs. No `if npu ... elif cuda ...` anywhere else.

NPU facts carry their source. Unless a line says otherwise, `torch_npu:PATH` means Ascend/pytorch at tag
v26.1.0-pytorch2.12.0 (torch_npu 2.12.0, the release images/ascend/pins.env pins), read from its source; no NPU
has run this code yet (README: "Ascend: what is verified, how").
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch

from facenet.errors import UserError
from facenet.spec import check_npu_count


@dataclass(frozen=True)
class Row:
    """What one device type does differently. Read by `Device`, the trainer, the loader, the detector and doctor."""

    type: str
    # torch.distributed backend of jobs on this type, and whether init_process_group gets device_id= (NCCL binds
    # its communicator to the device eagerly with it; HCCL and gloo take no such argument here).
    backend: str
    backend_device_id: bool
    # Variable that narrows the devices a process sees (None: the CPU has no such thing).
    visible_env: str | None
    # torch.<module> for set_device, synchronize, memory stats, bf16, streams (None: the CPU needs none of these).
    module: str | None
    pin_memory: bool
    channels_last: bool  # NHWC kernels (oneDNN, cuDNN); Ascend keeps its own formats, NHWC only adds transposes
    side_stream: bool  # copy the next batch on a side stream while the step computes
    # torch.optim.Adam's kernel: fused (one kernel for all parameters) or foreach (a few multi-tensor kernels).
    adam_kernel: str
    # optimizer.zero_grad(set_to_none=...): False on every type, see ZERO_GRAD_NOTE.
    zero_grad_to_none: bool
    # dtype of --amp (auto) where the hardware has no bf16; bf16 where `bf16_probe` says it has.
    no_bf16_dtype: torch.dtype
    bf16_probe: str  # "isa": the CPU's oneDNN bf16 support; "module": torch.<module>.is_bf16_supported()
    nms_on: str  # where torchvision's NMS runs for MTCNN on this type: "device" or "cpu"
    scalar_dtype: torch.dtype  # of the few scalars all-reduced per epoch (HCCL has no float64 all-reduce)
    compile_auto: str | None  # --compile auto: this torch.compile mode, or None for eager
    compile_backend: str  # "inductor", or "torchair" (Ascend's graph mode)
    cuda_graphs: bool  # --compile reduce-overhead (CUDA graphs) exists here
    # Environment of a job's trainer over several nodes (names of this backend's library): the NIC to use, how
    # long to wait for the other nodes' links, how long one collective may run before the library gives up.
    nic_env: str | None
    connect_timeout_env: str | None
    exec_timeout_env: str | None
    # The job's chips in MLflow's system metrics: "npu-smi" (facenet.npu_smi's monitor), or None where MLflow
    # has its own (NVIDIA GPUs through pynvml) or there is no chip (the CPU's use is MLflow's cpu_ metrics).
    chip_monitor: str | None = None
    sources: tuple[tuple[str, str], ...] = ()


# Why grads are zeroed in place everywhere: torch_npu's fused optimizers re-point every .grad into one combined
# buffer (torch_npu:torch_npu/utils/combine_tensors.py, npu_combine_tensors) and refuse set_to_none=True
# (torch_npu:torch_npu/optim/npu_fused_optim_base.py:127-131, ValueError "set_to_none is not supported in fused
# optimizers"); DDP's gradient_as_bucket_view grads are views into its buckets, and a fused or CUDA-graph step
# wants its buffers where they were. Zeroing in place keeps every buffer; it costs one memset per step.
ZERO_GRAD_NOTE = "grads are zeroed in place (set_to_none=False) on every device type"

ROWS: dict[str, Row] = {
    "npu": Row(
        type="npu", backend="hccl", backend_device_id=False, visible_env="ASCEND_RT_VISIBLE_DEVICES", module="npu",
        pin_memory=True, channels_last=False, side_stream=True, adam_kernel="foreach", zero_grad_to_none=False,
        no_bf16_dtype=torch.float16, bf16_probe="module", nms_on="cpu", scalar_dtype=torch.float32,
        compile_auto=None, compile_backend="torchair", cuda_graphs=False,
        nic_env="HCCL_IF_IP", connect_timeout_env="HCCL_CONNECT_TIMEOUT", exec_timeout_env="HCCL_EXEC_TIMEOUT",
        chip_monitor="npu-smi",
        sources=(
            ("module", "torch.npu is torch_npu.npu: torch_npu:torch_npu/_init/registry/backend.py:9 "
                       "(torch._register_device_module); set_device torch_npu/npu/utils.py:88, synchronize :62, "
                       "device_count torch_npu/npu/__init__.py:437, max_memory_allocated torch_npu/npu/memory.py:467, "
                       "Stream torch_npu/npu/streams.py:9 (wait_stream :42), current_stream torch_npu/npu/utils.py:260, "
                       "stream :232, Tensor.record_stream torch_npu/csrc/aten/ops/StreamAndEventKernelNpu.cpp:8"),
            ("visible_env", "torch_npu:torch_npu/npu/__init__.py:363-431 (_parse_visible_devices: ascending ids)"),
            ("adam_kernel", "no NPU kernel for torch._fused_adam_: Ascend/op-plugin@8b9c8534 (torch_npu 2.12's pin) "
                            "op_plugin/config/op_plugin_functions.yaml registers _fused_adamw_ only, and it ignores "
                            "grad_scale/found_inf (FusedAdamWKernelNpuOpApi.cpp); fused=True would run on the CPU "
                            "through torch_npu/csrc/aten/VariableFallbackKernel.cpp:247-261 and torch_npu's own "
                            "fused-optimizer tests are disabled (test/unsupported_test_cases/"
                            ".pytorch-disabled-tests.json); 131 _foreach_* ops are registered and torch_npu picks "
                            "foreach for 910B itself (torch_npu/utils/_optim.py:6, patch_supported_devices)"),
            ("zero_grad_to_none", "torch_npu:torch_npu/optim/npu_fused_optim_base.py:127-131"),
            ("bf16_probe", "torch.npu.is_bf16_supported: torch_npu/npu/utils.py:359 -> "
                           "torch_npu/csrc/core/npu/NpuVariables.cpp IsBF16Supported (SoC >= Ascend910B1); autocast "
                           "dtypes torch_npu/npu/autocast_utils.py:8 (fp16, and bf16 where supported)"),
            ("no_bf16_dtype", "910A has no bf16 (torch_npu/csrc/core/npu/NpuVariables.cpp IsBF16Supported: 910A "
                              "SoCs are 100-104 < Ascend910B1 = 220); fp16 + GradScaler is the recipe's O2"),
            ("nms_on", "torch_npu and op-plugin@8b9c8534 register no torchvision::nms kernel (torchvision_npu has "
                       "it, the image does not install it); the CPU fallback would warn and copy per call"),
            ("scalar_dtype", "HcclAllReduce on Atlas A2 takes int8/16/32/64, float16/32 and bf16, no float64 "
                             "(hiascend CANN 8.5 hcclapiref hcclcpp_07_0020); float32 is exact below 2**24"),
            ("compile_backend", "torchair ships inside the torch_npu wheel (setup.py:359-364, "
                                "torch_npu/dynamo/__init__.py:142-153); get_npu_backend: Ascend/torchair "
                                "python/torchair/npu_fx_compiler.py:890, CompilerConfig "
                                "python/torchair/configs/compiler_config.py:24"),
            ("compile_auto", "eager by default: graph mode is torchair's own compile (Ascend/torchair "
                             "python/torchair/configs/compiler_config.py:39, modes max-autotune, reduce-overhead, "
                             "npugraph_ex), not yet run on a chip by us"),
            ("cuda_graphs", "CUDA graphs are CUDA's; torchair's NPU graphs are its reduce-overhead mode (Ascend/"
                            "torchair python/torchair/configs/compiler_config.py:39)"),
            ("channels_last", "Ascend lays tensors out in its own formats (NC1HWC0, NZ; torch.npu.config."
                              "allow_internal_format, torch_npu/npu/npu_config.py:152-157), NHWC only adds transposes"),
            ("exec_timeout_env", "torch_npu:torch_npu/csrc/distributed/ProcessGroupHCCL.cpp:77 (default 1836 s) and "
                                 ":1290-1296 (a watchdog timeout at or below it only warns 'The plog may not be "
                                 "recorded'); hiascend CANN envref_07_0078 (A2 range [0, 2147483647])"),
            ("connect_timeout_env", "hiascend CANN envref_07_0149: [120, 7200] s, default 120"),
            ("nic_env", "hiascend CANN envref_07_0072: HCCL_IF_IP > HCCL_SOCKET_IFNAME > the first NIC by name"),
            ("chip_monitor", "npu-smi info's table (facenet/npu_smi.py; recorded outputs in tests/fixtures/npu_smi)"),
        )),
    "cuda": Row(
        type="cuda", backend="nccl", backend_device_id=True, visible_env="CUDA_VISIBLE_DEVICES", module="cuda",
        pin_memory=True, channels_last=True, side_stream=True, adam_kernel="fused", zero_grad_to_none=False,
        no_bf16_dtype=torch.float16, bf16_probe="module", nms_on="device", scalar_dtype=torch.float64,
        compile_auto="reduce-overhead", compile_backend="inductor", cuda_graphs=True,
        nic_env=None, connect_timeout_env=None, exec_timeout_env=None),
    "cpu": Row(
        type="cpu", backend="gloo", backend_device_id=False, visible_env=None, module=None,
        pin_memory=False, channels_last=True, side_stream=False, adam_kernel="fused", zero_grad_to_none=False,
        no_bf16_dtype=torch.bfloat16, bf16_probe="isa", nms_on="device", scalar_dtype=torch.float64,
        compile_auto=None, compile_backend="inductor", cuda_graphs=False,
        nic_env=None, connect_timeout_env=None, exec_timeout_env=None),
}


def row(device_type: str) -> Row:
    try:
        return ROWS[device_type]
    except KeyError:
        raise UserError(f"unknown device type {device_type!r}; one of {', '.join(ROWS)}") from None


@lru_cache(maxsize=1)
def _load_torch_npu() -> tuple[bool, str | None]:
    """Import torch_npu once. Returns (usable, why-not).

    torch_npu installed without the Ascend driver/CANN fails inside its import with a long OSError/ImportError
    about missing .so files; we turn that into one sentence the user can act on.
    """
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch: torch_npu/_init/registry/backend.py)
    except ModuleNotFoundError as exc:
        if exc.name == "torch_npu":
            return False, ("torch_npu is not installed (the Ascend image has it: `make up PROFILE=npu`; by hand, "
                           "the torch_npu release of TorchNPU's table for this torch, images/ascend/pins.env)")
        return False, _npu_load_message(exc)
    except Exception as exc:  # CANN/driver missing shows up as OSError, ImportError, RuntimeError
        return False, _npu_load_message(exc)
    try:
        if not torch.npu.is_available():  # torch_npu/npu/__init__.py:357
            return False, "torch_npu loaded but reports no NPU (check npu-smi info and the /dev/davinci* mounts)"
    except Exception as exc:
        return False, _npu_load_message(exc)
    return True, None


def _npu_load_message(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"torch_npu is installed but cannot load ({first}); install the Ascend driver and CANN "
            "toolkit and run `source /usr/local/Ascend/ascend-toolkit/set_env.sh` first")


def _available(device_type: str) -> bool:
    if device_type == "npu":
        return _load_torch_npu()[0]
    module = row(device_type).module
    return module is None or getattr(torch, module).is_available()


def device_count(device_type: str) -> int:
    """How many devices of this type the process can see (cpu: the core count)."""
    module = row(device_type).module
    if module is None:
        return os.cpu_count() or 1
    return getattr(torch, module).device_count() if _available(device_type) else 0


def resolve_device_type(requested: str) -> str:
    """Map --device (auto|npu|cuda|cpu) to a usable type, or raise UserError saying why not."""
    if requested == "npu":
        ok, why = _load_torch_npu()
        if not ok:
            raise UserError(f"--device npu: {why}")
        return "npu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible to torch "
                            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        return "cuda"
    if requested == "cpu":
        return "cpu"
    if requested != "auto":
        raise UserError(f"--device {requested}: unknown device; choose one of auto, npu, cuda, cpu")
    ok, why = _load_torch_npu()
    if ok:
        return "npu"
    if why and "not installed" not in why:
        print(f"warning: {why}; falling back to CUDA/CPU", file=sys.stderr)
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def check_device_request(device_type: str, npus: int, device_list: list[int] | None,
                         nnodes: int = 1) -> list[int] | None:
    """Validate N processes (over `nnodes` nodes, N / nnodes on this one) against the visible devices; returns
    the physical ids per local rank."""
    check_npu_count(device_type, npus, nnodes)
    if row(device_type).module is None:
        return None  # N processes stand in for N devices; no ids to pin
    visible = device_count(device_type)
    local = npus // nnodes
    ids = list(device_list) if device_list is not None else list(range(local))
    if local > visible:
        what = f"--npus {npus}" if nnodes == 1 else f"--npus {npus} over --nnodes {nnodes} ({local} per node)"
        raise UserError(f"{what}: only {visible} {device_type} device(s) visible on this host")
    too_high = [i for i in ids if i >= visible]
    if too_high:
        raise UserError(f"--device-list {','.join(map(str, ids))}: device id(s) {too_high} do not exist "
                        f"({visible} {device_type} device(s) visible)")
    return ids


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def collective_env(device_type: str, nnodes: int, node_address: str | None, timeout_s: int) -> dict[str, str]:
    """Settings of the collective library for a job's trainer (what the row names; empty for gloo and NCCL):
    over several nodes, the NIC at `node_address` (the address this node advertises: HCCL otherwise takes the
    first NIC by name, which on a multi-NIC host may not reach the others), and time for the other nodes' links;
    on any node count, a collective timeout below our watchdog's `timeout_s`, so the library fails the
    collective (and writes its plog) before the watchdog kills the process. A value already in the environment
    wins."""
    r = row(device_type)
    env: dict[str, str] = {}
    if r.exec_timeout_env:
        env[r.exec_timeout_env] = str(max(60, timeout_s - 60))
    if nnodes > 1:
        if r.connect_timeout_env:
            env[r.connect_timeout_env] = str(min(7200, max(120, timeout_s // 2)))
        if r.nic_env and node_address:
            env[r.nic_env] = node_address
    return {k: v for k, v in env.items() if k not in os.environ}


@dataclass(frozen=True)
class Device:
    """The device one process trains on."""

    type: str
    index: int | None = None

    @property
    def row(self) -> Row:
        return row(self.type)

    @property
    def module(self):
        """torch.npu / torch.cuda (None on the CPU)."""
        return getattr(torch, self.row.module) if self.row.module else None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    @property
    def dist_backend(self) -> str:
        return self.row.backend

    @property
    def pin_memory(self) -> bool:
        return self.row.pin_memory

    @property
    def channels_last(self) -> bool:
        return self.row.channels_last

    def has_bf16(self) -> bool:
        """Native bf16 here: the CPU's oneDNN ISA check, or the accelerator module's own answer."""
        if self.row.bf16_probe == "isa":
            return cpu_has_bf16()
        return bool(self.module.is_bf16_supported())

    def autocast_dtype(self, requested: str = "auto") -> torch.dtype:
        """bf16 where the hardware has it (cpu with AVX512-bf16/AMX, cuda sm80+, npu 910B+), else the row's."""
        if requested == "bf16":
            return torch.bfloat16
        if requested == "fp16":
            return torch.float16
        if self.row.bf16_probe == "isa":
            return torch.bfloat16  # amp_supported says when that would be emulated
        return torch.bfloat16 if self.has_bf16() else self.row.no_bf16_dtype

    def amp_supported(self, dtype: torch.dtype) -> tuple[bool, str | None]:
        if self.row.bf16_probe == "isa" and dtype == torch.bfloat16 and not cpu_has_bf16():
            return False, "this CPU has no native bf16 (AVX512-bf16/AMX), where autocast is slower than fp32"
        return True, None

    def autocast(self, enabled: bool, dtype: torch.dtype):
        if not enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work so a wall-clock read means something."""
        if self.module is not None:
            self.module.synchronize(self.torch_device)

    def max_memory_mb(self) -> float | None:
        if self.module is None:
            return None
        return self.module.max_memory_allocated(self.torch_device) / 2**20

    def make_optimizer(self, kind: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """The optimizer training uses, built the same way on every type: torch.optim's Adam with the row's
        kernel, or SGD with momentum 0.9 (torch picks its kernel). Never torch_npu's NpuFused* optimizers (the
        seed's NpuFusedAdam): they re-point every grad into one combined buffer, as DDP's bucket views also do,
        and only torch_npu's own GradScaler knows them (torch_npu/npu/amp/grad_scaler.py:216-233)."""
        if kind == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **{self.row.adam_kernel: True})
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        raise UserError(f"--optimizer {kind}: choose adam or sgd")

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=self.row.zero_grad_to_none)  # ZERO_GRAD_NOTE

    def compile_mode(self, requested: str) -> tuple[str | None, str]:
        """--compile on this device: (torch.compile mode or None for eager, the line the trainer says).

        auto: reduce-overhead on CUDA (inductor kernels captured as one CUDA graph: the step was bound by
        kernel launches, not by the GPU); eager on CPU (inductor takes minutes to compile InceptionResnetV1
        on a few cores, more than a short job gains) and on Ascend (its graph mode is torchair's, below).
        """
        if requested == "off":
            return None, "compile off: eager"
        if requested == "auto":
            mode = self.row.compile_auto
            if mode == "reduce-overhead":
                return mode, f"compile auto: reduce-overhead on {self.type} (inductor + CUDA graphs)"
            if mode:
                return mode, f"compile auto: {mode} on {self.type}"
            return None, f"compile auto: eager on {self.type} (--compile default compiles here too)"
        if requested == "reduce-overhead" and not self.row.cuda_graphs:
            return "default", f"compile reduce-overhead: CUDA graphs need a GPU; compiling as default on {self.type}"
        return requested, f"compile {requested}"

    def compile(self, fn, mode: str | None):
        """`fn` compiled in `mode` (None: `fn` itself). Ascend compiles through torchair's NPU backend (graph
        mode; sources in ROWS['npu']); untested here, where no NPU is available."""
        if mode is None:
            return fn
        if self.row.compile_backend == "torchair":
            try:
                import torchair  # torch_npu/dynamo/__init__.py:142-153 puts it in sys.modules
                from torchair.configs.compiler_config import CompilerConfig
            except ImportError:
                raise UserError(f"--compile {mode} on {self.type} needs torchair (shipped with torch_npu); "
                                "use --compile off") from None
            return torch.compile(fn, backend=torchair.get_npu_backend(compiler_config=CompilerConfig()),
                                 dynamic=False)
        return torch.compile(fn, mode=mode, dynamic=False)

    def mark_step(self, mode: str | None) -> None:
        """Before each compiled step: with CUDA graphs, the previous step's graph outputs are consumed."""
        if mode == "reduce-overhead" and self.row.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()


def setup_device(device_type: str, local_rank: int, device_ids: list[int] | None) -> Device:
    """Bind this process to its device (local rank -> physical id from --device-list)."""
    r = row(device_type)
    if r.module is None:
        return Device(device_type)
    index = device_ids[local_rank] if device_ids else local_rank
    getattr(torch, r.module).set_device(index)
    return Device(device_type, index)


def nms_device(device_type: str) -> torch.device | None:
    """Where torchvision's NMS must run for boxes on a `device_type` device: None where they are, else the CPU."""
    r = ROWS.get(device_type)
    return torch.device("cpu") if r is not None and r.nms_on == "cpu" else None


def versions() -> dict[str, str]:
    """torch / torch_npu / CUDA versions for the run's params."""
    out = {"torch_version": torch.__version__}
    if _load_torch_npu()[0]:
        import torch_npu
        out["torch_npu_version"] = getattr(torch_npu, "__version__", "unknown")
    if torch.version.cuda:
        out["cuda_version"] = torch.version.cuda
    return out
