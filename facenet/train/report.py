"""What a training run says and records, apart from the loop that trains: the console lines, the events file
the service follows, MLflow (params, per-epoch metrics, checkpoints, the final model) and the end-of-run
summary. Rank 0 does all of it; on other ranks every call is a no-op, so the loop calls it the same way
everywhere (world size 1 included)."""

from __future__ import annotations

import errno
import json
import os
import time

import numpy as np
import torch

from facenet import devices
from facenet.errors import UserError, one_line, unwritable
from facenet.fsutil import atomic_write
from facenet.runenv import mlflow_connect_seconds
from facenet.train import checkpoint as ckpt_io
from facenet.train import distributed as dist
from facenet.train.metrics import LIVENESS, EventLog, modelzoo_block
from facenet.tracking import Tracker, resolve_uri

EPOCH_METRICS = ("loss", "train_acc", "acc1", "fps", "fps_per_device", "lr", "epoch_time", "device_memory_mb",
                 "verify_acc", "val_far_1e-3", "auc", "eer")
VERIFY_METRICS = ("verify_acc", "val_far_1e-3", "auc", "eer")
BIN_VERIFY_METRICS = VERIFY_METRICS + ("verify_acc_insightface",)  # a .bin's accuracy as insightface computes it too


def bin_metrics(r) -> tuple[str, ...]:
    """The per-epoch metric names of the run's --verify-bin sets: <set>_verify_acc, <set>_auc, ..."""
    return tuple(f"{name}_{m}" for name, _, _ in r.bins for m in BIN_VERIFY_METRICS)


class Reporter:
    """The reporting side of one run (`run`: the engine's Run context). `open` on every rank (it shares the MLflow
    run id), the rest as training goes."""

    def __init__(self, run):
        self.r = run
        self.say = run.say
        self.events = EventLog(None)
        self.tracker: Tracker | None = None

    def open(self) -> str | None:
        """Rank 0: the events file, the summary's folder and the MLflow run (created, or the job's/checkpoint's
        continued, with the history a kill may have kept from it sent again). Returns the run id, the same on
        every rank."""
        r, spec = self.r, self.r.spec
        run_id = r.run_id
        if r.info.is_main:
            try:  # an output path the spec names that cannot be written: said now, in one line, not a traceback later
                os.makedirs(spec.output, exist_ok=True)
                self.events = EventLog(spec.events or os.path.join(spec.output, "events.jsonl"))
                if spec.json_out:
                    os.makedirs(os.path.dirname(os.path.abspath(spec.json_out)), exist_ok=True)
                    if os.path.isdir(spec.json_out):
                        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), spec.json_out)
            except OSError as exc:
                raise unwritable(exc) from None
            uri = resolve_uri(spec.mlflow_uri)
            if uri:
                run_id = self._open_tracker(uri, run_id)
        return dist.all_gather_object(run_id)[0]

    def _open_tracker(self, uri: str, run_id: str | None) -> str:
        r, spec = self.r, self.r.spec
        tags = {"device_type": r.device.type, "npus": str(r.info.world_size), "amp": r.amp.label, **spec.tags}
        # Standalone: a dead server is a configuration error, said at once. Under the service (which set
        # FACENET_MLFLOW_CONNECT_SECONDS) the server may be restarting: wait for it.
        self.tracker = Tracker(uri, spec.experiment, run_id, spec.run_name or spec.default_run_name(r.device.type),
                               tags, connect_timeout=mlflow_connect_seconds())
        self.tracker.start_system_metrics(float(os.environ.get("FACENET_SYSTEM_METRICS_INTERVAL", "10")),
                                          resume=bool(r.resume_path), chips=chip_monitors(r.device, spec))
        if not r.resume_path:
            self.tracker.log_params(params(r))
        self.say(f"MLflow run {self.tracker.run_id} at {uri}")
        for done in ([r.baseline] if r.baseline else []) + r.history:  # a kill between the checkpoint and the
            # send would lose these: send again
            self._log_epoch(done)
        return self.tracker.run_id

    def _log_epoch(self, record: dict) -> None:
        """One epoch's metrics at step = epoch. Logged after the checkpoint that holds the record; a resumed run
        sends its history again with the same timestamps, which MLflow keeps once."""
        if self.tracker:
            names = EPOCH_METRICS + bin_metrics(self.r)
            self.tracker.log_metrics({k: record[k] for k in names if record.get(k) is not None},
                                     step=record["epoch"], timestamp_ms=record.get("logged_ms"))

    def started(self, steps_per_epoch: int) -> None:
        r = self.r
        self.events.emit("start", world_size=r.info.world_size, device=r.device.type, epochs=r.spec.epochs,
                         start_epoch=r.start_epoch, mlflow_run_id=r.run_id, steps_per_epoch=steps_per_epoch)

    def baseline(self, record: dict) -> None:
        """The untrained (or pretrained) model's verification, at step 0: what training has to beat."""
        said = [f"accuracy {record['verify_acc']:.4f}, VAL@FAR=1e-3 {record['val_far_1e-3']:.4f}, AUC "
                f"{record['auc']:.4f}"] if "verify_acc" in record else []
        said += [f"{name} accuracy {record[name + '_verify_acc']:.4f}" for name, _, _ in self.r.bins]
        self.say("verification before training: " + "; ".join(said))
        self.events.emit("verify", **record)
        self._log_epoch(record)

    def step(self, epoch: int, step: int, steps: int, loss: float, fps: float, acc: float) -> None:
        self.say(f"Train | epoch {epoch + 1} | {step}/{steps} | loss: {loss:.4f} | fps: {fps:.1f} | acc: {acc:.4f}")
        self.events.emit("step", epoch=epoch + 1, step=step, steps=steps, loss=loss, fps=fps, train_acc=acc)

    def epoch(self, record: dict, n_eval: int) -> None:
        world = self.r.info.world_size
        acc_text = "n/a" if record["acc1"] is None else f"{record['acc1']:.4f}"
        verify_text = (f" | verify {record['verify_acc']:.4f} auc {record['auc']:.4f}" if "verify_acc" in record
                       else "")
        verify_text += "".join(f" | {name} {record[name + '_verify_acc']:.4f}" for name, _, _ in self.r.bins
                               if name + "_verify_acc" in record)
        self.say(f"Epoch {record['epoch']}/{self.r.spec.epochs} | loss {record['loss']:.4f} | train acc "
                 f"{record['train_acc']:.4f} | Acc@1 {acc_text} ({n_eval} held out){verify_text} | fps "
                 f"{record['fps']:.1f} ({record['fps'] / world:.1f}/device) | lr {record['lr']:g} | "
                 f"{record['epoch_time']:.1f}s")
        self.events.emit("epoch", **record)

    def checkpointed(self, record: dict, path: str) -> None:
        """Rank 0, once the epoch's checkpoint is on disk: a supervisor may now resume from it."""
        self.events.emit("checkpoint", epoch=record["epoch"], path=path)
        self._log_epoch(record)
        if self.tracker and self.r.spec.log_checkpoints == "every":
            self.tracker.log_artifact(path, "checkpoints")

    def failed(self) -> None:
        self.events.emit("failed")
        if self.tracker:
            self.tracker.close("FAILED", timeout=30, waiting=LIVENESS.beat)
        self.events.close()

    def finished(self, summary: dict, final: str) -> None:
        """Rank 0, after the final model is saved at `final`: the MLflow model and summary, the `end` event, the
        summary file and the ModelZoo block."""
        spec = self.r.spec
        summary["model"] = final
        if self.tracker:
            self._log_final(summary, final)
        self.events.emit("end", **{k: v for k, v in summary.items() if k != "event"})
        self.events.close()
        if spec.json_out:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(spec.json_out)), exist_ok=True)
                # Atomically: a summary is what tells the service that training completed; a trainer killed
                # while writing it must leave none, never half of one (the job would be FAILED, not resumed).
                with atomic_write(spec.json_out, fsync=True) as fh:
                    fh.write(json.dumps(summary, indent=2).encode())
            except OSError as exc:
                raise unwritable(exc, spec.json_out) from None
        self.say(json.dumps(summary))
        self.say(modelzoo_block(summary["fps"], summary["train_acc"], summary["e2e_seconds"]))

    def _log_final(self, summary: dict, final: str) -> None:
        spec, tracker, model = self.r.spec, self.tracker, self.r.model
        tracker.log_metrics({"final_fps": summary["fps"], "final_acc1": summary["acc1"]}, step=spec.epochs)
        if spec.log_checkpoints != "none":
            tracker.log_artifact(summary["checkpoint"], "checkpoints")
        tracker.log_text(json.dumps(summary, indent=2), "summary.json")
        tracker.log_artifact(final, "final")
        if spec.log_model:  # whatever the loss, the MLflow model maps face crops to unit embeddings
            model.cpu().float().eval()
            model.classify = False
            example = np.zeros((1, 3, spec.image_size, spec.image_size), dtype=np.float32)
            tracker.log_model(model, example, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                                "facenet-pytorch==2.5.3"])
        report = tracker.close("FINISHED", waiting=LIVENESS.beat)  # log_model: ~15 s on 2 cores
        summary["mlflow_lost_records"] = len(report.lost)
        self.say(report.summary())


def chip_monitors(device: devices.Device, spec) -> list:
    """System-metric monitors of the chips this node's ranks hold (rank 0 logs them: node 0's chips, the ids
    check_device_request gave the ranks), where the device row names one."""
    if device.row.chip_monitor != "npu-smi":
        return []
    from facenet import npu_smi

    ids = list(spec.device_list) if spec.device_list is not None else list(range(spec.npus_per_node))
    return [lambda: npu_smi.monitor_class()(ids)]


def params(r) -> dict:
    """The run's MLflow params: the whole spec (tags are tags) and what this run derived from it."""
    spec, data = r.spec, r.data
    out = {k: v for k, v in spec.to_dict().items() if k not in ("tags",)}
    out.update({"device_type": r.device.type, "world_size": r.info.world_size, "precision": r.amp.label,
                "num_classes": data.num_classes, "train_images": len(data.train), "test_images": len(data.test),
                "dataset_layout": data.layout, "dataset_hash": data.manifest_hash, "loader_workers": r.workers,
                "per_device_batch": spec.batch_size // r.info.world_size, "compiled": r.compile_mode or "eager",
                **devices.versions()})
    return out


def summary(r, t_start: float) -> dict:
    """The end-of-run JSON summary: throughput over every epoch's steady-state window on all ranks, the last
    epoch's numbers, and where the checkpoint and run are."""
    spec, history = r.spec, r.history
    images = sum(h["window_images"] for h in history)
    seconds = sum(h["window_seconds"] for h in history)
    fps = images / seconds if seconds > 0 else 0.0
    last = history[-1] if history else {}
    return {
        "fps": round(fps, 3),
        "fps_per_device": round(fps / r.info.world_size, 3),
        "acc1": last.get("acc1"),
        "loss_function": spec.loss,
        **{k: last.get(k) for k in VERIFY_METRICS},
        "train_acc": last.get("train_acc"),
        "loss": last.get("loss"),
        "epochs": len(history),
        "world_size": r.info.world_size,
        "device": r.device.type,
        "amp": r.amp.enabled,
        "precision": r.amp.label,
        "compiled": r.compile_mode or "eager",
        "batch_size": spec.batch_size,
        "num_classes": r.data.num_classes,
        "bad_images": len(r.bad_paths),
        "e2e_seconds": round(time.time() - t_start, 3),
        "checkpoint": os.path.abspath(os.path.join(spec.output, ckpt_io.CHECKPOINT_NAME)),
        "mlflow_run_id": r.run_id,
        "fps_measured_over": {"images": images, "seconds": round(seconds, 3),
                              "note": "all ranks, steady-state steps only, device synchronized"},
        "verify_untrained": r.baseline and {k: r.baseline.get(k) for k in VERIFY_METRICS},
        **{k: last.get(k) for k in bin_metrics(r)},
    }
