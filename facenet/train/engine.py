"""The training loop: one process, one device; N of these under torchrun make DDP.

Rank 0 does the side effects (console, events, checkpoints, MLflow);
everything else is symmetric, and world size 1 runs the same code.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from facenet import confine, devices
from facenet.data import loader as data_loader
from facenet.data.dataset import DatasetSplit, load_for_training
from facenet.errors import UserError, one_line
from facenet.model import build_model, resolve_pretrained
from facenet.runenv import HEARTBEAT_ENV, mlflow_connect_seconds
from facenet.spec import TrainSpec
from facenet.train import checkpoint as ckpt_io
from facenet.train import distributed as dist
from facenet.train.losses import Trainable, make_objective
from facenet.train.metrics import EpochClock, EventLog, modelzoo_block
from facenet.tracking import Tracker, resolve_uri

MAX_NAMED_BAD = 10


@dataclass
class Amp:
    enabled: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler
    static_scale: float | None
    note: str | None = None  # why AMP is off though --amp asked for it

    @property
    def label(self) -> str:
        if not self.enabled:
            return "fp32"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def make_amp(spec: TrainSpec, device: devices.Device) -> Amp:
    """One AMP path: autocast with the backend's dtype; a GradScaler only for fp16.

    `--amp` with the default dtype on a CPU without native bf16 trains in fp32 and says so (emulated bf16 is
    ~10x slower there, and a queued job does not know which CPU it lands on); `--amp-dtype bf16` forces it."""
    dtype = device.autocast_dtype(spec.amp_dtype)
    enabled, note = spec.amp_enabled, None
    if enabled and spec.amp_dtype == "auto":
        ok, why = device.amp_supported(dtype)
        if not ok:
            enabled, note = False, f"--amp on {device.type}: {why}; training in fp32 (--amp-dtype bf16 forces it)"
    use_scaler = enabled and dtype == torch.float16
    static = None if spec.loss_scale == "dynamic" else float(spec.loss_scale)
    kwargs = {"init_scale": static} if static else {}
    # torch's own GradScaler on every type; on npu its two kernels are op-plugin's (Ascend/op-plugin@8b9c8534,
    # torch_npu 2.12's pin: op_plugin/config/op_plugin_functions.yaml:119,123 _amp_foreach_non_finite_check_and_
    # unscale_, _amp_update_scale_). It unscales before the step, as the row's non-fused Adam needs there.
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler, **kwargs)
    return Amp(enabled, dtype, scaler, static, note)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Console:
    """Rank-0 printing; other ranks stay quiet."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)


def run(spec: TrainSpec) -> dict:
    """Train per `spec` in this process (rank from torchrun's env). Returns the summary (rank 0)."""
    t_start = time.time()
    info = dist.from_env()
    device_type = devices.resolve_device_type(spec.device)
    device_ids = devices.check_device_request(device_type, spec.npus, spec.device_list, spec.nnodes)
    if info.world_size != spec.npus:
        raise UserError(f"--npus {spec.npus} but {info.world_size} process(es) were started")
    device = devices.setup_device(device_type, info.local_rank, device_ids)
    dist.init(info, device.dist_backend, device.torch_device)
    say = Console(info.is_main)
    try:
        return _train(spec, info, device, say, t_start)
    finally:
        dist.shutdown()


def _train(spec: TrainSpec, info: dist.DistInfo, device: devices.Device, say: Console, t_start: float) -> dict:
    torch_device = device.torch_device
    roots = confine.Roots.from_env()  # set for queued jobs: every read is confined to the data roots
    data = load_for_training(spec.data, spec.holdout, spec.seed, spec.batch_size, roots)
    per_rank_batch = spec.batch_size // info.world_size
    pretrained_file, pretrained_note = resolve_pretrained(spec.pretrained, roots)
    resume_path = ckpt_io.resolve_resume(spec.resume, spec.output)
    amp = make_amp(spec, device)
    workers = spec.workers if spec.workers is not None else data_loader.default_workers(info.world_size)
    channels_last = device.channels_last

    say(f"{data.describe()}")
    say(f"{pretrained_note}")
    if amp.note:
        say(amp.note)
    say(f"device {device.type} x {info.world_size} ({device.dist_backend}), precision {amp.label}"
        f"{' + GradScaler' if amp.scaler.is_enabled() else ''}, channels_last {channels_last}")
    say(f"global batch {spec.batch_size} = {per_rank_batch} per process x {info.world_size}; "
        f"{-(-len(data.train) // spec.batch_size)} steps per epoch; {workers} loader worker(s) per process")

    if spec.loss == "triplet" and data.num_classes < 2:
        raise UserError(f"--loss triplet: {spec.data} has {data.num_classes} identity; triplets need 2 or more")
    pairs, verify_every = _verification_pairs(spec, data, roots, say)
    seed_everything(spec.seed + info.rank)
    model = build_model(data.num_classes, pretrained_file, spec.dropout, roots)
    model.to(torch_device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    objective = make_objective(spec)
    trainable = Trainable(model, spec.loss)  # network + loss head: what DDP wraps
    optimizer = device.make_optimizer(spec.optimizer, model.parameters(), spec.lr, spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, spec.lr_steps, gamma=spec.lr_gamma)

    start_epoch, history, run_id, baseline = 0, [], spec.run_id, None
    if resume_path:
        state = ckpt_io.load(resume_path)
        _check_resumable(state, data, resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        amp.scaler.load_state_dict(state["scaler"])
        start_epoch, history, baseline = state["epoch"], state.get("history", []), state.get("verify_baseline")
        run_id = run_id or state.get("mlflow_run_id")
        if info.is_main and state.get("rng"):
            ckpt_io.set_rng_state(state["rng"])
        say(f"resumed from {resume_path}: {start_epoch} epoch(s) done")
    if start_epoch >= spec.epochs:
        say(f"nothing to do: checkpoint already has {start_epoch} of {spec.epochs} epochs")

    compile_mode, compile_note = device.compile_mode(spec.compile)
    say(compile_note)
    ddp_model = trainable
    if info.world_size > 1:
        ids = [device.index] if device.index is not None else None
        # Gradients live in DDP's buckets (no copy per step); every step uses the same parameters, which lets
        # DDP plan its reduction once (static_graph) where nothing compiles the step around it.
        ddp_model = DistributedDataParallel(trainable, device_ids=ids, gradient_as_bucket_view=True,
                                            static_graph=compile_mode is None)
    step = Step(ddp_model, objective, device, amp, compile_mode)

    tracker, events = None, EventLog(None)
    if info.is_main:
        try:  # an output path the spec names that cannot be written: said now, in one line, not a traceback later
            os.makedirs(spec.output, exist_ok=True)
            events = EventLog(spec.events or os.path.join(spec.output, "events.jsonl"), append=bool(resume_path))
            if spec.json_out:
                os.makedirs(os.path.dirname(os.path.abspath(spec.json_out)), exist_ok=True)
                if os.path.isdir(spec.json_out):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), spec.json_out)
        except OSError as exc:
            raise _unwritable(exc) from None
        uri = resolve_uri(spec.mlflow_uri)
        if uri:
            tags = {"device_type": device.type, "npus": str(info.world_size), "amp": amp.label, **spec.tags}
            # Standalone: a dead server is a configuration error, said at once. Under the service (which set
            # FACENET_MLFLOW_CONNECT_SECONDS) the server may be restarting: wait for it.
            tracker = Tracker(uri, spec.experiment, run_id, spec.run_name or spec.default_run_name(device.type), tags,
                              connect_timeout=mlflow_connect_seconds())
            run_id = tracker.run_id
            tracker.start_system_metrics(float(os.environ.get("FACENET_SYSTEM_METRICS_INTERVAL", "10")),
                                         resume=bool(resume_path), chips=_chip_monitors(device, spec))
            if not resume_path:
                tracker.log_params(_params(spec, data, device, info, amp, workers, compile_mode))
            say(f"MLflow run {run_id} at {uri}")
            for done in ([baseline] if baseline else []) + history:  # a kill between the checkpoint and the
                # send would lose these: send again
                _log_epoch(tracker, done)
    run_id = dist.all_gather_object(run_id)[0]

    if spec.loss == "triplet":
        train_loader = data_loader.identity_loader(data.train, per_rank_batch, spec.images_per_identity, info.rank,
                                                   info.world_size, spec.seed, workers, spec.image_size, spec.augment,
                                                   device.pin_memory, roots)
    else:
        train_loader = data_loader.train_loader(data.train, per_rank_batch, info.rank, info.world_size, spec.seed,
                                                workers, spec.image_size, spec.augment, device.pin_memory, roots)
    eval_loader = data_loader.eval_loader(data.test, per_rank_batch, info.rank, info.world_size,
                                          workers, spec.image_size, device.pin_memory, roots)
    bad_paths: set[str] = set()
    reported_bad: set[str] = set()
    events.emit("start", world_size=info.world_size, device=device.type, epochs=spec.epochs,
                start_epoch=start_epoch, mlflow_run_id=run_id, steps_per_epoch=len(train_loader))
    if pairs is not None and start_epoch == 0:
        # The untrained (or pretrained) model's numbers, at step 0: what training has to beat.
        baseline = {"epoch": 0, **_verify(model, pairs, spec, device, amp, channels_last, info, roots),
                    "logged_ms": int(time.time() * 1000)}
        say(f"verification before training: accuracy {baseline['verify_acc']:.4f}, VAL@FAR=1e-3 "
            f"{baseline['val_far_1e-3']:.4f}, AUC {baseline['auc']:.4f}")
        events.emit("verify", **baseline)
        if tracker:
            _log_epoch(tracker, baseline)
    status = "FAILED"
    try:
        for epoch in range(start_epoch, spec.epochs):
            # Re-seed per (epoch, rank): a resumed run draws the same dropout masks and augmentations.
            seed_everything(spec.seed + 1000 * epoch + info.rank)
            train_loader.sampler.set_epoch(epoch)
            audit = Audit(spec.audit_samples, info.rank, epoch,
                          None if roots is None else confine.Roots(roots.roots + [spec.output]))
            t_epoch = time.time()
            stats = _train_epoch(step, train_loader, optimizer, amp, device, channels_last, spec,
                                 epoch, events, say, bad_paths, info, audit)
            train_seconds = time.time() - t_epoch
            acc1, n_eval = None, 0
            if objective.has_classifier:
                acc1, n_eval = _evaluate(trainable, objective, eval_loader, amp, device, channels_last, bad_paths,
                                         audit)
            verification = {}
            if pairs is not None and ((epoch + 1) % verify_every == 0 or epoch + 1 == spec.epochs):
                verification = _verify(model, pairs, spec, device, amp, channels_last, info, roots)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            bad_paths = _share_bad_paths(bad_paths, reported_bad, say)
            record = {"epoch": epoch + 1, "loss": stats["loss"], "train_acc": stats["train_acc"], "acc1": acc1,
                      "fps": stats["fps"], "fps_per_device": stats["fps"] / info.world_size, "lr": lr,
                      "epoch_time": time.time() - t_epoch, "train_seconds": train_seconds,
                      "train_images": stats["images"], "window_images": stats["window_images"],
                      "window_seconds": stats["window_seconds"], "eval_images": n_eval,
                      "bad_images": len(bad_paths), **verification}
            memory = device.max_memory_mb()
            if memory is not None:
                record["device_memory_mb"] = memory
            record["logged_ms"] = int(time.time() * 1000)  # the MLflow timestamp: a resend is then a duplicate
            history.append(record)
            acc_text = "n/a" if acc1 is None else f"{acc1:.4f}"
            verify_text = f" | verify {verification['verify_acc']:.4f} auc {verification['auc']:.4f}" if verification else ""
            say(f"Epoch {epoch + 1}/{spec.epochs} | loss {stats['loss']:.4f} | train acc {stats['train_acc']:.4f} | "
                f"Acc@1 {acc_text} ({n_eval} held out){verify_text} | fps {stats['fps']:.1f} "
                f"({stats['fps'] / info.world_size:.1f}/device) | lr {lr:g} | {record['epoch_time']:.1f}s")
            events.emit("epoch", **record)
            if info.is_main:
                path = os.path.join(spec.output, ckpt_io.CHECKPOINT_NAME)
                ckpt_io.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(), "scaler": amp.scaler.state_dict(),
                                     "epoch": epoch + 1, "rng": ckpt_io.rng_state(), "history": history,
                                     "verify_baseline": baseline,
                                     "spec": spec.to_dict(), "classes": data.classes, "mlflow_run_id": run_id,
                                     "writer_rank": info.rank},
                                    path)
                events.emit("checkpoint", epoch=epoch + 1, path=path)  # a supervisor may now resume from it
                if tracker:
                    _log_epoch(tracker, record)
                    if spec.log_checkpoints == "every":
                        tracker.log_artifact(path, "checkpoints")
            dist.barrier()
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            events.emit("failed")
            if tracker:
                tracker.close("FAILED", timeout=30, waiting=LIVENESS.beat)
            events.close()

    summary = _summary(spec, history, info, device, amp, t_start, run_id, data, bad_paths, compile_mode)
    summary["verify_untrained"] = baseline and {k: baseline[k] for k in ("verify_acc", "val_far_1e-3", "auc", "eer")}
    if info.is_main:
        final = os.path.join(spec.output, "model.pt")
        ckpt_io.save_atomic({"model": model.state_dict(), "classes": data.classes, "spec": spec.to_dict(),
                             "epoch": spec.epochs, "mlflow_run_id": run_id}, final)
        summary["model"] = final
        if tracker:
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
            say(report.summary())
        events.emit("end", **{k: v for k, v in summary.items() if k != "event"})
        events.close()
        if spec.json_out:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(spec.json_out)), exist_ok=True)
                with open(spec.json_out, "w", encoding="utf-8") as fh:
                    json.dump(summary, fh, indent=2)
            except OSError as exc:
                raise _unwritable(exc, spec.json_out) from None
        say(json.dumps(summary))
        say(modelzoo_block(summary["fps"], summary["train_acc"], summary["e2e_seconds"]))
    return summary


class Liveness:
    """Touches the file FACENET_TRAINER_HEARTBEAT names (set by the service) from the training and evaluation loops, at
    most every 2 s: a trainer whose loop stops (hung, stopped, a rank stuck) stops touching it, and the
    service stops it after FACENET_TRAINER_STALL_SECONDS. Beaten by the loop itself, not a thread, so a
    frozen loop cannot look alive."""

    def __init__(self) -> None:
        self.path: str | None = None  # read at the first beat, not at import
        self.last = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if now - self.last < 2.0:
            return
        self.last = now
        if self.path is None:
            self.path = os.environ.get(HEARTBEAT_ENV, "")
        if self.path:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                open(self.path, "a").close()
            except OSError:
                pass


LIVENESS = Liveness()


EPOCH_METRICS = ("loss", "train_acc", "acc1", "fps", "fps_per_device", "lr", "epoch_time", "device_memory_mb",
                 "verify_acc", "val_far_1e-3", "auc", "eer")


def _chip_monitors(device: devices.Device, spec: TrainSpec) -> list:
    """System-metric monitors of the chips this node's ranks hold (rank 0 logs them: node 0's chips, the ids
    check_device_request gave the ranks), where the device row names one."""
    if device.row.chip_monitor != "npu-smi":
        return []
    from facenet import npu_smi

    ids = list(spec.device_list) if spec.device_list is not None else list(range(spec.npus_per_node))
    return [lambda: npu_smi.monitor_class()(ids)]


def _log_epoch(tracker: Tracker, record: dict) -> None:
    """One epoch's metrics at step = epoch. Logged after the checkpoint that holds the record; a resumed run
    sends its history again with the same timestamps, which MLflow keeps once."""
    tracker.log_metrics({k: record[k] for k in EPOCH_METRICS if record.get(k) is not None}, step=record["epoch"],
                        timestamp_ms=record.get("logged_ms"))


class Step:
    """The training step's forward and loss, compiled per --compile (backward is compiled with it: AOTAutograd).
    Static shapes (the samplers give every step the same batch) mean one compilation, one CUDA graph."""

    def __init__(self, model, objective, device: devices.Device, amp: Amp, mode: str | None):
        self.model, self.objective, self.device, self.amp, self.mode = model, objective, device, amp, mode
        self._fn = device.compile(self._forward_loss, mode)

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor):
        with self.device.autocast(self.amp.enabled, self.amp.dtype):
            return self.objective.loss(self.model(x), y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        self.device.mark_step(self.mode)
        return self._fn(x, y)

    def train(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer):
        """One optimizer step on (x, y), the same on every device type: zero the grads (in place: the row's
        zero_grad_to_none), forward and loss under autocast, backward through the loss scaler (fp16 only),
        step, update the scale (a fixed --loss-scale is set again after every step). Returns (loss, correct)."""
        self.device.zero_grad(optimizer)
        loss, n_correct = self(x, y)
        self.amp.scaler.scale(loss).backward()
        self.amp.scaler.step(optimizer)
        self.amp.scaler.update(self.amp.static_scale)
        return loss, n_correct


def _train_epoch(step_fn: Step, loader, optimizer, amp: Amp, device: devices.Device, channels_last: bool,
                 spec: TrainSpec, epoch: int, events: EventLog, say: Console, bad_paths: set, info: dist.DistInfo,
                 audit: Audit) -> dict:
    step_fn.model.train()
    steps = len(loader)
    clock = EpochClock(spec.warmup_steps, steps)
    loss_sum = torch.zeros((), device=device.torch_device)
    correct = torch.zeros((), device=device.torch_device, dtype=torch.long)
    seen = 0
    if clock.warmup == 0:
        device.synchronize()
        clock.start()
    t_log, seen_at_log = time.perf_counter(), 0
    for step, (x, y, bad, fed) in enumerate(data_loader.on_device(loader, device.torch_device, channels_last), 1):
        LIVENESS.beat()
        bad_paths.update(bad)
        audit.fed(fed)
        if y.numel() == 0:
            raise _unreadable_batch(bad)
        loss, n_correct = step_fn.train(x, y, optimizer)
        n = y.numel()
        seen += n
        loss_sum += loss.detach().float() * n
        correct += n_correct
        if step == clock.warmup:
            device.synchronize()
            clock.start()
        elif step > clock.warmup:
            clock.count(n)
        if step % spec.log_every == 0 or step == steps:
            device.synchronize()
            now = time.perf_counter()
            # Rank 0's recent rate x world size is a progress estimate only; the epoch FPS below is measured.
            fps_now = (seen - seen_at_log) * info.world_size / max(now - t_log, 1e-9)
            t_log, seen_at_log = now, seen
            loss_avg = loss_sum.item() / seen
            acc = correct.item() / seen
            say(f"Train | epoch {epoch + 1} | {step}/{steps} | loss: {loss_avg:.4f} | fps: {fps_now:.1f} | acc: {acc:.4f}")
            events.emit("step", epoch=epoch + 1, step=step, steps=steps, loss=loss_avg, fps=fps_now, train_acc=acc)
    device.synchronize()
    clock.stop()
    audit.write_train()
    loss_total, correct_total, seen_total, images, _ = dist.all_reduce(
        [loss_sum.item(), float(correct.item()), float(seen), float(clock.images), 0.0], device.torch_device)
    (window,) = dist.all_reduce([clock.seconds], device.torch_device, op="max")
    return {"loss": loss_total / max(seen_total, 1), "train_acc": correct_total / max(seen_total, 1),
            "fps": images / window if window > 0 else 0.0, "window_images": int(images), "window_seconds": window,
            "images": int(seen_total)}


def _unwritable(exc: OSError, path: str | None = None) -> UserError:
    """`exc` from writing `path` (the file the error names, when the OSError has none: a full disk)."""
    return UserError(f"cannot write {one_line(exc.filename or path or 'an output file')}: {exc.strerror or exc} "
                     "(a path from --output, --events or --json-out)")


def _unreadable_batch(bad: list[str]) -> UserError:
    """The error for a batch with no readable image: say whether its files are unreadable or gone (a data
    set deleted or unmounted mid-run), naming one and the folder to check."""
    example = bad[0] if bad else "?"
    if bad and not os.path.exists(example):
        folder = os.path.dirname(example)
        while folder and not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        return UserError(f"the data set vanished during training: {example} (and every other image of a whole "
                         f"batch) no longer exists; {folder} is what is left of its path. Restore or remount "
                         "the data and submit again")
    return UserError(f"no readable image in a whole batch (e.g. {example}): the dataset is mostly unreadable")


@torch.inference_mode()
def _evaluate(model, objective, loader, amp: Amp, device: devices.Device, channels_last: bool, bad_paths: set,
              audit: Audit):
    """Top-1 of the loss's classifier on the held-out split over all ranks. Returns (acc1 or None, images
    evaluated). `model` is the Trainable (not DDP: ranks evaluate different images)."""
    model.eval()
    correct = torch.zeros((), device=device.torch_device, dtype=torch.long)
    total = 0
    for images, labels, bad, fed in loader:
        LIVENESS.beat()
        bad_paths.update(bad)
        audit.fed(fed)
        if labels.numel() == 0:
            continue
        x = data_loader.to_device(images, device.torch_device, channels_last)
        with device.autocast(amp.enabled, amp.dtype):
            predicted = objective.predict(model(x))
        correct += (predicted == labels.to(device.torch_device)).sum()
        total += labels.numel()
    audit.write_eval(int(correct.item()))
    correct_all, total_all = dist.all_reduce([float(correct.item()), float(total)], device.torch_device)
    model.train()
    return (correct_all / total_all if total_all else None), int(total_all)


def _verification_pairs(spec: TrainSpec, data: DatasetSplit, roots: confine.Roots | None, say: Console):
    """(the pairs the per-epoch verification runs on, every how many epochs), or (None, 0) with a line
    saying why not."""
    from facenet.verification.pairs import pairs_file_in, read_pairs

    if spec.verify_every == 0:
        return None, 0
    path = spec.verify_pairs or pairs_file_in(spec.data)
    if path is None:
        if spec.verify_every is not None:
            raise UserError(f"--verify-every {spec.verify_every}: {spec.data} has no test_pairs.txt or pairs.txt; "
                            "name a pairs file with --verify-pairs")
        say("verification: no test_pairs.txt or pairs.txt in the data root (--verify-pairs FILE adds one); off")
        return None, 0
    pairs = read_pairs(path, spec.data, roots, "--verify-pairs" if spec.verify_pairs else "verification pairs")
    people = pairs.people()
    seen = len(people & set(data.classes))
    every = spec.verify_every or 1
    say(f"verification every {every} epoch(s): {pairs.source}, {len(people)} people, "
        f"{seen or 'none'} of them trained on")
    return pairs, every


def _verify(model, pairs, spec: TrainSpec, device: devices.Device, amp: Amp, channels_last: bool,
            info: dist.DistInfo, roots: confine.Roots | None) -> dict:
    """LFW-protocol numbers on `pairs`, sharded: each rank embeds every world_size-th image, then every rank
    gathers all embeddings and scores the pairs (the same numbers everywhere; cheap next to embedding)."""
    from facenet.evaluate import logged_metrics, score_pairs
    from facenet.verification.embed import embed_paths

    images = pairs.images()
    mine = images[info.rank::info.world_size]
    emb, bad = embed_paths(model, mine, device.torch_device, spec.image_size, batch_size=max(32, spec.batch_size // info.world_size),
                           channels_last=channels_last, autocast=lambda: device.autocast(amp.enabled, amp.dtype),
                           roots=roots, progress=lambda *_: LIVENESS.beat())
    full = np.zeros((len(images), emb.shape[1]), dtype=np.float32)
    unreadable: set[str] = set()
    for rank, part, part_bad in dist.all_gather_object((info.rank, emb, bad)):
        full[rank::info.world_size] = part
        unreadable.update(part_bad)
    result, _, _ = score_pairs(pairs, images, full, unreadable)
    return {**logged_metrics(result), "verify_pairs": result["pairs"]}


def _share_bad_paths(local: set, reported: set, say: Console) -> set:
    """Union of unreadable files over ranks; rank 0 names new ones (first few) once."""
    merged = set().union(*dist.all_gather_object(sorted(local)))
    new = sorted(merged - reported)
    if new:
        reported.update(new)
        shown = ", ".join(one_line(p) for p in new[:MAX_NAMED_BAD])
        more = f" and {len(new) - MAX_NAMED_BAD} more" if len(new) > MAX_NAMED_BAD else ""
        say(f"warning: skipped {len(new)} unreadable image(s): {shown}{more}")
    return merged


class Audit:
    """--audit-samples DIR: each rank writes the images its loader really fed the model (a bad image's
    replacement included), not what its sampler would yield: DIR/rank<R>_epoch<E>.txt for training and
    DIR/rank<R>_epoch<E>_eval.json (images, correct) for the held-out Acc@1. A queued job's folder must lie
    in the data roots or its output. Does nothing without DIR."""

    def __init__(self, folder: str | None, rank: int, epoch: int, roots: confine.Roots | None):
        self.folder, self.rank, self.epoch, self.roots = folder, rank, epoch + 1, roots
        self.paths: list[str] = []

    def fed(self, paths: list[str]) -> None:
        if self.folder:
            self.paths += paths

    def _write(self, name: str, text: str) -> None:
        confine.write_bytes(os.path.join(self.folder, name), text.encode(), self.roots, "--audit-samples")
        self.paths = []

    def write_train(self) -> None:
        if self.folder:
            self._write(f"rank{self.rank}_epoch{self.epoch}.txt", "".join(p + "\n" for p in self.paths))

    def write_eval(self, correct: int) -> None:
        if self.folder:
            self._write(f"rank{self.rank}_epoch{self.epoch}_eval.json",
                        json.dumps({"images": self.paths, "correct": correct}))


def _check_resumable(state: dict, data: DatasetSplit, path: str) -> None:
    if state.get("classes") and state["classes"] != data.classes:
        raise UserError(f"--resume {path}: the checkpoint was trained on {len(state['classes'])} other identities; "
                        f"this dataset has {data.num_classes}")


def _params(spec: TrainSpec, data: DatasetSplit, device: devices.Device, info: dist.DistInfo, amp: Amp,
            workers: int, compile_mode: str | None) -> dict:
    params = {k: v for k, v in spec.to_dict().items() if k not in ("tags",)}
    params.update({"device_type": device.type, "world_size": info.world_size, "precision": amp.label,
                   "num_classes": data.num_classes, "train_images": len(data.train), "test_images": len(data.test),
                   "dataset_layout": data.layout, "dataset_hash": data.manifest_hash, "loader_workers": workers,
                   "per_device_batch": spec.batch_size // info.world_size, "compiled": compile_mode or "eager",
                   **devices.versions()})
    return params


def _summary(spec: TrainSpec, history: list, info: dist.DistInfo, device: devices.Device, amp: Amp,
             t_start: float, run_id: str | None, data: DatasetSplit, bad_paths: set, compile_mode: str | None) -> dict:
    images = sum(h["window_images"] for h in history)
    seconds = sum(h["window_seconds"] for h in history)
    fps = images / seconds if seconds > 0 else 0.0
    last = history[-1] if history else {}
    return {
        "fps": round(fps, 3),
        "fps_per_device": round(fps / info.world_size, 3),
        "acc1": last.get("acc1"),
        "loss_function": spec.loss,
        **{k: last.get(k) for k in ("verify_acc", "val_far_1e-3", "auc", "eer")},
        "train_acc": last.get("train_acc"),
        "loss": last.get("loss"),
        "epochs": len(history),
        "world_size": info.world_size,
        "device": device.type,
        "amp": amp.enabled,
        "precision": amp.label,
        "compiled": compile_mode or "eager",
        "batch_size": spec.batch_size,
        "num_classes": data.num_classes,
        "bad_images": len(bad_paths),
        "e2e_seconds": round(time.time() - t_start, 3),
        "checkpoint": os.path.abspath(os.path.join(spec.output, ckpt_io.CHECKPOINT_NAME)),
        "mlflow_run_id": run_id,
        "fps_measured_over": {"images": images, "seconds": round(seconds, 3),
                              "note": "all ranks, steady-state steps only, device synchronized"},
    }


def main_worker(spec: TrainSpec) -> int:
    """Entry for one process; UserError -> one line on stderr, exit 2."""
    try:
        run(spec)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
