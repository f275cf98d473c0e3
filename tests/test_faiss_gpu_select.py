"""GPU FAISS is chosen at run time: used when FAISS reports a GPU, CPU otherwise or on failure."""
import faiss
import numpy as np
import pytest

from grass_index.index import VectorIndex, gpu


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = []

    def to_gpu(res, device, index):
        calls.append((device, index.ntotal))
        return faiss.clone_index(index)  # stands in for the GPU copy (same results)
    monkeypatch.setattr(gpu, "_resources", None)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    return calls


def _index(n=50, d=8):
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    v = VectorIndex.create(d)
    v.add(x, np.arange(n))
    return v, x


def test_no_gpu_means_cpu_index(monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    v, x = _index()
    assert gpu.gpu_count() == 0 and gpu.gpu_copy(v._index) is None
    assert v._searcher(10) is v._index


def test_gpu_copy_used_once_and_refreshed_after_add(fake_gpu):
    v, x = _index()
    want = v.search(x[:3], 5)
    assert fake_gpu == [(0, 50)]
    got = v.search(x[:3], 5)
    assert fake_gpu == [(0, 50)] and all(np.array_equal(a, b) for a, b in zip(want, got))
    v.add(x[:2] + 1, np.array([100, 101]))
    v.search(x[:1], 5)
    assert fake_gpu[-1] == (0, 52)  # a stale GPU copy is never searched
    assert v._searcher(gpu.GPU_MAX_K + 1) is v._index  # beyond GPU FAISS's k limit: CPU


def test_gpu_copy_failure_falls_back_to_cpu(fake_gpu, monkeypatch):
    def broken(*a):
        raise RuntimeError("no GPU version of this index")
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", broken)
    v, x = _index()
    s, i = v.search(x[:2], 3)
    assert v._searcher(3) is v._index and i[0, 0] in range(50)
