"""grass-index serve: the HTTP API against the library, its guards (token, limits, read-only,
verify at start), the micro-batcher, and the page in a real headless browser."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (FastAPI, uvicorn) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

import grass_index as gi  # noqa: E402
from _tiny_task import write_task  # noqa: E402
from grass_index.serve import Engine, ServeError, create_app  # noqa: E402
from grass_index.serve.guard import check_bind  # noqa: E402
from grass_index.serve.batching import MicroBatcher  # noqa: E402
from grass_index.task import load_task  # noqa: E402
from grass_index.store import SketchStore  # noqa: E402

# The tiny task, plus a label and a text encoding ("x1 x2 ... x6" -> (x, class 0)).
EXTRA = '''
def label(item):
    return "class %d" % int(item[1])

def encode(text):
    vals = [float(v) for v in text.split()]
    if len(vals) != 6:
        raise ValueError("give 6 numbers separated by spaces, got %d" % len(vals))
    return torch.tensor(vals), torch.tensor(0)
'''
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    task = write_task(d)
    task.write_text(task.read_text() + EXTRA)
    t = load_task(task)
    gi.build_index(t.model(), t.train_data(), t.loss, d / "idx", sparsification="random_mask-4*3",
                   projection="sjlt-8", batch_size=8, task=t.ref, progress=False)
    return task, d / "idx"


@pytest.fixture(scope="module")
def client(built):
    _, out = built
    with TestClient(create_app(out, task=str(built[0])), raise_server_exceptions=False) as c:
        yield c


def reference(out, items, k, opponents=False):
    t = load_task(gi.open_index(out).task)
    return gi.open_index(out).query(t.model(), items, t.loss, k=k, opponents=opponents)


def hits(rows):
    return [(r["train_id"], pytest.approx(r["score"], rel=1e-5, abs=1e-6)) for r in rows]


# ----------------------------------------------------------------------------- answers

def test_query_by_example_equals_the_library(built, client):
    task, out = built
    r = client.get("/api/query", params=dict(example=4, k=5, opponents=1))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["k"] == 5 and doc["task"] == str(task.resolve()) and len(doc["results"]) == 1
    res = doc["results"][0]
    t = load_task(task)
    q = t.query_data()[4]
    assert res["example"] == 4 and res["source"] == "query_data" and res["label"] == t.label(q)
    assert hits(res["proponents"]) == reference(out, [q], 5)[0]
    assert hits(res["opponents"]) == reference(out, [q], 5, opponents=True)[0]
    train = t.train_data()
    assert all(row["label"] == t.label(train[row["train_id"]]) for row in res["proponents"])
    assert set(res["proponents"][0]) == {"train_id", "score", "label"}


def test_self_influence_ranking_equals_the_library_and_pages(built, client):
    task, out = built
    want = gi.open_index(out).self_influence().numpy()
    order = sorted(range(len(want)), key=lambda i: (-want[i], i))
    r = client.get("/api/self-influence", params=dict(limit=7))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["total"] == len(want) and doc["offset"] == 0
    assert [row["train_id"] for row in doc["results"]] == order[:7]
    assert [row["rank"] for row in doc["results"]] == list(range(1, 8))
    assert [row["score"] for row in doc["results"]] == pytest.approx(want[order[:7]], rel=1e-6)
    train = load_task(task).train_data()
    assert doc["results"][0]["label"] == load_task(task).label(train[order[0]])
    page2 = client.get("/api/self-influence", params=dict(offset=5, limit=4, images=1)).json()
    assert [row["train_id"] for row in page2["results"]] == order[5:9]
    assert [row["rank"] for row in page2["results"]] == [6, 7, 8, 9]
    for bad, needle in ((dict(limit=0), "limit"), (dict(offset=-1), "offset"),
                        (dict(offset=len(want)), "offset"), (dict(images="maybe"), "images")):
        r = client.get("/api/self-influence", params=bad)
        assert r.status_code == 400 and needle in r.json()["error"] and r.json()["fix"], r.text


def test_query_train_split_text_json_and_upload(built, client):
    task, out = built
    t = load_task(task)
    r = client.get("/api/query", params=dict(example=7, split="train", k=3))
    assert r.status_code == 200, r.text
    assert hits(r.json()["results"][0]["proponents"]) == reference(out, [t.train_data()[7]], 3)[0]

    r = client.post("/api/query", json=dict(example=2, k=4))
    assert r.status_code == 200, r.text
    assert hits(r.json()["results"][0]["proponents"]) == reference(out, [t.query_data()[2]], 4)[0]

    text = "0.5 -1 2 0 0.25 1"
    r = client.post("/api/query", json=dict(text=text, k=4, opponents=True))
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["source"] == "text" and res["label"] == "class 0"
    item = t.source.encode(text)
    assert hits(res["proponents"]) == reference(out, [item], 4)[0]
    assert hits(res["opponents"]) == reference(out, [item], 4, opponents=True)[0]

    # an uploaded .npz (x and y arrays) answers like `query --input`: one result per row
    qd = t.query_data()
    x = np.stack([qd[i][0].numpy() for i in range(3)])
    y = np.array([int(qd[i][1]) for i in range(3)])
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    r = client.post("/api/query", files={"file": ("q.npz", buf.getvalue())},
                    data={"k": "3", "opponents": "1"})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [g["example"] for g in got] == [0, 1, 2] and got[0]["source"] == "q.npz"
    want = reference(out, [qd[i] for i in range(3)], 3)
    assert [hits(g["proponents"]) for g in got] == want


def test_images_info_examples_train_and_health(built, client):
    task, _ = built
    r = client.get("/api/query", params=dict(example=0, k=2, images=1))
    res = r.json()["results"][0]
    for url in [res["image"]] + [p["image"] for p in res["proponents"]]:
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    info = client.get("/api/info").json()
    assert info["n_train"] == 40 and info["n_query"] == 6 and info["config"]["dim"] == 16
    assert info["features"] == dict(text=True, image=True, label=True, query_data=True)
    ex = client.get("/api/examples", params=dict(split="train", offset=38)).json()
    assert ex["total"] == 40 and [e["id"] for e in ex["examples"]] == [38, 39]
    tr = client.get("/api/train/5").json()
    t = load_task(task)
    assert tr["train_id"] == 5 and tr["label"] == t.label(t.train_data()[5])
    assert tr["image"].startswith("data:image/png;base64,")
    assert client.get("/healthz").json()["ok"] is True
    page = client.get("/")
    assert page.status_code == 200 and "<ol id=\"proponents\">" in page.text
    nonce = page.headers["content-security-policy"].split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in page.text


# ----------------------------------------------------------------------------- bad input

BAD = [
    ("get", "/api/query?example=6", 400, "out of range"),
    ("get", "/api/query?example=-1", 400, "out of range"),
    ("get", "/api/query?example=abc", 400, "not an integer"),
    ("get", "/api/query?example=1&k=0", 400, "k=0"),
    ("get", "/api/query?example=1&k=101", 400, "k=101"),
    ("get", "/api/query?example=1&split=dev", 400, "split"),
    ("get", "/api/query?example=1&opponents=perhaps", 400, "not a flag"),
    ("get", "/api/query", 400, "no example"),
    ("get", "/api/train/40", 400, "out of range"),
    ("get", "/api/train/x", 400, "not an integer"),
    ("get", "/api/examples?limit=0", 400, "limit"),
    ("get", "/nowhere", 404, "no such endpoint"),
    ("delete", "/api/query", 405, "not allowed"),
    ("post", dict(json={"text": "1 2 3"}), 400, "encode(text) raised"),
    ("post", dict(json={"text": ""}), 400, "non-empty"),
    ("post", dict(json={"text": "1 2 3 4 5 6", "example": 1}), 400, "both"),
    ("post", dict(json={"example": 1, "colour": "red"}), 400, "unknown fields"),
    ("post", dict(json=[1, 2]), 400, "must be an object"),
    ("post", dict(json={"example": 1, "k": 2.5}), 400, "not an integer"),
    ("post", dict(json={"example": True}), 400, "not an integer"),
    ("post", dict(content=b"{nope", headers={"content-type": "application/json"}), 400,
     "not valid JSON"),
    ("post", dict(content=b"hello", headers={"content-type": "text/plain"}), 415,
     "content type"),
    ("post", dict(files={"file": ("q.csv", b"1,2")}), 400, "unknown file type"),
    ("post", dict(files={"file": ("q.npy", b"garbage")}), 400, "unreadable"),
    ("post", dict(files={"other": ("q.npy", b"x")}), 400, "no file"),
]


@pytest.mark.parametrize("method,target,status,needle", BAD)
def test_bad_input_is_a_4xx_json_error_with_a_fix(client, method, target, status, needle):
    if method == "post":
        r = client.post("/api/query", **target)
    else:
        r = getattr(client, method)(target)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "fix"} and body["fix"], body
    assert needle in body["error"], body
    assert "Traceback" not in r.text


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_wrong_examples_are_refused_without_breaking_the_batch(built, client):
    _, out = built
    r = client.post("/api/query", files={"file": ("q.npy", _npy(np.zeros((2, 5), np.float32)))})
    assert r.status_code == 400 and "look like the training examples" in r.json()["error"]
    # a bad job batched with good ones fails alone
    eng = client.app.state.engine
    qd = eng.queries
    from grass_index.serve.engine import Job

    jobs = [Job(items=[qd[0]], ids=[0], source="q", k=3),
            Job(items=[(torch.zeros(5), torch.tensor(0))], ids=[0], source="bad", k=3),
            Job(items=[qd[1]], ids=[1], source="q", k=3, opponents=True)]
    res = eng.run(jobs)
    assert isinstance(res[1], ValueError) and "expected shape [6]" in str(res[1])
    assert hits(res[0][0]["proponents"]) == reference(out, [qd[0]], 3)[0]
    assert hits(res[2][0]["opponents"]) == reference(out, [qd[1]], 3, opponents=True)[0]


def test_limits_on_body_and_examples(built):
    _, out = built
    eng = Engine(out, task=str(built[0]))
    with TestClient(create_app(out, engine=eng, max_body=4096, max_items=2),
                    raise_server_exceptions=False) as c:
        big = _npy(np.zeros((200, 6), np.float32))
        r = c.post("/api/query", files={"file": ("q.npy", big)})
        assert r.status_code == 413 and "over the limit" in r.json()["error"]
        r = c.post("/api/query", files={"file": ("q.npy", _npy(np.zeros((3, 6), np.float32)))})
        assert r.status_code == 413 and "3 examples" in r.json()["error"]


# ----------------------------------------------------------------------------- safety

def test_token_is_required_on_every_request(built):
    _, out = built
    with TestClient(create_app(out, task=str(built[0]), token=TOKEN), raise_server_exceptions=False) as c:
        for path in ("/healthz", "/", "/api/info", "/api/query?example=1"):
            r = c.get(path)
            assert r.status_code == 401 and "token" in r.json()["error"], path
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/healthz", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/healthz", params={"token": TOKEN[:-1]}).status_code == 401
        assert c.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        r = c.get("/api/query", params={"example": 1, "token": TOKEN})
        assert r.status_code == 200 and r.json()["results"][0]["proponents"]


def test_non_loopback_bind_needs_a_token(built):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(ServeError, match="non-loopback"):
            check_bind(host, None)
        check_bind(host, TOKEN)
    with pytest.raises(ServeError, match="shorter than 8"):
        check_bind("0.0.0.0", "abc")
    from typer.testing import CliRunner

    from grass_index.cli.main import app

    res = CliRunner().invoke(app, ["serve", str(built[1]), "--task", str(built[0]), "--host", "0.0.0.0"],
                             env={"GRASS_INDEX_TOKEN": ""})
    assert res.exit_code == 1 and "refusing to serve on 0.0.0.0" in res.output, res.output


def _digests(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_serving_never_writes_to_the_index_directory(built, tmp_path):
    task, out = built
    copy = tmp_path / "idx"
    shutil.copytree(out, copy)
    before = _digests(copy)
    with TestClient(create_app(copy, task=str(task)), raise_server_exceptions=False) as c:
        assert c.get("/api/query", params=dict(example=1, opponents=1, images=1)).status_code == 200
        assert c.post("/api/query", json=dict(text="1 2 3 4 5 6")).status_code == 200
        assert c.get("/api/info").status_code == 200 and c.get("/api/train/3").status_code == 200
    after = _digests(copy)
    assert sorted(after) == sorted(before)  # nothing created or removed
    # LMDB's lock file holds the reader table, which a read-only open updates by design; every
    # other file (config, build record, sketches, FAISS) is byte-identical and untouched
    lock = "sketches/lock.mdb"
    assert {k: v for k, v in after.items() if k != lock} == \
        {k: v for k, v in before.items() if k != lock}


def test_a_corrupted_index_is_refused_with_verifys_message(built, tmp_path):
    _, out = built
    copy = tmp_path / "idx"
    shutil.copytree(out, copy)
    rep = gi.verify_index(copy, fast=True)  # what serve runs: no full scan of the sketches
    assert rep["ok"] and "every id has a sketch" not in [c["name"] for c in rep["checks"]]
    key = gi.open_index(copy).settings.preconditioner_key
    with SketchStore.open(copy / "sketches", readonly=False) as st:  # a forged saturated list
        st.put_array(f"precond/{key}/saturated", np.array([[0, 0]], np.int64))
    with pytest.raises(ServeError, match=r"failed verification \(exact scan: .*"
                       r"verify_index\('.*', repair=True\)"):  # a Python caller's spelling
        create_app(copy, task=str(built[0]))
    from grass_index.errors import cli_spelling
    with cli_spelling(), pytest.raises(ServeError, match=r"failed verification .*--repair"):
        create_app(copy, task=str(built[0]))  # as `grass-index serve` runs it
    with pytest.raises(ServeError, match="not a directory"):
        create_app(tmp_path / "missing")


# ----------------------------------------------------------------------------- batching

def test_micro_batcher_groups_concurrent_jobs_and_isolates_errors():
    calls = []

    def run(jobs):
        calls.append(list(jobs))
        return [ValueError(f"bad {j}") if j < 0 else j * 10 for j in jobs]

    async def main():
        b = MicroBatcher(run, window_ms=20, max_batch=8)
        res = await asyncio.gather(*(b.submit(j) for j in [1, 2, -3, 4, 5, 6, 7, 8, 9, 10]),
                                   return_exceptions=True)
        await b.aclose()
        b.shutdown()
        return res

    res = asyncio.run(main())
    assert res[:2] == [10, 20] and res[3:] == [40, 50, 60, 70, 80, 90, 100]
    assert isinstance(res[2], ValueError) and str(res[2]) == "bad -3"
    assert [len(c) for c in calls] == [8, 2]  # 10 jobs, max 8 per batch: two calls


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(built):
    _, out = built
    eng = Engine(out, task=str(built[0]), verify=False)
    sizes = []
    real = eng.run

    def spy(jobs):
        sizes.append(len(jobs))
        return real(jobs)

    eng.run = spy
    app = create_app(out, engine=eng, batch_window_ms=50)
    try:  # the HTTP client starlette's TestClient uses (httpx2 in recent releases)
        import httpx2 as httpx
    except ImportError:
        httpx = pytest.importorskip("httpx")

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(*(c.get("/api/query", params=dict(example=i % 6, k=3))
                                        for i in range(12)))
        return [r.json() for r in rs]

    docs = asyncio.run(main())
    assert max(sizes) > 1 and sum(sizes) == 12
    want = reference(out, [eng.queries[i] for i in range(6)], 3)
    for i, d in enumerate(docs):
        assert d["results"][0]["example"] == i % 6
        assert hits(d["results"][0]["proponents"]) == want[i % 6]


# ----------------------------------------------------------------------------- browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(built):
    uvicorn = pytest.importorskip("uvicorn")
    _, out = built
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(out, task=str(built[0]), token=TOKEN), host="127.0.0.1",
                                           port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not server.started:
        assert th.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    th.join(10)


def test_page_in_a_headless_browser(live_server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{live_server}/?token={TOKEN}")
            page.wait_for_selector("body[data-ready='1']", timeout=15000)
            assert page.locator("#example option").count() == 6
            page.select_option("#example", "4")
            page.fill("#k", "5")
            page.click("#run")
            page.wait_for_selector("#proponents li.hit", timeout=15000)
            rows = page.locator("#proponents li.hit")
            assert rows.count() == 5 and page.locator("#opponents li.hit").count() == 5
            first = rows.nth(0)
            assert first.locator("img.thumb").get_attribute("src").startswith("data:image/png")
            assert first.locator("a").get_attribute("href").startswith("/api/train/")
            assert "class " in first.locator(".text").inner_text()
            assert "query query_data[4]" in page.inner_text("#query")
            shot = Path(os.environ.get("GRASS_INDEX_SCREENSHOT", tmp_path / "serve_page.png"))
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert not errors, errors  # no script error, no failed request so far
            # the page shows the API's error for a bad query, with the fix
            page.fill("#exid", "99")
            page.click("#run")
            page.wait_for_selector("#error:not(:empty)", timeout=15000)
            assert "out of range" in page.inner_text("#error")
            assert "fix:" in page.inner_text("#error")
            assert not [e for e in errors if "status of 400" not in e], errors
            # the self-influence ranking opens on demand, highest first
            page.click("#selfbox summary")
            page.wait_for_selector("#selfinf li.hit", timeout=15000)
            assert page.locator("#selfinf li.hit").count() == 5
            # a typed text is POSTed by the page itself (same origin: allowed)
            page.fill("#exid", "")
            page.fill("#text", "0.5 -1 2 0 0.25 1")
            page.click("#run")
            page.wait_for_selector("text=query text[0]", timeout=15000)
            assert page.locator("#proponents li.hit").count() == 5
        finally:
            browser.close()


# ----------------------------------------------------------------------------- language model

def test_text_queries_on_a_language_model_batch_like_single_ones(tmp_path, monkeypatch):
    """Typed text goes through the task's encode(); texts of different lengths padded into
    one batch score exactly as each alone, and a training line's top proponent is itself."""
    pytest.importorskip("transformers")
    from test_examples_lm import HF_LM, LINES, _save_gpt2_no_tokenizer

    from grass_index.serve.engine import Job

    _save_gpt2_no_tokenizer(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(LINES) + "\n")
    monkeypatch.setenv("GRASS_INDEX_MODEL_PATH", str(tmp_path / "model"))
    monkeypatch.setenv("GRASS_INDEX_TEXT_FILE", str(tmp_path / "corpus.txt"))
    monkeypatch.delenv("GRASS_INDEX_QUERY_FILE", raising=False)
    monkeypatch.setenv("GRASS_INDEX_MAX_LENGTH", "48")
    t = load_task(HF_LM)
    out = tmp_path / "idx"
    gi.build_index(t.model(), t.train_data(), t.loss, out, sparsification="random_mask-16*16",
                   projection="sjlt-128", batch_size=4, collate=t.collate, task=t.ref,
                   progress=False)
    eng = Engine(out, task=HF_LM)
    with TestClient(create_app(out, engine=eng), raise_server_exceptions=False) as c:
        assert c.get("/api/info").json()["features"]["text"] is True
        r = c.post("/api/query", json=dict(text=LINES[4], k=3))
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["proponents"][0]["train_id"] == 4
        assert res["proponents"][0]["label"].strip() == res["label"].strip() == LINES[4]
    texts = [LINES[0], LINES[3] + " and more words to pad the others", LINES[5]]
    jobs = [Job(items=eng.encode(s), ids=[0], source="text", k=5) for s in texts]
    together = eng.run(jobs)
    for s, got in zip(texts, together):
        alone = eng.run([Job(items=eng.encode(s), ids=[0], source="text", k=5)])[0]
        assert [r["train_id"] for r in got[0]["proponents"]] == \
            [r["train_id"] for r in alone[0]["proponents"]]
        np.testing.assert_allclose([r["score"] for r in got[0]["proponents"]],
                                   [r["score"] for r in alone[0]["proponents"]], rtol=1e-4,
                                   atol=1e-5)


def test_without_a_token_only_loopback_host_names_are_answered(built):
    """A page elsewhere cannot reach a loopback server by DNS rebinding: its requests carry
    the attacker's host name."""
    _, out = built
    from grass_index.serve.guard import loopback_hosts

    eng = Engine(out, task=str(built[0]), verify=False)
    app = create_app(out, engine=eng, allowed_hosts=loopback_hosts("127.0.0.1"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").status_code == 200
        for host in ("localhost:8000", "LOCALHOST", "[::1]:8000"):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        for host in ("evil.example:8000", "127.0.0.1.evil.example", "::1"):
            r = c.get("/api/info", headers={"host": host})
            assert r.status_code == 400 and host in r.json()["error"] and r.json()["fix"], host


# ----------------------------------------------------------------------------- round two:
# bounded work per upload, cross-origin writes, no 500s, the API's docs, the real port

def _zip(members: dict, compress=True) -> bytes:
    """A zip (an .npz or a torch.save file) of ``name -> bytes or iterable of chunks``, streamed
    so that a member can declare gigabytes while this test holds a few MB."""
    import zipfile

    buf = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", mode) as z:
        for name, data in members.items():
            if isinstance(data, bytes):
                z.writestr(name, data)
                continue
            with z.open(name, "w", force_zip64=True) as f:
                for chunk in data:
                    f.write(chunk)
    return buf.getvalue()


def _npy_header(shape, dtype="<f4") -> bytes:
    from numpy.lib import format as npformat

    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, dict(descr=dtype, fortran_order=False, shape=shape))
    return buf.getvalue()


def _zeros(nbytes: int, chunk: int = 1 << 22):
    block = bytes(chunk)
    for lo in range(0, nbytes, chunk):
        yield block[:min(chunk, nbytes - lo)]


def _bombs() -> dict:
    rows = 1 << 16  # 64 Ki examples of 6 float32: far over 64 per request and the byte budget
    inflating = _zip({"x.npy": iter([_npy_header((rows * 64, 6)), *_zeros(rows * 64 * 24)])})
    pt = io.BytesIO()
    torch.save(torch.zeros(1 << 24), pt)  # 64 MiB of zeros, then deflated
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(pt.getvalue()))
    deflated_pt = _zip({i.filename: src.read(i.filename) for i in src.infolist()})
    return {
        "npz member inflating 1000:1": ("q.npz", inflating, 413, "unpacks to"),
        "npz member header of 1e12 elements": (
            "q.npz", _zip({"x.npy": _npy_header((1, 10**12)) + bytes(64)}), 413,
            "declares"),
        "npy header of 1e12 elements": ("q.npy", _npy_header((4, 25 * 10**10)) + bytes(64), 413,
                                        "declares"),
        "npy of 500k rows": ("q.npy", _npy(np.zeros(500_000, np.float32)), 413,
                             "500000 examples"),
        "npy truncated": ("q.npy", _npy_header((3, 6)) + bytes(8), 400, "truncated"),
        "pt storage deflated 1000:1": ("q.pt", deflated_pt, 413, "unpacks to"),
    }


@pytest.fixture(scope="module")
def bombs():
    return _bombs()


@pytest.mark.parametrize("case", ["npz member inflating 1000:1",
                                  "npz member header of 1e12 elements",
                                  "npy header of 1e12 elements", "npy of 500k rows",
                                  "npy truncated", "pt storage deflated 1000:1"])
def test_upload_bombs_are_refused_from_their_headers(client, bombs, case, monkeypatch):
    """Each file is refused with a 4xx JSON error before anything is unpacked: numpy's
    allocations (traced by tracemalloc) stay far below what the file declares, and torch.load
    is never reached."""
    import tracemalloc

    name, data, status, needle = bombs[case]
    assert len(data) < 8 << 20  # each fits the default body limit
    reached = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: reached.append(1) or 1 / 0)
    tracemalloc.start()
    try:
        r = client.post("/api/query", files={"file": (name, data)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "fix"} and needle in body["error"] and body["fix"], body
    assert not reached
    assert peak < 4 * len(data) + (8 << 20), peak  # the body itself, a copy or two; no more


def test_upload_budget_follows_the_index_signature(built):
    from grass_index.input_budget import OPEN_ELEMENTS, InputBudget

    sig = gi.open_index(built[1]).config["item_signature"]
    b = InputBudget.for_signature(sig, max_items=64)
    assert b.max_bytes == 64 * 7 * 8 + (1 << 20)  # x: 6 floats, y: 1 int, 8 bytes each
    tokens = {"seq": [{"tensor": [None], "dtype": "int64"}]}
    assert InputBudget.for_signature(tokens, 4).max_bytes == 4 * OPEN_ELEMENTS * 8 + (1 << 20)


@pytest.mark.parametrize("array,needle", [
    (np.array(["a", "bc"]), "<U2 values"),
    (np.zeros(3, dtype=[("a", "<f4"), ("b", "<i8")]), "values; examples are numeric"),
])
def test_string_and_structured_npy_are_a_400(client, array, needle, tmp_path):
    r = client.post("/api/query", files={"file": ("q.npy", _npy(array))})
    assert r.status_code == 400 and needle in r.json()["error"] and r.json()["fix"], r.text
    (tmp_path / "q.npy").write_bytes(_npy(array))  # `query --input` (no budget): same refusal
    with pytest.raises(gi.GrassIndexError, match="values; examples are numeric"):
        gi.load_examples(tmp_path / "q.npy")


def test_a_pt_upload_of_examples_still_answers(built, client):
    t = load_task(built[0])
    qd = t.query_data()
    buf = io.BytesIO()
    torch.save([qd[i] for i in range(2)], buf)
    r = client.post("/api/query", files={"file": ("q.pt", buf.getvalue())}, data={"k": "3"})
    assert r.status_code == 200, r.text
    want = reference(built[1], [qd[0], qd[1]], 3)
    assert [hits(g["proponents"]) for g in r.json()["results"]] == want


def test_cross_origin_writes_are_refused(client):
    for same in ({"origin": "http://testserver", "sec-fetch-site": "same-origin"},
                 {"origin": "http://testserver"},  # a browser without Sec-Fetch-Site
                 {"origin": "https://public.example", "sec-fetch-site": "same-origin"}):
        # (the last: the page behind a proxy that rewrites Host; the browser's verdict holds)
        r = client.post("/api/query", json=dict(example=1), headers=same)
        assert r.status_code == 200, (same, r.text)
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"},
                    {"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"},
                    {"origin": "http://testserver.evil.example"}):
        r = client.post("/api/query", files={"file": ("q.npy", b"x")}, headers=headers)
        assert r.status_code == 403 and "cross-origin" in r.json()["error"], (headers, r.text)
        assert r.json()["fix"]
    # reads stay open to the page and to scripts: a GET changes nothing
    r = client.get("/api/query", params=dict(example=1), headers={"origin": "http://evil.example"})
    assert r.status_code == 200


def test_no_500_on_nested_json_non_ascii_tokens_or_overflowing_inputs(built, client):
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/api/query", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text
    for text in ("1e37 1e37 1e37 1e37 1e37 1e37", "3e38 -3e38 3e38 1 1 1"):
        r = client.post("/api/query", json=dict(text=text, opponents=True))
        assert r.status_code in (200, 400), r.text
        assert "Infinity" not in r.text and "NaN" not in r.text
        if r.status_code == 400:
            assert "overflowed" in r.json()["error"] and r.json()["fix"], r.text
    # an input that overflows the model (inf through tanh: a NaN gradient) is a clear 400
    r = client.post("/api/query", json=dict(text="inf inf inf inf inf inf"))
    assert r.status_code == 400 and "non-finite" in r.json()["error"], r.text
    x = np.zeros((2, 6), np.float32)
    x[1] = np.inf
    buf = io.BytesIO()
    np.savez(buf, x=x, y=np.zeros(2, np.int64))
    r = client.post("/api/query", files={"file": ("q.npz", buf.getvalue())})
    assert r.status_code == 400 and "non-finite" in r.json()["error"], r.text
    # finite sketches whose scores overflow float32: refused, never "Infinity" in the JSON
    eng = client.app.state.engine
    search = eng.idx.search

    def overflowing(q, k, opponents=False):
        return [[(i, float("inf") if i == 0 else s) for i, s in row]
                for row in search(q, k, opponents=opponents)]

    eng.idx.search = overflowing
    try:
        r = client.get("/api/query", params=dict(example=1, k=40))
    finally:
        del eng.idx.search
    assert r.status_code == 400 and "overflowed" in r.json()["error"], r.text
    assert client.get("/api/query", params=dict(example=1)).status_code == 200
    token = "t\u00f6k\u00e9n-for-tests"
    eng = client.app.state.engine
    with TestClient(create_app(built[1], engine=eng, token=token),
                    raise_server_exceptions=False) as c:
        for bad in ("%E2%82%AC", "%ff%fe", "\u20ac"):
            r = c.get("/healthz?token=" + bad)
            assert r.status_code == 401 and r.json()["fix"], r.text
        assert c.get("/healthz", params={"token": token}).status_code == 200


def test_openapi_docs_are_served_with_the_apis_guard(built, client):
    schema = client.get("/openapi.json").json()
    assert {"/api/query", "/api/info", "/api/examples", "/api/self-influence"} <= \
        set(schema["paths"])
    k = next(p for p in schema["paths"]["/api/query"]["get"]["parameters"] if p["name"] == "k")
    assert k["schema"]["maximum"] == 100 and k["schema"]["minimum"] == 1
    assert "swagger" in client.get("/docs").text.lower()
    eng = client.app.state.engine
    with TestClient(create_app(built[1], engine=eng, token=TOKEN),
                    raise_server_exceptions=False) as c:
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/docs").status_code == 401
        page = c.get("/docs", params={"token": TOKEN})
        assert page.status_code == 200 and f"/openapi.json?token={TOKEN}" in page.text
        assert c.get("/openapi.json", params={"token": TOKEN}).status_code == 200


def test_loaded_objects_are_frozen_out_of_the_collector(client):
    """A full collection walks only what came after start: no server-wide pause scanning
    torch, the model and the data (benchmarks/serve.py measures the p99 this removes)."""
    import gc

    info = client.get("/api/info").json()
    assert info["gc"]["frozen"] > 10_000 and gc.get_freeze_count() > 10_000
    assert len(info["gc"]["collections"]) == 3


def test_serve_port_0_prints_the_port_it_bound(built):
    import http.client
    import re
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("GRASS_INDEX_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "grass_index.cli.main", "serve", str(built[1]),
                             "--task", str(built[0]), "--port", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m and int(m.group(1)) > 0, line
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=30)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        proc.terminate()
        proc.wait(30)
