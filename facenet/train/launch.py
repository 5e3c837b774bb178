"""Entry point: validate at the edge, then run 1 process here or N under torchrun.

With --npus N > 1 and no torchrun environment, this process becomes the
launcher: it checks everything a user can get wrong (paths, devices, sizes)
so mistakes are one line instead of N tracebacks, writes the spec as JSON and
starts `torch.distributed.run --nproc-per-node N -m facenet.train --spec FILE`.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time

from facenet import devices
from facenet.data.dataset import load_for_training
from facenet.errors import UserError, one_line
from facenet import confine
from facenet.model import resolve_pretrained
from facenet.runenv import FENCE_ENV, NODE_ADDRESS_ENV, NODE_RANK_ENV, RDZV_ENDPOINT_ENV, WATCH_PID_ENV, cpu_share
from facenet.spec import TrainSpec
from facenet.train import checkpoint as ckpt_io
from facenet.train.options import spec_and_file
from facenet.train.sole import BUSY_EXIT, TrainerBusy, sole_trainer



def watch_supervisor() -> None:
    """Kill this process group when the worker that started it is gone (FACENET_WATCH_PID) or the attempt's
    deadline passes (FACENET_FENCE: the trainer fences itself even when its worker is alive but cut off from
    Redis, or frozen). A rank whose launcher died (it was re-parented) stops itself too."""
    raw = os.environ.get(WATCH_PID_ENV)
    fence = _Fence.take()
    if not raw and fence is None:
        return
    pid = int(raw) if raw else None
    parent = os.getppid()

    def gone() -> bool:
        # torchrun starts each rank in a session of its own, so a SIGKILL to the launcher's process group
        # does not reach the ranks: a rank whose parent died (it was re-parented) stops itself too.
        if "RANK" in os.environ and os.getppid() != parent:
            return True
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        try:  # a zombie is dead too
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False

    def loop() -> None:
        # The deadline is a number in memory, checked right after the pipe is drained (without blocking) and before
        # anything touches /proc: nothing here can wait on I/O, and a renewal already written is never missed.
        while not (fence is not None and fence.passed()) and not gone():
            if fence is not None:
                fence.wait(0.1)
            else:
                time.sleep(0.5)
        # Nothing is printed first: stdout is a pipe to the supervisor, which may be dead or not reading.
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=loop, daemon=True, name="watch-supervisor").start()


class _Fence:
    """The attempt's deadline for this trainer (FACENET_FENCE, services/queue/fence.py): the one at start, then
    each one the attempt writes to the pipe after a renewal (non-blocking reads: the watcher never waits on it)."""

    def __init__(self, fd: int, deadline: float):
        self.fd: int | None = fd
        self.deadline = deadline
        self._pending = b""
        os.set_blocking(fd, False)
        self._poll = select.poll()  # not select(): a worker's descriptor may be numbered past 1023
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def take(cls) -> "_Fence | None":
        """The fence of this process, taken out of the environment: the processes it starts (torchrun and its
        ranks) do not hold the pipe, and die with this one."""
        raw = os.environ.pop(FENCE_ENV, None)
        if not raw:
            return None
        fd, _, deadline = raw.partition(":")
        return cls(int(fd), float(deadline))

    def wait(self, seconds: float) -> None:
        """Up to `seconds` for news on the pipe; read all there is (a closed pipe: the last deadline stands)."""
        if self.fd is None:
            time.sleep(seconds)
            return
        self._poll.poll(seconds * 1000)
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                return
            if not chunk:
                self._poll.unregister(self.fd)
                os.close(self.fd)
                self.fd = None
                return
            *lines, self._pending = (self._pending + chunk).split(b"\n")
            for line in lines:
                try:
                    self.deadline = max(self.deadline, float(line))
                except ValueError:
                    continue

    def passed(self) -> bool:
        self.wait(0)  # what was written before now counts
        return time.monotonic() >= self.deadline


def preflight(spec: TrainSpec) -> str:
    """Everything checkable before processes start; returns the resolved device type."""
    device_type = devices.resolve_device_type(spec.device)
    devices.check_device_request(device_type, spec.npus, spec.device_list, spec.nnodes)
    roots = confine.Roots.from_env()
    load_for_training(spec.data, spec.holdout, spec.seed, spec.batch_size, roots)
    resolve_pretrained(spec.pretrained, roots)
    ckpt_io.resolve_resume(spec.resume, spec.output)
    return device_type


def node_place(spec: TrainSpec) -> tuple[int, str | None]:
    """(this node's rank, node 0's host:port) of a job over several nodes, from FACENET_NODE_RANK and
    FACENET_RDZV_ENDPOINT (set by the queue's workers; by hand, like the reference recipes' --rank and --addr);
    (0, None) on one node."""
    if spec.nnodes == 1:
        return 0, None
    raw_rank, endpoint = os.environ.get(NODE_RANK_ENV, ""), os.environ.get(RDZV_ENDPOINT_ENV, "")
    host, _, port = endpoint.rpartition(":")
    if not raw_rank.isdigit() or int(raw_rank) >= spec.nnodes or not host or not port.isdigit():
        raise UserError(f"--nnodes {spec.nnodes}: every node needs {NODE_RANK_ENV} (0..{spec.nnodes - 1}; "
                        f"got {raw_rank or 'nothing'}) and {RDZV_ENDPOINT_ENV} (node 0's HOST:PORT, the same on "
                        f"every node; got {endpoint or 'nothing'})")
    return int(raw_rank), endpoint


def launch_distributed(spec: TrainSpec, device_type: str, spec_file: str | None = None) -> int:
    """torchrun with npus / nnodes processes here. Over several nodes, torchrun's static rendezvous on node 0's
    endpoint (a c10d TCPStore there): node ranks are the ones given, so global rank 0 (checkpoints, MLflow)
    is always on node 0."""
    node_rank, endpoint = node_place(spec)
    os.makedirs(spec.output, exist_ok=True)
    spec_path = spec_file  # given as --spec FILE (a queued job's, written once by its worker): the ranks read it
    if spec_path is None:
        # One file per node: on a shared output folder two launchers must not rewrite a file the other's ranks read.
        spec_path = os.path.join(os.path.abspath(spec.output),
                                 "spec.json" if spec.nnodes == 1 else f"spec.node{node_rank}.json")
        from facenet.fsutil import atomic_write

        with atomic_write(spec_path) as fh:
            fh.write(spec.to_json().encode())
    env = dict(os.environ)
    local = spec.npus_per_node
    if device_type == "cpu" and "OMP_NUM_THREADS" not in env:
        # N CPU processes share the cores; without this each spawns a thread per core and they thrash.
        env["OMP_NUM_THREADS"] = str(cpu_share(local))
    from facenet.train.distributed import collective_timeout

    collective = devices.collective_env(device_type, spec.nnodes, os.environ.get(NODE_ADDRESS_ENV),
                                        collective_timeout())
    env.update(collective)
    if endpoint is None:
        where = ["--standalone"]
    else:
        host, _, port = endpoint.rpartition(":")
        where = [f"--nnodes={spec.nnodes}", f"--node-rank={node_rank}", f"--master-addr={host}",
                 f"--master-port={port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={local}",
           "-m", "facenet.train", "--spec", spec_path]
    said = "".join(f" {k}={v}" for k, v in sorted(collective.items()))
    print(f"launching {local} processes ({device_type})"
          f"{f' as node {node_rank} of {spec.nnodes}' if endpoint else ''}:{said} {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def main(argv: list[str] | None = None, prog: str = "python -m facenet.train") -> int:
    from facenet.train.engine import main_worker

    watch_supervisor()
    try:
        spec, spec_file = spec_and_file(argv, prog)
        # One process (or a torchrun child) runs the same checks inside run(), so only the launcher of
        # N processes preflights: it must catch mistakes before N ranks each report them.
        if (spec.npus > 1 or spec.nnodes > 1) and "RANK" not in os.environ:
            return launch_distributed(spec, preflight(spec), spec_file)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    try:
        with sole_trainer(spec.output, int(os.environ.get("RANK", "0"))):
            return main_worker(spec)
    except TrainerBusy as exc:  # not the job's input: another attempt's trainer still runs; try again later
        print(f"busy: {one_line(exc)}", file=sys.stderr)
        return BUSY_EXIT
    except UserError as exc:  # its folder cannot be written
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
