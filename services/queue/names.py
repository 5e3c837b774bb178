"""The queue's names, which the app, the guard, the senders and the stack all take: the queues, the guarded
transport's import path, the task names. Task names are the wire format: a message queued by an older version
names its task by one of these strings, so they never change when code moves."""

from __future__ import annotations

PREPROCESS_QUEUE = "preprocess"

# What a worker's broker transport is (services.queue.app sets it on workers only).
TRANSPORT = "services.queue.guard:Transport"

PLAN_TASK = "facenet.plan_dataset"
SHARD_TASK = "facenet.preprocess_shard"
FINALIZE_TASK = "facenet.finalize_dataset"
TRAIN_TASK = "facenet.train"
NODE_TASK = "facenet.train_node"  # no Celery task: what Flower shows of another node's part of a gang


def train_queue(device_type: str) -> str:
    return f"train.{device_type}"


def unfit_queue(device_type: str) -> str:
    """Where a device worker whose doctor failed listens: nothing sends to it."""
    return f"unfit.{device_type}"
