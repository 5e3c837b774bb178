"""The one typed training spec shared by the CLI, the queue payload and the trainer.

A spec is plain data: it round-trips through JSON (never pickle), is logged
whole to MLflow and stored in every checkpoint. Unknown keys are errors, so a
typo in a queued job fails at submit time instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from facenet.errors import InputError, UserError

DEVICES = ("auto", "npu", "cuda", "cpu")
OPTIMIZERS = ("adam", "sgd")
OPT_LEVELS = ("O0", "O1", "O2")
AMP_DTYPES = ("auto", "bf16", "fp16")
CHECKPOINT_LOGGING = ("last", "every", "none")
LOSSES = ("softmax", "triplet", "arcface")
# torch.compile's modes, plus off and auto (per device type: see facenet.devices.Device.compile_mode).
COMPILE_MODES = ("off", "auto", "default", "reduce-overhead", "max-autotune")
# Tags the service sets on every run; a user's tag must not overwrite them.
RESERVED_TAGS = ("job_id", "attempts", "npus", "device_type", "amp", "host")

# Upper bounds: far above any real run, low enough that a typo cannot ask for a million processes or a
# 60000-pixel input. (name: (lowest, highest))
BOUNDS = {"epochs": (1, 100_000), "batch_size": (1, 1 << 20), "npus": (1, 4096), "nnodes": (1, 512), "workers": (0, 64),
          "image_size": (32, 1024), "log_every": (1, 1_000_000), "warmup_steps": (0, 1_000_000),
          "seed": (0, 2**32 - 1), "images_per_identity": (2, 1024), "verify_every": (0, 100_000)}
FIELD_TYPES = {"data": str, "epochs": int, "batch_size": int, "lr": float, "optimizer": str, "lr_steps": list,
               "lr_gamma": float, "weight_decay": float, "amp": bool, "amp_dtype": str, "opt_level": str,
               "loss_scale": str, "npus": int, "nnodes": int, "device_list": list, "device": str, "workers": int, "seed": int,
               "resume": str, "output": str, "json_out": str, "events": str, "mlflow_uri": str, "run_id": str,
               "run_name": str, "experiment": str, "tags": dict, "pretrained": str, "holdout": float,
               "augment": bool, "image_size": int, "dropout": float, "log_every": int, "warmup_steps": int,
               "log_checkpoints": str, "audit_samples": str, "loss": str, "triplet_margin": float,
               "arcface_scale": float, "arcface_margin": float, "images_per_identity": int, "verify_every": int,
               "verify_pairs": str, "log_model": bool, "compile": str}
OPTIONAL = ("device_list", "workers", "resume", "json_out", "events", "mlflow_uri", "run_id", "run_name",
            "pretrained", "audit_samples", "verify_every", "verify_pairs")


def default_pretrained_path() -> str:
    """Where the seed expects vggface2 weights: $TORCH_HOME/checkpoints (default ~/.cache/torch)."""
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return os.path.join(torch_home, "checkpoints", "20180402-114759-vggface2.pt")


@dataclass
class TrainSpec:
    """Everything that defines one training run. Defaults follow the ModelZoo recipe."""

    data: str
    epochs: int = 20
    batch_size: int = 64  # global, split evenly over the processes
    lr: float = 0.01
    optimizer: str = "adam"
    lr_steps: list[int] = field(default_factory=lambda: [5, 10])
    lr_gamma: float = 0.1
    weight_decay: float = 0.0
    amp: bool = False
    amp_dtype: str = "auto"
    opt_level: str = "O2"
    loss_scale: str = "dynamic"
    npus: int = 1  # processes (devices) of the whole job, over all its nodes
    nnodes: int = 1  # nodes the job spans: npus / nnodes processes on each
    device_list: list[int] | None = None
    device: str = "auto"
    workers: int | None = None  # None: 0 with <= 2 cores per process, else min(8, cores - 1)
    seed: int = 123456
    resume: str | None = None
    output: str = "output/train"
    json_out: str | None = None
    events: str | None = None  # None: OUTPUT/events.jsonl
    mlflow_uri: str | None = None
    run_id: str | None = None
    run_name: str | None = None
    experiment: str = "facenet"
    tags: dict[str, str] = field(default_factory=dict)
    pretrained: str | None = "auto"  # "auto": the seed's cache path if present; None: from scratch
    holdout: float = 0.2
    augment: bool = False
    image_size: int = 160
    dropout: float = 0.6
    log_every: int = 10
    warmup_steps: int = 3
    log_checkpoints: str = "last"
    log_model: bool = True  # the final model as an MLflow model (torch.export; ~15 s on 2 cores)
    audit_samples: str | None = None  # DIR: each rank lists the training images it reads per epoch
    loss: str = "softmax"  # the recipe's classifier; triplet (FaceNet's) or arcface (additive angular margin)
    triplet_margin: float = 0.2  # FaceNet's alpha, on squared distances of unit embeddings
    arcface_scale: float = 64.0  # insightface's s
    arcface_margin: float = 0.5  # insightface's m, radians
    images_per_identity: int = 4  # triplet: K images of each of P people per batch (P = per-process batch / K)
    verify_every: int | None = None  # None: every epoch when there are pairs; 0: never
    verify_pairs: str | None = None  # None: DATA/test_pairs.txt or DATA/pairs.txt when present
    compile: str = "auto"  # torch.compile mode of the training step; auto: per device type (devices.py)

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(unknown)}")
        if "data" not in data:
            raise InputError("training spec has no 'data' (the dataset root)")
        for name, value in data.items():
            _check_type(name, value)
        spec = cls(**data)
        spec.validate()
        return spec

    @classmethod
    def from_json(cls, text: str) -> "TrainSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"training spec is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InputError("training spec must be a JSON object")
        return cls.from_dict(data)

    @property
    def npus_per_node(self) -> int:
        return self.npus // self.nnodes

    @property
    def amp_enabled(self) -> bool:
        """Mixed precision runs when --amp is on and the opt level is not O0 (apex's O0 is fp32)."""
        return self.amp and self.opt_level != "O0"

    # -- validation ----------------------------------------------------------
    def validate(self) -> None:
        """Raise UserError naming the first bad value."""

        def bad(name: str, value: Any, why: str) -> UserError:
            return InputError(f"--{name.replace('_', '-')} {value}: {why}")

        for name in FIELD_TYPES:
            _check_type(name, getattr(self, name))
        if not self.data:
            raise InputError("--data is required (the dataset root)")
        for name, (lo, hi) in BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not lo <= value <= hi:
                raise bad(name, value, f"must be in [{lo}, {hi}]")
        for name, hi in (("lr", 100.0), ("lr_gamma", 100.0), ("weight_decay", 10.0)):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0 <= value <= hi or (name == "lr" and value == 0):
                raise bad(name, value, f"must be a {'positive' if name == 'lr' else 'non-negative'} number "
                          f"up to {hi}")
        if len(self.lr_steps) > 1000 or any(not isinstance(x, int) or isinstance(x, bool) for x in self.lr_steps):
            raise bad("lr_steps", self.lr_steps, "must be a list of up to 1000 epochs")
        for key, value in self.tags.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key or len(key) > 250 \
                    or len(value) > 5000:
                raise bad("tag", f"{key!r}={value!r}", "tags are KEY=VALUE strings (key up to 250 characters)")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
        if any(s < 1 for s in self.lr_steps) or list(self.lr_steps) != sorted(set(self.lr_steps)):
            raise bad("lr_steps", ",".join(map(str, self.lr_steps)), "must be increasing positive epochs")
        if self.opt_level not in OPT_LEVELS:
            raise bad("opt_level", self.opt_level, f"choose one of {', '.join(OPT_LEVELS)}")
        if self.amp_dtype not in AMP_DTYPES:
            raise bad("amp_dtype", self.amp_dtype, f"choose one of {', '.join(AMP_DTYPES)}")
        if self.loss_scale != "dynamic":
            try:
                scale = float(self.loss_scale)
            except ValueError:
                raise bad("loss_scale", self.loss_scale, "must be 'dynamic' or a positive number") from None
            if not 0 < scale < 2**64:
                raise bad("loss_scale", self.loss_scale, "must be 'dynamic' or a positive number")
        if self.npus < 1:
            raise bad("npus", self.npus, "must be at least 1 (one process per device)")
        if self.device not in DEVICES:
            raise bad("device", self.device, f"unknown device; choose one of {', '.join(DEVICES)}")
        if self.npus % self.nnodes:
            raise bad("npus", self.npus, f"must divide evenly over --nnodes {self.nnodes} (the same number of "
                      "devices on every node)")
        if self.device_list is not None:
            if len(self.device_list) != self.npus_per_node:
                raise bad("device_list", ",".join(map(str, self.device_list)),
                          f"names {len(self.device_list)} device(s) but a node runs {self.npus_per_node} "
                          f"(--npus {self.npus} over --nnodes {self.nnodes})")
            if len(set(self.device_list)) != len(self.device_list) or min(self.device_list) < 0:
                raise bad("device_list", ",".join(map(str, self.device_list)),
                          "device ids must be distinct and non-negative")
        if self.batch_size % self.npus:
            raise bad("batch_size", self.batch_size,
                      f"the global batch must divide evenly over --npus {self.npus}")
        if self.workers is not None and self.workers < 0:
            raise bad("workers", self.workers, "must be 0 or more")
        if not 0 <= self.holdout < 1:
            raise bad("holdout", self.holdout, "must be in [0, 1)")
        if self.image_size < 32:
            raise bad("image_size", self.image_size, "must be at least 32")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", self.dropout, "must be in [0, 1)")
        if self.log_every < 1:
            raise bad("log_every", self.log_every, "must be at least 1")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", self.warmup_steps, "must be 0 or more")
        if self.loss not in LOSSES:
            raise bad("loss", self.loss, f"choose one of {', '.join(LOSSES)}")
        for name, hi, zero_ok in (("triplet_margin", 4.0, False), ("arcface_scale", 1024.0, False),
                                  ("arcface_margin", 1.5, True)):
            value = getattr(self, name)
            if not math.isfinite(value) or not (0 <= value if zero_ok else 0 < value) or value > hi:
                raise bad(name, value, f"must be in {'[' if zero_ok else '('}0, {hi:g}]")
        if self.loss == "triplet":
            per_process, k = self.batch_size // self.npus, self.images_per_identity
            if per_process % k or per_process // k < 2:
                raise bad("batch_size", self.batch_size,
                          f"--loss triplet takes whole groups of --images-per-identity {k} from at least 2 people "
                          f"per process: each process's batch ({per_process}) must be a multiple of {k}, at least {2 * k}")
        if self.compile not in COMPILE_MODES:
            raise bad("compile", self.compile, f"choose one of {', '.join(COMPILE_MODES)}")
        if self.log_checkpoints not in CHECKPOINT_LOGGING:
            raise bad("log_checkpoints", self.log_checkpoints,
                      f"choose one of {', '.join(CHECKPOINT_LOGGING)}")


# HCCL's shapes on the hardware the Ascend image is built for (Atlas A2, 910B: its CANN base is a -910b tag):
# any number of chips of one server, and over N servers the same (1..8) on each. hiascend CANN 8.5 "使用前须知"
# (TensorFlowCommunity/850/migration/tfmigr2/tfmigr2_000030): "单Server场景,对参与集合通信的昇腾AI处理器数量无限制;
# Server集群场景要求参与集合通信的昇腾AI处理器数量为(1~8)*n". The 910A's rule (1, 2, 4 or 8 on a server, two HCCS
# rings of 4) is not ours: its chips have no bf16 and the image carries no 910 ops.
NPU_MAX_PER_NODE = 8


def check_npu_count(device_type: str, npus: int, nnodes: int = 1) -> None:
    """HCCL's shapes on Atlas A2: 1 to 8 NPUs on one node; over several nodes, 1 to 8 on each (the same on every
    node, which TrainSpec.validate checks)."""
    if device_type != "npu":
        return
    if nnodes == 1 and not 1 <= npus <= NPU_MAX_PER_NODE:
        raise InputError(f"--npus {npus}: an Ascend A2 node trains on 1 to {NPU_MAX_PER_NODE} NPUs per job (HCCL); "
                         f"more is a job over several nodes (--nnodes N, or let submit-train count them)")
    if nnodes > 1 and not 1 <= npus // nnodes <= NPU_MAX_PER_NODE:
        raise InputError(f"--npus {npus} over --nnodes {nnodes}: a job over several Ascend nodes uses 1 to "
                         f"{NPU_MAX_PER_NODE} NPUs on each ({npus // nnodes} asked)")


def _check_type(name: str, value: Any) -> None:
    """InputError naming a field whose JSON value has the wrong type (a spec file, a queued message)."""
    want = FIELD_TYPES.get(name)
    if want is None or (value is None and name in OPTIONAL):
        return
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        kind = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
                dict: "an object"}[want]
        raise InputError(f"training spec field {name!r}: {value!r} is not {kind}")
