"""The chaos run, small: jobs through a real local stack while workers, trainers, Redis and MLflow are
killed under them (services/bench/chaos.py). Every real job must still succeed once, in one MLflow run, with
crops equal to an undisturbed run's; the poison job must fail with its reason; nothing may be left over."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.timeout(900)


def test_jobs_survive_killed_workers_trainers_redis_and_mlflow(tmp_path, sample_root):
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "services.bench.chaos", "--seed", "5", "--jobs", "4", "--timeout", "480",
                           "--fault-gap", "1", "4", "--mlflow-outage", "20", "30", "--out", str(out),
                           "--workdir", str(tmp_path / "work"), "--sample-root", sample_root],
                          capture_output=True, text=True, timeout=840, cwd=REPO)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert out.exists(), log
    r = json.loads(out.read_text())
    assert "error" not in r, log
    assert proc.returncode == 0 and r["ok"], "\n".join(r["violations"]) + f"\n(state and logs: {r['workdir']})"

    # The driver's verdict, checked again from its figures.
    real = [j["id"] for j in r["jobs"] if not j["poison"]]
    poison = [j for j in r["jobs"] if j["poison"]]
    assert len(real) == 3 and len(poison) == 1
    assert sorted(r["succeeded"]) == sorted(real), r["jobs"]
    assert [f["id"] for f in r["failed"]] == [poison[0]["id"]]
    assert "--pretrained" in r["failed"][0]["reason"], r["failed"]
    assert r["lost_jobs"] == []
    assert r["runs_per_job_max"] == 1 and all(r["runs_per_job"][j] == 1 for j in real), r["runs_per_job"]
    assert r["missing_epoch_metrics"] == []
    assert r["crops_equal"] == {j: True for j in real}
    assert r["double_leases"] == 0, r["double_lease_detail"]
    assert r["leftover_processes"] == [] and r["leftover_leases"] == [] and r["leftover_temp_files"] == []

    # The run was a real one: every kind of fault hit while jobs ran, and the trainers' leases were watched.
    assert all(r["faults"][kind] >= 1 for kind in ("device_worker", "preprocess_worker", "trainer", "redis",
                                                    "mlflow")), r["fault_log"]
    assert r["lease_check"] == "ok" and r["attempts_seen"] >= 4 and r["lease_samples"] > 100, r
