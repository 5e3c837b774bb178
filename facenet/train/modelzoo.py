"""The ModelZoo test scripts (`scripts/train_{full,performance}_{1p,8p}.sh`) on top of our engine.

They take `--data_path=DIR` like the ModelZoo's `test/*.sh`, run the seed's
settings, print the `Final ...` block and write the ModelZoo key=value log.
Any other flag is passed to the trainer and wins over the preset (e.g.
`--batch-size 64`). On a host without NPUs they run on the detected device;
FACENET_NPROC overrides the process count (an 8p script on a CPU host runs
1 process unless told otherwise).
"""

from __future__ import annotations

import json
import os
import sys

from facenet import devices
from facenet.errors import UserError
from facenet.runenv import NPROC_ENV
from facenet.train.launch import main as train_main

NETWORK = "FaceNet_for_PyTorch"
PRESETS = {
    # case: (npus on an NPU host, global batch, epochs, lr, loader workers per process, kind)
    "full_1p": (1, 512, 1, 0.001, 8, "acc"),
    "full_8p": (8, 4096, 8, 0.005, 8, "acc"),
    "performance_1p": (1, 512, 1, 0.001, 8, "perf"),
    "performance_8p": (8, 4096, 1, 0.005, 8, "perf"),
}


def _nproc(wanted: int, device_type: str) -> int:
    if os.environ.get(NPROC_ENV):
        try:
            n = int(os.environ[NPROC_ENV])
        except ValueError:
            raise UserError(f"{NPROC_ENV}={os.environ[NPROC_ENV]!r}: not a number") from None
        if n < 1:
            raise UserError(f"{NPROC_ENV}={n}: must be at least 1")
        return n
    if device_type == "cpu":
        return 1  # N gloo processes only make sense when asked for
    return min(wanted, devices.device_count(device_type))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in PRESETS:
        print(f"usage: python -m facenet.train.modelzoo {{{','.join(PRESETS)}}} --data_path=DIR [trainer flags]",
              file=sys.stderr)
        return 2
    case, rest = argv[0], argv[1:]
    npus, batch, epochs, lr, workers, kind = PRESETS[case]
    data = None
    passthrough = []
    for arg in rest:
        if arg.startswith("--data_path="):
            data = arg.split("=", 1)[1]
        else:
            passthrough.append(arg)
    if not data:
        print("error: --data_path=DIR is required (the preprocessed dataset root)", file=sys.stderr)
        return 2
    try:
        device_type = devices.resolve_device_type(os.environ.get("FACENET_DEVICE", "auto"))
        nproc = _nproc(npus, device_type)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if nproc != npus:
        print(f"note: {case} uses {npus} NPU(s); running {nproc} {device_type} process(es) on this host "
              f"(set {NPROC_ENV} to change)", flush=True)
    case_name = f"{NETWORK}_bs{batch}_{npus}p_{kind}"
    output = os.path.join("output", "modelzoo", case_name)
    summary_path = os.path.join(output, "summary.json")
    args = ["--data", data, "--batch-size", str(batch), "--epochs", str(epochs), "--lr", str(lr),
            "--workers", str(workers), "--amp", "--opt-level", "O2", "--npus", str(nproc), "--device", device_type,
            "--output", output, "--json-out", summary_path, *passthrough]
    rc = train_main(args, prog=f"train_{case}.sh")
    if rc == 0 and os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as fh:
            summary = json.load(fh)
        fps = summary["fps"]
        lines = {"Network": NETWORK, "RankSize": summary["world_size"], "BatchSize": summary["batch_size"],
                 "DeviceType": summary["device"], "CaseName": case_name, "ActualFPS": f"{fps:.2f}",
                 "TrainingTime": f"{summary['batch_size'] * 1000 / fps:.2f}" if fps else "n/a",
                 "TrainAccuracy": summary["train_acc"], "HeldOutAccuracy": summary["acc1"],
                 "ActualLoss": summary["loss"], "E2ETrainingTime": int(round(summary["e2e_seconds"]))}
        log = os.path.join(output, f"{case_name}.log")
        with open(log, "w", encoding="utf-8") as fh:
            fh.writelines(f"{k} = {v}\n" for k, v in lines.items())
        print(f"ModelZoo log: {log}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
