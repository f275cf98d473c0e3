"""The server's own timings (GET /api/stats): GC pauses, request handling and batch runs, so a
stall can be told from a loaded machine (benchmarks/serve.py --rounds prints them)."""
from __future__ import annotations

import gc
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (FastAPI, uvicorn) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from grass_index.serve import create_app  # noqa: E402
from grass_index.serve.stats import ServerStats  # noqa: E402
from test_serve import built  # noqa: E402,F401  (the module's index fixture)


def test_a_collection_is_recorded_with_its_pause_and_generation():
    stats = ServerStats()
    stats.install()
    try:
        junk = [[i] for i in range(20_000)]
        for a, b in zip(junk, junk[1:]):
            a.append(b)  # cycles: something for the collector to walk
        del junk
        t0 = time.monotonic()
        gc.collect(2)
        outside = 1e3 * (time.monotonic() - t0)
    finally:
        stats.uninstall()
    full = [g for g in stats.gc if g[0] >= t0 and g[1] == 2]
    assert len(full) == 1
    _, _, wall_ms, cpu_ms = full[0]
    assert 0 < wall_ms <= outside and 0 <= cpu_ms <= wall_ms + 1.0
    assert stats._on_gc not in gc.callbacks
    assert [list(full[0])] == [g for g in stats.since(t0)["gc"] if g[1] == 2]


def test_api_stats_reports_requests_batches_and_collections_since_a_moment(built):  # noqa: F811
    task, out = built
    app = create_app(out, task=str(task), verify=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        stats = app.state.served.stats
        assert stats._on_gc in gc.callbacks  # installed for the server's life
        t0 = time.monotonic()
        for i in range(3):
            assert c.get(f"/api/query?example={i}&k=3").status_code == 200
        gc.collect()
        got = c.get(f"/api/stats?since={t0}").json()
        assert set(got) >= {"now", "gc", "requests", "batches", "fields"} and got["now"] > t0
        queries = [r for r in got["requests"] if r[2] == "/api/query"]
        assert len(queries) == 3 and all(r[0] >= t0 and r[1] > 0 for r in queries)
        assert sum(b[1] for b in got["batches"]) == 3  # every job ran in a recorded batch
        assert all(b[2] >= 0 and b[3] >= 0 for b in got["batches"])
        assert any(g[1] == 2 for g in got["gc"])
        later = c.get(f"/api/stats?since={got['now']}").json()
        assert not [r for r in later["requests"] if r[2] == "/api/query"]
    assert stats._on_gc not in gc.callbacks  # removed at shutdown
