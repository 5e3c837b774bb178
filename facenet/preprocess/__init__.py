"""MTCNN preprocessing at VGGFace2 scale: planned in shards any worker can run, resumable.

plan (`plan.py`) -> shards (`shard.py`, one MTCNN per process) -> lists + manifest (`finalize.py`);
`run.py` runs all of it locally in N processes.
"""

from facenet.preprocess.finalize import finalize
from facenet.preprocess.plan import Params, Plan, load_plan, make_plan, save_plan
from facenet.preprocess.run import run_local
from facenet.preprocess.shard import run_shard

__all__ = ["Params", "Plan", "finalize", "load_plan", "make_plan", "run_local", "run_shard", "save_plan"]
