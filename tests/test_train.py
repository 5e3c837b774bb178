"""The training engine, end to end on CPU: real photos, real processes, a real MLflow server."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import mlflow
import pytest
import torch
import yaml

from facenet.devices import cpu_has_bf16

from conftest import REPO, TEST_IMAGE_SIZE, TEST_SIZE, read_events, read_json, run_train, train_cmd


def test_learns_real_faces_with_amp_and_logs_to_mlflow(sample_faces, mlflow_server, tmp_path):
    """8 real people: loss falls, held-out Acc@1 far above chance (1/8), the precision used recorded everywhere."""
    out = tmp_path / "run"
    res = run_train("--data", sample_faces, "--epochs", "6", "--batch-size", "32", "--lr", "0.001",
                    "--amp", "--output", str(out), "--json-out", str(out / "summary.json"),
                    "--mlflow-uri", mlflow_server.uri, "--experiment", "test-learn", "--tag", "job_id=j-learn")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = read_json(out / "summary.json")
    events = [e for e in read_events(out / "events.jsonl") if e["event"] == "epoch"]
    assert [e["epoch"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[-1]["loss"] < 0.5 * events[0]["loss"]
    assert summary["acc1"] >= 0.5, summary  # chance is 0.125
    # --amp is bf16 autocast where the CPU runs bf16 natively; elsewhere fp32, said in a line (not refused).
    precision = "bf16" if cpu_has_bf16() else "fp32"
    assert summary["amp"] is (precision == "bf16") and summary["precision"] == precision
    assert ("no native bf16" in res.stdout) is (precision == "fp32"), res.stdout[-2000:]
    assert summary["epochs"] == 6 and summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["fps"] > 0 and summary["fps_per_device"] == summary["fps"]
    assert summary["mlflow_lost_records"] == 0
    assert "Final Performance images/sec :" in res.stdout and "E2E Training Duration sec :" in res.stdout

    client = mlflow_server.client()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["precision"] == precision and run.data.params["amp"] == "True"  # asked for
    assert run.data.params["world_size"] == "1" and run.data.params["num_classes"] == "8"
    assert run.data.params["torch_version"] == torch.__version__
    assert run.data.tags["job_id"] == "j-learn"
    acc_history = client.get_metric_history(run.info.run_id, "acc1")
    assert sorted(m.step for m in acc_history) == [1, 2, 3, 4, 5, 6]
    assert abs(max(acc_history, key=lambda m: m.step).value - summary["acc1"]) < 1e-9
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "final", "summary.json"} <= artifacts
    models = [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
              if m.source_run_id == run.info.run_id]
    assert len(models) == 1
    # Logged without pickle: a torch.export archive (JSON program + raw weights), no pickled module; and
    # whatever the loss, it maps face crops to 512-d embeddings.
    mlflow.set_tracking_uri(mlflow_server.uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{models[0].model_id}", dst_path=str(tmp_path / "model"))
    files = {os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs}
    assert "data/model.pt2" in files and not any(f.endswith((".pth", ".pkl", ".pickle")) for f in files), files
    with zipfile.ZipFile(os.path.join(local, "data", "model.pt2")) as archive:
        names = archive.namelist()
    assert any(n.endswith("models/model.json") for n in names) and not any(n.endswith(".pkl") for n in names), names
    with open(os.path.join(local, "MLmodel"), encoding="utf-8") as fh:
        signature = yaml.safe_load(fh)["signature"]
    assert json.loads(signature["outputs"])[0]["tensor-spec"]["shape"] == [-1, 512], signature


def test_two_process_gloo_ddp_reads_disjoint_samples(small_faces, tmp_path):
    """Two gloo ranks: what each loader really fed its model (recorded in the loops, not by iterating the sampler
    again) is disjoint and covers the split; held-out Acc@1 pools both ranks' halves (all-reduce)."""
    out, audit = tmp_path / "ddp", tmp_path / "audit"
    folders = _split(small_faces)
    # Lists: the folder split's training images; as held-out set, 8 copies of one held-out photo labelled so
    # that whatever class the model predicts for it, the two ranks' halves score differently (rank 0 gets
    # positions 0, 2, 4, 6: classes 0, 0, 1, 2; rank 1 the odd ones: class 3 each). A rank-local Acc@1 then
    # cannot equal the pooled one.
    photo = folders.test[0][0]
    os.makedirs(os.path.join(small_faces, "heldout"))
    test_lines = []
    for i, label in enumerate([0, 3, 0, 3, 1, 3, 2, 3]):
        rel = f"heldout/x{i}{os.path.splitext(photo)[1]}"
        shutil.copy(photo, os.path.join(small_faces, rel))
        test_lines.append(f"{rel} {label}")
    with open(os.path.join(small_faces, "train_list.txt"), "w", encoding="utf-8") as fh:
        fh.writelines(f"{os.path.relpath(p, small_faces)} {label}\n" for p, label in folders.train)
    with open(os.path.join(small_faces, "test_list.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(test_lines) + "\n")
    res = run_train("--data", small_faces, "--npus", "2", "--device", "cpu", "--epochs", "2", "--batch-size", "8",
                    "--lr", "0.001", "--output", str(out), "--json-out", str(out / "summary.json"),
                    "--audit-samples", str(audit))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert summary["fps_per_device"] == pytest.approx(summary["fps"] / 2, rel=1e-3)
    split = _split(small_faces)
    assert split.layout == "lists"
    train_set, test_set = {p for p, _ in split.train}, {p for p, _ in split.test}
    assert len(train_set) == 40 and len(test_set) == 8  # 4 identities x (12 - 2 held out)
    orders = []
    for epoch in (1, 2):
        r0 = (audit / f"rank0_epoch{epoch}.txt").read_text().split("\n")[:-1]
        r1 = (audit / f"rank1_epoch{epoch}.txt").read_text().split("\n")[:-1]
        # 40 images in global batches of 8: 5 whole steps, 20 images per rank, no padding needed
        assert len(r0) == len(r1) == 20
        assert not set(r0) & set(r1), "ranks read the same images"
        assert set(r0) | set(r1) == train_set, "every training image is read once per epoch"
        orders.append(r0)
        e0, e1 = (read_json(audit / f"rank{r}_epoch{epoch}_eval.json") for r in (0, 1))
        assert len(e0["images"]) == len(e1["images"]) == 4 and not set(e0["images"]) & set(e1["images"])
        assert set(e0["images"]) | set(e1["images"]) == test_set
        assert e0["correct"] != e1["correct"], "the halves were built to score differently"
        record = next(e for e in read_events(out / "events.jsonl") if e["event"] == "epoch" and e["epoch"] == epoch)
        assert record["eval_images"] == 8
        assert record["acc1"] == pytest.approx((e0["correct"] + e1["correct"]) / 8)
    assert orders[0] != orders[1], "set_epoch reshuffles"
    # Held-out images never reach training (the ModelZoo 8p sampler trained on its own validation set).
    assert photo not in train_set and not test_set & train_set
    # The pooled figure is the whole held-out set's: the final model, scored here in one process, agrees.
    from facenet_pytorch import InceptionResnetV1

    from facenet.data.loader import FaceImages, collate, to_device

    net = InceptionResnetV1(classify=True, num_classes=4)
    net.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"])
    batch = collate([FaceImages(split.test, TEST_SIZE)[i] for i in range(8)])
    with torch.inference_mode():
        predicted = net.eval()(to_device(batch.images, torch.device("cpu"), False)).argmax(1)
    assert not batch.bad and sorted(batch.fed) == sorted(test_set)
    assert summary["acc1"] == pytest.approx((predicted == batch.labels).float().mean().item())
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["writer_rank"] == 0 and ckpt["epoch"] == 2
    # Both ranks evaluated one model, the one saved (DDP updates each rank's BatchNorm statistics from its own
    # batch: without the epoch-end broadcast each rank scored a model of its own, and rank 1's was not saved).
    from facenet.train.checkpoint import state_digest

    digests = [[read_json(audit / f"rank{r}_epoch{epoch}_eval.json")["model_sha256"] for r in (0, 1)]
               for epoch in (1, 2)]
    assert all(d0 == d1 for d0, d1 in digests), digests
    assert digests[1][0] == state_digest(torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"])
    assert digests[1][0] == state_digest(ckpt["model"])
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "events.jsonl", "model.pt", "spec.json", "summary.json",
                                       "trainer.rank0.lock", "trainer.rank1.lock", "trainers.jsonl"]

    # The same job over two "nodes": two launchers of one process each (--nnodes 2, what each worker of a gang
    # runs), meeting at node 0's endpoint on loopback. Global rank r runs on node r and is fed exactly what
    # rank r was fed above; the numbers are the single-node run's.
    from facenet.fsutil import free_port

    nodes, audit2 = tmp_path / "two-nodes", tmp_path / "audit-two-nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    launchers = [subprocess.Popen(train_cmd("--data", small_faces, "--npus", "2", "--nnodes", "2", "--device", "cpu",
                                            "--epochs", "2", "--batch-size", "8", "--lr", "0.001", "--output",
                                            str(nodes), "--json-out", str(nodes / "summary.json"),
                                            "--audit-samples", str(audit2)),
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=dict(os.environ, FACENET_NODE_RANK=str(rank), FACENET_RDZV_ENDPOINT=endpoint,
                                           OMP_NUM_THREADS="1"))
                 for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(x[-2000:] for x in logs)
    assert "as node 0 of 2" in logs[0] and "as node 1 of 2" in logs[1]
    two = read_json(nodes / "summary.json")
    assert two["world_size"] == 2 and two["acc1"] == summary["acc1"]
    assert two["loss"] == pytest.approx(summary["loss"], rel=1e-4)
    for name in sorted(os.listdir(audit)):
        assert (audit2 / name).read_text() == (audit / name).read_text(), name


def test_state_digest_is_deterministic_for_equal_tensors():
    """The digest --audit-samples records: equal for equal tensors (another copy, another memory layout, another
    insertion order), different for one changed value, dtype or name."""
    from facenet.model import build_model
    from facenet.train.checkpoint import state_digest

    torch.manual_seed(0)
    state = build_model(4, None).state_dict()
    copy = {name: state[name].clone() for name in reversed(list(state))}
    strided = {name: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for name, t in state.items()}
    assert state_digest(state) == state_digest(copy) == state_digest(strided) == state_digest(state)
    name = "logits.weight"
    changed = dict(copy, **{name: copy[name].clone()})
    changed[name][0, 0] += 1e-6
    assert state_digest(changed) != state_digest(state)
    assert state_digest(dict(copy, **{name: copy[name].double()})) != state_digest(state)
    assert state_digest({"x" + k: v for k, v in copy.items()}) != state_digest(state)


def _split(root):
    from facenet.data.dataset import load_dataset

    return load_dataset(root)


def test_killed_run_resumes_into_the_same_mlflow_run(small_faces, mlflow_server, tmp_path):
    """SIGKILL after epoch 1, --resume auto: 3 epochs in all, one MLflow run, same result as uninterrupted."""
    common = ["--data", small_faces, "--epochs", "3", "--batch-size", "8", "--lr", "0.001", "--workers", "0",
              "--mlflow-uri", mlflow_server.uri, "--experiment", "test-resume"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(*common, "--output", str(out)), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_path = out / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt_path.exists():
        assert proc.poll() is None, "trainer ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert first["epoch"] in (1, 2)  # killed right after a checkpoint landed

    res = run_train(*common, "--output", str(out), "--resume", "auto", "--json-out", str(out / "summary.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{first['epoch']} epoch(s) done" in res.stdout
    resumed = read_json(out / "summary.json")
    assert resumed["epochs"] == 3
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]

    ref = tmp_path / "uninterrupted"
    res = run_train(*common, "--output", str(ref), "--json-out", str(ref / "summary.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    straight = read_json(ref / "summary.json")
    assert straight["epochs"] == resumed["epochs"]
    # Same data order, same per-epoch seeds, restored optimizer state: the same training trajectory.
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=0.05)

    client = mlflow_server.client()
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == [1, 2, 3]
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 2  # the killed+resumed run and the uninterrupted one, nothing else


def test_mlflow_outage_mid_training_is_buffered_and_flushed(small_faces, tmp_path):
    """Stop the tracking server during training, bring it back: training finishes, nothing is lost."""
    from conftest import MlflowServer, free_port

    port = free_port()
    workdir = tmp_path / "mlflow"
    workdir.mkdir()
    server = MlflowServer(f"http://127.0.0.1:{port}", port, str(workdir))
    server.start()
    out = tmp_path / "run"
    try:
        proc = subprocess.Popen(train_cmd("--data", small_faces, "--epochs", "4", "--batch-size", "8", "--lr", "0.001",
                                          "--workers", "0", "--mlflow-uri", server.uri, "--output", str(out),
                                          "--json-out", str(out / "summary.json")),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        events = out / "events.jsonl"
        deadline = time.time() + 300
        while not (events.exists() and '"start"' in events.read_text()):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        server.stop()
        while '"epoch": 2' not in events.read_text():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        server.start()
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        summary = read_json(out / "summary.json")
        assert summary["mlflow_lost_records"] == 0
        assert "retr" in output and "MLflow: all" in output
        client = server.client()
        steps = sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "fps"))
        assert steps == [1, 2, 3, 4]
        assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    finally:
        server.stop()


def test_corrupt_images_are_skipped_and_named(small_faces, tmp_path):
    ident = sorted(os.listdir(small_faces))[0]
    folder = os.path.join(small_faces, ident)
    victim = sorted(os.listdir(folder))[0]
    with open(os.path.join(folder, victim), "rb") as fh:
        data = fh.read()
    with open(os.path.join(folder, "truncated.png"), "wb") as fh:
        fh.write(data[: len(data) // 3])
    with open(os.path.join(folder, "notes.jpg"), "w") as fh:
        fh.write("this is not an image\n")
    out = tmp_path / "run"
    # holdout 0: every file is in training, so both bad files are met in epoch 1
    res = run_train("--data", small_faces, "--epochs", "1", "--batch-size", "8", "--holdout", "0", "--workers", "1",
                    "--output", str(out), "--json-out", str(out / "summary.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["bad_images"] == 2
    assert "skipped 2 unreadable image(s)" in res.stdout
    assert "truncated.png" in res.stdout and "notes.jpg" in res.stdout


def test_list_layout_and_pretrained_weights(small_faces, tmp_path):
    """ROOT/{train,test}_list.txt + a vggface2-shaped weights file (8631-way head replaced)."""
    from facenet_pytorch import InceptionResnetV1

    root = tmp_path / "lists"
    shutil.copytree(small_faces, root / "train")
    idents = sorted(os.listdir(root / "train"))
    train_lines, test_lines = [], []
    for label, ident in enumerate(idents):
        files = sorted(os.listdir(root / "train" / ident))
        test_lines += [f"train/{ident}/{f} {label}" for f in files[:2]]
        train_lines += [f"train/{ident}/{f} {label}" for f in files[2:]]
    (root / "train_list.txt").write_text("# path label\n" + "\n".join(train_lines) + "\n")
    (root / "test_list.txt").write_text("\n".join(test_lines) + "\n")
    weights = tmp_path / "vggface2.pt"
    torch.save(InceptionResnetV1(classify=True, num_classes=8631).state_dict(), weights)
    out = tmp_path / "run"
    res = run_train("--data", str(root), "--epochs", "1", "--batch-size", "8", "--pretrained", str(weights),
                    "--output", str(out), "--json-out", str(out / "summary.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"pretrained weights: {weights}" in res.stdout
    assert f"lists dataset at {root}: 4 identities, {len(train_lines)} training images, {len(test_lines)} held out" \
        in res.stdout
    summary = read_json(out / "summary.json")
    assert summary["num_classes"] == 4
    events = [e for e in read_events(out / "events.jsonl") if e["event"] == "epoch"]
    assert events[0]["eval_images"] == len(test_lines)


def test_opt_level_o0_trains_in_fp32_and_says_so(small_faces, tmp_path):
    out = tmp_path / "run"
    res = run_train("--data", small_faces, "--epochs", "1", "--batch-size", "8", "--amp", "--opt-level", "O0",
                    "--output", str(out), "--json-out", str(out / "summary.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["amp"] is False and summary["precision"] == "fp32"
    assert "precision fp32" in res.stdout


def test_a_full_disk_is_one_clear_line_naming_the_file(small_faces, tmp_path):
    """--output on a 40 MiB filesystem: the first checkpoint (~200 MB) cannot be written. One line names it and the
    space left (torch reports ENOSPC as a RuntimeError from its zip writer); no traceback, no temp file left."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        out = disk / "run"
        res = run_train("--data", small_faces, "--epochs", "1", "--batch-size", "8", "--workers", "0",
                        "--output", str(out))
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        error_lines = [line for line in res.stderr.splitlines() if "error" in line]
        assert len(error_lines) == 1, res.stderr
        assert f"cannot write {out / 'checkpoint.pt'}: no space left on its disk (" in error_lines[0]
        assert [p for p in os.listdir(out) if ".tmp-" in p] == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("args, message", [
    (["--data", "{missing}"], "--data {missing}: no such directory"),
    (["--data", "{data}", "--npus", "0"], "--npus 0: must be in [1, 4096]"),
    (["--data", "{data}", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--data", "{data}", "--pretrained", "{missing}.pt"], "--pretrained {missing}.pt: no such file"),
    (["--data", "{data}", "--device", "cuda"], "--device cuda: no CUDA device is visible"),
    (["--data", "{data}", "--npus", "3", "--batch-size", "8"], "--batch-size 8: the global batch must divide evenly"),
    (["--data", "{data}", "--batch-size", "4096"], "--batch-size 4096: larger than the training split"),
    (["--data", "{data}", "--loss-scale", "big"], "--loss-scale big: must be 'dynamic' or a positive number"),
    (["--data", "{data}", "--resume", "{missing}.pt"], "--resume {missing}.pt: no such checkpoint"),
    (["--data", "{data}", "--mlflow-uri", "http://127.0.0.1:9"], "MLflow tracking server http://127.0.0.1:9 is unreachable"),
])
def test_bad_input_is_one_clear_line(small_faces, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    missing = str(tmp_path / "nope")
    fill = {"missing": missing, "data": small_faces}
    # a batch the small set can fill, so only the value under test is wrong (a later flag wins)
    # (An unreachable MLflow is retried for FACENET_MLFLOW_CONNECT_SECONDS, 15 by default, before the error.)
    res = run_train("--batch-size", "8", *[a.format(**fill) for a in args], "--output", str(tmp_path / "out"),
                    timeout=120, env={"FACENET_MLFLOW_CONNECT_SECONDS": "2"})
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    error_lines = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, res.stderr
    assert message.format(**fill) in error_lines[0]


def test_pretrained_auto_uses_the_seeds_cache_file_only_when_it_exists(small_faces, tmp_path):
    """--pretrained auto (the default): $TORCH_HOME/checkpoints/20180402-114759-vggface2.pt when present, else
    from scratch, said in a line either way; nothing is downloaded."""
    from facenet_pytorch import InceptionResnetV1

    home = tmp_path / "torch"
    weights = home / "checkpoints" / "20180402-114759-vggface2.pt"
    common = ["--data", small_faces, "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    res = run_train(*common, "--output", str(tmp_path / "a"), env={"TORCH_HOME": str(home)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"no pretrained vggface2 weights at {weights} (pass --pretrained FILE to use some): training from scratch" \
        in res.stdout
    weights.parent.mkdir(parents=True)
    torch.save(InceptionResnetV1(classify=True, num_classes=8631).state_dict(), weights)
    res = run_train(*common, "--output", str(tmp_path / "b"), env={"TORCH_HOME": str(home)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"pretrained vggface2 weights: {weights}" in res.stdout


def test_modelzoo_script_runs_as_the_seed_calls_it(small_faces, tmp_path):
    """`bash scripts/train_performance_1p.sh --data_path=DIR` (the seed's spelling), extra flags winning over
    the preset: the Final block on stdout and the ModelZoo key = value log."""
    res = subprocess.run(["bash", os.path.join(REPO, "scripts", "train_performance_1p.sh"), f"--data_path={small_faces}",
                          "--batch-size", "8", "--workers", "0", *TEST_IMAGE_SIZE],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Final Performance images/sec :" in res.stdout and "E2E Training Duration sec :" in res.stdout
    logs = glob.glob(str(tmp_path / "output" / "modelzoo" / "*" / "*.log"))
    assert len(logs) == 1, logs
    values = dict(line.strip().split(" = ", 1) for line in open(logs[0], encoding="utf-8"))
    assert {"ActualFPS", "TrainingTime", "TrainAccuracy", "HeldOutAccuracy", "ActualLoss", "E2ETrainingTime"} <= set(values)
    assert float(values["ActualFPS"]) > 0 and values["BatchSize"] == "8" and values["RankSize"] == "1"


def test_make_bench_runs_on_a_tiny_setting(small_faces, tmp_path):
    """`make bench` end to end (both benchmarks, the private stack of the queue benchmark) on 4 people x 12
    crops and 24 raw photos: the command, its JSON and its ratios, not its speed."""
    out = tmp_path / "bench"
    res = subprocess.run(["make", "--no-print-directory", "bench", f"BENCH_DIR={out}",
                          f"BENCH_ARGS=--epochs 1 --batch-size 8 --data {small_faces} --raw-per-identity 3 "
                          "--ceiling-steps 3",
                          f"BENCH_QUEUE_ARGS=--epochs 1 --batch-size 8 --data {small_faces} --image-size {TEST_SIZE} "
                          "--no-artifacts"],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    bench = read_json(out / "bench.json")
    train, pre = bench["train"], bench["preprocess"]
    assert train["config"]["epochs"] == 1 and train["config"]["train_images"] == 40
    for side in ("ours", "reference"):
        assert train[side]["img_per_s"] > 0 and 0 <= train[side]["acc1"] <= 1
        assert pre[side]["img_per_s"] > 0
    assert train["ratio"] == pytest.approx(train["ours"]["img_per_s"] / train["reference"]["img_per_s"])
    assert train["step_ceiling"]["ratio"] > 0
    assert pre["ours"]["faces"] > 0 and pre["ratio"] > 0
    queue = read_json(out / "bench_queue.json")
    assert queue["job"]["epochs"] == 1 and queue["job"]["data"] == small_faces and queue["job"]["artifacts"] is False
    assert queue["direct_seconds"] > 0 and queue["queue_seconds"] > 0
    assert queue["ratio"] == pytest.approx(queue["queue_seconds"] / queue["direct_seconds"], rel=1e-3)
    assert queue["fps"]["direct"] > 0 and queue["fps"]["queue"] > 0


def test_an_fp32_checkpoint_resumes_with_fp16_amp(sample_faces, tmp_path):
    """Mixed fleets: a job requeued from an fp32 (or bf16) worker onto an fp16 one resumes a checkpoint whose scaler
    state is empty (a disabled GradScaler's). The enabled scaler starts fresh, said in one line, instead of a
    RuntimeError on every remaining attempt. (2 people x 5 crops, one step an epoch: fp16 is emulated on a CPU.)"""
    from facenet.samples import copy_subset

    data, out = copy_subset(sample_faces, str(tmp_path / "tiny"), 2, 5), tmp_path / "run"
    common = ["--data", data, "--batch-size", "8", "--workers", "0", "--image-size", "80", "--output", str(out),
              "--json-out", str(out / "summary.json")]
    res = run_train(*common, "--epochs", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["scaler"] == {}
    res = run_train(*common, "--epochs", "2", "--resume", "auto", "--amp", "--amp-dtype", "fp16")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "precision fp16 + GradScaler" in res.stdout
    assert [line for line in res.stdout.splitlines() if "GradScaler state" in line] == [
        "the checkpoint has no GradScaler state (written by a bf16 or fp32 run): fp16 starts with a fresh scaler"]
    summary = read_json(out / "summary.json")
    assert summary["epochs"] == 2 and summary["precision"] == "fp16"
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["scaler"]["scale"] > 0


def test_steps_per_epoch_line_is_the_loaders_for_triplet_batches(small_faces, tmp_path):
    """The identity sampler makes its own number of P x K batches (4 people x 10 training crops, K 4: 3 groups each,
    12 groups, P 2: 6 batches, not 40 / 8 = 5): the console line says what the loader runs, as the events do."""
    import re

    out = tmp_path / "run"
    res = run_train("--data", small_faces, "--loss", "triplet", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                    "--image-size", "80", "--log-every", "1", "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    said = [int(n) for n in re.findall(r"; (\d+) steps per epoch;", res.stdout)]
    events = read_events(out / "events.jsonl")
    start = next(e for e in events if e["event"] == "start")
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert said == [start["steps_per_epoch"]] == [len(steps)] == [6], res.stdout[-2000:]


def test_resume_is_exact_with_loader_workers(small_faces, tmp_path):
    """With loader workers, augmentation and dropout, 1 epoch then --resume auto to 3 trains exactly what 3 epochs
    straight do: the same per-epoch loss (==, not approx) and the same final model. (Persistent workers drew their
    seed from the global RNG when the loader's iterator was first made, so a resumed run shifted its dropout stream
    and its workers' augmentation streams for the rest of the run.)"""
    from facenet.train.checkpoint import state_digest

    common = ["--data", small_faces, "--batch-size", "8", "--lr", "0.001", "--workers", "2", "--augment",
              "--dropout", "0.5", "--image-size", "80"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for args in (["--epochs", "3", "--output", str(straight)], ["--epochs", "1", "--output", str(resumed)],
                 ["--epochs", "3", "--output", str(resumed), "--resume", "auto"]):
        res = run_train(*common, *args)
        assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "2 loader worker(s) per process" in res.stdout

    def curve(out):
        return [(e["epoch"], e["loss"], e["train_acc"], e["acc1"]) for e in read_events(out / "events.jsonl")
                if e["event"] == "epoch"]

    assert [c[0] for c in curve(resumed)] == [1, 2, 3]
    assert curve(resumed) == curve(straight)
    models = [torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"] for out in (straight, resumed)]
    assert state_digest(models[0]) == state_digest(models[1])
