"""Build the optional native kernels (grass_index._C).

GRASS_INDEX_BUILD=auto|cpu|cuda|none picks what is compiled:
  auto  C++ CPU kernels always; CUDA kernels too when torch is a CUDA build and nvcc is found
  cpu   C++ CPU kernels only
  cuda  CPU + CUDA kernels; fail if CUDA cannot be built
  none  no native code: every op runs through its pure-torch fallback
"""
import glob
import json
import os

from setuptools import find_packages, setup

mode = os.environ.get("GRASS_INDEX_BUILD", "auto").lower()
if mode not in {"auto", "cpu", "cuda", "none"}:
    raise SystemExit(f"GRASS_INDEX_BUILD={mode!r}: expected one of auto, cpu, cuda, none")

packages = find_packages(include=["grass_index", "grass_index.*"])
ext_modules, cmdclass = [], {}

if mode != "none":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want_cuda = mode == "cuda" or (mode == "auto" and torch.version.cuda is not None and CUDA_HOME is not None)
    if mode == "cuda" and (torch.version.cuda is None or CUDA_HOME is None):
        raise SystemExit("GRASS_INDEX_BUILD=cuda needs a CUDA build of torch and nvcc (set CUDA_HOME)")
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    sources = sorted(glob.glob("csrc/*.cpp"))
    extra = {"cxx": cxx_flags}
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        extra["cxx"] = extra["cxx"] + ["-DGRASS_INDEX_WITH_CUDA"]
        extra["nvcc"] = opt + ["-DGRASS_INDEX_WITH_CUDA", "--expt-relaxed-constexpr"]
        Ext = CUDAExtension
    else:
        Ext = CppExtension
    ext_modules = [
        Ext(
            "grass_index._C",
            sources,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]
    cmdclass = {"build_ext": BuildExtension}
    # Build metadata beside the .so: printed when loading fails (torch/CUDA mismatch).
    with open(os.path.join("grass_index", "_build_info.json"), "w") as f:
        json.dump({"torch": torch.__version__, "cuda": torch.version.cuda if want_cuda else None,
                   "with_cuda": bool(want_cuda), "mode": mode}, f)

setup(
    packages=packages,
    package_data={"grass_index": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
