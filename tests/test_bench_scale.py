"""The scale benchmark end to end on its CI size (2k photos: every stage in its own process, ~30 s on 2
cores), and its exponent fit on made-up timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from facenet.bench.scale import STAGES, exponent, exponents, parse_size


def test_scale_bench_runs_every_stage_and_its_counts_agree(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "facenet.bench.scale", "--photos", "2k", "--work",
                           str(tmp_path / "w"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    report = json.loads(out.read_text())
    assert report["benchmark"] == "scale" and report["sizes"] == [2000]
    assert report["host"]["cpu_count"] >= 1 and report["host"]["memory_gib"] > 0
    run = report["runs"][0]
    stages = run["stages"]
    assert set(STAGES) | {"build"} == set(stages)
    for name in STAGES:
        assert stages[name]["seconds"] >= 0 and stages[name]["peak_rss_mib"] > 0, name
        assert 0 < stages[name]["baseline_rss_mib"] <= stages[name]["peak_rss_mib"], name
    assert stages["build"]["train_photos"] + stages["build"]["test_photos"] == run["photos"] == 2000
    assert stages["plan"]["items"] == 2000 and stages["shard_checks"]["pending"] == 0

    records = stages["shard_records"]
    assert records["train_records"] == stages["build"]["train_photos"]
    assert 0 < records["train_rejects"] < records["train_records"] * 0.02  # ~1%, none in the queued shard
    queued = stages["one_queued_shard"]
    assert queued["same_count"] and queued["records"] == queued["records_before"] == 256
    assert queued["reused"] == 256 and queued["rejects"] == 0 and not queued["skipped"]

    final = stages["finalize"]
    assert final["train_list"] + final["test_list"] == records["train_records"] - records["train_rejects"]
    assert final["splits"]["test"]["rejects"] == records["test_rejects"] and final["test_pairs"] > 0
    assert (stages["load_dataset"]["train"], stages["load_dataset"]["test"]) == (final["train_list"],
                                                                                 final["test_list"])
    for name in ("train_sampler", "identity_sampler"):
        sampler = stages[name]
        assert sampler["covered_all"] and sampler["multiple_of_batch"] and sampler["indices"] % 64 == 0, name
        assert sampler["train"] == final["train_list"], name

    loader = stages["loader_epoch"]
    assert not loader["capped"] and loader["batches"] == loader["epoch_batches"] > 0
    assert len(loader["workers"]) == 2 and all(w["private_mib"] > 0 for w in loader["workers"])
    assert stages["pairs_metrics"]["pairs"] > 0 and stages["pairs_metrics"]["folds"] >= 2

    assert set(report["exponents"]) == set(stages) and all(v is None for v in report["exponents"].values())
    goal = report["goal"]
    assert goal["plan_finalize_sampler_seconds"] == pytest.approx(
        stages["plan"]["seconds"] + final["seconds"] + stages["identity_sampler"]["seconds"], abs=1e-3)
    assert goal["max_peak_rss_mib"] == max(stages[s]["peak_rss_mib"] for s in STAGES)


def test_exponent_is_the_log_log_slope():
    assert exponent([(2000, 1.0)]) is None
    assert exponent([(2000, 1.0), (4000, 2.0), (8000, 4.0)]) == pytest.approx(1.0)
    assert exponent([(1000, 3.0), (10_000, 300.0)]) == pytest.approx(2.0)
    runs = [{"photos": n, "stages": {s: {"seconds": math.sqrt(n)} for s in ["build", *STAGES]}}
            for n in (2000, 4000)]
    assert all(v == pytest.approx(0.5) for v in exponents(runs).values())
    assert [parse_size(t) for t in ("2k", "100k", "1M", "3.31M", "5000")] == [2000, 100_000, 1_000_000,
                                                                               3_310_000, 5000]
