"""`facenet-cli runs --compare`: training runs side by side, as a table and one PNG.

The table has the params that differ between the runs (the rest are the same and would only hide
them), then throughput and accuracy: final FPS, FPS per device, held-out Acc@1 and the verification
numbers of the last epoch. The PNG has FPS against device count (scaling) and, per epoch, Acc@1 and
verification accuracy (learning). Both go to the newest compared run as artifacts (`compare/`).
"""

from __future__ import annotations

import json
import os
import tempfile

from facenet.errors import UserError
from services.queue.mlflow_runs import client

# Params that are the same in spirit but differ between any two runs (ids, paths of the job, timings).
_NOISE = {"run_id", "output", "json_out", "events", "resume", "mlflow_uri", "run_name"}
# Table rows after FPS and FPS per device (which is derived): metric key -> label.
RESULT_ROWS = (("final_acc1", "Acc@1 (held out)"), ("verify_acc", "verification accuracy"),
               ("val_far_1e-3", "VAL@FAR=1e-3"), ("auc", "ROC AUC"))
HISTORY = ("acc1", "verify_acc")


def resolve_runs(c, refs: list[str], experiment_ids: list[str]) -> list:
    """MLflow runs (client `c`) for RUN arguments: full run ids, unique prefixes of them (as `runs` prints),
    or job ids."""
    out = []
    for ref in refs:
        run = None
        if len(ref) == 32:
            try:
                run = c.get_run(ref)
            except Exception:
                run = None
        if run is None:
            found = c.search_runs(experiment_ids, filter_string=f"tags.job_id = '{_quote(ref)}'", max_results=2)
            if not found:
                found = [r for r in c.search_runs(experiment_ids, max_results=5000) if r.info.run_id.startswith(ref)]
            if len(found) != 1:
                raise UserError(f"RUN {ref}: {'no run' if not found else 'more than one run'} has this id, prefix "
                                "or job id")
            run = found[0]
        out.append(run)
    return out


def _quote(text: str) -> str:
    if not text.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"RUN {text!r}: not a run id, prefix or job id")
    return text


def compare(uri: str, refs: list[str], experiment: str, plot: str | None = None, log: bool = True) -> dict:
    """The comparison as plain data: {"runs": [...], "differing_params": {...}, "results": {...},
    "histories": {...}, "plot": path or None, "logged_to": run id or None}."""
    if len(refs) < 2:
        raise UserError("--compare needs at least two runs")
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = resolve_runs(c, refs, [exp.experiment_id] if exp else [])
    ids = [r.info.run_id for r in runs]
    params = [dict(r.data.params) for r in runs]
    keys = sorted(set().union(*params) - _NOISE)
    differing = {k: [p.get(k) for p in params] for k in keys if len({p.get(k) for p in params}) > 1}
    devices = [_int(p.get("world_size") or r.data.tags.get("npus")) for p, r in zip(params, runs)]
    fps = [r.data.metrics.get("final_fps") for r in runs]
    results = {"FPS": fps, "FPS per device": [None if f is None or not d else f / d for f, d in zip(fps, devices)],
               **{label: [r.data.metrics.get(key) for r in runs] for key, label in RESULT_ROWS}}
    histories = {rid: {m: [(h.step, h.value) for h in sorted(c.get_metric_history(rid, m), key=lambda h: h.step)]
                       for m in HISTORY} for rid in ids}
    report = {"runs": [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
                        "devices": d} for r, d in zip(runs, devices)],
              "differing_params": differing, "results": results, "histories": histories, "plot": None,
              "logged_to": None}
    with tempfile.TemporaryDirectory(prefix="facenet-compare-") as tmp:
        png = plot or os.path.join(tmp, "compare.png")
        plot_comparison(report, png)
        report["plot"] = plot
        if log:
            newest = max(runs, key=lambda r: r.info.start_time or 0).info.run_id
            c.log_artifact(newest, png, "compare")
            c.log_text(newest, json.dumps({k: v for k, v in report.items() if k != "histories"}, indent=2),
                       f"compare/{'-'.join(i[:8] for i in ids)}.json")
            report["logged_to"] = newest
    return report


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def format_table(report: dict) -> str:
    names = [r["run_id"][:12] for r in report["runs"]]
    rows: list[tuple[str, list[str]]] = [("run name", [r["name"] or "" for r in report["runs"]])]
    rows += [(k, ["" if v is None else str(v) for v in vals]) for k, vals in report["differing_params"].items()]
    for label, vals in report["results"].items():
        digits = 1 if "FPS" in label else 4
        rows.append((label, ["-" if v is None else f"{v:.{digits}f}" for v in vals]))
    first = max(len(k) for k, _ in rows + [("", [])])
    widths = [max([len(n)] + [len(vals[i]) for _, vals in rows]) for i, n in enumerate(names)]
    line = lambda k, vals: "  ".join([k.ljust(first)] + [v.rjust(w) for v, w in zip(vals, widths)])  # noqa: E731
    out = [line("", names), line("-" * first, ["-" * w for w in widths])]
    out += [line(k, vals) for k, vals in rows]
    if not report["differing_params"]:
        out.append("(no param differs)")
    return "\n".join(out)


def plot_comparison(report: dict, path: str, width_px: int = 1200, height_px: int = 500) -> str:
    """Left: FPS against device count, one point per run. Right: Acc@1 (solid) and verification accuracy
    (dashed) per epoch, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(width_px / 100, height_px / 100), dpi=100)
    try:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        fps = report["results"]["FPS"]
        for i, run in enumerate(report["runs"]):
            colour = colours[i % len(colours)]
            label = f"{run['run_id'][:8]} {run['name'] or ''}".strip()
            if run["devices"] is not None and fps[i] is not None:
                ax1.scatter([run["devices"]], [fps[i]], color=colour, s=50, label=label)
            hist = report["histories"][run["run_id"]]
            for metric, style in (("acc1", "-"), ("verify_acc", "--")):
                if hist[metric]:
                    steps, values = zip(*hist[metric])
                    ax2.plot(steps, values, style, color=colour, marker="o", ms=3,
                             label=f"{label}: {'Acc@1' if metric == 'acc1' else 'verification'}")
        ax1.set_xlabel("devices")
        ax1.set_ylabel("images / s (whole job)")
        ax1.set_title("throughput")
        ax1.grid(True, alpha=0.3)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("accuracy")
        ax2.set_title("Acc@1 (solid) and verification accuracy (dashed)")
        ax2.grid(True, alpha=0.3)
        for ax in (ax1, ax2):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
