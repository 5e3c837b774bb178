"""MTCNN preprocessing at VGGFace2 scale: planned in shards any worker can run, resumable.

plan (`plan.py`) -> shards (`shard.py`, one MTCNN per process) -> lists + manifest (`finalize.py`);
`run.py` runs all of it locally in N processes.

The names below load on first use: `facenet.preprocess.plan` (what the CLI checks a submission with) must
not pull in torch and the detector, which cost the CLI 5 s before it could say a value was bad.
"""

import importlib

_WHERE = {"finalize": "finalize", "Params": "plan", "Plan": "plan", "load_plan": "plan", "make_plan": "plan",
          "save_plan": "plan", "run_local": "run", "run_shard": "shard"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
