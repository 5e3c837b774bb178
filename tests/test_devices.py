"""Device selection and its messages."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def _run(args, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "facenet.train", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_torch_npu_without_cann_is_one_clear_line(tmp_path, small_faces):
    # torch_npu installed on a host without the Ascend driver/CANN fails inside its import with a
    # missing-library error like this one; a stand-in package reproduces exactly that import failure.
    pkg = tmp_path / "site" / "torch_npu"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        'raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")\n')
    env = {"PYTHONPATH": str(tmp_path / "site")}
    res = _run(["--data", small_faces, "--device", "npu"], env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "torch_npu is installed but cannot load (libhccl.so" in res.stderr
    assert "set_env.sh" in res.stderr

    # auto: says why the NPU is skipped, then trains on what there is
    res = _run(["--data", small_faces, "--device", "auto", "--epochs", "1", "--batch-size", "8",
                "--output", str(tmp_path / "out")], env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: torch_npu is installed but cannot load" in res.stderr
    assert "device cpu x 1" in res.stdout
