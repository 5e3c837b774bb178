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

from facenet import confine
from facenet.errors import InputError, UserError, clipped, first_line

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
# A queued job's fields the service decides, never the client (`submit-train` refuses a flag that sets one):
# where it writes, that it resumes, where its events and summary go, its MLflow server and run.
SERVICE_OWNED = ("output", "resume", "events", "json_out", "run_id", "mlflow_uri")
# What the worker resolves or completes of what the client gave: paths checked against its data roots, its
# own device type and ids, the job's experiment, the service's tags beside the user's.
SERVICE_RESOLVED = ("data", "pretrained", "verify_pairs", "verify_bin", "audit_samples", "device", "device_list", "experiment",
                    "tags")

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
               "verify_pairs": str, "verify_bin": list, "log_model": bool, "compile": str}
MIN_IMAGE_SIZE = 75  # measured: from 74 px down, a 3 x 3 convolution of InceptionResnetV1 is left a 1 x 1 input
# Lists hold integers only (a JSON 0.5 or true among them is refused, not truncated or taken as 1).
LIST_ITEM_TYPES = {"lr_steps": int, "device_list": int, "verify_bin": str}
MAX_DEVICE_ID = 4095
# A spec is a few hundred bytes; --spec FILE reads no more than this. Its strings are paths and names: PATH_MAX.
MAX_SPEC_BYTES = 1 << 20
MAX_TEXT_CHARS = 4096
OPTIONAL = ("device_list", "workers", "resume", "json_out", "events", "mlflow_uri", "run_id", "run_name",
            "pretrained", "audit_samples", "verify_every", "verify_pairs", "verify_bin")


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
    verify_bin: list[str] | None = None  # insightface .bin sets verified beside the pairs: <set>_verify_acc, ...
    compile: str = "auto"  # torch.compile mode of the training step; auto: per device type (devices.py)

    def placed(self, **decided: Any) -> "TrainSpec":
        """This spec as the worker hands it to its trainer: a new spec with the fields the service decides
        (SERVICE_OWNED, SERVICE_RESOLVED) set, checked as every spec is. The one place a queued job's spec
        changes: a field outside those is a programming error here, not a user's."""
        stray = sorted(set(decided) - set(SERVICE_OWNED) - set(SERVICE_RESOLVED))
        if stray:
            raise TypeError(f"TrainSpec.placed: {', '.join(stray)} are not the service's to decide")
        spec = dataclasses.replace(self, **decided)
        spec.validate()
        return spec

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            names = ", ".join(clipped(str(k), 40) for k in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise InputError(f"unknown training option(s): {names}{more}")
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
        except ValueError as exc:  # JSONDecodeError, and an integer of more than 4300 digits
            raise InputError(f"training spec is not valid JSON: {first_line(exc)}") from None
        except RecursionError:
            raise InputError("training spec is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise InputError(f"training spec must be a JSON object, not {_json_kind(data)}")
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str) -> "TrainSpec":
        """`--spec FILE`: a regular file (a FIFO or device is refused, never waited on) of at most
        MAX_SPEC_BYTES of UTF-8 JSON. InputError names the file and the first bad value."""
        where = f"--spec {confine.shown(path)}"
        try:
            # Resolved first: open_regular refuses a final symlink, and a link to a spec is the user's to follow.
            data = confine.read_bytes(os.path.realpath(path), None, "--spec", MAX_SPEC_BYTES)
        except OSError as exc:  # missing, unreadable (a FIFO, folder or oversized file is confine.Refused)
            raise InputError(f"{where}: {exc.strerror or first_line(exc)}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})") from None
        try:
            return cls.from_json(text)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None

    @property
    def npus_per_node(self) -> int:
        return self.npus // self.nnodes

    @property
    def amp_enabled(self) -> bool:
        """Mixed precision runs when --amp is on and the opt level is not O0 (apex's O0 is fp32)."""
        return self.amp and self.opt_level != "O0"

    def default_run_name(self, device_type: str) -> str:
        """The MLflow run name when none is given, e.g. 8p-npu-bs512-O2 (a queued job's adds -<job id>)."""
        return f"{self.npus}p-{device_type}-bs{self.batch_size}-{self.opt_level if self.amp_enabled else 'O0'}"

    # -- validation ----------------------------------------------------------
    def validate(self) -> None:
        """Raise UserError naming the first bad value."""

        def bad(name: str, value: Any, why: str) -> UserError:
            return InputError(f"--{name.replace('_', '-')} {_shown_value(value)}: {why}")

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
        if self.verify_bin is not None:
            names = [os.path.splitext(os.path.basename(p))[0].lower() for p in self.verify_bin]
            if not 1 <= len(names) <= 16 or len(set(names)) != len(names) or not all(self.verify_bin):
                raise bad("verify_bin", ",".join(self.verify_bin), "must name 1 to 16 .bin files of different names")
        if len(self.lr_steps) > 1000:
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
            if any(not 0 <= d <= MAX_DEVICE_ID for d in self.device_list):
                raise bad("device_list", ",".join(map(str, self.device_list)),
                          f"device ids are integers in [0, {MAX_DEVICE_ID}]")
            if len(self.device_list) != self.npus_per_node:
                raise bad("device_list", ",".join(map(str, self.device_list)),
                          f"names {len(self.device_list)} device(s) but a node runs {self.npus_per_node} "
                          f"(--npus {self.npus} over --nnodes {self.nnodes})")
            if len(set(self.device_list)) != len(self.device_list):
                raise bad("device_list", ",".join(map(str, self.device_list)), "device ids must be distinct")
        if self.batch_size % self.npus:
            raise bad("batch_size", self.batch_size,
                      f"the global batch must divide evenly over --npus {self.npus}")
        if self.workers is not None and self.workers < 0:
            raise bad("workers", self.workers, "must be 0 or more")
        if not 0 <= self.holdout < 1:
            raise bad("holdout", self.holdout, "must be in [0, 1)")
        if self.image_size < MIN_IMAGE_SIZE:
            raise bad("image_size", self.image_size, f"must be at least {MIN_IMAGE_SIZE} (InceptionResnetV1's "
                      "smallest input)")
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


KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
         dict: "an object"}


def _check_type(name: str, value: Any) -> None:
    """InputError naming a field whose JSON value has the wrong type (a spec file, a queued message)."""
    want = FIELD_TYPES.get(name)
    if want is None or (value is None and name in OPTIONAL):
        return
    where = f"training spec field {name!r}"
    if not _is(value, want):
        raise InputError(f"{where}: {_shown_repr(value)} is not {KINDS[want]}")
    if want is float and isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise InputError(f"{where}: {_shown_value(value)} is too large for a number") from None
    if want is str and len(value) > MAX_TEXT_CHARS:
        raise InputError(f"{where}: {_shown_repr(value)} is longer than {MAX_TEXT_CHARS} characters")
    if want is str and ("\x00" in value or not _encodable(value)):
        raise InputError(f"{where}: {_shown_repr(value)} holds a NUL or an unpaired surrogate, not text")
    item = LIST_ITEM_TYPES.get(name)
    odd = [x for x in value if not _is(x, item)] if item is not None else []
    if odd:
        raise InputError(f"{where}: {_shown_repr(odd[0])} in {_shown_repr(value)} is not {KINDS[item]}")


def _is(value: Any, want: type) -> bool:
    """isinstance for JSON values: a bool is not a number, an int is a float."""
    if isinstance(value, bool):
        return want is bool
    return isinstance(value, (int, float)) if want is float else isinstance(value, want)


def _encodable(text: str) -> bool:
    """True unless `text` holds a surrogate no file name can (argv's undecodable bytes come as \\udc80-\\udcff,
    which encode back to those bytes)."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


# Values echoed in an error are cut to one short line (errors.clipped): a spec file can hold a megabyte string,
# an integer of 4000 digits or a line break where a name was expected.


def _shown_value(value: Any) -> str:
    """`value` as a flag's value in a message: 0, nan, adam."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"(an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits)"  # str() fails past 4300
    return clipped(str(value))


def _shown_repr(value: Any) -> str:
    """`value` as a JSON field's value in a message: 'ten', [0.5], True."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _shown_value(value)
    try:
        return clipped(repr(value))
    except (RecursionError, ValueError):  # a deeply nested list; a list holding a 5000-digit integer
        return f"(a {type(value).__name__})"


def _json_kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(type(value), "a number")


