"""The job registry, worker capacities and device leases, in Redis.

Why a registry and not just Celery's messages: a worker killed outright
leaves its message unacknowledged until the visibility timeout (longer than
the longest job), so its job would wait hours. Here every running job
heartbeats (a key with a TTL); a live worker's sweep finds jobs whose
heartbeat expired and queues them again, counting attempts. Devices are
leased the same way: a lease is a key with a TTL renewed by the job's
heartbeat, so a crashed worker's leases free themselves.

Keys (prefix `facenet:`):
  job:<id>            hash: id, kind, status, spec (JSON), created, updated, started, finished,
                      attempts, claimed (an attempt holds or held it), progress (JSON), mlflow_run_id, checkpoint, output, error, worker,
                      host, device_type, npus, queue, cancel_requested, result (JSON), ...
  job:<id>:hb         owner token of the attempt running it, TTL = heartbeat TTL
  job:<id>:log        list of the trainer's log lines (the last LOG_LINES)
  job:<id>:started    preprocessing stages in flight ("plan", "shard:<i>", "finalize"), each entered only in
                      the job state that calls for it (see _FIT)
  job:<id>:hb:<stage> owner token of the task running that stage, TTL = heartbeat TTL
  job:<id>:shards     indices of finished shards (the fan-in: the last one sends finalize)
  job:<id>:deliveries times each preprocessing stage was started (a stage that kills its worker process
                      every time fails the job after a bound instead of looping)
  jobs                sorted set of job ids by creation time
  jobs:active         ids of jobs not yet ended (what the sweep looks at, however many jobs are older)
  worker:<node>       JSON capacity of a live worker, TTL = heartbeat TTL
  lease:<node>:<dev>  "<job id>:<attempt token>" holding that device, TTL = heartbeat TTL

An ended job's keys expire after the retention (FACENET_JOB_RETENTION_DAYS); the sweep drops ids of
expired jobs from `jobs` and trims the history to FACENET_JOB_HISTORY ended jobs.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import redis

from facenet.errors import UserError

PREFIX = "facenet:"
# What `create` makes (12 hex digits); anything else naming a job (a message, a record) is not ours.
JOB_ID = re.compile(r"[0-9a-f]{12}")
LOG_LINES = 5000

QUEUED, PREPROCESSING, RUNNING = "QUEUED", "PREPROCESSING", "RUNNING"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
JSON_FIELDS = ("spec", "progress", "result", "devices", "params", "dataset", "nodes")

# Whether job KEYS[job] is in the state a stage acts in, the one place that says so (a forged message of the right
# shape, or one from the past, must not act in any other):
#   plan           a preprocessing job, or the preprocessing stage of a train job (--preprocess-from), not yet planned
#   shard <i>      a planned preprocessing job whose plan made shard i, not yet finished
#   finalize       a planned preprocessing job whose every shard is recorded (the fan-in's last shard sends it)
#   train          a train job QUEUED (by submit, finalize or a requeue: never claimed since), and with
#                  --preprocess-from only once its preprocessing finished
#   preprocessing  still preprocessing, no trainer can hold it: what a stage's failure, a cancel or progress writes in
# Returns {verdict, why}: 'ok'; 'gone' (no such job, or it ended); 'again' (done already: a redelivery); 'unfit'.
_FIT = """
local function set(v) return v and v ~= '' end
local function fit(job, shards, stage, index)
  local f = redis.call('HMGET', job, 'status', 'kind', 'preprocess_from', 'plan_id', 'shards', 'preprocessed',
                       'claimed')
  local status, kind, raw, plan, total, done, claimed = f[1], f[2], f[3], f[4], tonumber(f[5]) or 0, f[6], f[7]
  if not status then return {'gone', 'no such job'} end
  if status == 'SUCCEEDED' or status == 'FAILED' or status == 'CANCELLED' then
    return {'gone', 'it ended ' .. status}
  end
  if stage == 'train' then
    if kind ~= 'train' then return {'unfit', 'it is a ' .. tostring(kind) .. ' job, not a train job'} end
    if status ~= 'QUEUED' then return {'unfit', 'it is ' .. status .. ', not QUEUED'} end
    if set(raw) and not set(done) then return {'unfit', 'its preprocessing has not finished'} end
    if claimed == '1' then return {'unfit', 'a lost attempt still has it claimed (the sweep queues it again)'} end
    return {'ok', ''}
  end
  if status ~= 'PREPROCESSING' or set(done) or not set(raw) then
    return {'unfit', 'it is ' .. status .. (set(done) and ' after its preprocessing' or '') .. ', not preprocessing'}
  end
  if stage == 'preprocessing' then return {'ok', ''} end
  if stage == 'plan' then
    if set(plan) then return {'again', 'it is planned already'} end
    return {'ok', ''}
  end
  if not set(plan) or total < 1 then return {'unfit', 'it is not planned yet'} end
  if stage == 'shard' then
    if tonumber(index) >= total then return {'unfit', 'its plan made ' .. total .. ' shard(s)'} end
    if redis.call('SISMEMBER', shards, index) == 1 then return {'again', 'shard ' .. index .. ' is finished'} end
    return {'ok', ''}
  end
  if stage == 'finalize' then
    local n = redis.call('SCARD', shards)
    if n < total then return {'unfit', 'only ' .. n .. ' of its ' .. total .. ' shards are finished'} end
    return {'ok', ''}
  end
  return {'unfit', 'no stage ' .. stage}
end
"""

# Write a job's fields; a write that sets a status is refused once the job has ended (a late result must
# not turn a cancelled job into a succeeded one), and a write made for an attempt (ARGV[4], its token) is
# refused unless that attempt still holds the job's heartbeat: an attempt that lost its claim (a stall longer
# than the TTL, a sweeper requeued the job, another attempt took it) writes nothing. A write for a stage (ARGV[5])
# lands only while the job is in that stage's state (_FIT), checked in the same step. Ending a job takes it off
# the active set and starts the expiry of its keys. KEYS: job hash, active set, heartbeat, shards set, the job's
# other keys; ARGV: id, new status or '', retention seconds, attempt token or '', stage or '', field/value pairs.
# Returns 1 written, 0 the job had ended, -1 no such job, -2 not the holder, -3 not in the stage's state.
_UPDATE = _FIT + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return -1 end
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4] then return -2 end
if ARGV[5] ~= '' and fit(KEYS[1], KEYS[4], ARGV[5], '0')[1] ~= 'ok' then return -3 end
local ended = {SUCCEEDED=true, FAILED=true, CANCELLED=true}
if ARGV[2] ~= '' and ended[cur] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
if ended[ARGV[2]] then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  for i = 4, #KEYS do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[3])) end
end
return 1
"""

# Start a preprocessing stage (the task's delivery) only in the job state that calls for it, in one step with the
# check: count the start, mark it in flight and set its heartbeat. A cancel asked meanwhile is returned instead
# (the task ends the job). KEYS: job hash, shards set, stages in flight, the stage's heartbeat, deliveries;
# ARGV: stage ('plan', 'shard', 'finalize'), shard index, stage key ('shard:<i>'), token, ttl.
# Returns {verdict, why, starts}: verdict 'ok', 'cancel' or what _FIT said.
_STAGE_ENTER = _FIT + """
local v = fit(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if v[1] == 'gone' or v[1] == 'unfit' then return {v[1], v[2], 0} end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return {'cancel', 'a cancel was asked', 0} end
if v[1] ~= 'ok' then return {v[1], v[2], 0} end
-- Two copies of a plan message (a sweep's resend racing a slow submitter) must not both plan: a second plan may
-- choose other shards and remove the first's files. A plan in flight whose heartbeat lives takes the second copy.
if ARGV[3] == 'plan' and redis.call('SISMEMBER', KEYS[3], 'plan') == 1 and redis.call('EXISTS', KEYS[4]) == 1 then
  return {'again', 'another delivery is planning it', 0}
end
local n = redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[4], 'EX', tonumber(ARGV[5]))
return {'ok', '', n}
"""

# What _FIT says, read only (the reason a refused claim names). KEYS: job hash, shards set; ARGV: stage, index.
_MISFIT = _FIT + "return fit(KEYS[1], KEYS[2], ARGV[1], ARGV[2])"

# Claim a job for one attempt: refuse finished jobs, jobs another live attempt holds, and jobs not in the state a train
# message acts in (_FIT 'train': a forged message for a job that preprocesses, runs or is no train job); count
# attempts. KEYS: job hash, heartbeat, shards set; ARGV: token, ttl.
_CLAIM = _FIT + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status == 'SUCCEEDED' or status == 'FAILED' or status == 'CANCELLED' then return {'done', 0} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'busy', 0} end
if fit(KEYS[1], KEYS[3], 'train', '0')[1] ~= 'ok' then return {'unfit', 0} end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return {'cancel', 0} end
redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'claimed', '1')
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {'ok', attempts}
"""

# Move a claimed job back to QUEUED for its next attempt, exactly once: either the attempt holding it
# gives it up (ARGV[3] = its token; its heartbeat goes in the same step), or a sweeper finds the holder's
# heartbeat expired (ARGV[3] = ''). Several sweepers and the attempt itself may race; one wins.
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'claimed') ~= '1' then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'SUCCEEDED' or status == 'FAILED' or status == 'CANCELLED' then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'claimed', '0', 'updated', ARGV[1], 'message', ARGV[2])
redis.call('HDEL', KEYS[1], 'trainer_pid')
if holder then redis.call('DEL', KEYS[2]) end
return 1
"""

# A worker's registration goes when that worker stops, not when another process that took the same node name does:
# the registration holds its registrant's token (ARGV[1]), and only that token deletes it.
_UNREGISTER = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, info = pcall(cjson.decode, v)
if ok and type(info) == 'table' and info['token'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A worker's registration written for ARGV[2] seconds, whatever the key held (a value of another type, as anyone who
# can write to Redis may leave there, is removed: SET ... GET would refuse it, and the worker would stay unlisted).
# Returns {token, pid, host} of a registration of another token it replaced (each at most 64 characters), else nil.
_REGISTER = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local old = nil
if kind == 'string' then old = redis.call('GET', KEYS[1]) elseif kind ~= 'none' then redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if not old or string.len(old) > 65536 then return nil end
local ok, info = pcall(cjson.decode, old)
if not ok or type(info) ~= 'table' or type(info['token']) ~= 'string' or info['token'] == ARGV[3] then return nil end
local function short(v)
  if type(v) == 'string' or type(v) == 'number' then return string.sub(tostring(v), 1, 64) end
  return ''
end
return {short(info['token']), short(info['pid']), short(info['host'])}
"""

# A preprocessing shard finished: record it, and tell exactly one caller when the last one is in.
_SHARD_DONE = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[3], 'shard:' .. ARGV[1])
redis.call('DEL', KEYS[4])
local n = redis.call('SCARD', KEYS[1])
redis.call('HSET', KEYS[2], 'shards_done', n)
if n >= tonumber(ARGV[2]) and redis.call('HSETNX', KEYS[2], 'finalize_sent', '1') == 1 then return {n, 1} end
return {n, 0}
"""

# A started stage whose heartbeat expired: exactly one sweeper gets to send it again.
_STALLED = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('SREM', KEYS[1], ARGV[1])
"""

# Take N free devices of one worker at once, or none.
_LEASE = """
local want = tonumber(ARGV[1])
local free = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if not holder or holder == ARGV[2] then table.insert(free, i) end
end
if #free < want then return {} end
local got = {}
for j = 1, want do
  redis.call('SET', KEYS[free[j]], ARGV[2], 'EX', tonumber(ARGV[3]))
  table.insert(got, free[j] - 1)
end
return got
"""

# A gang: `want` devices on each of `nodes` workers, the first worker (the leader's own) among them, all at
# once or none at all, so a job waiting for a gang holds nothing another job could be waiting for (two gang
# jobs cannot deadlock). KEYS: every candidate worker's lease keys, worker after worker; ARGV: holder, ttl,
# want, nodes, then the number of keys of each worker. Returns, per chosen worker, its index then the
# positions of its leased keys, flattened with -1 after each worker; {} when the gang does not fit now.
_GANG_LEASE = """
local holder, ttl, want, nodes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local chosen, at = {}, 0
for w = 5, #ARGV do
  local n, free = tonumber(ARGV[w]), {}
  for i = 1, n do
    local h = redis.call('GET', KEYS[at + i])
    if not h or h == holder then table.insert(free, at + i) end
  end
  if #free >= want and #chosen < nodes then
    table.insert(chosen, {w - 5, free})
  elseif w == 5 then
    return {}
  end
  at = at + n
end
if #chosen < nodes then return {} end
local out = {}
for _, c in ipairs(chosen) do
  table.insert(out, c[1])
  for j = 1, want do
    redis.call('SET', KEYS[c[2][j]], holder, 'EX', ttl)
    table.insert(out, c[2][j])
  end
  table.insert(out, -1)
end
return out
"""

# Renew this attempt's heartbeat; one that expired while Redis was away (a restart that lost the key) is
# taken back, unless another attempt holds it now, the job ended, or it is no longer claimed: a sweeper that
# found the heartbeat gone requeued it (its next attempt's message is on its way), so this attempt has lost it.
# 1: renewed or taken back; 0: lost. KEYS: hb key, job hash; ARGV: token, ttl.
_BEAT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2])) return 1 end
if holder then return 0 end
if redis.call('HGET', KEYS[2], 'claimed') ~= '1' then return 0 end
local status = redis.call('HGET', KEYS[2], 'status')
if not status or status == 'SUCCEEDED' or status == 'FAILED' or status == 'CANCELLED' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return 1
"""

# Keep leases: renewed while they hold ARGV[1], taken back when they expired (Redis was away) and nobody
# took the device meanwhile; returns how many this holder has now.
_HOLD = """
local n = 0
for _, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == ARGV[1] then
    redis.call('EXPIRE', key, tonumber(ARGV[2]))
    n = n + 1
  elseif not holder then
    redis.call('SET', key, ARGV[1], 'EX', tonumber(ARGV[2]))
    n = n + 1
  end
end
return n
"""

# A gang's assignment of one node (gang.py: JSON naming the leader's lease holder): set only while the leader's
# attempt holds the job's heartbeat, renewed or deleted only for the holder it names, each in one step (a stale
# leader's late write can neither evict another gang's part nor keep it alive). KEYS: assignment key, the job's
# heartbeat key; ARGV: 'set' | 'renew' | 'drop', holder, attempt token, ttl, value.
_ASSIGNMENT = """
if ARGV[1] == 'set' then
  if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
  redis.call('SET', KEYS[1], ARGV[5], 'EX', tonumber(ARGV[4]))
  return 1
end
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local ok, a = pcall(cjson.decode, raw)
if not ok or type(a) ~= 'table' or a['holder'] ~= ARGV[2] then return 0 end
if ARGV[1] == 'renew' then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4])) else redis.call('DEL', KEYS[1]) end
return 1
"""

# Write a new job's record, its message ids and its place in the job lists, only when no record of that id exists:
# a client that writes it again (its first reply never came) must not undo what happened since (a claim, a cancel).
# KEYS: job hash, jobs zset, active set, tasks hash; ARGV: id, created, task_id, number of record items, record
# field/value pairs, then stage/message id pairs. Returns 1 written, 0 written before (same task_id), -1 another job.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'task_id') == ARGV[3] then return 0 end
  return -1
end
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + n))
if #ARGV > 4 + n then redis.call('HSET', KEYS[4], unpack(ARGV, 5 + n)) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# Renew (or drop) keys only while they still hold this job.
_RENEW = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    if ARGV[2] == '0' then redis.call('DEL', key) else redis.call('EXPIRE', key, tonumber(ARGV[2])) end
    n = n + 1
  end
end
return n
"""


def call_timeout(heartbeat_ttl: float) -> float:
    """The longest one registry call may wait for Redis: a tenth of the heartbeat TTL (3 s at the default 30),
    between 1 and 5 s (a loaded 2-core host once took 0.6 s to answer). A heartbeat that waits longer could not
    renew a lease before the attempt's own fence deadline (LEASE_SAFETY x TTL) anyway, and a stalled Redis (port
    open, no answer) must not hold a caller for a whole TTL: that is how a job once ran twice."""
    return min(5.0, max(1.0, heartbeat_ttl / 10))


def connect(url: str, timeout: float = 5.0, call_seconds: float = 30.0) -> redis.Redis:
    """A client of the Redis at `url`: `timeout` to connect, `call_seconds` for each reply, and no retries
    (redis-py 6+ retries a timed-out call up to 10 times by default, which multiplies every timeout: the
    callers retry when they want to, on their own deadline)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=min(timeout, call_seconds),
                                socket_timeout=call_seconds, retry=Retry(NoBackoff(), 0),
                                health_check_interval=30)


def registry_at(url: str, heartbeat_ttl: int = 30, retention_seconds: int = 30 * 86400,
                timeout: float = 5.0, call_seconds: float | None = None) -> "Registry":
    """The one way a process opens a registry: the Redis at `url` (nothing is sent yet), each call bounded by
    `call_seconds`, by default call_timeout(heartbeat_ttl)."""
    return Registry(connect(url, timeout, call_seconds or call_timeout(heartbeat_ttl)), heartbeat_ttl,
                    retention_seconds)


# A client (facenet-cli, a script) holds no lease, so nothing of it expires while it waits: it waits this long for a
# reply before it gives up (a stalled fsync-always Redis took over a second here), where a worker's heartbeat must
# give up within call_timeout(ttl).
CLIENT_CALL_SECONDS = 10.0


def registry_for(settings, timeout: float = 5.0, client: bool = False) -> "Registry":
    """The registry of `settings` (services.config.Settings): its Redis, heartbeat TTL and job retention; `client`:
    for a process that holds no lease (each call may wait CLIENT_CALL_SECONDS)."""
    calls = max(call_timeout(settings.heartbeat_ttl), CLIENT_CALL_SECONDS) if client else None
    return registry_at(settings.redis_url, settings.heartbeat_ttl, settings.job_retention_seconds, timeout, calls)


def unreachable(url_display: str, exc: BaseException) -> UserError:
    what = "wrong Redis password" if isinstance(exc, redis.AuthenticationError) else type(exc).__name__
    return UserError(f"Redis at {url_display} is unreachable ({what}); start the stack with "
                     "`facenet-cli stack up` or point FACENET_REDIS_URL at yours")


ACTIVE_KEY = f"{PREFIX}jobs:active"
JOB_SUBKEYS = (":log", ":log:n", ":started", ":shards", ":resends", ":deliveries", ":tasks")


class Registry:
    def __init__(self, client: redis.Redis, heartbeat_ttl: int = 30, retention_seconds: int = 30 * 86400):
        self.r = client
        self.ttl = heartbeat_ttl
        self.retention = retention_seconds
        self._create = client.register_script(_CREATE)
        self._update = client.register_script(_UPDATE)
        self._stage_enter = client.register_script(_STAGE_ENTER)
        self._misfit = client.register_script(_MISFIT)
        self._claim = client.register_script(_CLAIM)
        self._requeue = client.register_script(_REQUEUE)
        self._register = client.register_script(_REGISTER)
        self._unregister = client.register_script(_UNREGISTER)
        self._lease = client.register_script(_LEASE)
        self._gang_lease = client.register_script(_GANG_LEASE)
        self._renew = client.register_script(_RENEW)
        self._beat = client.register_script(_BEAT)
        self._hold = client.register_script(_HOLD)
        self._shard_done = client.register_script(_SHARD_DONE)
        self._stalled = client.register_script(_STALLED)
        self._assignment = client.register_script(_ASSIGNMENT)

    # ---- jobs -------------------------------------------------------------------------------------
    @staticmethod
    def key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:12]

    def create(self, kind: str, fields: dict, job_id: str | None = None, tasks: dict | None = None) -> str:
        """Write a new job's record in one step (_CREATE; QUEUED unless `fields` says otherwise); `tasks`: stage ->
        the id of the message about to be sent for it. With `job_id` chosen by the caller, writing it again (after a
        reply that never came) changes nothing, whatever happened to the job since; an id another job holds (another
        task_id) is refused."""
        job_id = job_id or self.new_id()
        now = time.time()
        record = {"id": job_id, "kind": kind, "status": QUEUED, "created": now, "updated": now, "attempts": 0,
                  "cancel_requested": 0, **fields}
        k = self.key(job_id)
        pairs = [x for kv in _encode(record).items() for x in kv]
        tasks = [x for kv in (tasks or {}).items() for x in kv]
        made = self._create(keys=[k, f"{PREFIX}jobs", ACTIVE_KEY, k + ":tasks"],
                            args=[job_id, now, str(record.get("task_id", "")), len(pairs), *pairs, *tasks])
        if made == -1:
            raise UserError(f"job id {job_id} is taken by another job")
        return job_id

    def get(self, job_id: str) -> dict | None:
        raw = self.r.hgetall(self.key(job_id))
        return _decode(raw) if raw else None

    def find(self, prefix: str) -> dict:
        """A job by its id or a unique prefix of it (UserError otherwise)."""
        job = self.get(prefix)
        if job:
            return job
        matches = [j for j in self.r.zrange(f"{PREFIX}jobs", 0, -1) if j.startswith(prefix)] if prefix else []
        if len(matches) == 1:
            return self.get(matches[0])
        if not matches:
            raise UserError(f"no job {prefix!r} (see `facenet-cli jobs`)")
        raise UserError(f"job id {prefix!r} is ambiguous: {', '.join(matches[:5])}")

    def update(self, job_id: str, token: str = "", when: str = "", **fields) -> bool:
        """Write fields; False (nothing written) when the write sets a status and the job already ended, the job
        does not exist, `token` (an attempt's, when it writes) no longer holds the job's heartbeat, or `when` (a
        stage: 'plan', 'finalize', 'preprocessing') names a state the job is not in (checked in the same step)."""
        fields["updated"] = time.time()
        status = fields.get("status") or ""
        k = self.key(job_id)
        pairs = [x for kv in _encode(fields).items() for x in kv]
        return self._update(keys=[k, ACTIVE_KEY, k + ":hb", k + ":shards"] + [k + sub for sub in JOB_SUBKEYS],
                            args=[job_id, status, self.retention, token, when, *pairs]) == 1

    def active_ids(self) -> list[str]:
        if self.r.set(ACTIVE_KEY + ":seeded", 1, nx=True):  # once per Redis: jobs from before the set existed
            ids = self.r.zrange(f"{PREFIX}jobs", 0, -1)
            live = [j["id"] for j in self.jobs_by_id(ids) if j["status"] not in TERMINAL]
            if live:
                self.r.sadd(ACTIVE_KEY, *live)
        return sorted(self.r.smembers(ACTIVE_KEY))

    def jobs(self, limit: int = 50) -> list[dict]:
        return self.jobs_by_id(self.r.zrevrange(f"{PREFIX}jobs", 0, limit - 1))

    def jobs_by_id(self, ids: list[str]) -> list[dict]:
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.hgetall(self.key(job_id))
        return [_decode(raw) for raw in pipe.execute() if raw]

    def finish(self, job_id: str, status: str, token: str = "", when: str = "", **fields) -> bool:
        """End the job (once: False when it had already ended, `token` no longer holds it, or it is not in the
        state of stage `when`, and nothing is written)."""
        return self.update(job_id, token, when, status=status, finished=time.time(), **fields)

    def prune(self, keep: int) -> int:
        """Drop ids of expired jobs from the history and end the oldest ended jobs beyond `keep`; returns
        how many ids were removed."""
        ids = self.r.zrange(f"{PREFIX}jobs", 0, -1)
        if not ids:
            return 0
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.hget(self.key(job_id), "status")
        statuses = pipe.execute()
        gone = [j for j, st in zip(ids, statuses) if st is None]
        ended = [j for j, st in zip(ids, statuses) if st in TERMINAL]
        extra = ended[:max(0, len(ended) - keep)]  # oldest first
        if gone or extra:
            pipe = self.r.pipeline()
            pipe.zrem(f"{PREFIX}jobs", *(gone + extra))
            for job_id in extra:
                pipe.delete(self.key(job_id), *(self.key(job_id) + sub for sub in JOB_SUBKEYS))
            pipe.execute()
        return len(gone) + len(extra)

    # ---- one attempt's liveness --------------------------------------------------------------------
    def claim(self, job_id: str, token: str) -> tuple[str, int]:
        """(state, attempts): 'ok' and the attempt's number, else 'missing', 'done' (ended), 'busy' (another attempt
        holds it), 'unfit' (not a train job waiting for an attempt: `misfit(job_id, 'train')` says why) or
        'cancel' (asked, and no attempt holds it), with 0."""
        k = self.key(job_id)
        state, attempts = self._claim(keys=[k, k + ":hb", k + ":shards"], args=[token, self.ttl])
        return state, int(attempts)

    def misfit(self, job_id: str, stage: str, index: int = 0) -> tuple[str, str]:
        """Whether the job is in the state `stage` acts in, read only: ('ok', ''), else ('gone' | 'again' | 'unfit',
        why). A stage's own check goes with its transition (stage_enter, claim, update's `when`); this one says why."""
        k = self.key(job_id)
        verdict, why = self._misfit(keys=[k, k + ":shards"], args=[stage, str(index)])
        return verdict, why

    def heartbeat(self, job_id: str, token: str) -> bool:
        """Renew this attempt's heartbeat (taking it back if it lapsed while Redis was away); False if another
        attempt took the job over or the job ended."""
        return bool(self._beat(keys=[self.key(job_id) + ":hb", self.key(job_id)], args=[token, self.ttl]))

    def release(self, job_id: str, token: str) -> None:
        self._renew(keys=[self.key(job_id) + ":hb"], args=[token, 0])

    def alive(self, job_id: str) -> bool:
        return bool(self.r.exists(self.key(job_id) + ":hb"))

    def requeue(self, job_id: str, message: str, token: str = "") -> bool:
        """Put claimed job `job_id` back to QUEUED; True for exactly one caller. `token`: the attempt token of
        the attempt giving the job up; '' for a sweeper, which wins only once that attempt stopped heartbeating."""
        return bool(self._requeue(keys=[self.key(job_id), self.key(job_id) + ":hb"],
                                  args=[time.time(), message, token]))

    def request_cancel(self, job_id: str) -> None:
        self.update(job_id, cancel_requested=1)

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.key(job_id), "cancel_requested") == "1"

    # ---- preprocessing stages -----------------------------------------------------------------------
    # Shards fan in here rather than in a Celery chord: a chord cannot recover a shard whose worker was
    # killed (its message waits out the visibility timeout, days), while a stage that stops
    # heartbeating here is found by the sweep and sent again.
    def stage_enter(self, job_id: str, stage: str, token: str, index: int = 0) -> tuple[str, str, int]:
        """Start `stage` ('plan', 'shard' number `index`, 'finalize') of job `job_id` for the task holding `token`, only
        when the job is in the state that calls for it, checked in the same step: (verdict, why, starts). 'ok': it is
        started (in flight, heartbeating from now) and counted (`starts`: how many times it was started, this one
        included); 'cancel': a cancel was asked; 'gone', 'again' (done already) or 'unfit' (see _FIT): nothing is
        written."""
        name = f"shard:{index}" if stage == "shard" else stage
        k = self.key(job_id)
        verdict, why, starts = self._stage_enter(
            keys=[k, k + ":shards", k + ":started", k + f":hb:{name}", k + ":deliveries"],
            args=[stage, str(index), name, token, self.ttl])
        return verdict, why, int(starts)

    def stage_beat(self, job_id: str, stage: str, token: str) -> bool:
        return bool(self._renew(keys=[self.key(job_id) + f":hb:{stage}"], args=[token, self.ttl]))

    def stage_end(self, job_id: str, stage: str) -> None:
        pipe = self.r.pipeline()
        pipe.srem(self.key(job_id) + ":started", stage)
        pipe.delete(self.key(job_id) + f":hb:{stage}")
        pipe.execute()

    def shard_done(self, job_id: str, index: int, total: int) -> tuple[int, bool]:
        """Record shard `index` finished; (shards done, whether this caller sends finalize)."""
        k = self.key(job_id)
        n, last = self._shard_done(keys=[k + ":shards", k, k + ":started", k + f":hb:shard:{index}"],
                                   args=[index, total])
        return int(n), bool(last)

    def stalled_stages(self, job_id: str) -> list[str]:
        """Stages in flight whose task stopped heartbeating; each is returned to exactly one caller."""
        k = self.key(job_id)
        return [st for st in sorted(self.r.smembers(k + ":started"))
                if self._stalled(keys=[k + ":started", k + f":hb:{st}"], args=[st])]

    # ---- logs --------------------------------------------------------------------------------------
    def append_log(self, job_id: str, lines: list[str]) -> None:
        if not lines:
            return
        key = self.key(job_id) + ":log"
        pipe = self.r.pipeline()
        pipe.rpush(key, *lines)
        pipe.ltrim(key, -LOG_LINES, -1)
        pipe.incrby(key + ":n", len(lines))
        pipe.execute()

    def read_log(self, job_id: str, since: int = 0) -> tuple[list[str], int]:
        """Lines after the first `since` ever written, and the new total (for `logs -f`)."""
        key = self.key(job_id) + ":log"
        total = int(self.r.get(key + ":n") or 0)
        kept = self.r.llen(key)
        first_kept = total - kept
        start = max(since, first_kept) - first_kept
        return self.r.lrange(key, start, -1), total

    # ---- workers and devices -----------------------------------------------------------------------
    def register_worker(self, node: str, info: dict) -> dict | None:
        """Write `node`'s registration (for the TTL) over whatever the key held; returns {token, pid, host} (text,
        64 characters at most) of the registration it replaced when that was another registrant's (a different
        token: two processes given one node name, or this node's previous process, killed), else None."""
        got = self._register(keys=[f"{PREFIX}worker:{node}"], args=[json.dumps(info), self.ttl, info.get("token", "")])
        return dict(zip(("token", "pid", "host"), got)) if got else None

    def unregister_worker(self, node: str, token: str) -> bool:
        """Remove `node`'s registration if it is still the one written with `token` (the caller's own); a worker
        started since under the same name keeps its own. True when it was removed."""
        return bool(self._unregister(keys=[f"{PREFIX}worker:{node}"], args=[token]))

    def workers(self) -> list[dict]:
        keys = sorted(self.r.scan_iter(f"{PREFIX}worker:*"))
        try:
            values = self.r.mget(keys) if keys else []
        except UnicodeDecodeError:  # a value that is not text: read them one at a time, skipping such values
            values = []
            for key in keys:
                try:
                    values.append(self.r.get(key))
                except UnicodeDecodeError:
                    continue
        out = []
        for v in values:
            try:
                info = json.loads(v) if v else None
            except (ValueError, RecursionError):  # not a registration of ours (anything can write to Redis)
                continue
            if isinstance(info, dict) and isinstance(info.get("node"), str):
                info.pop("token", None)  # the registrant's own, for its unregistering: nobody else's to show
                out.append(info)
        return out

    def lease_keys(self, node: str, devices: list[int]) -> list[str]:
        return [f"{PREFIX}lease:{node}:{d}" for d in devices]

    def lease(self, node: str, devices: list[int], n: int, holder: str) -> list[int]:
        """N devices of `node` for lease holder `holder` (<job id>:<attempt token>), all or none ([] when not
        enough are free)."""
        got = self._lease(keys=self.lease_keys(node, devices), args=[n, holder, self.ttl])
        return [devices[i] for i in got]

    def gang_lease(self, workers: list[tuple[str, list[int]]], want: int, nodes: int,
                   holder: str) -> list[tuple[str, list[int]]]:
        """`want` devices on each of `nodes` of `workers` ((node, device ids); the first is the leader's own and
        always in the gang), all at once or none: [(node, leased ids)] in gang order, or [] when it does not
        fit now (nothing is held then)."""
        keys = [k for node, devices in workers for k in self.lease_keys(node, devices)]
        flat = self._gang_lease(keys=keys, args=[holder, self.ttl, want, nodes, *[len(d) for _, d in workers]])
        gang, offsets = [], [0]
        for _, devices in workers:
            offsets.append(offsets[-1] + len(devices))
        current: list = []
        for value in flat:
            if value == -1:
                w = current[0]
                node, devices = workers[w]
                gang.append((node, [devices[k - 1 - offsets[w]] for k in current[1:]]))
                current = []
            else:
                current.append(int(value))
        return gang

    def renew_leases(self, node: str, devices: list[int], holder: str, drop: bool = False) -> int:
        """Renew (taking back lapsed ones nobody took) or drop `holder`'s leases; how many it holds(held)."""
        if drop:
            return int(self._renew(keys=self.lease_keys(node, devices), args=[holder, 0]))
        return int(self._hold(keys=self.lease_keys(node, devices), args=[holder, self.ttl]))

    def assignment(self, op: str, key: str, holder: str, value: str = "") -> bool:
        """A gang assignment at `key` for lease holder `holder` (<job id>:<attempt token>): 'set' to `value` while
        that attempt holds its job, 'renew' or 'drop' only while the assignment names it. True when done."""
        job_id, _, token = holder.partition(":")
        return bool(self._assignment(keys=[key, self.key(job_id) + ":hb"], args=[op, holder, token, self.ttl, value]))

    def leases(self, node: str, devices: list[int]) -> dict[int, str | None]:
        values = self.r.mget(self.lease_keys(node, devices)) if devices else []
        return dict(zip(devices, values))


def _encode(fields: dict) -> dict:
    out = {}
    for k, v in fields.items():
        if k in JSON_FIELDS:
            out[k] = json.dumps(v)
        elif v is None:
            out[k] = ""
        elif isinstance(v, bool):
            out[k] = int(v)
        else:
            out[k] = v
    return out


def _decode(raw: dict) -> dict:
    out: dict = {}
    for k, v in raw.items():
        if k in JSON_FIELDS:
            out[k] = json.loads(v) if v else None
        elif k in ("created", "updated", "started", "finished", "trainer_started", "preprocessed"):
            out[k] = float(v) if v else None
        elif k in ("attempts", "npus", "cancel_requested", "shards"):
            out[k] = int(v) if v else 0
        else:
            out[k] = v if v != "" else None
    return out
