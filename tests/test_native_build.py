"""Build checks for the native sources that need no GPU.

The CUDA kernels live in torch-free .cu files precisely so that nvcc can compile them here
(a CPU torch wheel lacks the c10/cuda headers a torch-including .cu would need). Skips when
nvcc is absent.
"""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")


@needs_nvcc
@pytest.mark.parametrize("src", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
def test_cuda_kernels_compile_for_sm90(src, tmp_path):
    r = subprocess.run([NVCC, "-c", "-O2", "-gencode", "arch=compute_90,code=sm_90",
                        str(ROOT / "csrc" / "cuda" / src), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


@needs_nvcc
@pytest.mark.slow
def test_cuda_binding_parses(tmp_path):
    # Syntax-check the torch binding against the CPU wheel's headers, with the one
    # generated CUDA-build header it lacks stubbed out. Catches API misuse, not link errors.
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    inc = Path(torch.__file__).parent / "include"
    homes = [os.environ.get("CUDA_HOME"), str(Path(NVCC).resolve().parent.parent),
             *sorted(map(str, Path("/usr/local").glob("cuda*")), reverse=True)]
    cuda_inc = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()),
                    None)
    if cuda_inc is None:
        pytest.skip("CUDA headers not found (set CUDA_HOME)")
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-I{tmp_path}", f"-I{inc}",
                        f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{cuda_inc}",
                        f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc" / "cuda" / "ops_cuda.cpp")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
