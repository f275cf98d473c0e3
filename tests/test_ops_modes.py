"""The op suite in both modes: native kernels forced on, and the pure-torch fallback.

Each check runs in a fresh interpreter, because the extension is loaded (or not) once per
process at import time.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=300)


def _status(**env):
    r = _run(["-c", "import json, grass_index; print(json.dumps(grass_index.native_status()))"], **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.native
def test_require_native_loads_cpu_kernels():
    st = _status(GRASS_INDEX_REQUIRE_NATIVE="1")
    assert st["loaded"] and st["error"] is None
    assert st["kernels"] == {"sjlt": {"CPU": "native", "CUDA": st["kernels"]["sjlt"]["CUDA"]},
                             "mask": {"CPU": "native", "CUDA": st["kernels"]["mask"]["CUDA"]}}


def test_disable_native_uses_fallback():
    st = _status(GRASS_INDEX_DISABLE_NATIVE="1")
    assert not st["loaded"] and "GRASS_INDEX_DISABLE_NATIVE" in st["error"]
    assert st["kernels"]["sjlt"]["CPU"] == "fallback" and st["kernels"]["mask"]["CPU"] == "fallback"


def test_op_suite_on_fallback():
    # The fast part of tests/test_ops.py (values, gradients, errors, compile) on the
    # pure-torch kernels: both implementations satisfy the same contract.
    r = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_ops.py",
              "-m", "not slow and not inductor and not cuda",
              "-k", "not properties and not opcheck"],
             GRASS_INDEX_DISABLE_NATIVE="1")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
