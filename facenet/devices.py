"""One small abstraction over Ascend NPUs, NVIDIA GPUs and CPUs.

The training loop only ever talks to a `Device`: where tensors go, which
collective backend to use, which autocast dtype, how to synchronize before
reading a clock. No `if npu ... elif cuda ...` anywhere else.
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

DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
VISIBLE_ENV = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES", "cpu": None}


@lru_cache(maxsize=1)
def _load_torch_npu() -> tuple[bool, str | None]:
    """Import torch_npu once. Returns (usable, why-not).

    torch_npu installed without the Ascend driver/CANN fails inside its import
    with a long OSError/ImportError about missing .so files; we turn that into
    one sentence the user can act on.
    """
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except ModuleNotFoundError as exc:
        if exc.name == "torch_npu":
            return False, "torch_npu is not installed (pip install 'facenet-stack[npu]')"
        return False, _npu_load_message(exc)
    except Exception as exc:  # CANN/driver missing shows up as OSError, ImportError, RuntimeError
        return False, _npu_load_message(exc)
    try:
        if not torch.npu.is_available():
            return False, "torch_npu loaded but reports no NPU (check npu-smi info and the /dev/davinci* mounts)"
    except Exception as exc:
        return False, _npu_load_message(exc)
    return True, None


def _npu_load_message(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"torch_npu is installed but cannot load ({first}); install the Ascend driver and CANN "
            "toolkit and run `source /usr/local/Ascend/ascend-toolkit/set_env.sh` first")


def device_count(device_type: str) -> int:
    """How many devices of this type the process can see (cpu: the core count)."""
    if device_type == "npu":
        return torch.npu.device_count() if _load_torch_npu()[0] else 0
    if device_type == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    return os.cpu_count() or 1


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
    if device_type == "cpu":
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


@dataclass(frozen=True)
class Device:
    """The device one process trains on."""

    type: str
    index: int | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    @property
    def dist_backend(self) -> str:
        return DIST_BACKENDS[self.type]

    @property
    def pin_memory(self) -> bool:
        return self.type != "cpu"

    @property
    def channels_last(self) -> bool:
        # oneDNN and cuDNN pick faster NHWC kernels; Ascend uses its own internal
        # formats (NC1HWC0) and channels_last only adds transposes there.
        return self.type in ("cpu", "cuda")

    def autocast_dtype(self, requested: str = "auto") -> torch.dtype:
        """bf16 where the hardware has it (cpu with AVX512-bf16/AMX, cuda sm80+), else fp16."""
        if requested == "bf16":
            return torch.bfloat16
        if requested == "fp16":
            return torch.float16
        if self.type == "cpu":
            return torch.bfloat16
        if self.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # Ascend 910A has no bf16; fp16 + loss scaling is the recipe's O2 path.
        return torch.float16

    def amp_supported(self, dtype: torch.dtype) -> tuple[bool, str | None]:
        if self.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
            return False, "this CPU has no native bf16 (AVX512-bf16/AMX), where autocast is slower than fp32"
        return True, None

    def autocast(self, enabled: bool, dtype: torch.dtype):
        if not enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work so a wall-clock read means something."""
        if self.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
        elif self.type == "npu":
            torch.npu.synchronize(self.torch_device)

    def max_memory_mb(self) -> float | None:
        if self.type == "cuda":
            return torch.cuda.max_memory_allocated(self.torch_device) / 2**20
        if self.type == "npu":
            return torch.npu.max_memory_allocated(self.torch_device) / 2**20
        return None

    def compile_mode(self, requested: str) -> tuple[str | None, str]:
        """--compile on this device: (torch.compile mode or None for eager, the line the trainer says).

        auto: reduce-overhead on CUDA (inductor kernels captured as one CUDA graph: the step was bound by
        kernel launches, not by the GPU); eager on CPU (inductor takes minutes to compile InceptionResnetV1
        on a few cores, more than a short job gains) and on Ascend (its graph mode is torchair's, below).
        """
        if requested == "off":
            return None, "compile off: eager"
        if requested == "auto":
            if self.type == "cuda":
                return "reduce-overhead", "compile auto: reduce-overhead on cuda (inductor + CUDA graphs)"
            return None, f"compile auto: eager on {self.type} (--compile default compiles here too)"
        if requested == "reduce-overhead" and self.type != "cuda":
            return "default", f"compile reduce-overhead: CUDA graphs need a GPU; compiling as default on {self.type}"
        return requested, f"compile {requested}"

    def compile(self, fn, mode: str | None):
        """`fn` compiled in `mode` (None: `fn` itself). Ascend compiles through torchair's NPU backend (graph
        mode), the seam for it; untested here, where no NPU is available."""
        if mode is None:
            return fn
        if self.type == "npu":
            try:
                import torchair
                from torchair.configs.compiler_config import CompilerConfig
            except ImportError:
                raise UserError(f"--compile {mode} on npu needs torchair (shipped with torch_npu); "
                                "use --compile off") from None
            return torch.compile(fn, backend=torchair.get_npu_backend(compiler_config=CompilerConfig()),
                                 dynamic=False)
        return torch.compile(fn, mode=mode, dynamic=False)

    def make_adam(self, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        if self.type == "npu":
            try:  # the seed's NpuFusedAdam: one fused kernel instead of one per tensor
                from torch_npu.optim import NpuFusedAdam
                return NpuFusedAdam(params, lr=lr, weight_decay=weight_decay)
            except ImportError:
                pass
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


def setup_device(device_type: str, local_rank: int, device_ids: list[int] | None) -> Device:
    """Bind this process to its device (local rank -> physical id from --device-list)."""
    if device_type == "cpu":
        return Device("cpu")
    index = device_ids[local_rank] if device_ids else local_rank
    if device_type == "cuda":
        torch.cuda.set_device(index)
    else:
        torch.npu.set_device(index)
    return Device(device_type, index)


def versions() -> dict[str, str]:
    """torch / torch_npu / CUDA versions for the run's params."""
    out = {"torch_version": torch.__version__}
    if _load_torch_npu()[0]:
        import torch_npu
        out["torch_npu_version"] = getattr(torch_npu, "__version__", "unknown")
    if torch.version.cuda:
        out["cuda_version"] = torch.version.cuda
    return out
