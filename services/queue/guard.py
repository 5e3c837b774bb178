"""The worker's gate on its task queues: only our own well-formed task messages reach Celery.

Anyone who can write to Redis can push any item onto a queue. kombu and Celery trust what they pop: a
non-JSON item or an envelope of the wrong shape raises out of the worker's main loop ("Unrecoverable
error"), an envelope popped before it fails is restored on the way down, so the worker dies again on
every start; a `compression` header makes kombu inflate the body before anything looks at it; the
whole arguments travel into the error, the log and the result backend; Celery's own tasks, and our
tasks on the wrong queue, run. So the worker's Redis channel checks each raw item it pops from one of
our task queues before kombu decodes it, and drops (logs in one line, never delivers, never restores)
anything that is not one of our tasks, for that queue, with the arguments that task takes. Items on
other queues (kombu's and Celery's own) pass as they are; remote-control broadcasts, which reach every
worker at once, must be envelopes kombu can build a Message of.

Workers use it through `broker_transport` (services/queue/app.py); the rest of kombu is unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from queue import Empty

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from facenet.errors import clipped
from services.config import DEVICE_TYPES
from services.queue.names import PREPROCESS_QUEUE, train_queue, unfit_queue
from services.queue.tasks import BadMessage, _check_args, finalize_dataset, plan_dataset, preprocess_shard, train

# Our messages are about 1 KB (a job id and a shard index); a plan travels in a file, never in a message.
MAX_MESSAGE_BYTES = 1 << 20
PREFIX_BYTES = 40  # of a dropped item, shown escaped in its log line

# Task name -> how many arguments it takes (its job id, then a shard index).
PREPROCESS_TASKS = {plan_dataset.name: 1, preprocess_shard.name: 2, finalize_dataset.name: 1}
TRAIN_TASKS = {train.name: 1}

_UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}")  # celery.utils.uuid, or its hex
ENVELOPE_KEYS = {"body", "content-encoding", "content-type", "headers", "properties"}
EMBED_KEYS = {"callbacks", "errbacks", "chain", "chord"}  # all None: our tasks are sent alone, never linked

log = logging.getLogger(__name__)


def tasks_for(queue: str) -> dict[str, int] | None:
    """The tasks (name -> argument count) queue `queue` carries; None when it is not a task queue of ours."""
    if queue == PREPROCESS_QUEUE:
        return PREPROCESS_TASKS
    if queue in {train_queue(t) for t in DEVICE_TYPES}:
        return TRAIN_TASKS
    if queue in {unfit_queue(t) for t in DEVICE_TYPES} or queue.startswith(train_queue("")):
        return {}  # a failed doctor's queue, which nothing sends to; a device type we do not know
    return None


def _shown(value) -> str:
    return clipped(repr(value), 48)


def _none_or_uuid(value) -> bool:
    return value is None or isinstance(value, str) and bool(_UUID.fullmatch(value))


def _small_int(value, top: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top


# Task name -> its own (hard, soft) time limits: Celery takes a message's limits over the task's
# (celery@v5.7.0:celery/worker/request.py Request.__init__ and time_limits), so a message may lower them, never
# lift them past FACENET_STAGE_TIME_LIMIT (or give the trainer, which has none, one).
TASK_LIMITS = {t.name: (t.time_limit, t.soft_time_limit) for t in (plan_dataset, preprocess_shard, finalize_dataset,
                                                                    train)}


def _time_limits(value, task: str) -> bool:
    """[hard, soft] seconds, each None (the task's own) or a positive number at most the task's own limit: a
    task sent from inside a worker carries its own limits (STAGE_LIMITS in services/queue/tasks.py), one sent
    elsewhere none."""
    def seconds(v, top):
        return v is None or top is not None and isinstance(v, (int, float)) and not isinstance(v, bool) \
            and 0 < v <= top
    caps = TASK_LIMITS.get(task, (None, None))
    return isinstance(value, list) and len(value) == 2 and all(seconds(v, top) for v, top in zip(value, caps))


# Celery 5's protocol-2 headers (celery@v5.7.0:celery/app/amqp.py as_task_v2) and what ours hold; kombu
# adds `redelivered` when it restores a message (kombu@v5.7.0:kombu/transport/redis.py _do_restore_message).
HEADER_CHECKS = {
    "lang": lambda v: v == "py",
    "task": lambda v: isinstance(v, str),
    "id": lambda v: isinstance(v, str) and bool(_UUID.fullmatch(v)),
    "root_id": _none_or_uuid, "parent_id": _none_or_uuid, "group": _none_or_uuid,
    "shadow": lambda v: v is None, "eta": lambda v: v is None, "expires": lambda v: v is None,
    "group_index": lambda v: v is None, "stamped_headers": lambda v: v is None, "stamps": lambda v: v == {},
    "ignore_result": lambda v: v is None or isinstance(v, bool),
    "retries": lambda v: _small_int(v, 100),
    "timelimit": lambda v: isinstance(v, list),  # checked against the task's own limits in _check_headers
    "replaced_task_nesting": lambda v: v == 0,
    "argsrepr": lambda v: isinstance(v, str), "kwargsrepr": lambda v: isinstance(v, str),  # rewritten below
    "origin": lambda v: isinstance(v, str) and len(v) <= 255,
    "redelivered": lambda v: isinstance(v, bool),
}


def _check_headers(headers, tasks: dict[str, int], queue: str) -> int:
    """The checked headers' task's argument count; BadMessage naming the first bad header."""
    if not isinstance(headers, dict):
        raise BadMessage(f"headers are {type(headers).__name__}, not an object")
    unknown = sorted(set(headers) - set(HEADER_CHECKS))
    if "compression" in headers:
        raise BadMessage("it is compressed (kombu would inflate it before any check)")
    if unknown:
        raise BadMessage(f"unknown header {_shown(unknown[0])}")
    for key in ("lang", "task", "id"):
        if key not in headers:
            raise BadMessage(f"no {key!r} header")
    for key, value in headers.items():
        if not HEADER_CHECKS[key](value):
            raise BadMessage(f"header {key!r} is {_shown(value)}")
    if headers["task"] not in tasks:
        raise BadMessage(f"task {_shown(headers['task'])} is not one queue {queue!r} carries")
    if "timelimit" in headers and not _time_limits(headers["timelimit"], headers["task"]):
        raise BadMessage(f"header 'timelimit' is {_shown(headers['timelimit'])}, past the task's own "
                         f"{list(TASK_LIMITS[headers['task']])}")
    return tasks[headers["task"]]


def _check_properties(props, queue: str) -> None:
    if not isinstance(props, dict):
        raise BadMessage(f"properties are {type(props).__name__}, not an object")
    allowed = {"correlation_id", "reply_to", "delivery_mode", "delivery_info", "priority", "body_encoding",
               "delivery_tag"}
    unknown = sorted(set(props) - allowed)
    if unknown:
        raise BadMessage(f"unknown property {_shown(unknown[0])}")
    if props.get("body_encoding") != "base64":
        raise BadMessage(f"body_encoding is {_shown(props.get('body_encoding'))}, not 'base64'")
    if not isinstance(props.get("delivery_tag"), str) or not _UUID.fullmatch(props["delivery_tag"]):
        raise BadMessage(f"delivery_tag is {_shown(props.get('delivery_tag'))}")
    if not _none_or_uuid(props.get("correlation_id")) or not isinstance(props.get("reply_to", ""), str) \
            or len(props.get("reply_to", "")) > 255:
        raise BadMessage("correlation_id or reply_to is not an id")
    if not _small_int(props.get("priority", 0), 255) or props.get("delivery_mode", 2) not in (1, 2):
        raise BadMessage(f"priority {_shown(props.get('priority'))} or delivery_mode "
                         f"{_shown(props.get('delivery_mode'))} is out of range")
    info = props.get("delivery_info")
    # A worker that dies under a message restores it to its routing key: it must be the queue it came from.
    if not isinstance(info, dict) or set(info) - {"exchange", "routing_key", "redelivered"} \
            or info.get("exchange") not in ("", queue) or info.get("routing_key") != queue:
        raise BadMessage(f"delivery_info {_shown(info)} does not route to {queue!r}")


def _check_body(body, arity: int) -> list:
    """The task's arguments from a base64 protocol-2 body `[args, {}, embed]`; BadMessage otherwise."""
    if not isinstance(body, str):
        raise BadMessage(f"body is {type(body).__name__}, not base64 text")
    try:
        decoded = json.loads(base64.b64decode(body, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMessage(f"body is not base64 JSON ({type(exc).__name__})") from None
    if not isinstance(decoded, list) or len(decoded) != 3:
        raise BadMessage(f"body is {_shown(decoded)}, not [args, kwargs, embed]")
    args, kwargs, embed = decoded
    if not isinstance(args, list) or len(args) != arity:
        raise BadMessage(f"args {_shown(args)} are not the task's {arity}")
    if kwargs != {}:
        raise BadMessage(f"kwargs {_shown(kwargs)}: our tasks take none")
    if not isinstance(embed, dict) or set(embed) - EMBED_KEYS or any(v is not None for v in embed.values()):
        raise BadMessage(f"embed {_shown(embed)} links other work")
    try:
        _check_args(*args)
    except BadMessage:
        raise BadMessage(f"args {_shown(args)} are not a job id" + (" and a shard index" if arity == 2 else "")) \
            from None
    return args


def parse(item: bytes) -> dict:
    """Raw Redis item `item` as a kombu envelope (a JSON object of its five keys); BadMessage otherwise."""
    if len(item) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        envelope = json.loads(item.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMessage(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(envelope, dict) or set(envelope) != ENVELOPE_KEYS:
        raise BadMessage("not a kombu envelope (an object of body, content-encoding, content-type, headers, "
                         "properties)")
    return envelope


def check_envelope(queue: str, envelope: dict) -> dict:
    """`envelope`, popped from our task queue `queue`, once every part of it is what our own senders write;
    BadMessage naming the first part that is not. Its argsrepr/kwargsrepr (what the worker's events, hence
    Flower, show) are set from the checked arguments: a sender's own text is not trusted."""
    if envelope["content-type"] != "application/json" or envelope["content-encoding"] != "utf-8":
        raise BadMessage(f"content {_shown(envelope['content-type'])} in {_shown(envelope['content-encoding'])}, "
                         "not application/json in utf-8")
    arity = _check_headers(envelope["headers"], tasks_for(queue) or {}, queue)
    _check_properties(envelope["properties"], queue)
    args = _check_body(envelope["body"], arity)
    envelope["headers"].update(argsrepr=repr(args), kwargsrepr="{}")
    return envelope


def check(queue: str, item: bytes) -> dict:
    """The checked envelope of raw item `item` from our task queue `queue` (`parse`, then `check_envelope`)."""
    return check_envelope(queue, parse(item))


# The remote-control commands a broadcast may carry: the read-only ones that `celery inspect`, Flower's pages
# and the tests ask, and the event switches Flower sends. The rest (shutdown, revoke/terminate, pool_grow,
# autoscale, rate_limit, time_limit, add_consumer, ...) change a worker, and anyone who can write to Redis
# could send them: a job is cancelled with `facenet-cli cancel`, which goes through the job record.
BROADCAST_METHODS = {"ping", "stats", "active_queues", "registered", "scheduled", "active", "reserved", "revoked",
                     "conf", "report", "clock", "query_task", "heartbeat", "enable_events", "disable_events"}


def check_broadcast(envelope) -> None:
    """A remote-control broadcast (celery.pidbox, which every worker subscribes to): an envelope kombu can
    build a Message of, uncompressed, whose body is base64 JSON asking one of BROADCAST_METHODS; BadMessage
    otherwise."""
    if not isinstance(envelope, dict) or set(envelope) != ENVELOPE_KEYS:
        raise BadMessage("not a kombu envelope")
    headers, props = envelope["headers"], envelope["properties"]
    if not isinstance(headers, dict) or "compression" in headers:
        raise BadMessage("headers are not an object, or it is compressed")
    if envelope["content-type"] != "application/json" or not isinstance(envelope["body"], str) \
            or len(envelope["body"]) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"not JSON of at most {MAX_MESSAGE_BYTES} bytes")
    if not isinstance(props, dict) or props.get("body_encoding") != "base64" \
            or not isinstance(props.get("delivery_tag"), str) or not isinstance(props.get("delivery_info"), dict):
        raise BadMessage("properties are not kombu's (body_encoding base64, a delivery_tag, delivery_info)")
    try:  # kombu decodes the body when it builds the Message, outside any handler (a bad one kills the worker)
        body = json.loads(base64.b64decode(envelope["body"], validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMessage(f"body is not base64 JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict) or not isinstance(body.get("arguments", {}), dict):
        raise BadMessage(f"body {_shown(body)} is not a control command")
    if body.get("method") not in BROADCAST_METHODS:
        raise BadMessage(f"control command {_shown(body.get('method'))} is not a read-only one")


def _about(envelope: dict) -> str:
    """', task NAME id ID' of an envelope whose headers say so (shortened): what Flower's sent event shows."""
    headers = envelope.get("headers")
    if not isinstance(headers, dict):
        return ""
    return "".join(f", {key} {_shown(headers[key])}" for key in ("task", "id") if key in headers)


def admit(queue: str, item) -> dict | None:
    """`check`'s envelope, or None for an item it refuses, logged in one line (what is wrong, its size, the
    queue, its task and id, its first bytes escaped; never the rest of it). Items on other queues are decoded
    as kombu does."""
    if tasks_for(queue) is None:
        return loads(bytes_to_str(item))
    raw = item if isinstance(item, bytes) else str(item).encode("utf-8", "surrogateescape")
    about = ""
    try:
        envelope = parse(raw)
        about = _about(envelope)
        return check_envelope(queue, envelope)
    except BadMessage as exc:
        log.warning("facenet guard: dropped a message on queue %r (%d bytes%s): %s; it begins %s",
                    queue, len(raw), about, exc, repr(raw[:PREFIX_BYTES]))
        return None


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with entries of the unacked hash that kombu did not write dropped. It
    restores them (restore_visible at every worker start, restore_unacked at shutdown) with a `loads` in no
    handler (kombu@v5.7.0:kombu/transport/redis.py QoS.restore_by_tag): one forged entry killed every worker
    on every start, since the aborted transaction left it in place."""

    def restore_by_tag(self, tag, client=None, leftmost=False):
        try:
            return super().restore_by_tag(tag, client=client, leftmost=leftmost)
        except (TypeError, ValueError, RecursionError) as exc:
            log.warning("facenet guard: dropped an unacked entry %s: not a message kombu wrote (%s)",
                        _shown(bytes_to_str(tag)), type(exc).__name__)
            with self.channel.conn_or_acquire(client) as conn:
                self._remove_from_indices(tag, conn.pipeline()).execute()


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with `admit` between popping an item and building its Message. The two
    methods are kombu's own (kombu@v5.7.0:kombu/transport/redis.py Channel._brpop_read, Channel._get)
    with that one step added; a dropped item was popped and never entered the unacked hash, so there is
    nothing to acknowledge or restore."""

    QoS = QoS

    def _brpop_read(self, **options):
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # A ConnectionError: disconnect, so the next iteration reconnects.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = admit(dest, item)
            if payload is None:
                return False
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _get(self, queue):
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while True:
                    item = client.rpop(self._q_for_pri(queue, pri))
                    if not item:
                        break
                    payload = admit(queue, item)
                    if payload is not None:
                        self._maybe_update_queues_expire(client, queue)
                        return payload
            self._maybe_update_queues_expire(client, queue)
            raise Empty()


    def _receive_one(self, c):
        # kombu's (kombu@v5.7.0:kombu/transport/redis.py Channel._receive_one) decodes a pub/sub payload and
        # catches TypeError and ValueError only: a deeply nested one raised RecursionError out of every worker.
        try:
            return super()._receive_one(c)
        except RecursionError:
            log.warning("facenet guard: dropped a broadcast: not JSON (RecursionError)")
            return False  # nothing delivered (kombu's _receive calls this in a loop that does not catch Empty)

    def _restore(self, message, leftmost=False):
        # kombu@v5.7.0:kombu/transport/redis.py Channel._restore reads the message back from the unacked hash,
        # which anyone who can write to Redis can overwrite: a bad entry is dropped, not raised at shutdown.
        try:
            return super()._restore(message, leftmost)
        except (TypeError, ValueError, RecursionError) as exc:
            log.warning("facenet guard: dropped an unacked entry %s: not a message kombu wrote (%s)",
                        _shown(bytes_to_str(message.delivery_tag)), type(exc).__name__)
            with self.conn_or_acquire() as client:
                client.hdel(self.unacked_key, message.delivery_tag)

    def _deliver_fanout_message(self, message, exchange):
        # Broadcasts arrive over pub/sub, already decoded (kombu@v5.7.0:kombu/transport/redis.py
        # Channel._receive_one, which logs and skips one that is not JSON); one that is JSON of another shape
        # raised out of every worker at once.
        try:
            check_broadcast(message)
        except BadMessage as exc:
            log.warning("facenet guard: dropped a broadcast on %s: %s", _shown(exchange), exc)
            return False
        return super()._deliver_fanout_message(message, exchange)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the guarded Channel: same URL, password and options."""

    Channel = Channel
