"""Load test of `grass-index serve`: concurrent clients against 127.0.0.1, from the first request.

    python benchmarks/serve.py runs/digits                  # 16 clients x 30 s, batching on/off
    python benchmarks/serve.py runs/digits --seconds 10 --configs batched:4,unbatched:4
    python benchmarks/serve.py runs/digits --rounds 3 --baseline /work/main   # the p99 stall

The index directory is built first with `grass-index build --out DIR` when it does not exist
(the bundled digits task). Each configuration starts its own server process on a free
loopback port and runs N client threads (one keep-alive connection each) sending
`GET /api/query?example=I&k=10` with random ids for the given seconds, from the first request
(no warm-up is left out), and stops the server. Prints a markdown table: requests,
throughput, p50/p99/max latency, errors, the server's RSS before and after the run, and the
mean batch size the server formed. The cost of one `grass-index query` process (what serving
saves) is measured once for comparison.

``--rounds R`` instead runs the pattern of a stall report: one server per source tree, 8
clients x 25 id queries each, a NEW connection per request, R rounds; per round p50/p99/max,
the server's full (generation-2) garbage collections, and the stall's signature: the most
clients waiting at one moment on a request slower than 3x the round's p50 (all of them: a
server-wide pause); beside them the server's own view (GET /api/stats): its handling time
per request, every GC pause (wall and CPU ms) and its batches' wall and CPU time, which a
loaded machine does not fake. ``--baseline DIR`` runs the same rounds against the code in DIR (e.g. the
main checkout) in the same run, alternating, for a side-by-side ratio on a shared machine.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402

HOST = "127.0.0.1"  # never anything else: this sends thousands of requests
CONFIGS = {  # name -> serve options
    "batched": ["--batch-window-ms", "2", "--max-batch", "32", "--threads", "1"],
    "unbatched": ["--batch-window-ms", "0", "--max-batch", "1", "--threads", "1"],
    "batched-all-threads": ["--batch-window-ms", "2", "--max-batch", "32"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def get(conn: http.client.HTTPConnection, path: str):
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read()


def start_server(index: Path, options: list[str], task: str | None, source: Path | None = None):
    """A server process on a free port, running the code in ``source`` (default: this tree)."""
    port = free_port()
    cmd = [sys.executable, "-m", "grass_index.cli.main", "serve", str(index.resolve()),
           "--host", HOST, "--port", str(port), *options]
    cmd += ["--task", str(Path(task).resolve())] if task else []
    source = source or Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(source))  # (and its cwd: `-m` imports from there)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=source)
    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().strip()}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            if get(conn, "/healthz")[0] == 200:
                conn.close()
                return proc, port, time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)
        if time.perf_counter() - t0 > 300:
            proc.kill()
            raise SystemExit("server did not come up within 300 s")


def client(port: int, n_examples: int, k: int, stop_at: float, seed: int, out: list):
    rng = random.Random(seed)
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    lat, errors = [], 0
    while time.perf_counter() < stop_at:
        path = f"/api/query?example={rng.randrange(n_examples)}&k={k}"
        t0 = time.perf_counter()
        try:
            status, body = get(conn, path)
            ok = status == 200 and b'"proponents"' in body
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=30)
        lat.append(time.perf_counter() - t0)
        errors += not ok
    conn.close()
    out.append((lat, errors))


def run_config(name, index, options, task, clients, seconds, k):
    proc, port, startup = start_server(index, options, task)
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        info = json.loads(get(conn, "/api/info")[1])
        n = info["n_query"] or info["n_train"]
        info0 = json.loads(get(conn, "/api/info")[1])["batching"]
        rss0 = rss_mib(proc.pid)
        results: list = []
        stop_at = time.perf_counter() + seconds
        threads = [threading.Thread(target=client, args=(port, n, k, stop_at, s, results))
                   for s in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss1 = rss_mib(proc.pid)
        conn.close()  # idle past the server's keep-alive timeout: open a new one
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        info1 = json.loads(get(conn, "/api/info")[1])["batching"]
        conn.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = sorted(x for r in results for x in r[0])
    errors = sum(r[1] for r in results)
    pct = lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
    jobs, batches = info1["jobs"] - info0["jobs"], info1["batches"] - info0["batches"]
    return [name, clients, len(lat), f"{len(lat) / wall:.1f}", f"{pct(0.5):.1f}",
            f"{pct(0.99):.1f}", f"{1000 * lat[-1]:.1f}", errors,
            f"{rss0:.0f} -> {rss1:.0f}", f"{jobs / max(1, batches):.1f}", f"{startup:.1f}"]


def fresh_client(port: int, n: int, k: int, per_client: int, seed: int, out: list):
    """``per_client`` queries, each on a new connection (as a plain HTTP client does)."""
    rng = random.Random(seed)
    for _ in range(per_client):
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=30)
            status, body = get(conn, f"/api/query?example={rng.randrange(n)}&k={k}")
            conn.close()
            ok = status == 200 and b'"proponents"' in body
        except (OSError, http.client.HTTPException):
            ok = False
        out.append((t0, time.perf_counter(), ok))


def stall_signature(requests: list, p50: float) -> tuple[int, float]:
    """The most clients waiting at one moment on a request slower than 3x p50, and when
    (ms from the round's start): 8 of 8 is a server-wide pause."""
    slow = [(c, t0, t1) for c, (t0, t1, _) in requests if t1 - t0 > 3 * p50]
    best, when = 0, 0.0
    for _, t0, t1 in slow:
        moment = t1 - 1e-4  # just before the slowest request ends, every stalled one is waiting
        waiting = {c for c, a, b in slow if a <= moment <= b}
        if len(waiting) > best:
            best, when = len(waiting), moment
    start = min(t0 for _, (t0, _, _) in requests)
    return best, 1000 * (when - start)


def gc_collections(port: int) -> list:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    info = json.loads(get(conn, "/api/info")[1])
    conn.close()
    return info.get("gc", {}).get("collections") or [float("nan")] * 3


def server_side(port: int, since: float) -> list:
    """The server's own view of the round (GET /api/stats): its handling time per query
    request (p50/p99 ms), its GC pauses (how many, the longest's wall and CPU ms) and its
    batches' runs (p99 wall/CPU ms): CPU times a loaded machine does not inflate."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    st = json.loads(get(conn, f"/api/stats?since={since}")[1])
    conn.close()
    if "requests" not in st:  # a server without /api/stats (older code)
        return ["-"] * 4
    handle = sorted(r[1] for r in st["requests"] if r[2] == "/api/query")
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa
    longest = max(st["gc"], key=lambda g: g[2], default=None)
    wall = sorted(b[2] for b in st["batches"])
    cpu = sorted(b[3] for b in st["batches"])
    return [f"{pct(handle, 0.5):.1f} / {pct(handle, 0.99):.1f}",
            f"{len(st['gc'])}, max {longest[2]:.1f} / {longest[3]:.1f} (gen {longest[1]})"
            if longest else "0",
            f"{len(wall)}: {pct(wall, 0.99):.1f} / {pct(cpu, 0.99):.1f}",
            f"{max((b[1] for b in st['batches']), default=0)}"]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(port: int, n: int, k: int, clients: int, per_client: int, seed: int,
              pid: int) -> list:
    outs = [[] for _ in range(clients)]
    gc0 = gc_collections(port)
    since, cpu0 = time.monotonic(), cpu_seconds(pid)
    threads = [threading.Thread(target=fresh_client, args=(port, n, k, per_client,
                                                           seed + c, outs[c]))
               for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.monotonic() - since, cpu_seconds(pid) - cpu0
    gc1 = gc_collections(port)
    server = server_side(port, since)
    requests = [(c, r) for c, out in enumerate(outs) for r in out]
    lat = sorted(t1 - t0 for _, (t0, t1, _) in requests)
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
    together, at = stall_signature(requests, pct(0.5))
    return [f"{1000 * pct(0.5):.1f}", f"{1000 * pct(0.99):.1f}", f"{1000 * lat[-1]:.1f}",
            sum(not ok for _, (_, _, ok) in requests), gc1[2] - gc0[2],
            f"{together}/{clients}" + (f" at {at:.0f} ms" if together else ""),
            *server, f"{1000 * cpu / len(requests):.1f} ({cpu / wall:.2f})",
            f"{os.getloadavg()[0]:.1f}"]


def run_rounds(index: Path, task, sources: dict, rounds: int, clients: int, per_client: int,
               k: int, options: list[str]) -> list:
    """``rounds`` rounds on one server per source tree, alternating between them."""
    servers = {name: start_server(index, options, task, src) for name, src in sources.items()}
    rows = []
    try:
        n = {}
        for name, (_, port, _) in servers.items():
            conn = http.client.HTTPConnection(HOST, port, timeout=30)
            info = json.loads(get(conn, "/api/info")[1])
            conn.close()
            n[name] = info["n_query"] or info["n_train"]
        for r in range(rounds):
            for name, (proc, port, _) in servers.items():
                print(f"round {r + 1} on {name} ...", file=sys.stderr)
                rows.append([name, r + 1, clients * per_client,
                             *one_round(port, n[name], k, clients, per_client, 100 * r,
                                        proc.pid)])
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rows


def full_gc_ms(index: Path, task, reps: int = 5) -> tuple[float, float, int]:
    """In this process, with the server's Engine loaded: median ms of one full collection
    (what every in-flight request waits for) with everything walked vs with the loaded
    objects frozen as the server now does at start; and how many objects that is."""
    import gc
    import statistics

    from grass_index.serve.engine import Engine

    eng = Engine(index, task, verify=False)  # kept alive to the end: it is what is walked
    gc.collect()

    def timed():
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            gc.collect()
            out.append(1000 * (time.perf_counter() - t0))
        return statistics.median(out)

    walked, n = timed(), len(gc.get_objects())
    gc.freeze()
    frozen = timed()
    gc.unfreeze()
    del eng
    return walked, frozen, n


def service_times(index: Path, task: str | None, k: int, reps: int = 7):
    """In this process, without HTTP: median ms to answer 16 queries as 16 calls of one vs
    one batch of 16 (the engine's own cost, 1 thread, side by side)."""
    import statistics

    from grass_index.index.threads import configure_threads
    from grass_index.serve.engine import Engine, Job, batch_friendly_search

    configure_threads(1, torch_too=True)
    batch_friendly_search()  # as the server does
    eng = Engine(index, task, verify=False)
    data = eng.queries if eng.queries is not None else eng.train
    jobs = lambda: [Job(items=[data[i]], ids=[i], source="q", k=k) for i in range(16)]  # noqa
    eng.run(jobs())  # warm-up
    one, batch = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for j in jobs():
            eng.run([j])
        one.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        eng.run(jobs())
        batch.append(1000 * (time.perf_counter() - t0))
    return statistics.median(one), statistics.median(batch)


def cli_query_seconds(index: Path, task: str | None) -> float:
    cmd = [sys.executable, "-m", "grass_index.cli.main", "query", str(index), "--example", "0",
           "--json"] + (["--task", task] if task else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("index", nargs="?", default="runs/digits", type=Path)
    ap.add_argument("--task", default=None, help="task file (default: the index's)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients per run")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--configs", default="batched,unbatched,batched-all-threads,batched:1",
                    help=f"comma list of CONFIG or CONFIG:CLIENTS, CONFIG in {sorted(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=0, help="instead: R rounds of 8 clients x "
                    "25 queries, a new connection per request (see above)")
    ap.add_argument("--round-clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=25)
    ap.add_argument("--baseline", type=Path, default=None, help="with --rounds: also run the "
                    "code in this source tree (e.g. /work/main), alternating")
    ap.add_argument("--server-options", default="--threads 1",
                    help="with --rounds: serve options for every server")
    args = ap.parse_args()
    runs = [(c.partition(":")[0], int(c.partition(":")[2] or args.clients))
            for c in args.configs.split(",")]
    for name, clients in runs:
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; use {sorted(CONFIGS)}")
        if not 1 <= clients <= 256 or not 0 < args.seconds <= 600:
            raise SystemExit("keep it bounded: 1..256 clients, at most 600 s")
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    if not (args.index / "config.json").is_file():
        print(f"building {args.index} (bundled digits task) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "grass_index.cli.main", "build", "--out",
                        str(args.index)], check=True, stdout=subprocess.DEVNULL)
    if args.rounds:
        here = Path(__file__).resolve().parents[1]
        sources = {"this tree": here, **({"baseline": args.baseline} if args.baseline else {})}
        rows = run_rounds(args.index, args.task, sources, args.rounds, args.round_clients,
                          args.per_client, args.k, args.server_options.split())
        print(markdown_table(["server", "round", "requests", "p50 ms", "p99 ms", "max ms",
                              "errors", "full GCs", "clients stalled together",
                              "server: handling p50 / p99 ms", "GC pauses: n, max wall / CPU ms",
                              "batches: p99 wall / CPU ms", "largest batch",
                              "server CPU ms per request (cores used)", "load"], rows))
        print("\nclient columns: from the clients (connect to last byte); server columns: "
              "from GET /api/stats (handling = the ASGI call; GC pauses from gc.callbacks; a "
              "batch's CPU time is its worker thread's, which load does not inflate)")
        walked, frozen, n = full_gc_ms(args.index, args.task)
        print(f"\none full garbage collection with the server's engine loaded ({n} objects), "
              f"median of 5: {walked:.1f} ms walking everything, {frozen:.2f} ms with the "
              "loaded objects frozen")
        print(f"server options: {args.server_options}; a new connection per request; "
              f"cpus: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.1f}")
        return
    rows = []
    for name, clients in runs:
        print(f"{name}: {clients} clients x {args.seconds:g} s ...", file=sys.stderr)
        rows.append(run_config(name, args.index, CONFIGS[name], args.task, clients,
                               args.seconds, args.k))
    cli_s = cli_query_seconds(args.index, args.task)
    one, batch = service_times(args.index, args.task, args.k)
    print(markdown_table(["config", "clients", "requests", "req/s", "p50 ms", "p99 ms",
                          "max ms", "errors", "RSS MiB before -> after", "mean batch",
                          "startup s"], rows))
    print(f"\nengine alone (no HTTP, 1 thread, median of 7): 16 queries as 16 calls {one:.0f} ms, "
          f"as one batch {batch:.0f} ms ({one / batch:.1f}x)")
    print(f"one `grass-index query --example 0` process: {cli_s:.1f} s "
          f"(load task, model and index, then query); cpus: {os.cpu_count()}, "
          f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
