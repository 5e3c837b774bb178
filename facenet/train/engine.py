"""The training loop: one process, one device; N of these under torchrun make DDP.

Rank 0 does the side effects (console, events, checkpoints, MLflow);
everything else is symmetric, and world size 1 runs the same code.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from facenet import confine, devices
from facenet.data import loader as data_loader
from facenet.data.dataset import DatasetSplit, load_for_training
from facenet.errors import UserError, one_line
from facenet.model import build_model, resolve_pretrained
from facenet.spec import TrainSpec
from facenet.train import checkpoint as ckpt_io
from facenet.train import distributed as dist
from facenet.train.losses import Trainable, make_objective
from facenet.train.metrics import LIVENESS, EpochClock
from facenet.train.report import Reporter, summary

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
    except BaseException as exc:
        # The traceback's frames hold the run (its DDP model, and through its reducer the process group): cleared
        # here, so the group below is destroyed whole on the error path too, not in the interpreter's teardown.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        dist.shutdown()


@dataclass
class Run:
    """One training run in this process: what the loop, the evaluation and the reporting share, in one small
    object instead of a dozen parameters (`_prepare` builds it; the loaders and the run id come after)."""

    spec: TrainSpec
    info: dist.DistInfo
    device: devices.Device
    say: Console
    roots: confine.Roots | None
    data: DatasetSplit
    amp: Amp
    workers: int
    model: torch.nn.Module
    trainable: Trainable  # network + loss head: what DDP wraps
    objective: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    step: "Step"
    compile_mode: str | None
    pairs: object = None  # verification pairs, when there are any
    bins: list = field(default_factory=list)  # (set name, pairs, images) of each --verify-bin set
    verify_every: int = 0
    resume_path: str | None = None
    start_epoch: int = 0
    history: list = field(default_factory=list)
    baseline: dict | None = None  # verification before training
    run_id: str | None = None
    train_loader: object = None
    eval_loader: object = None
    bad_paths: set = field(default_factory=set)
    reported_bad: set = field(default_factory=set)

    @property
    def per_rank_batch(self) -> int:
        return self.spec.batch_size // self.info.world_size

    @property
    def channels_last(self) -> bool:
        return self.device.channels_last


def _train(spec: TrainSpec, info: dist.DistInfo, device: devices.Device, say: Console, t_start: float) -> dict:
    r = _prepare(spec, info, device, say)
    report = Reporter(r)
    r.run_id = report.open()
    r.train_loader, r.eval_loader = _loaders(r)
    # The loader's own length: the identity sampler (--loss triplet) deals its own number of P x K batches.
    say(f"global batch {spec.batch_size} = {r.per_rank_batch} per process x {info.world_size}; "
        f"{len(r.train_loader)} steps per epoch; {r.workers} loader worker(s) per process")
    report.started(len(r.train_loader))
    if (r.pairs is not None or r.bins) and r.start_epoch == 0:
        r.baseline = {"epoch": 0, **verify(r), "logged_ms": int(time.time() * 1000)}
        report.baseline(r.baseline)
    finished = False
    try:
        for epoch in range(r.start_epoch, spec.epochs):
            record, n_eval = train_and_evaluate(r, epoch, report)
            report.epoch(record, n_eval)
            if info.is_main:
                report.checkpointed(record, _save_checkpoint(r, epoch))
            dist.barrier()
        finished = True
    finally:
        if not finished:
            report.failed()
    result = summary(r, t_start)
    if info.is_main:
        final = os.path.join(spec.output, "model.pt")
        ckpt_io.save_atomic({"model": r.model.state_dict(), "classes": r.data.classes, "spec": spec.to_dict(),
                             "epoch": spec.epochs, "mlflow_run_id": r.run_id}, final)
        report.finished(result, final)
    return result


def _prepare(spec: TrainSpec, info: dist.DistInfo, device: devices.Device, say: Console) -> Run:
    """The data, the model on its device (resumed from a checkpoint when there is one), the optimizer, the
    compiled (or eager) step inside DDP, and the verification pairs; every derived quantity said."""
    roots = confine.Roots.from_env()  # set for queued jobs: every read is confined to the data roots
    data = load_for_training(spec.data, spec.holdout, spec.seed, spec.batch_size, roots)
    pretrained_file, pretrained_note = resolve_pretrained(spec.pretrained, roots)
    resume_path = ckpt_io.resolve_resume(spec.resume, spec.output)
    amp = make_amp(spec, device)
    workers = spec.workers if spec.workers is not None else data_loader.default_workers(info.world_size)
    say(f"{data.describe()}")
    say(f"{pretrained_note}")
    if amp.note:
        say(amp.note)
    say(f"device {device.type} x {info.world_size} ({device.dist_backend}), precision {amp.label}"
        f"{' + GradScaler' if amp.scaler.is_enabled() else ''}, channels_last {device.channels_last}")
    if spec.loss == "triplet" and data.num_classes < 2:
        raise UserError(f"--loss triplet: {spec.data} has {data.num_classes} identity; triplets need 2 or more")
    pairs, verify_every = _verification_pairs(spec, data, roots, say, has_bins=bool(spec.verify_bin))
    bins = _verification_bins(spec, roots, say)
    seed_everything(spec.seed + info.rank)
    model = build_model(data.num_classes, pretrained_file, spec.dropout, roots)
    model.to(device.torch_device, memory_format=torch.channels_last if device.channels_last else torch.preserve_format)
    objective = make_objective(spec)
    trainable = Trainable(model, spec.loss)
    optimizer = device.make_optimizer(spec.optimizer, model.parameters(), spec.lr, spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, spec.lr_steps, gamma=spec.lr_gamma)
    r = Run(spec, info, device, say, roots, data, amp, workers, model, trainable, objective, optimizer, scheduler,
            step=None, compile_mode=None, pairs=pairs, bins=bins, verify_every=verify_every, run_id=spec.run_id,
            resume_path=resume_path)
    if r.resume_path:
        _resume(r)
    if r.start_epoch >= spec.epochs:
        say(f"nothing to do: checkpoint already has {r.start_epoch} of {spec.epochs} epochs")
    r.compile_mode, compile_note = device.compile_mode(spec.compile)
    say(compile_note)
    ddp_model = trainable
    if info.world_size > 1:
        ids = [device.index] if device.index is not None else None
        # Gradients live in DDP's buckets (no copy per step); every step uses the same parameters, which lets
        # DDP plan its reduction once (static_graph) where nothing compiles the step around it.
        ddp_model = DistributedDataParallel(trainable, device_ids=ids, gradient_as_bucket_view=True,
                                            static_graph=r.compile_mode is None)
    r.step = Step(ddp_model, objective, device, amp, r.compile_mode)
    return r


def _resume(r: Run) -> None:
    """The whole training state from the checkpoint: model, optimizer, scheduler, scaler, epoch, history, RNG."""
    state = ckpt_io.load(r.resume_path)
    _check_resumable(state, r.data, r.resume_path)
    r.model.load_state_dict(state["model"])
    r.optimizer.load_state_dict(state["optimizer"])
    r.scheduler.load_state_dict(state["scheduler"])
    _resume_scaler(r, state.get("scaler"))
    r.start_epoch, r.history, r.baseline = state["epoch"], state.get("history", []), state.get("verify_baseline")
    r.run_id = r.run_id or state.get("mlflow_run_id")
    if r.info.is_main and state.get("rng"):
        ckpt_io.set_rng_state(state["rng"])
    r.say(f"resumed from {r.resume_path}: {r.start_epoch} epoch(s) done")


def _resume_scaler(r: Run, state: dict | None) -> None:
    """The checkpoint's GradScaler state, when it has one. A job requeued from a bf16 or fp32 worker onto an fp16
    one finds the empty state of a disabled scaler, which an enabled one refuses (RuntimeError, on every attempt):
    it starts fresh instead (a few skipped steps while the scale settles), said in one line. A disabled scaler
    ignores whatever it is given."""
    if state:
        r.amp.scaler.load_state_dict(state)
    elif r.amp.scaler.is_enabled():
        r.say(f"the checkpoint has no GradScaler state (written by a bf16 or fp32 run): {r.amp.label} starts with "
              "a fresh scaler")


def _loaders(r: Run):
    """(the training loader: P x K identities for triplets, else shuffled; the held-out loader)."""
    spec, info, pin = r.spec, r.info, r.device.pin_memory
    if spec.loss == "triplet":
        train = data_loader.identity_loader(r.data.train, r.per_rank_batch, spec.images_per_identity, info.rank,
                                            info.world_size, spec.seed, r.workers, spec.image_size, spec.augment,
                                            pin, r.roots)
    else:
        train = data_loader.train_loader(r.data.train, r.per_rank_batch, info.rank, info.world_size, spec.seed,
                                         r.workers, spec.image_size, spec.augment, pin, r.roots)
    held_out = data_loader.eval_loader(r.data.test, r.per_rank_batch, info.rank, info.world_size, r.workers,
                                       spec.image_size, pin, r.roots)
    return train, held_out


def train_and_evaluate(r: Run, epoch: int, report: Reporter) -> tuple[dict, int]:
    """One epoch: train, evaluate on the held-out split, verify when due, step the schedule. Returns (the
    epoch's record, which the history keeps and MLflow gets; held-out images evaluated)."""
    spec, info = r.spec, r.info
    # Re-seed per (epoch, rank): a resumed run draws the same dropout masks. (Augmentations are seeded per image
    # by the loader, and no loader draws from this RNG: `data_loader.AugmentSeeds`, `_loader`.)
    seed_everything(spec.seed + 1000 * epoch + info.rank)
    r.train_loader.sampler.set_epoch(epoch)
    audit = Audit(spec.audit_samples, info.rank, epoch,
                  None if r.roots is None else confine.Roots(r.roots.roots + [spec.output]))
    t_epoch = time.time()
    stats = train_one_epoch(r, epoch, audit, report)
    # Every rank evaluates, verifies and (rank 0) checkpoints rank 0's model: the same one everywhere.
    dist.broadcast_buffers(r.model)
    train_seconds = time.time() - t_epoch
    acc1, n_eval = evaluate(r, audit) if r.objective.has_classifier else (None, 0)
    verification = {}
    if (r.pairs is not None or r.bins) and ((epoch + 1) % r.verify_every == 0 or epoch + 1 == spec.epochs):
        verification = verify(r)
    lr = r.optimizer.param_groups[0]["lr"]
    r.scheduler.step()
    r.bad_paths = _share_bad_paths(r.bad_paths, r.reported_bad, r.say)
    record = {"epoch": epoch + 1, "loss": stats["loss"], "train_acc": stats["train_acc"], "acc1": acc1,
              "fps": stats["fps"], "fps_per_device": stats["fps"] / info.world_size, "lr": lr,
              "epoch_time": time.time() - t_epoch, "train_seconds": train_seconds,
              "train_images": stats["images"], "window_images": stats["window_images"],
              "window_seconds": stats["window_seconds"], "eval_images": n_eval,
              "bad_images": len(r.bad_paths), **verification}
    memory = r.device.max_memory_mb()
    if memory is not None:
        record["device_memory_mb"] = memory
    record["logged_ms"] = int(time.time() * 1000)  # the MLflow timestamp: a resend is then a duplicate
    r.history.append(record)
    return record, n_eval


def _save_checkpoint(r: Run, epoch: int) -> str:
    """Rank 0: the whole training state after `epoch`, atomically; returns its path."""
    path = os.path.join(r.spec.output, ckpt_io.CHECKPOINT_NAME)
    ckpt_io.save_atomic({"model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(),
                         "scheduler": r.scheduler.state_dict(), "scaler": r.amp.scaler.state_dict(),
                         "epoch": epoch + 1, "rng": ckpt_io.rng_state(), "history": r.history,
                         "verify_baseline": r.baseline, "spec": r.spec.to_dict(), "classes": r.data.classes,
                         "mlflow_run_id": r.run_id, "writer_rank": r.info.rank}, path)
    return path


def _forward_loss(model, objective, device: devices.Device, amp: Amp, x: torch.Tensor, y: torch.Tensor):
    with device.autocast(amp.enabled, amp.dtype):
        return objective.loss(model(x), y)


class Step:
    """The training step's forward and loss, compiled per --compile (backward is compiled with it: AOTAutograd).
    Static shapes (the samplers give every step the same batch) mean one compilation, one CUDA graph."""

    def __init__(self, model, objective, device: devices.Device, amp: Amp, mode: str | None):
        self.model, self.objective, self.device, self.amp, self.mode = model, objective, device, amp, mode
        # A function of its own, not a method of this object: `self._fn = self._forward_loss` was a cycle (Step ->
        # bound method -> Step) that kept the DDP model, and through its reducer the process group, alive after
        # destroy_process_group until the collector ran, at the latest during the interpreter's teardown.
        self._fn = device.compile(functools.partial(_forward_loss, model, objective, device, amp), mode)

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


def train_one_epoch(r: Run, epoch: int, audit: "Audit", report: Reporter) -> dict:
    """The training pass of one epoch, timed honestly (EpochClock: steady-state steps, device synchronized);
    loss, accuracy and throughput all-reduced over ranks."""
    step_fn, device, spec = r.step, r.device, r.spec
    step_fn.model.train()
    loader = r.train_loader
    steps = len(loader)
    clock = EpochClock(spec.warmup_steps, steps)
    loss_sum = torch.zeros((), device=device.torch_device)
    correct = torch.zeros((), device=device.torch_device, dtype=torch.long)
    seen = 0
    if clock.warmup == 0:
        device.synchronize()
        clock.start()
    t_log, seen_at_log = time.perf_counter(), 0
    for step, (x, y, bad, fed) in enumerate(data_loader.on_device(loader, device.torch_device, r.channels_last), 1):
        LIVENESS.beat()
        r.bad_paths.update(bad)
        audit.fed(fed)
        if y.numel() == 0:
            raise _unreadable_batch(bad, r.data)
        loss, n_correct = step_fn.train(x, y, r.optimizer)
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
            fps_now = (seen - seen_at_log) * r.info.world_size / max(now - t_log, 1e-9)
            t_log, seen_at_log = now, seen
            report.step(epoch, step, steps, loss_sum.item() / seen, fps_now, correct.item() / seen)
    device.synchronize()
    clock.stop()
    audit.write_train()
    loss_total, correct_total, seen_total, images, _ = dist.all_reduce(
        [loss_sum.item(), float(correct.item()), float(seen), float(clock.images), 0.0], device.torch_device)
    (window,) = dist.all_reduce([clock.seconds], device.torch_device, op="max")
    return {"loss": loss_total / max(seen_total, 1), "train_acc": correct_total / max(seen_total, 1),
            "fps": images / window if window > 0 else 0.0, "window_images": int(images), "window_seconds": window,
            "images": int(seen_total)}


def _unreadable_batch(bad: list[str], data: DatasetSplit) -> UserError:
    """The error for a batch with no readable image: say whether its files are unreadable or gone (a data
    set deleted or unmounted mid-run), naming one and the folder to check. A pack's images are no files of
    their own: a whole batch of them unreadable means its shards changed or were cut short."""
    example = bad[0] if bad else "?"
    if data.layout == "packed":
        return UserError(f"no readable image in a whole batch (e.g. {example}) of the pack {data.root}: its "
                         "shards changed or were cut short since it was loaded (each image is checked against "
                         "its sha256); pack the data set again")
    if bad and not os.path.exists(example):
        folder = os.path.dirname(example)
        while folder and not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        return UserError(f"the data set vanished during training: {example} (and every other image of a whole "
                         f"batch) no longer exists; {folder} is what is left of its path. Restore or remount "
                         "the data and submit again")
    return UserError(f"no readable image in a whole batch (e.g. {example}): the dataset is mostly unreadable")


@torch.inference_mode()
def evaluate(r: Run, audit: "Audit"):
    """Top-1 of the loss's classifier on the held-out split over all ranks. Returns (acc1 or None, images
    evaluated). It runs the Trainable, not DDP: ranks evaluate different images."""
    model, objective, loader, amp, device = r.trainable, r.objective, r.eval_loader, r.amp, r.device
    channels_last, bad_paths = r.channels_last, r.bad_paths
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
    audit.write_eval(int(correct.item()), r.model)
    correct_all, total_all = dist.all_reduce([float(correct.item()), float(total)], device.torch_device)
    model.train()
    return (correct_all / total_all if total_all else None), int(total_all)


def _verification_pairs(spec: TrainSpec, data: DatasetSplit, roots: confine.Roots | None, say: Console,
                        has_bins: bool = False):
    """(the pairs the per-epoch verification runs on, every how many epochs), or (None, 0) with a line
    saying why not; (None, every) when only --verify-bin sets are verified."""
    from facenet.verification.pairs import pairs_file_in, read_pairs

    if spec.verify_every == 0:
        return None, 0
    path = spec.verify_pairs or pairs_file_in(spec.data)
    if path is None:
        if has_bins:
            return None, spec.verify_every or 1
        if spec.verify_every is not None:
            raise UserError(f"--verify-every {spec.verify_every}: {spec.data} has no test_pairs.txt or pairs.txt; "
                            "name a pairs file with --verify-pairs")
        say("verification: no test_pairs.txt or pairs.txt in the data root (--verify-pairs FILE adds one); off")
        return None, 0
    packed = {p for p, _ in data.pair_images} if data.pair_images is not None and not spec.verify_pairs else None
    pairs = read_pairs(path, spec.data, roots, "--verify-pairs" if spec.verify_pairs else "verification pairs",
                       packed)
    people = pairs.people()
    seen = len(people & set(data.classes))
    every = spec.verify_every or 1
    say(f"verification every {every} epoch(s): {pairs.source}, {len(people)} people, "
        f"{seen or 'none'} of them trained on")
    return pairs, every


def _verification_bins(spec: TrainSpec, roots: confine.Roots | None, say: Console) -> list:
    """(set name, pairs, images) of each --verify-bin set, read (without running pickle code) before training."""
    if not spec.verify_bin or spec.verify_every == 0:
        return []
    from facenet.verification.binset import load_set, set_name

    sets = []
    for path in spec.verify_bin:
        sets.append((set_name(path), *load_set(path, roots, "--verify-bin")))
        say(f"verification on {sets[-1][1].source} too, logged as {sets[-1][0]}_verify_acc, {sets[-1][0]}_auc, ...")
    return sets


def verify(r: Run) -> dict:
    """LFW-protocol numbers on the run's pairs (verify_acc, ...) and on each --verify-bin set (<set>_verify_acc,
    ...)."""
    from facenet.evaluate import logged_metrics

    out = {}
    if r.pairs is not None:
        result = _verify_on(r, r.pairs, r.data.pair_images)
        out.update({**logged_metrics(result), "verify_pairs": result["pairs"]})
    for name, pairs, images in r.bins:
        result = _verify_on(r, pairs, images)
        out.update({f"{name}_{k}": v for k, v in logged_metrics(result).items()})
        out[f"{name}_pairs"] = result["pairs"]
    return out


def _verify_on(r: Run, pairs, source) -> dict:
    """score_pairs' numbers for `pairs`, sharded: each rank embeds every world_size-th image, then every rank
    gathers all embeddings and scores the pairs (the same numbers everywhere; cheap next to embedding).
    `source` reads images that are not files (a pack's, a .bin's)."""
    from facenet.evaluate import score_pairs
    from facenet.verification.embed import embed_paths
    from facenet.verification.metrics import ScoreError

    model, spec, device, amp, info, roots = r.model, r.spec, r.device, r.amp, r.info, r.roots
    images = pairs.images()
    mine = images[info.rank::info.world_size]
    emb, bad = embed_paths(model, mine, device.torch_device, spec.image_size, batch_size=max(32, spec.batch_size // info.world_size),
                           channels_last=r.channels_last, autocast=lambda: device.autocast(amp.enabled, amp.dtype),
                           roots=roots, progress=lambda *_: LIVENESS.beat(), source=source)
    full = np.zeros((len(images), emb.shape[1]), dtype=np.float32)
    unreadable: set[str] = set()
    for rank, part, part_bad in dist.all_gather_object((info.rank, emb, bad)):
        full[rank::info.world_size] = part
        unreadable.update(part_bad)
    try:
        result, _, _ = score_pairs(pairs, images, full, unreadable)
    except ScoreError as exc:  # NaN embeddings (a diverged model), too few pairs left: one line, exit 2
        raise ScoreError(f"verification on {pairs.source}: {exc}") from None
    return result


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
    DIR/rank<R>_epoch<E>_eval.json (images, correct, model_sha256: the `state_digest` of the model that scored
    them) for the held-out Acc@1. A queued job's folder must lie
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

    def write_eval(self, correct: int, model: torch.nn.Module) -> None:
        if self.folder:
            self._write(f"rank{self.rank}_epoch{self.epoch}_eval.json",
                        json.dumps({"images": self.paths, "correct": correct,
                                    "model_sha256": ckpt_io.state_digest(model.state_dict())}))


def _check_resumable(state: dict, data: DatasetSplit, path: str) -> None:
    if state.get("classes") and state["classes"] != data.classes:
        raise UserError(f"--resume {path}: the checkpoint was trained on {len(state['classes'])} other identities; "
                        f"this dataset has {data.num_classes}")


def main_worker(spec: TrainSpec) -> int:
    """Entry for one process; UserError -> one line on stderr, exit 2."""
    try:
        run(spec)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
