"""The training step with everything else removed: InceptionResnetV1, the optimizer and AMP training uses
(`Device.make_optimizer`, `make_amp`, `Step.train`), on one synthetic batch that stays on the device.

`make bench`'s compute ceiling and `facenet-cli doctor`'s training step and throughput probe both run it, so
what they measure is the trainer's own step, not a copy of it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from facenet import devices
from facenet.model import build_model
from facenet.spec import TrainSpec
from facenet.train.engine import Amp, Step, make_amp
from facenet.train.losses import Trainable, make_objective


@dataclass
class Probe:
    step: Step
    optimizer: torch.optim.Optimizer
    amp: Amp
    x: torch.Tensor
    y: torch.Tensor
    device: devices.Device

    def run(self) -> float:
        """One step; returns its loss (device synchronized)."""
        loss, _ = self.step.train(self.x, self.y, self.optimizer)
        self.device.synchronize()
        return float(loss.detach().float())

    def timed(self, steps: int | None = None, seconds: float | None = None, warmup: int = 2) -> list[float]:
        """Seconds of each step after `warmup` untimed ones: `steps` of them, or as many as fit in `seconds`
        (at least 3)."""
        for _ in range(warmup):
            self.run()
        times: list[float] = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            self.run()
            times.append(time.perf_counter() - t0)
            if steps is not None and len(times) >= steps:
                return times
            if seconds is not None and len(times) >= 3 and time.perf_counter() - start >= seconds:
                return times


def build(device: devices.Device, batch_size: int, spec: TrainSpec | None = None, image_size: int = 160,
          num_classes: int = 8, channels_last: bool | None = None, seed: int = 0,
          compile_mode: str | None = None) -> Probe:
    """A probe of `spec`'s step (default: the recipe's, with --amp) on `device`, batch `batch_size`, eager or
    compiled in `compile_mode` (a torch.compile mode, as `Device.compile_mode` resolves --compile)."""
    spec = spec or TrainSpec(data="synthetic", amp=True, batch_size=batch_size)
    channels_last = device.channels_last if channels_last is None else channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(seed)
    model = build_model(num_classes, None, spec.dropout).to(device.torch_device, memory_format=fmt).train()
    amp = make_amp(spec, device)
    optimizer = device.make_optimizer(spec.optimizer, model.parameters(), spec.lr, spec.weight_decay)
    step = Step(Trainable(model, spec.loss), make_objective(spec), device, amp, compile_mode)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device.torch_device)
    x = x.contiguous(memory_format=fmt)
    y = (torch.arange(batch_size) % num_classes).to(device.torch_device)
    return Probe(step, optimizer, amp, x, y, device)


def parameters_moved(probe: Probe, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(b, p.detach().cpu()) for b, p in zip(before, probe.step.model.parameters()))


def snapshot(probe: Probe) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in probe.step.model.parameters()]


def median_rate(batch_size: int, times: list[float]) -> float:
    steady = sorted(times)
    mid = steady[len(steady) // 2]
    return batch_size / mid if mid > 0 and math.isfinite(mid) else 0.0
