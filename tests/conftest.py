"""Shared test setup: marker gating, hypothesis profiles, a device fixture."""
import os
import shutil

import pytest
import torch

try:
    from hypothesis import settings

    settings.register_profile("dev", deadline=None, max_examples=40)
    settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # hypothesis is a test extra
    pass

HAS_CUDA = torch.cuda.is_available()
HAS_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_cxx = pytest.mark.skip(reason="Inductor on CPU needs a C++ compiler (set CXX)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "inductor" in item.keywords and not HAS_CXX:
            item.add_marker(skip_cxx)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return torch.device(request.param)
