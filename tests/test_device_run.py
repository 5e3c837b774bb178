"""The GPU call's driver (facenet/bench/device_run.py), on what needs no GPU: phases under a deadline keep what
they measured when one fails or would not fit, the training set is linked from distinct crops, and the table
prints from partial results."""

import json
import os

from facenet.bench import device_run


def test_phases_record_results_errors_and_skips_and_rewrite_the_json(tmp_path):
    ph = device_run.Phases(str(tmp_path), deadline_s=30)
    assert ph.run("first", lambda: {"img_per_s": 12.5}, needs_s=1) == {"img_per_s": 12.5}

    def broken():
        raise RuntimeError("CUDA graphs: accessing an overwritten output")

    assert ph.run("second", broken, needs_s=1) is None
    assert ph.run("third", lambda: {"never": True}, needs_s=10_000) is None
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["first"] == {"img_per_s": 12.5}
    assert "overwritten output" in saved["phases"]["second"]["error"] and "second" not in saved
    assert "needs about 10000 s" in saved["phases"]["third"]["skipped"] and "third" not in saved
    assert saved["phases"]["first"]["seconds"] >= 0


def test_linked_dataset_links_each_crop_k_times_under_new_names(tmp_path):
    crops = tmp_path / "crops"
    for ident in ("alice", "bob"):
        (crops / ident).mkdir(parents=True)
        for i in range(3):
            (crops / ident / f"{i}.jpg").write_bytes(f"{ident}{i}".encode())
    (crops / "README").write_text("not an identity")
    dest = tmp_path / "train"
    (dest / "stale").mkdir(parents=True)  # an earlier run's folder goes
    info = device_run.linked_dataset(str(crops), str(dest), copies=4)
    assert info == {"distinct_crops": 6, "files": 24, "copies": 4}
    assert sorted(os.listdir(dest)) == ["alice", "bob"]
    assert (dest / "bob" / "c3_2.jpg").read_bytes() == b"bob2"
    assert os.stat(dest / "bob" / "c3_2.jpg").st_ino == os.stat(crops / "bob" / "2.jpg").st_ino


def test_table_prints_from_partial_results(capsys):
    device_run.print_table({"eager_512": {"img_per_s_steady": 9000.0, "img_per_s": 8000.0, "mfu": 0.071,
                                          "acc1_per_epoch": [0.5, 0.9]},
                            "ceiling_512": {"ours_eager": 11000.0, "mfu": {"ours_eager": 0.087}},
                            "detect": {"ours_batched": {"photos_per_s": 2100.0, "mean_iou_vs_cpu": 0.97}}})
    out = capsys.readouterr().out
    assert "9,000   7.1%" in out and "11,000   8.7%" in out
    assert "ours_batched" in out and "2100.0 photos/s" in out and "[0.5, 0.9]" in out
    assert "ours compiled" in out  # a row that did not run prints dashes
