"""The page at ``/``: plain HTML and a little JS over the JSON API, no build step.

Every piece of training or query data goes into the page through ``textContent`` or an
``<img src="data:...">`` (never innerHTML), and the Content-Security-Policy allows only this
page's own script and style (by nonce) and inline images, so text from a corpus cannot run.
The token, when the server has one, is read from the page's ``?token=`` and sent on every call.
"""
from __future__ import annotations

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>grass-index</title>
<style nonce="__NONCE__">
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .2em; } .muted { color: #777; }
form { display: flex; flex-wrap: wrap; gap: .6em 1em; align-items: end; margin: 1em 0;
       padding: .8em; background: #f4f4f6; border-radius: 6px; }
label { display: flex; flex-direction: column; font-size: .85em; color: #555; }
input, select, button { font: inherit; } #text { min-width: 22em; }
button { padding: .35em 1.2em; cursor: pointer; }
#error { color: #b00; white-space: pre-wrap; } #query { margin: 1em 0; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 2em; }
ol { list-style: none; padding: 0; margin: 0; }
li.hit { display: grid; grid-template-columns: 2.2em auto 1fr; gap: .6em; align-items: center;
         padding: .35em 0; border-bottom: 1px solid #eee; }
.rank { color: #888; text-align: right; } img.thumb { width: 48px; height: 48px;
        image-rendering: pixelated; border: 1px solid #ccc; }
.bar { height: 8px; border-radius: 4px; margin: 2px 0; }
.pro .bar { background: #2a8a3a; } #selfbox .bar { background: #7a5ab8; }
details { margin: 1.5em 0; } summary { cursor: pointer; font-weight: 600; } .opp .bar { background: #c0392b; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; } .score { font-variant-numeric: tabular-nums; }
a { color: #2456a8; }
</style></head>
<body>
<h1>grass-index</h1>
<div id="about" class="muted">loading…</div>
<form id="form">
  <label>query example <select id="example"></select></label>
  <label>or id <input id="exid" type="number" min="0" step="1" size="6"></label>
  <label id="textbox" hidden>or text <input id="text" type="text" placeholder="type a query"></label>
  <label id="filebox">or file (.pt/.npy/.npz) <input id="file" type="file" accept=".pt,.npy,.npz"></label>
  <label>top k <input id="k" type="number" min="1" value="10" size="4"></label>
  <label><span>opponents</span><input id="opp" type="checkbox" checked></label>
  <button id="run" type="submit">attribute</button>
</form>
<div id="error" role="alert"></div>
<div id="query"></div>
<div class="cols">
  <section class="pro"><h2>proponents <span class="muted">(helped)</span></h2><ol id="proponents"></ol></section>
  <section class="opp"><h2>opponents <span class="muted">(hurt)</span></h2><ol id="opponents"></ol></section>
</div>
<details id="selfbox"><summary>most self-influential training examples
  <span class="muted">(mislabelled or atypical first)</span></summary><ol id="selfinf"></ol></details>
<script nonce="__NONCE__">
"use strict";
const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
async function api(path, opts) {
  opts = opts || {};
  opts.headers = Object.assign({}, opts.headers || {});
  if (token) opts.headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, opts);
  const body = await r.json().catch(() => ({error: "HTTP " + r.status, fix: ""}));
  if (!r.ok) throw new Error(body.error + (body.fix ? "\\nfix: " + body.fix : ""));
  return body;
}
function trainLink(id) {
  const a = el("a", null, "#" + id);
  a.href = "/api/train/" + id + (token ? "?token=" + encodeURIComponent(token) : "");
  a.target = "_blank"; a.rel = "noopener";
  return a;
}
function renderHits(list, hits) {
  list.replaceChildren();
  const top = Math.max(1e-30, ...hits.map((h) => Math.abs(h.score)));
  hits.forEach((h, r) => {
    const li = el("li", "hit");
    li.dataset.trainId = h.train_id;
    li.append(el("span", "rank", r + 1));
    if (h.image) { const img = el("img", "thumb"); img.src = h.image; img.alt = "train " + h.train_id; li.append(img); }
    else li.append(el("span"));
    const body = el("div");
    const head = el("div");
    head.append(trainLink(h.train_id), " ", el("span", "score", (h.score >= 0 ? "+" : "") + h.score.toPrecision(4)));
    const bar = el("div", "bar");
    bar.style.width = (100 * Math.abs(h.score) / top).toFixed(1) + "%";
    body.append(head, bar);
    if (h.label !== null && h.label !== undefined) body.append(el("div", "text", h.label));
    li.append(body);
    list.append(li);
  });
}
function render(res) {
  const q = res.results[0];
  const box = $("query");
  box.replaceChildren();
  const head = el("div");
  head.append(el("strong", null, "query " + q.source + "[" + q.example + "]"),
              el("span", "muted", "  " + res.ms_per_example + " ms"));
  box.append(head);
  if (q.image) { const img = el("img", "thumb"); img.src = q.image; img.alt = "query"; box.append(img); }
  if (q.label !== null && q.label !== undefined) box.append(el("div", "text", q.label));
  renderHits($("proponents"), q.proponents);
  renderHits($("opponents"), q.opponents || []);
}
async function run(ev) {
  if (ev) ev.preventDefault();
  $("error").textContent = "";
  const k = $("k").value || "10", opp = $("opp").checked ? "1" : "0";
  try {
    let res;
    const file = $("file").files[0], text = $("text").value.trim(), id = $("exid").value;
    if (file) {
      const fd = new FormData();
      fd.append("file", file); fd.append("k", k); fd.append("opponents", opp); fd.append("images", "1");
      res = await api("/api/query", {method: "POST", body: fd});
    } else if (text) {
      res = await api("/api/query", {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify({text: text, k: Number(k), opponents: opp === "1", images: true})});
    } else {
      const ex = id !== "" ? id : $("example").value;
      res = await api("/api/query?example=" + encodeURIComponent(ex) + "&k=" + encodeURIComponent(k) + "&opponents=" + opp + "&images=1");
    }
    render(res);
  } catch (e) {
    $("error").textContent = e.message;
  }
}
async function showSelfInfluence() {
  if (!$("selfbox").open || $("selfinf").childElementCount) return;
  try {
    const res = await api("/api/self-influence?limit=" + encodeURIComponent($("k").value || "10") + "&images=1");
    renderHits($("selfinf"), res.results);
  } catch (e) {
    $("error").textContent = e.message;
  }
}
async function init() {
  try {
    const info = await api("/api/info");
    $("about").textContent = info.n_train + " training examples · task " + info.task + " · index " + info.index;
    $("textbox").hidden = !info.features.text;
    $("k").max = info.limits.max_k;
    if (info.features.query_data) {
      const ex = await api("/api/examples?split=query&limit=200");
      for (const e of ex.examples) {
        const o = el("option", null, "#" + e.id + (e.label ? "  " + e.label : ""));
        o.value = e.id;
        $("example").append(o);
      }
    }
    $("form").addEventListener("submit", run);
    $("selfbox").addEventListener("toggle", showSelfInfluence);
    document.body.dataset.ready = "1";
  } catch (e) {
    $("about").textContent = "";
    $("error").textContent = e.message;
  }
}
init();
</script>
</body></html>
"""


def page_html(nonce: str) -> str:
    """The page, with this response's CSP nonce on its script and style."""
    return _PAGE.replace("__NONCE__", nonce)
