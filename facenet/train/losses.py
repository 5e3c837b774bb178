"""The three training objectives (`--loss`), each a head over InceptionResnetV1's 512-d embedding.

* softmax: the ModelZoo recipe. The network's own `logits` layer over the
  un-normalised embedding, cross-entropy.
* arcface: additive angular margin (Deng et al. 2019; insightface's
  `CombinedMarginLoss` with m2 only). The class centres are the rows of the
  same `logits` layer, normalised (its bias is unused), so a model trained
  with any loss has the same state dict and is evaluated the same way.
* triplet: FaceNet's loss (Schroff et al. 2015) on squared distances of unit
  embeddings, with online semi-hard mining inside each process's batch of P
  people x K images (`IdentityBatchSampler`): for every anchor-positive pair the
  negative is the closest one still farther than the positive; when there is
  none, the farthest negative (TensorFlow's `triplet_semihard_loss`). No
  classifier: `logits` is frozen and Acc@1 is not measured (verification is).

What DDP wraps is `Trainable`: the network and the head in one forward, so every
parameter the loss touches goes through DDP's forward and its gradients are
reduced like any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Trainable(nn.Module):
    """forward(x) -> what `Objective.loss` takes: logits (softmax), cosines to the class centres
    (arcface) or unit embeddings (triplet)."""

    def __init__(self, net: nn.Module, loss: str):
        super().__init__()
        self.net, self.loss = net, loss
        net.classify = loss == "softmax"
        if loss == "triplet":
            net.logits.requires_grad_(False)  # no classifier: DDP must not wait for its gradients
        elif loss == "arcface":
            net.logits.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)  # logits when classify, else the normalised embedding
        if self.loss == "arcface":
            return arcface_cosines(out, self.net.logits.weight)
        return out


def arcface_cosines(embedding: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """float32 cosines [N, classes] of unit embeddings [N, D] to the class centres (rows of `centres` [classes, D],
    normalised here), in [-1, 1].

    Computed with autocast off, whatever the step runs under: F.linear is on autocast's low-precision list, so the
    `.float()` casts alone still ran it in bf16, where a cosine near 1 moves in steps of 2^-8 and a logit (x s = 64)
    in steps of ~0.25. `torch.autocast(device_type=..., enabled=False)` is the same call on every type: autocast takes
    the PrivateUse1 backend's name as a device type (pytorch/pytorch@v2.14.1:torch/amp/autocast_mode.py:250-262,
    autocast.__init__, `custom_backend_name = torch._C._get_privateuse1_backend_name()`; it needs
    torch.npu.get_amp_supported_dtype, torch_npu:torch_npu/npu/autocast_utils.py:8), and torch_npu names that backend
    "npu" (torch_npu:torch_npu/_init/registry/backend.py:7, torch.utils.rename_privateuse1_backend). With
    enabled=False no dtype is checked. (torch_npu:PATH as in facenet/devices.py: Ascend/pytorch v26.1.0-pytorch2.12.0.)"""
    with torch.autocast(device_type=embedding.device.type, enabled=False):
        return F.linear(embedding.float(), F.normalize(centres.float(), dim=1)).clamp(-1.0, 1.0)


class Objective:
    """loss(out, labels) -> (loss, number of correct predictions in the batch)."""

    has_classifier = True

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Class indices from Trainable's output (held-out Acc@1)."""
        return out.argmax(1)


class Softmax(Objective):
    def loss(self, out, labels):
        return F.cross_entropy(out, labels), (out.detach().argmax(1) == labels).sum()


class ArcFace(Objective):
    def __init__(self, scale: float, margin: float):
        self.s, self.m = scale, margin
        # Past theta = pi - m, cos(theta + m) would rise again; insightface's fallback keeps the target
        # logit decreasing there: cos(theta) - m sin(m).
        self.threshold, self.fallback = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin

    def loss(self, cos, labels):
        cos = cos.float()
        target = cos.gather(1, labels[:, None])
        sin = torch.sqrt((1.0 - target * target).clamp_min(1e-9))
        with_margin = target * math.cos(self.m) - sin * math.sin(self.m)  # cos(theta + m)
        with_margin = torch.where(target > self.threshold, with_margin, target - self.fallback)
        logits = cos.scatter(1, labels[:, None], with_margin) * self.s
        return F.cross_entropy(logits, labels), (cos.detach().argmax(1) == labels).sum()


class Triplet(Objective):
    has_classifier = False

    def __init__(self, margin: float):
        self.margin = margin

    def loss(self, emb, labels):
        emb = emb.float()
        d = torch.cdist(emb, emb).pow(2)  # squared Euclidean, in [0, 4] for unit vectors
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
        positive = same & ~eye
        negative = ~same
        # For each (anchor a, positive p): the closest negative farther than d(a, p) (semi-hard), else the
        # farthest negative. Each anchor's negative distances sorted once, then searched: O(B^2 log B) memory
        # and time, not the [B, B, B] of a broadcast (537 MB at a batch of 512).
        inf = torch.tensor(float("inf"), device=emb.device)
        sorted_neg = torch.where(negative, d, inf).sort(dim=1).values  # non-negatives last
        n_neg = negative.sum(1)
        first_farther = torch.searchsorted(sorted_neg, d.contiguous(), right=True)  # [a, p]
        semi_hard = sorted_neg.gather(1, first_farther.clamp(max=len(labels) - 1))
        farthest = sorted_neg.gather(1, (n_neg - 1).clamp_min(0)[:, None]).expand_as(semi_hard)
        chosen = torch.where(first_farther < n_neg[:, None], semi_hard, farthest)
        # Total, and without a branch or a data-dependent shape: the mean hinge over the valid (anchor, positive)
        # pairs, 0 when there are none. An anchor without negatives gets chosen = inf (an all-inf row), so its
        # hinge is clamp(-inf) = 0, with a zero gradient. A batch of one person, or of one image per person, is
        # then a zero loss rather than an error that requeues the job to fail at the same step again.
        hinge = (d - chosen + self.margin).clamp_min(0.0)
        loss = torch.where(positive, hinge, 0.0).sum() / positive.sum().clamp_min(1)
        # "correct": anchors whose farthest positive is nearer than their nearest negative.
        far_pos = torch.where(positive, d, -inf).amax(1)
        near_neg = torch.where(negative, d, inf).amin(1)
        has_pos = positive.any(1)
        correct = ((far_pos < near_neg) & has_pos).sum()
        return loss, correct.detach()

    def predict(self, out):
        raise RuntimeError("--loss triplet trains no classifier")


def make_objective(spec) -> Objective:
    if spec.loss == "softmax":
        return Softmax()
    if spec.loss == "arcface":
        return ArcFace(spec.arcface_scale, spec.arcface_margin)
    return Triplet(spec.triplet_margin)
