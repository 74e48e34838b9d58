#!/usr/bin/env python3
"""Scale benchmark (issue 3): a real `kumo server` with 1,000 and 10,000 simulated hosts
(`kumo dev sim-hosts`, one process) and 10 instances per host, through the native API.

For each fleet size H it measures: host registration time; creates/s for 10xH instances
(accepted, and end to end until the API lists them all `running`; with batches of 100 too
when `POST /api/v1/instances` takes `"count"`); the scheduler's decision time
(`GET /api/v1/placement/stats`, "n/a" where the controller lacks it); p99 of a list page
(`limit=100`) and of a single GET; and the controller's and the fleet's resident memory.
One table row per H, so the growth from 1,000 to 10,000 hosts is visible.

Run: `python3 bench/issue3.py` (release build at target/release/kumo, or KUMO_BIN).
Everything runs on 127.0.0.1 in a temp dir that is removed at exit. Knobs: BENCH_HOSTS
("1000,10000"; BENCH_HOSTS=200 is a quick smoke run), BENCH_PER_HOST (10), BENCH_CLIENTS (8),
BENCH_HEARTBEAT (30, the fleet's heartbeat interval in seconds).
"""

import atexit
import datetime
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUMO = os.environ.get("KUMO_BIN") or os.path.join(REPO, "target", "release", "kumo")
SIZES = [int(x) for x in os.environ.get("BENCH_HOSTS", "1000,10000").split(",") if x.strip()]
PER_HOST = int(os.environ.get("BENCH_PER_HOST", "10"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "8"))
HEARTBEAT = os.environ.get("BENCH_HEARTBEAT", "30")
BATCH = 100
LIST_CALLS = 200
GET_CALLS = 500
PROCS = []
TMP = tempfile.mkdtemp(prefix="kbench3-")


def cleanup():
    for p in PROCS:
        if p.poll() is None:
            p.kill()
            p.wait()
    shutil.rmtree(TMP, ignore_errors=True)


atexit.register(cleanup)
# SIGTERM (e.g. `kill`) exits through atexit too, so the server and the fleet do not outlive it.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def log(msg):
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ApiError(RuntimeError):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body[:400]!r}")
        self.status, self.body = status, body


class Api:
    """Native API requests, SigV4-signed (service and region `kumo`), on one keep-alive connection."""

    def __init__(self, port, key, secret):
        self.port, self.key, self.secret = port, key, secret
        self.conn = None

    def call(self, method, path, query=None, body=None):
        """(status, parsed JSON or None, seconds); raises ApiError on a non-2xx answer."""
        q = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(str(v), safe='-_.~')}"
                     for k, v in sorted((query or {}).items()))
        raw = json.dumps(body).encode() if body is not None else b""
        now = datetime.datetime.now(datetime.timezone.utc)
        amz = now.strftime("%Y%m%dT%H%M%SZ")
        date = amz[:8]
        payload = hashlib.sha256(raw).hexdigest()
        headers = {"host": f"127.0.0.1:{self.port}", "x-amz-date": amz, "x-amz-content-sha256": payload}
        if body is not None:
            headers["content-type"] = "application/json"
        names = sorted(headers)
        creq = "\n".join([method, path, q, "".join(f"{n}:{headers[n]}\n" for n in names), ";".join(names), payload])
        scope = f"{date}/kumo/kumo/aws4_request"
        sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(creq.encode()).hexdigest()])
        k = ("AWS4" + self.secret).encode()
        for part in (date, "kumo", "kumo", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.key}/{scope}, "
                                    f"SignedHeaders={';'.join(names)}, Signature={sig}")
        url = path + (f"?{q}" if q else "")
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
            t = time.perf_counter()
            try:
                self.conn.request(method, url, body=raw or None, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                # A keep-alive connection the server closed: reconnect once (GETs only).
                self.conn.close()
                self.conn = None
                if attempt or method != "GET":
                    raise
                continue
            dt = time.perf_counter() - t
            if resp.status >= 300:
                raise ApiError(resp.status, data)
            return resp.status, (json.loads(data) if data else None), dt


def spawn(args, logname):
    f = open(os.path.join(TMP, logname), "ab")
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=dict(os.environ, KUMO_LOG="warn"))
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.kill()
        p.wait()


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what} (logs in {TMP})")
        time.sleep(0.2)


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def paged(api, path, limit=1000):
    cursor = None
    while True:
        q = {"limit": limit}
        if cursor:
            q["cursor"] = cursor
        _, page, _ = api.call("GET", path, q)
        yield from page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            return


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def parallel(api, n, fn):
    """Run fn(a, i) for i in range(n) on CLIENTS threads, each with its own connection `a`."""
    lock = threading.Lock()
    nxt = [0]
    errors = []

    def worker(api):
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= n or errors:
                return
            try:
                fn(api, i)
            except Exception as e:  # noqa: BLE001 - reported below, the run stops
                errors.append(e)
                return

    threads = [threading.Thread(target=worker, args=(Api(api.port, api.key, api.secret),)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]



def wait_running(api, ids, timeout):
    """Seconds until the API lists every id in `ids` as running (polling the whole list)."""
    want = set(ids)

    def check():
        running = sum(1 for i in paged(api, "/api/v1/instances") if i["state"] == "running" and i["id"] in want)
        return running == len(want)

    wait_for(check, timeout, f"{len(want)} instances to run")


def create_phase(api, img, n, batch, label, mode=None):
    """Create n instances (one per request, or `batch` per request in `mode`); returns
    (ids, accepted s, running s)."""
    ids = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    if batch:
        calls = (n + batch - 1) // batch

        def one(a, i):
            k = min(batch, n - i * batch)
            tmpl = {"name": f"{label}-{i}", "image": img, "instance_type": "t1.nano"}
            if mode == "batches":
                _, r, _ = a.call("POST", "/api/v1/instance-batches", body={"template": tmpl, "count": k})
            else:
                _, r, _ = a.call("POST", "/api/v1/instances", body=dict(tmpl, count=k))
            with lock:
                ids.extend(x["id"] for x in r["items"])
        parallel(api, calls, one)
    else:
        def one(a, i):
            _, r, _ = a.call("POST", "/api/v1/instances", body={"name": f"{label}-{i}", "image": img, "instance_type": "t1.nano"})
            with lock:
                ids.append(r["id"])
        parallel(api, n, one)
    accepted = time.perf_counter() - t0
    log(f"{label}: {len(ids)} accepted in {accepted:.1f} s; waiting until all are running")
    wait_running(api, ids, max(300, n / 10))
    running = time.perf_counter() - t0
    return ids, accepted, running


def run(hosts):
    port = free_port()
    d = os.path.join(TMP, f"h{hosts}")
    os.makedirs(d)
    boot = os.path.join(d, "bootstrap.json")
    # A /12 holds a million addresses: 10 instances per host on 10,000 hosts fit easily.
    server = spawn([KUMO, "server", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(d, "server"),
                    "--bootstrap-file", boot, "--heartbeat-timeout", "120", "--default-cidr", "10.0.0.0/12"],
                   f"server-{hosts}.log")
    wait_for(lambda: os.path.exists(boot) and os.path.getsize(boot) > 0, 60, "bootstrap")
    time.sleep(0.1)
    b = json.load(open(boot))
    api = Api(port, b["access_key_id"], b["secret_access_key"])

    def healthy():
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/healthz")
            return c.getresponse().status == 200
        except OSError:
            return False

    wait_for(healthy, 60, "the controller")
    fleet_log = os.path.join(TMP, f"fleet-{hosts}.log")
    fleet = subprocess.Popen([KUMO, "dev", "sim-hosts", "--controller", f"http://127.0.0.1:{port}", "--join-token",
                              b["join_token"], "--count", str(hosts), "--sites", "3", "--heartbeat-interval", HEARTBEAT],
                             stdin=subprocess.DEVNULL, stdout=open(fleet_log, "wb"), stderr=subprocess.STDOUT,
                             env=dict(os.environ, KUMO_LOG="warn"))
    PROCS.append(fleet)

    def registered():
        if fleet.poll() is not None:
            raise RuntimeError(f"kumo dev sim-hosts exited: {open(fleet_log).read()[-2000:]}")
        m = re.search(r"registered (\d+) hosts in ([0-9.]+) s", open(fleet_log).read())
        return m and float(m.group(2))

    reg_s = wait_for(registered, max(120, hosts / 20), f"{hosts} hosts to register")
    log(f"H={hosts}: registered in {reg_s:.1f} s")
    wait_for(lambda: sum(1 for h in paged(api, "/api/v1/hosts") if h["state"] == "up") == hosts, 120, "all hosts up")

    img_path = os.path.join(d, "tiny.raw")
    with open(img_path, "wb") as f:
        f.truncate(1 << 20)
    _, r, _ = api.call("POST", "/api/v1/images", body={"name": "tiny", "kind": "disk", "path": img_path,
                                                      "format": "raw", "public": True})
    img = r["image"]["id"]
    wait_for(lambda: api.call("GET", f"/api/v1/images/{img}")[1]["state"] == "available", 60, "the image")

    total = PER_HOST * hosts
    # Batches: `POST /api/v1/instance-batches {"template", "count"}`, or an older draft's
    # `"count"` on `POST /api/v1/instances` (answered with `items`). One probe of two tells.
    batch_mode, probe_ids = None, []
    tmpl = {"name": "probe", "image": img, "instance_type": "t1.nano"}
    for mode, path, body in (("batches", "/api/v1/instance-batches", {"template": tmpl, "count": 2}),
                             ("count", "/api/v1/instances", dict(tmpl, count=2))):
        try:
            _, r, _ = api.call("POST", path, body=body)
        except ApiError as e:
            if e.status in (400, 404, 405):
                continue
            raise
        if isinstance(r, dict) and "items" in r:
            batch_mode, probe_ids = mode, [x["id"] for x in r["items"]]
            break
        probe_ids.append(r["id"])  # `count` ignored: one instance was made
    batch_ok = batch_mode is not None
    total -= len(probe_ids)
    single_n = total // 2 if batch_ok else total
    ids, acc, run_s = create_phase(api, img, single_n, None, "one")
    single = (single_n / acc, single_n / run_s)
    batch = None
    if batch_ok:
        more, bacc, brun = create_phase(api, img, total - single_n, BATCH, "batch", batch_mode)
        ids += more
        batch = ((total - single_n) / bacc, (total - single_n) / brun)
    ids += probe_ids

    try:
        _, s, _ = api.call("GET", "/api/v1/placement/stats")
        sched = f"{s['p50_us']:.0f}/{s['p99_us']:.0f}/{s['max_us']:.0f}"
    except ApiError as e:
        if e.status != 404:
            raise
        sched = "n/a"

    pages, cursor = [], None
    for _ in range(LIST_CALLS):
        q = {"limit": 100}
        if cursor:
            q["cursor"] = cursor
        _, page, dt = api.call("GET", "/api/v1/instances", q)
        pages.append(dt)
        cursor = page.get("next_cursor")
    gets = [api.call("GET", f"/api/v1/instances/{random.choice(ids)}")[2] for _ in range(GET_CALLS)]

    row = {
        "hosts": hosts,
        "register_s": reg_s,
        "instances": len(ids),
        "single": single,
        "batch": batch,
        "sched": sched,
        "list_p99_ms": pct(pages, 99) * 1000,
        "get_p99_ms": pct(gets, 99) * 1000,
        "ctl_rss": rss_mib(server.pid),
        "fleet_rss": rss_mib(fleet.pid),
    }
    stop(fleet)
    stop(server)
    shutil.rmtree(d, ignore_errors=True)
    return row


def main():
    if not os.path.exists(KUMO):
        sys.exit(f"no kumo binary at {KUMO}: cargo build --release -p kumo (or set KUMO_BIN)")
    cols = ["hosts", "register s", "instances", "creates/s accepted", "creates/s running",
            "x100 accepted/s", "x100 running/s", "sched p50/p99/max us", "list p99 ms", "get p99 ms",
            "ctl RSS MiB", "fleet RSS MiB"]
    print("| " + " | ".join(cols) + " |", flush=True)
    print("|" + "|".join("---:" for _ in cols) + "|", flush=True)
    for h in SIZES:
        r = run(h)
        b = r["batch"]
        cells = [f"{r['hosts']:,}", f"{r['register_s']:.1f}", f"{r['instances']:,}", f"{r['single'][0]:.0f}",
                 f"{r['single'][1]:.0f}", f"{b[0]:.0f}" if b else "n/a", f"{b[1]:.0f}" if b else "n/a", r["sched"],
                 f"{r['list_p99_ms']:.1f}", f"{r['get_p99_ms']:.1f}", f"{r['ctl_rss']:.0f}", f"{r['fleet_rss']:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
