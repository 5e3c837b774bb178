"""The accelerator fast path, on the CPU: the compiled training step computes what the eager one does, CUDA
graph capture and the side-stream prefetch are guarded (and run only where a GPU is visible), and the batched
MTCNN finds the boxes the per-photo detector finds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from facenet import devices
from facenet.data import loader as data_loader
from facenet.train.engine import Amp, Step
from facenet.train.losses import Trainable, make_objective
from facenet.spec import TrainSpec

HAS_CUDA = torch.cuda.is_available()


def _model(seed: int = 0) -> torch.nn.Module:
    from facenet.model import build_model

    torch.manual_seed(seed)
    return build_model(4, None, dropout=0.0)  # no dropout: compiled code draws its own random numbers


def _steps(step: Step, optimizer, batches) -> list[float]:
    losses = []
    for x, y in batches:
        loss, _ = step(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _fp32() -> Amp:
    return Amp(False, torch.float32, torch.amp.GradScaler("cpu", enabled=False), None)


def test_the_compiled_step_computes_what_the_eager_step_does(loss="softmax"):
    """Three optimiser steps of the real network and loss, eager and through torch.compile (dynamo's capture
    of the step, AOTAutograd's backward): the same losses and the same weights after, within float tolerance.
    The aot_eager backend keeps it to seconds on two cores (inductor's C++ build of this network takes
    minutes); test_inductor_compiles_a_step runs inductor itself on a small network."""
    device = devices.Device("cpu")
    spec = TrainSpec(data="x", loss=loss)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 96, 96, generator=g), torch.tensor([0, 1, 2, 3])) for _ in range(3)]
    eager_net = _model()
    compiled_net = copy.deepcopy(eager_net)
    results = []
    for net, backend in ((eager_net, None), (compiled_net, "aot_eager")):
        trainable = Trainable(net, loss)
        step = Step(trainable, make_objective(spec), device, _fp32(), None)
        if backend:
            torch._dynamo.reset()
            step._fn = torch.compile(step._fn, backend=backend, dynamic=False)  # the eager forward and loss
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        results.append(_steps(step, optimizer, batches))
    assert results[0] == pytest.approx(results[1], rel=1e-4, abs=1e-5), results
    for (name, a), b in zip(eager_net.state_dict().items(), compiled_net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5), name


def test_inductor_compiles_a_step():
    """`Device.compile` with torch's default mode (inductor, real generated code) on a small conv network in
    the trainer's Step: the same losses as eager over three steps."""
    device = devices.Device("cpu")

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))

    class Objective:
        def loss(self, out, y):
            return torch.nn.functional.cross_entropy(out, y), (out.argmax(1) == y).sum()

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(6, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(3)]
    torch._dynamo.reset()
    results = []
    for mode in (None, "default"):
        model = net()
        step = Step(model, Objective(), device, _fp32(), mode)
        results.append(_steps(step, torch.optim.Adam(model.parameters(), lr=1e-2), batches))
    assert results[0] == pytest.approx(results[1], rel=1e-4, abs=1e-6), results


def test_compile_modes_resolve_per_device_type():
    cpu, cuda, npu = devices.Device("cpu"), devices.Device("cuda", 0), devices.Device("npu", 0)
    assert cpu.compile_mode("auto")[0] is None and "eager on cpu" in cpu.compile_mode("auto")[1]
    assert cuda.compile_mode("auto") == ("reduce-overhead", "compile auto: reduce-overhead on cuda (inductor + "
                                         "CUDA graphs)")
    assert npu.compile_mode("auto")[0] is None
    assert cpu.compile_mode("off")[0] is None and cuda.compile_mode("off")[0] is None
    mode, note = cpu.compile_mode("reduce-overhead")  # CUDA graphs are GPU only: said, and compiled plainly
    assert mode == "default" and "CUDA graphs need a GPU" in note
    assert cuda.compile_mode("max-autotune")[0] == "max-autotune"
    with pytest.raises(Exception, match="--compile fast: choose one of off, auto, default"):
        TrainSpec(data="x", compile="fast").validate()


def test_batches_reach_the_device_as_the_step_wants_them():
    """`on_device` (the trainer's input path) on the CPU: standardised float NHWC images and the labels, the bad
    and fed paths passed through, batch for batch."""
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    batches = [data_loader.Batch(images, torch.tensor([1, 0]), ["bad.jpg"], ["a.jpg", "b.jpg"]),
               data_loader.Batch(images.flip(0), torch.tensor([0, 1]), [], ["b.jpg", "a.jpg"])]
    out = list(data_loader.on_device(batches, torch.device("cpu"), channels_last=True))
    assert len(out) == 2
    x, y, bad, fed = out[0]
    assert torch.equal(x, (images.float() - 127.5) / 128.0) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.tolist() == [1, 0] and bad == ["bad.jpg"] and fed == ["a.jpg", "b.jpg"]
    assert out[1][1].tolist() == [0, 1]


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graph capture needs a GPU; none is visible")
def test_cuda_graph_step_equals_eager_on_the_gpu():
    """reduce-overhead (inductor + CUDA graphs) on the real network and the side-stream prefetch, on a GPU."""
    device = devices.Device("cuda", 0)
    spec = TrainSpec(data="x")
    g = torch.Generator().manual_seed(1)
    cpu_batches = [data_loader.Batch(torch.randint(0, 256, (8, 3, 96, 96), dtype=torch.uint8, generator=g),
                                     torch.arange(8) % 4, [], []) for _ in range(4)]
    eager_net = _model().cuda()
    graphed_net = copy.deepcopy(eager_net)
    results = []
    for net, mode in ((eager_net, None), (graphed_net, "reduce-overhead")):
        net.to(memory_format=torch.channels_last)
        step = Step(Trainable(net, "softmax"), make_objective(spec), device, _fp32(), mode)
        batches = [(x, y) for x, y, _, _ in data_loader.on_device(cpu_batches, device.torch_device, True)]
        results.append(_steps(step, torch.optim.Adam(net.parameters(), lr=1e-3), batches))
    assert results[0] == pytest.approx(results[1], rel=1e-3, abs=1e-4), results


def test_batched_detection_finds_the_per_photo_boxes(sample_root):
    """MTCNN over many photos at once (PNet on a stack of same-size photos per pyramid scale, RNet and ONet over
    the candidates of all photos in one call each) gives each photo the boxes the one-photo detector gives."""
    import os

    from PIL import Image

    from facenet.preprocess.detect import detect_faces, detect_faces_batch
    from facenet.preprocess.faces import DetectorSettings, FaceCropper

    import torch

    cropper = FaceCropper(DetectorSettings())
    # A detector leaves the process's grad mode alone (it used to switch it off, and a bench that trained after
    # detecting in one process failed), and builds no autograd graph itself.
    assert torch.is_grad_enabled() and not any(p.requires_grad for p in cropper.mtcnn.parameters())
    raw = os.path.join(sample_root, "raw")
    paths = [os.path.join(raw, ident, sorted(os.listdir(os.path.join(raw, ident)))[k])
             for ident in sorted(os.listdir(raw)) for k in (0, 1)]
    photos = [cropper.reduced(Image.open(p).convert("RGB"))[0] for p in paths]
    photos.append(photos[0].crop((0, 0, photos[0].size[0] * 2 // 3, photos[0].size[1])))  # another size
    photos.append(Image.new("RGB", (200, 150)))  # no face at all
    sizes = {p.size for p in photos}
    assert len(sizes) >= 2 and len(photos) > len(sizes)  # some photos share a size, some do not
    m = cropper.mtcnn
    arrays = [np.asarray(p) for p in photos]
    minsizes = [cropper.min_face(p) for p in photos]
    batched = detect_faces_batch(arrays, minsizes, m.pnet, m.rnet, m.onet, m.thresholds, m.factor)
    assert len(batched) == len(photos)
    found = 0
    for img, minsize, (boxes, probs) in zip(arrays, minsizes, batched):
        want_boxes, want_probs = detect_faces(img, minsize, m.pnet, m.rnet, m.onet, m.thresholds, m.factor)
        assert boxes.shape == want_boxes.shape
        np.testing.assert_allclose(boxes, want_boxes, rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(probs, want_probs, rtol=1e-4, atol=1e-5)
        found += len(boxes) > 0
    assert found >= len(photos) - 2 and len(batched[-1][0]) == 0


@pytest.mark.parametrize("align", [False, True], ids=["box", "aligned"])
def test_a_shard_cropped_in_batches_equals_one_photo_at_a_time(tmp_path, sample_root, align):
    """run_shard with the batched detector (what an accelerator's preprocessing uses, photos decoded ahead by
    threads) writes the crops, byte for byte, and the records that one photo at a time writes: box crops and
    --align's warps (the landmarks come out of the batched ONet as the boxes do)."""
    import os

    from facenet.preprocess.plan import Params, make_plan
    from facenet.preprocess.shard import run_shard
    from facenet.samples import copy_subset

    raw = tmp_path / "raw"
    copy_subset(os.path.join(sample_root, "raw"), str(raw), 3, 4)
    (raw / "blank").mkdir()
    from PIL import Image

    Image.new("RGB", (120, 90)).save(raw / "blank" / "no_face.jpg")  # a reject in the middle of a batch
    (raw / "blank" / "broken.jpg").write_bytes(b"not a jpeg")
    results = []
    for name, batch in (("one", 1), ("batched", 5)):
        plan = make_plan(str(raw), str(tmp_path / name), Params(shard_size=100, align=align))
        rec = run_shard(plan, 0, "cpu", batch=batch)
        crops = {}
        for r in rec["records"]:
            if "out" in r:
                with open(os.path.join(plan.out, r["out"]), "rb") as fh:
                    crops[r["out"]] = fh.read()
        results.append(([{k: v for k, v in r.items()} for r in rec["records"]], crops))
    (one, one_crops), (batched, batched_crops) = results
    assert [r["item"] for r in one] == [r["item"] for r in batched]
    for a, b in zip(one, batched):
        assert a.get("reject") == b.get("reject"), (a, b)
        assert align or a.get("sha256") == b.get("sha256"), (a, b)
        if "box" in a:
            assert a["box"] == pytest.approx(b["box"], abs=0.02)
    assert sorted(one_crops) == sorted(batched_crops) and len(one_crops) >= 10
    assert sum("reject" in r for r in one) >= 2
    if not align:
        assert one_crops == batched_crops
        return
    # A warp samples at the landmarks' float positions, which the batched ONet gives to within ~1e-5 px of the
    # one-photo ONet: the warps differ by a grey level here and there, and JPEG (quality 95) can turn such a
    # difference into a flipped DCT coefficient, a few levels over its 8x8 block (CI saw 4). Landmarks 1e-3 px
    # off already give a mean of 0.1 to 0.26 on these photos, 0.25 px off 1.2 to 2.2: the mean catches them.
    import io

    for rel, data in one_crops.items():
        a, b = (np.asarray(Image.open(io.BytesIO(d)), dtype=np.int16) for d in (data, batched_crops[rel]))
        diff = np.abs(a - b)
        assert diff.max() <= 16 and diff.mean() < 0.05 and (diff > 2).mean() < 0.005, (rel, diff.max(),
                                                                                       diff.mean())
