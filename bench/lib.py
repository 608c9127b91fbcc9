#!/usr/bin/env python3
"""Helpers for bench/run (standard library only).

  lib.py freeport                       a free 127.0.0.1 TCP port
  lib.py wait-http URL SECONDS          until URL answers 200 (exit 1 on timeout)
  lib.py wait-active SOCKET SECONDS     until batond has an active generation; prints its listen address
  lib.py active-pid SOCKET              the active generation's worker pid
  lib.py active-port SOCKET             the active generation's worker port (tcp)
  lib.py active-socket SOCKET           the active generation's worker socket (unix)
  lib.py wrk FILE                       wrk --latency output -> JSON (rps, p99_ms, non2xx, socket errors)
  lib.py rss PID OUT SECONDS            samples VmRSS every 0.2 s (OUT.ready once it runs); writes max kB to OUT (stops when OUT.stop exists)
  lib.py savelat SOCKET FILE N OUT      N saves of FILE, save -> cutover minus build time, JSON to OUT
  lib.py table RESULTS_DIR              the markdown table
"""

import datetime
import json
import os
import queue
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def freeport():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def wait_http(url, seconds):
    end = time.time() + float(seconds)
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return 0
        except Exception:
            pass
        time.sleep(0.05)
    print(f"timed out waiting for {url}", file=sys.stderr)
    return 1


def status(sock):
    out = subprocess.run(
        [os.environ["BATONCTL"], "--socket", sock, "status", "--json"],
        capture_output=True, text=True, timeout=10,
    )
    # 0: running; 3: no worker serving (starting, failed, ...), still JSON.
    if out.returncode not in (0, 3):
        return None
    return json.loads(out.stdout)


def wait_active(sock, seconds):
    end = time.time() + float(seconds)
    while time.time() < end:
        try:
            s = status(sock)
        except Exception:
            s = None
        if s and s.get("active"):
            print(s["listen"])
            return 0
        time.sleep(0.1)
    print("timed out waiting for an active generation", file=sys.stderr)
    return 1


def active_field(sock, field):
    """A field of the active generation (pid, port, socket)."""
    active = (status(sock) or {}).get("active") or {}
    if not active.get(field):
        print(f"no active worker with a {field}", file=sys.stderr)
        return 1
    print(active[field])
    return 0


def to_ms(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
    x, u = float(m.group(1)), m.group(2)
    return x * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[u]


def wrk(path):
    t = open(path).read()
    r = {"rps": None, "p99_ms": None, "requests": 0, "non2xx": 0, "sock_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", t)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"^\s+99%\s+(\S+)", t, re.M)
    if m:
        r["p99_ms"] = to_ms(m.group(1))
    m = re.search(r"(\d+) requests in", t)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
    if m:
        r["sock_errors"] = sum(int(g) for g in m.groups())
        r["connect_errors"], r["read_errors"], r["write_errors"], r["timeouts"] = (int(g) for g in m.groups())
    print(json.dumps(r))


def rss(pid, out, seconds):
    end = time.time() + float(seconds)
    best, anon = 0, 0
    while time.time() < end and not os.path.exists(out + ".stop"):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    best = max(best, int(line.split()[1]))
                if line.startswith("RssAnon:"):
                    anon = max(anon, int(line.split()[1]))
        except OSError:
            break
        if not os.path.exists(out + ".ready"):
            # The interpreter has started: the load may begin.
            open(out + ".ready", "w").close()
        time.sleep(0.2)
    with open(out, "w") as f:
        f.write(f"{best} {anon}\n")


def parse_ts(ts):
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def find_gen(s, gid):
    gens = [s.get("active"), s.get("candidate")] + s.get("draining", []) + s.get("history", [])
    for g in gens:
        if g and g.get("id") == gid:
            return g
    return None


def savelat(sock, path, n, out):
    """Appends to a watched file N times; for each, the time from the save
    to the `cutover` event of the generation it caused, minus that
    generation's build time (build_ms)."""
    proc = subprocess.Popen(
        [os.environ["BATONCTL"], "--socket", sock, "events", "--json"],
        stdout=subprocess.PIPE, text=True,
    )
    q = queue.Queue()

    def reader():
        for line in proc.stdout:
            try:
                q.put(json.loads(line))
            except ValueError:
                pass

    threading.Thread(target=reader, daemon=True).start()
    time.sleep(0.5)
    samples, breakdown, errors = [], [], []
    try:
        for i in range(int(n)):
            time.sleep(0.6)  # quiet, so each save is its own deploy
            while not q.empty():
                q.get_nowait()
            t0 = time.time()
            with open(path, "a") as f:
                f.write(f"// bench save {i} {t0}\n")
            ev, end = {}, time.time() + 30
            gen = None
            while time.time() < end:
                try:
                    e = q.get(timeout=max(0.01, end - time.time()))
                except queue.Empty:
                    break
                k = e.get("kind")
                if k == "build_started" and gen is None:
                    gen = e.get("generation")
                if gen is not None and e.get("generation") == gen:
                    ev.setdefault(k, parse_ts(e["ts"]))
                    if k in ("cutover", "rejected", "build_failed"):
                        break
            if "cutover" not in ev:
                errors.append(f"save {i}: no cutover ({sorted(ev)})")
                continue
            g = find_gen(status(sock), gen) or {}
            build_ms = g.get("build_ms") or 0
            total = (ev["cutover"] - t0) * 1000
            samples.append(total - build_ms)
            breakdown.append({
                "save_to_build_started_ms": (ev.get("build_started", t0) - t0) * 1000,
                "build_ms": build_ms,
                "health_ms": g.get("health_ms"),
                "candidate_to_cutover_ms": (ev["cutover"] - ev.get("candidate_started", ev["cutover"])) * 1000,
                "total_ms": total,
            })
    finally:
        proc.terminate()
        proc.wait(timeout=5)
    med = lambda k: statistics.median(b[k] for b in breakdown if b[k] is not None) if breakdown else None
    r = {
        "n": len(samples),
        "median_ms": statistics.median(samples) if samples else None,
        "min_ms": min(samples) if samples else None,
        "max_ms": max(samples) if samples else None,
        "median_debounce_ms": med("save_to_build_started_ms"),
        "median_build_ms": med("build_ms"),
        "median_health_ms": med("health_ms"),
        "median_candidate_to_cutover_ms": med("candidate_to_cutover_ms"),
        "errors": errors,
    }
    with open(out, "w") as f:
        json.dump(r, f)


# ---------------------------------------------------------------- table

def load(d, name):
    try:
        with open(os.path.join(d, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt(x, nd=0):
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:,.{nd}f}"


def verdict(ok):
    if ok is None:
        return "n/a"
    return "**met**" if ok else "**missed**"


def http_rows(http, name):
    """Row 1's lines for one kind of worker socket ("tcp", "unix"), or for
    the TCP socket with each proxy on a CPU of its own ("pinned": a
    reference, the target is judged on the other two)."""
    rows = []
    if not http:
        return rows

    def med(cfg, key):
        vals = [r[key] for r in http.get(cfg, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    direct_rps, direct_p99 = med("direct", "rps"), med("direct", "p99_ms")
    peers = {c: (med(c, "rps"), med(c, "p99_ms")) for c in ("batond", "nginx", "haproxy", "nginx2", "haproxy2")}
    best_peer = max((peers[c] for c in ("nginx", "haproxy") if peers[c][0]), default=(None, None))
    # The peers with two workers / threads (a reference, no verdict).
    best_two = max((peers[c] for c in ("nginx2", "haproxy2") if peers[c][0]), default=(None, None))
    where = {"tcp": "worker on loopback TCP", "unix": "worker on a Unix socket",
             "pinned": "worker on loopback TCP; the proxy alone on one CPU, the worker and wrk on another"}[name]
    for cfg, label in (("direct", "direct to media-worker"), ("batond", "through batond"),
                       ("nginx", "through nginx (1 worker, keepalive)"),
                       ("haproxy", "through HAProxy (1 thread, http-reuse always)"),
                       ("nginx2", "through nginx (2 workers, keepalive)"),
                       ("haproxy2", "through HAProxy (2 threads, http-reuse always)")):
        if cfg not in http:
            continue
        rps, p99 = (direct_rps, direct_p99) if cfg == "direct" else peers[cfg]
        ratio = f"{rps / direct_rps:.2f}x direct; " if rps and direct_rps else ""
        if cfg == "batond" and rps and best_peer[0] and name == "pinned":
            target = "(reference: placement fixed)"
            v = f"{ratio}{rps / best_peer[0]:.2f}x best peer req/s, p99 {p99:.2f} vs {best_peer[1]:.2f} ms"
        elif cfg == "batond" and rps and best_peer[0]:
            ok = rps >= best_peer[0] and p99 <= best_peer[1]
            target = "req/s >= best of nginx/HAProxy, p99 no worse"
            v = f"{ratio}{rps / best_peer[0]:.2f}x best peer req/s, p99 {p99:.2f} vs {best_peer[1]:.2f} ms: {verdict(ok)}"
            if best_two[0]:
                v += f" (against the better peer with two workers/threads: {rps / best_two[0]:.2f}x, p99 {p99:.2f} vs {best_two[1]:.2f} ms)"
        else:
            target, v = "(reference)", ratio.rstrip("; ") or "-"
        n = len(http.get(cfg, []))
        rows.append((f"1. HTTP `/healthz` {label} ({where})", f"{fmt(rps)} req/s, p99 {fmt(p99, 2)} ms (median of {n})", target, v))
    return rows


def table(d):
    rows = []
    for name in ("tcp", "pinned", "unix"):
        rows.extend(http_rows(load(d, f"http-{name}.json") or {}, name))

    dep = load(d, "deploys.json") or {}
    ws = load(d, "ws.json") or {}
    load_ = dep.get("wrk") or {}
    failed = None if not load_ else load_.get("non2xx", 0) + load_.get("sock_errors", 0)
    rows.append(("2. Failed requests across deploys under load",
                 f"{fmt(failed)} of {fmt(load_.get('requests'))} requests ({dep.get('ok', 0)}/{dep.get('n', 0)} deploys ok, {fmt(dep.get('seconds'), 1)} s, wrk -c16 through batond)",
                 "0", verdict(None if failed is None else failed == 0 and dep.get("ok") == dep.get("n"))))
    wsv = None
    if ws:
        wsv = ws.get("dropped") == 0 and ws.get("lost") == 0 and ws.get("opened") == ws.get("conns")
    rows.append((f"2. {os.environ.get('WS_CONNS', '?')} WebSockets across the same deploys",
                 f"{fmt(ws.get('dropped'))} dropped of {fmt(ws.get('opened'))} opened; {fmt(ws.get('lost'))} lost of {fmt(ws.get('sent'))} messages (ping every 20 ms + media; rtt p99 {fmt(ws.get('rtt_p99_ms'), 1)} ms)",
                 "0 dropped, 0 lost", verdict(wsv)))

    sl = load(d, "savelat.json") or {}
    m = sl.get("median_ms")
    rows.append((f"3. File save -> new generation serving, minus build (debounce_ms = {os.environ.get('DEBOUNCE_MS', '?')})",
                 f"median {fmt(m)} ms (min {fmt(sl.get('min_ms'))}, max {fmt(sl.get('max_ms'))}, n={sl.get('n', 0)}); of which save->build start {fmt(sl.get('median_debounce_ms'))} ms, candidate start->cutover {fmt(sl.get('median_candidate_to_cutover_ms'))} ms; build {fmt(sl.get('median_build_ms'))} ms subtracted",
                 "< 250 ms", verdict(None if m is None else m < 250)))

    rss = load(d, "rss.json") or {}
    for k, label in (("idle", "idle"), ("load", "under HTTP load, row 1 (max)"),
                     ("ws", f"during row 2: wrk + {os.environ.get('WS_CONNS', '?')} WebSockets + {os.environ.get('DEPLOYS', '?')} deploys (max)")):
        v = rss.get(k)
        mb = v / 1024 if v else None
        extra = ""
        if rss.get(k + "_anon"):
            extra = f" (anonymous {rss[k + '_anon'] / 1024:.1f} MB; the rest is the mapped executable and libc)"
        if k == "load" and rss.get("nginx_worker"):
            extra += f"; nginx worker {rss['nginx_worker'] / 1024:.1f} MB, HAProxy {rss.get('haproxy', 0) / 1024:.1f} MB, under the same load"
        rows.append((f"4. batond RSS {label}", f"{fmt(mb, 1)} MB{extra}", "< 8 MB", verdict(None if mb is None else mb < 8)))

    mu = load(d, "mulaw.json") or {}
    rt = mu.get("roundtrip_bps")
    rows.append(("5. mu-law encode+decode (`baton::twilio::mulaw`, 1 core)",
                 f"{fmt(rt / 1e9 if rt else None, 2)} GB/s round trip (encode {fmt(mu.get('encode_bps', 0) / 1e9, 2)}, decode {fmt(mu.get('decode_bps', 0) / 1e9, 2)} GB/s)",
                 "> 1 GB/s", verdict(None if rt is None else rt > 1e9)))

    rtp = os.environ.get("RT_PRIORITY", "10")
    rt = f"batond, worker and callsim at `realtime_priority = {rtp}`"
    for prefix, how in (("calls", "defaults: worker on loopback TCP, normal scheduling"),
                        ("calls-unix", "`worker.socket = \"unix\"`, normal scheduling"),
                        ("calls-unix-rt", f"`worker.socket = \"unix\"`, {rt}"),
                        ("calls-rt", f"worker on loopback TCP, {rt}")):
        files = sorted((f for f in os.listdir(d) if re.fullmatch(re.escape(prefix) + r"-\d+\.json", f)),
                       key=lambda f: int(f[len(prefix) + 1:-5]))
        if prefix != "calls" and not files:
            continue
        for f in files or [f"{prefix}-0.json"]:
            calls = load(d, f)
            if calls and calls.get("p99_ms") is not None:
                n = calls["calls"]
                ok = calls["completed"] == n and calls["p99_ms"] < 2
                target = "1000 calls, p99 < 2 ms" if n >= 1000 else "p99 < 2 ms (sweep step)"
                rows.append((f"6. {n} concurrent call{'s' if n != 1 else ''} through batond (callsim, real time; {how})",
                             f"{calls['completed']} of {n} ok; outbound pacing jitter p50 {fmt(calls.get('p50_ms'), 2)} ms, p99 {fmt(calls['p99_ms'], 2)} ms, max {fmt(calls.get('max_ms'), 1)} ms{calls.get('note', '')}",
                             target, verdict(ok) if n >= 1000 else ("p99 " + ("< 2 ms" if calls["p99_ms"] < 2 else ">= 2 ms"))))
            else:
                rows.append((f"6. Concurrent calls through batond ({how})", (calls or {}).get("note", "not measured"),
                             "1000 calls, p99 < 2 ms", "n/a"))

    sup = load(d, "supervisord.json")
    if sup:
        w = sup.get("wrk") or {}
        sws = load(d, "sup-ws.json") or {}
        sfailed = w.get("non2xx", 0) + w.get("sock_errors", 0)
        rows.append((f"7. For contrast: the same load straight to a worker while supervisord restarts it {sup.get('n')} times",
                     f"{fmt(sfailed)} failed (wrk: {fmt(w.get('non2xx'))} non-2xx, socket errors connect {fmt(w.get('connect_errors'))}, "
                     f"read {fmt(w.get('read_errors'))}, write {fmt(w.get('write_errors'))}, timeout {fmt(w.get('timeouts'))}) "
                     f"beside {fmt(w.get('requests'))} answered ({sup.get('ok')}/{sup.get('n')} restarts); "
                     f"{fmt(sws.get('dropped'))} of {fmt(sws.get('opened'))} WebSockets dropped, {fmt(sws.get('lost'))} messages lost; "
                     f"supervisord RSS {fmt(sup.get('rss_kb', 0) / 1024, 1)} MB",
                     "(contrast)", "what row 2 avoids"))

    mach = load(d, "machine.json") or {}
    print(f"Machine: {mach.get('nproc')} CPUs, {mach.get('cpu')}, {mach.get('ram')} RAM, Linux {mach.get('kernel')}; "
          f"{mach.get('date')}; 1-min load average {mach.get('loadavg_start')} at start, {mach.get('loadavg_end')} at end; {mach.get('tools')}")
    print()
    print("| row | measured | target | ratio / verdict |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "freeport":
        freeport()
    elif cmd == "wait-http":
        sys.exit(wait_http(*args))
    elif cmd == "wait-active":
        sys.exit(wait_active(*args))
    elif cmd == "active-pid":
        sys.exit(active_field(args[0], "pid"))
    elif cmd == "active-port":
        sys.exit(active_field(args[0], "port"))
    elif cmd == "active-socket":
        sys.exit(active_field(args[0], "socket"))
    elif cmd == "wrk":
        wrk(*args)
    elif cmd == "rss":
        rss(*args)
    elif cmd == "savelat":
        savelat(*args)
    elif cmd == "table":
        table(*args)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
