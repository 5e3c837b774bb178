"""Command-line options of the trainer (`python -m facenet.train`, `facenet-cli train`).

`get_args_parser()` is reusable (the service CLI and the scripts build on
it). Kebab-case flags; the ModelZoo spellings are accepted as aliases so the
seed's command lines keep working.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from facenet.errors import UserError
from facenet.spec import (AMP_DTYPES, CHECKPOINT_LOGGING, COMPILE_MODES, DEVICES, LOSSES, OPT_LEVELS, OPTIMIZERS, TrainSpec,
                          default_pretrained_path)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _path_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x.strip() != ""]


def _tag(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    k, v = text.split("=", 1)
    return k, v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def _loss_and_verification(p: argparse.ArgumentParser, d: TrainSpec) -> None:
    g = p.add_argument_group("loss and verification")
    g.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="softmax: the recipe's classifier head; triplet: FaceNet's loss with online semi-hard "
                        "mining over P people x K images per batch; arcface: additive angular margin head")
    g.add_argument("--triplet-margin", type=float, default=d.triplet_margin,
                   help="triplet margin on squared distances of unit embeddings")
    g.add_argument("--images-per-identity", type=int, default=d.images_per_identity, metavar="K",
                   help="triplet: K images of each person per batch (each process's batch must be a multiple)")
    g.add_argument("--arcface-scale", type=float, default=d.arcface_scale, help="arcface: logit scale s")
    g.add_argument("--arcface-margin", type=float, default=d.arcface_margin, help="arcface: angular margin m (radians)")
    g.add_argument("--verify-every", type=int, default=None, metavar="N",
                   help="verification on pairs (LFW protocol) every N epochs; default: every epoch when DATA has "
                        "test_pairs.txt or pairs.txt (or --verify-pairs is given); 0: never")
    g.add_argument("--verify-pairs", metavar="FILE",
                   help="pairs file for the per-epoch verification (ours or LFW's), paths relative to DATA")
    g.add_argument("--verify-bin", type=_path_list, default=None, metavar="A.bin,B.bin",
                   help="insightface verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin) verified with the pairs, "
                        "logged per epoch as <set>_verify_acc, <set>_auc, ...")


def get_args_parser(prog: str = "python -m facenet.train") -> argparse.ArgumentParser:
    d = TrainSpec(data="")
    p = _Parser(prog=prog, description="Train FaceNet (InceptionResnetV1 + classification head) on a face "
                "dataset; 1 process or N processes with torch.distributed.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", "--data_dir", "--data_path", dest="data", metavar="DIR",
                   help="dataset root: ROOT/{train,test}_list.txt, ROOT/<identity>/<image> folders, "
                        "or a pack of either (facenet-cli pack)")
    g.add_argument("--holdout", type=float, default=d.holdout,
                   help="fraction of each identity's images held out for Acc@1 (folder layout only)")
    g.add_argument("--augment", action="store_true", help="random flip + small crop at train time (off in the recipe)")
    g.add_argument("--image-size", type=int, default=d.image_size, help="face crop side in pixels")
    g.add_argument("--workers", type=int, default=None,
                   help="data loader processes per training process (default: 0 with <= 2 cores per process, else min(8, cores per process - 1))")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", "--epoch", type=int, default=d.epochs, help="training epochs")
    g.add_argument("--batch-size", "--batch_size", type=int, default=d.batch_size,
                   help="GLOBAL batch size, split evenly over the processes")
    g.add_argument("--lr", type=float, default=d.lr, help="initial learning rate")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="adam (the recipe) or sgd (momentum 0.9)")
    g.add_argument("--lr-steps", type=_int_list, default=d.lr_steps,
                   help="epochs at which lr is multiplied by --lr-gamma (MultiStepLR)")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="lr decay factor at each step")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the embedding layer")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (data split, order, init)")
    g.add_argument("--pretrained", default=d.pretrained, metavar="FILE|auto|none",
                   help=f"vggface2 weights to start from; auto uses {default_pretrained_path()} when it "
                        "exists, else trains from scratch. Nothing is downloaded")

    _loss_and_verification(p, d)

    g = p.add_argument_group("precision")
    g.add_argument("--amp", "--amp_cfg", "--amp-cfg", action="store_true",
                   help="mixed precision (torch autocast): bf16 on CPU/CUDA, fp16 on Ascend")
    g.add_argument("--amp-dtype", choices=AMP_DTYPES, default=d.amp_dtype, help="autocast dtype")
    g.add_argument("--opt-level", "--opt_level", choices=OPT_LEVELS, default=d.opt_level,
                   help="apex-style level: O0 = fp32 even with --amp; O1/O2 = autocast")
    g.add_argument("--loss-scale", "--loss_scale_value", default=d.loss_scale,
                   help="fp16 loss scale: 'dynamic' or a fixed number (bf16 needs none)")

    g = p.add_argument_group("devices")
    g.add_argument("--npus", "--device_num", "--device-num", type=int, default=d.npus,
                   help="processes/devices; >1 runs torch.distributed (hccl/nccl/gloo)")
    g.add_argument("--nnodes", "--nodes", type=int, default=d.nnodes,
                   help="nodes the job spans, --npus / nnodes processes on each; every node runs the same command "
                        "with FACENET_NODE_RANK (0..nnodes-1) and FACENET_RDZV_ENDPOINT (node 0's HOST:PORT), "
                        "which the queue's workers set themselves")
    g.add_argument("--npus-per-node", type=int, default=None, metavar="K",
                   help="devices per node: the same as --npus K x --nnodes")
    g.add_argument("--device-list", "--device_list", type=_int_list, default=None,
                   help="physical device ids, one per process (default 0..npus-1)")
    g.add_argument("--device", choices=DEVICES, default=d.device, help="auto picks npu, then cuda, then cpu")
    g.add_argument("--compile", choices=COMPILE_MODES, default=d.compile,
                   help="torch.compile the training step (forward, loss, backward) in this mode; reduce-overhead "
                        "also captures it as a CUDA graph (GPU only). auto: reduce-overhead on cuda, off on cpu "
                        "(compiling takes minutes there) and npu; the trainer says what it picked")

    g = p.add_argument_group("run")
    g.add_argument("--output", default=d.output, metavar="DIR", help="checkpoints, events and final model")
    g.add_argument("--resume", metavar="CHECKPOINT|auto",
                   help="continue from a checkpoint; auto: OUTPUT/checkpoint.pt if it exists")
    g.add_argument("--json-out", metavar="FILE", help="write the end-of-run JSON summary here")
    g.add_argument("--events", metavar="FILE", help="progress events, one JSON line each (default OUTPUT/events.jsonl)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="steps per epoch left out of the FPS measurement")
    g.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking server (default $MLFLOW_TRACKING_URI; none: no tracking)")
    g.add_argument("--experiment", default=d.experiment, help="MLflow experiment")
    g.add_argument("--run-id", metavar="ID", help="continue this MLflow run instead of starting one")
    g.add_argument("--run-name", metavar="NAME", help="MLflow run name (default e.g. 1p-cpu-bs64-O0)")
    g.add_argument("--tag", dest="tags", type=_tag, action="append", default=[], metavar="KEY=VALUE",
                   help="extra MLflow run tag (repeatable)")
    g.add_argument("--log-checkpoints", choices=CHECKPOINT_LOGGING, default=d.log_checkpoints,
                   help="upload checkpoints to MLflow: the last one, every epoch, or none")
    g.add_argument("--no-log-model", dest="log_model", action="store_false",
                   help="do not log the final model as an MLflow model (model.pt is still uploaded under final/)")
    g.add_argument("--audit-samples", metavar="DIR",
                   help="each process writes what its loader fed the model per epoch: DIR/rank<R>_epoch<E>.txt (training "
                        "images) and DIR/rank<R>_epoch<E>_eval.json (held-out images and how many it got right)")
    g.add_argument("--spec", metavar="FILE", help="read the whole spec from a JSON file (other flags are ignored)")
    g.add_argument("--epochs_per_save", type=int, default=1, help=argparse.SUPPRESS)  # seed: always 1 here
    g.add_argument("--multiprocessing_distributed", action="store_true", help=argparse.SUPPRESS)  # seed: implied by --npus
    return p


def spec_from_args(argv: list[str] | None = None, prog: str = "python -m facenet.train") -> TrainSpec:
    """Parse argv into a validated TrainSpec (UserError on bad values)."""
    return spec_and_file(argv, prog)[0]


def spec_and_file(argv: list[str] | None = None, prog: str = "python -m facenet.train") -> tuple[TrainSpec, str | None]:
    """(the spec, the absolute path of its `--spec FILE`, or None when flags gave it)."""
    args = get_args_parser(prog).parse_args(argv)
    if args.spec:  # a regular file of at most MAX_SPEC_BYTES, never a FIFO waited on
        return TrainSpec.from_file(args.spec), os.path.abspath(args.spec)
    return spec_from_namespace(args, argv), None


def spec_from_namespace(args: argparse.Namespace, argv: list[str] | None) -> TrainSpec:
    """The spec the flags of a parser built on get_args_parser() give (extra flags of such a parser, like
    submit-train's queue options, are left out); the checks `python -m facenet.train` makes, in one place."""
    if not args.data:
        raise UserError("--data is required (the dataset root)")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSpec)}
    per_node = args.npus_per_node
    if per_node is not None:
        npus_given = any(a == "--npus" or a.startswith("--npus=") for a in argv or [])
        if npus_given and values["npus"] != per_node * values["nnodes"]:
            raise UserError(f"--npus {values['npus']} disagrees with --npus-per-node {per_node} x --nnodes "
                            f"{values['nnodes']}; give one of them")
        values["npus"] = per_node * values["nnodes"]
    values["tags"] = dict(values["tags"])
    if values["pretrained"] in ("none", ""):
        values["pretrained"] = None
    values["data"] = os.path.abspath(os.path.expanduser(values["data"]))
    spec = TrainSpec(**values)
    spec.validate()
    return spec
