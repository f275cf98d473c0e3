"""Pass 2 again (a re-precondition) on an index ``benchmarks/lm.py --keep WORK`` built, sampling
VmRSS / RssAnon / RssFile every 0.2 s by stage: how much of pass 2's peak RSS is anonymous
memory (what the plan prices) and how much file-backed pages of the store (page cache).

    PYTHONPATH=$PWD python3 benchmarks/pass2_memory.py WORK/idx 0.3   # the damping to refit with
"""
import json
import os
import sys
import threading
import time

import grass_index as gi
peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
stage_peaks = {}
cur = {"stage": "open"}
stop = False
def read():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in peak:
            d[k] = int(v.split()[0]) * 1024
    return d
def sampler():
    while not stop:
        d = read()
        for k, v in d.items():
            peak[k] = max(peak[k], v)
            sp = stage_peaks.setdefault(cur["stage"], {})
            sp[k] = max(sp.get(k, 0), v)
        time.sleep(0.2)
t = threading.Thread(target=sampler, daemon=True); t.start()
def progress(stage, done, total):
    cur["stage"] = stage
t0 = time.time()
idx = gi.open_index(sys.argv[1])
idx.reprecondition(damping=sys.argv[2], progress=progress)
stop = True; t.join()
print(json.dumps({"s": time.time() - t0, "load": os.getloadavg(), "peak_gb": {k: v / 1e9 for k, v in peak.items()},
                  "stages": {s: {k: round(v / 1e9, 2) for k, v in d.items()} for s, d in stage_peaks.items()}}, indent=1))
