"""A small preprocessing state with every kind of shard record finalize reads, for the byte-equality test of
finalize (tests/test_scale.py): the golden outputs in tests/fixtures/finalize_v1/ were written by finalize as it
was before it streamed its records (commit eb01ec5), from this same tree. One key was added to them by hand since:
the manifest's params.align (false), when --align came (issue 26)."""

from __future__ import annotations

import hashlib
import json
import os


def build(out: str):
    """A Plan over made-up items whose shard records lie in OUT, as run_shard leaves them."""
    from facenet import confine
    from facenet.preprocess.plan import Params, Plan
    from facenet.preprocess.shard import shard_record_path

    train_people = ["a", "a b", "a-b", "ab", "b", "z\u00e9"]  # "a-b" sorts before "a/" as text, after "a" as a tuple
    items = []
    for k, person in enumerate(train_people):
        names = [f"{n:04d}_01.jpg" for n in range(1 + 2 * k)] + ["x.bmp", "x 1.jpg", "x.jpg"] + (["x.png"] if k == 3 else [])
        items += [("train", person, name) for name in sorted(names)]
    items += [("test", f"t{p:02d}", f"{n}.jpg") for p in range(24) for n in range(3)]
    plan = Plan("/data/raw", out, Params(shard_size=7, seed=99), items, "vggface2",
                [("train/evil/link.jpg", "symbolic link outside the data roots")])
    for index in range(plan.num_shards):
        records = []
        for item in plan.shard_items(index):
            digest = int(hashlib.sha256("/".join(item).encode()).hexdigest(), 16)
            if digest % 9 == 0:
                records.append({"item": list(item), "reject": "no face found"})
            elif digest % 9 == 1:
                records.append({"item": list(item), "reject": "unreadable image (truncated)"})
            else:
                rec = {"item": list(item), "out": plan.out_rel(item), "sha256": f"{digest:064x}"[:64]}
                if item[2].endswith(".bmp"):
                    rec["converted"] = "BMP"
                if digest % 9 == 2:
                    rec["links"] = 2
                records.append(rec)
        confine.write_bytes(shard_record_path(plan, index),
                            json.dumps({"plan_id": plan.plan_id, "index": index, "records": records}).encode(), None)
    return plan


OUTPUTS = ("train_list.txt", "test_list.txt", "test_pairs.txt", "manifest.json")


if __name__ == "__main__":  # python tests/finalize_tree.py OUT: write the golden files (with the old finalize)
    import sys

    from facenet.preprocess.finalize import finalize

    finalize(build(sys.argv[1]))
    print(sorted(os.listdir(sys.argv[1])))
