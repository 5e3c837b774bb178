"""The chaos run, small: jobs through a real local stack while workers, trainers, Redis and MLflow are
killed under them, the links of two of its workers to Redis and MLflow freeze, slow down and lose half their
connections for longer than the heartbeat TTL, and well-formed messages of each of our stages are forged for jobs
in the wrong state (services/bench/chaos.py). Every forged message must be dropped; every real job must still succeed
once, in one MLflow run, with crops equal to an undisturbed run's; the poison job must fail with its reason; never two
trainers of one job alive at once; nothing may be left over."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, TEST_IMAGE_SIZE

pytestmark = pytest.mark.timeout(900)


def test_jobs_survive_killed_workers_trainers_redis_and_mlflow(tmp_path, sample_root):
    out = tmp_path / "chaos.json"
    # 3 epochs: the nine kinds of fault take ~130 s of the jobs' time here (partitions wait for a job training behind
    # the proxy); 2 epochs left ~50 s to spare on this host, too little on one twice as fast.
    proc = subprocess.run([sys.executable, "-m", "services.bench.chaos", "--seed", "5", "--jobs", "4", "--timeout", "480",
                           "--epochs", "3", "--fault-gap", "1", "4", "--mlflow-outage", "20", "30", "--out", str(out),
                           "--workdir", str(tmp_path / "work"), "--sample-root", sample_root,
                           "--extra-jobs", "3", *TEST_IMAGE_SIZE],
                          capture_output=True, text=True, timeout=840, cwd=REPO)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert out.exists(), log
    r = json.loads(out.read_text())
    assert "error" not in r, log
    assert proc.returncode == 0 and r["ok"], "\n".join(r["violations"]) + f"\n(state and logs: {r['workdir']})"

    # The driver's verdict, checked again from its figures.
    real = [j["id"] for j in r["jobs"] if not j["poison"]]
    poison = [j for j in r["jobs"] if j["poison"]]
    # An ordinary job more when the four ended before every fault kind or forged message had landed (a slow host).
    # (3, not the driver's default 2: a forged finalize taken late is forged again, and may need a job to land on.)
    assert len(real) == 3 + r["extra_jobs"] and r["extra_jobs"] <= 3 and len(poison) == 1
    assert sorted(r["succeeded"]) == sorted(real), r["jobs"]
    assert [f["id"] for f in r["failed"]] == [poison[0]["id"]]
    assert "--pretrained" in r["failed"][0]["reason"], r["failed"]
    assert r["lost_jobs"] == []
    assert r["runs_per_job_max"] == 1 and all(r["runs_per_job"][j] == 1 for j in real), r["runs_per_job"]
    assert r["missing_epoch_metrics"] == []
    assert r["crops_equal"] == {j: True for j in real}
    assert r["double_leases"] == 0, r["double_lease_detail"]
    assert r["two_trainers_of_a_job"] == [] and r["trainer_lock_waits"] == [], r
    assert r["trainer_locks_taken"] >= 4  # every attempt's trainer journaled its lock (2p: one per rank)
    assert r["leftover_processes"] == [] and r["leftover_leases"] == [] and r["leftover_temp_files"] == []

    # The run was a real one: every kind of fault hit while jobs ran, and the trainers' leases were watched.
    assert all(r["faults"][kind] >= 1 for kind in ("device_worker", "preprocess_worker", "trainer", "redis",
                                                    "mlflow", "redis_freeze", "redis_slow", "redis_cut",
                                                    "mlflow_freeze")), r["fault_log"]
    # One message of each stage, for a job in a state it does not act in, and each was dropped.
    assert r["forged"] == {"plan": 1, "shard": 1, "finalize": 1, "train": 1}, (r["forged_log"], r["forged_late"])
    assert all(f["dropped"] for f in r["forged_log"]), r["forged_log"]
    # A forged finalize taken only after its job's last shard ended did the real one's work on the whole set (the
    # reference's crops) and was forged again; one that acted on part of a set would have stayed a violation above.
    assert len(r["forged_late"]) <= 3 and all(f["kind"] == "finalize" and "skipped" not in f["result"]
                                              for f in r["forged_late"]), r["forged_late"]
    assert r["lease_check"] == "ok" and r["attempts_seen"] >= 4 and r["lease_samples"] > 100, r
