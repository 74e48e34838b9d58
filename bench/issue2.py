#!/usr/bin/env python3
"""kumo start-path benchmarks (issue 2): start overhead vs bare QEMU, provisioning time vs
image size, agent/controller memory.

Run as root on a test machine: `bash bench/issue2.sh` (see BENCHMARKS.md). It starts its own
`kumo server` and `kumo agent --hypervisor qemu --vm-netns kbench-<pid>` on a temp dir, imports
the demo guest, measures, and tears everything down on exit (server, agent, every QEMU and
dnsmasq whose command line names the temp dir, the namespace, the temp dir). No traffic leaves
the machine: the API is on 127.0.0.1 and guests only see taps inside the bench namespace.

Environment knobs: KUMO_BIN (default target/release/kumo), BENCH_RUNS (default 7, at least 5), BENCH_START_RUNS (figure 1 pairs, default 11),
BENCH_KEEP=1 (keep the temp dir for inspection).
"""

import atexit
import datetime
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUMO = os.environ.get("KUMO_BIN") or os.path.join(REPO, "target", "release", "kumo")
RUNS = int(os.environ.get("BENCH_RUNS", "7"))
# Boot-to-marker under TCG varies by ±150 ms on a shared 2-core machine: more pairs for figure 1.
START_RUNS = int(os.environ.get("BENCH_START_RUNS", "11"))
POLL = 0.002  # seconds between polls of files / the API
MARKER = b"KUMO-GUEST-BOOTED"
GIB = 1 << 30

# Goals from the issue.
GOAL_RATIO = 1.05
GOAL_ADDED_MS = 50.0
GOAL_PROVISION_MS = 50.0
# "Flat": the 10 GiB median may exceed the 1 GiB median by at most this much.
FLAT_TOLERANCE_MS = 10.0
GOAL_AGENT_MIB = 30.0
GOAL_CONTROLLER_MIB = 50.0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ms(s):
    return s * 1000.0


def med(xs):
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------- teardown

STATE = {"tmp": None, "netns": None, "procs": [], "bare": []}


def pids_matching(needle):
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == os.getpid():
            continue
        try:
            with open(f"/proc/{e}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            out.append(int(e))
    return out


def kill_pid(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def cleanup():
    tmp, ns = STATE["tmp"], STATE["netns"]
    for p in STATE["procs"] + STATE["bare"]:
        if p.poll() is None:
            p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
    if tmp:
        # QEMU (detached by the agent with setsid) and dnsmasq name files in the temp dir.
        for _ in range(3):
            pids = pids_matching(tmp)
            if not pids:
                break
            for pid in pids:
                kill_pid(pid)
            time.sleep(0.3)
    if ns:
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
    if tmp and os.path.isdir(tmp):
        if os.environ.get("BENCH_KEEP"):
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def on_signal(signum, _frame):
    sys.exit(128 + signum)


# --------------------------------------------------------------------------- signed API client


class Api:
    """The native API, SigV4-signed (service `kumo`), on one keep-alive connection."""

    def __init__(self, port, key, secret, region="kumo"):
        self.port, self.key, self.secret, self.region = port, key, secret, region
        self.conn = None

    def _sign(self, method, path, data, headers):
        now = datetime.datetime.now(datetime.timezone.utc)
        amz = now.strftime("%Y%m%dT%H%M%SZ")
        date = amz[:8]
        payload = hashlib.sha256(data).hexdigest()
        headers = dict(headers)
        headers.update({"host": f"127.0.0.1:{self.port}", "x-amz-date": amz, "x-amz-content-sha256": payload})
        names = sorted(headers)
        canon_headers = "".join(f"{n}:{headers[n].strip()}\n" for n in names)
        signed = ";".join(names)
        creq = "\n".join([method, path, "", canon_headers, signed, payload])
        scope = f"{date}/{self.region}/kumo/aws4_request"
        sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(creq.encode()).hexdigest()])
        k = ("AWS4" + self.secret).encode()
        for part in (date, self.region, "kumo", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = f"AWS4-HMAC-SHA256 Credential={self.key}/{scope}, SignedHeaders={signed}, Signature={sig}"
        return headers

    def req(self, method, path, body=None):
        assert "?" not in path, "queries are not signed by this small client"
        data = json.dumps(body).encode() if body is not None else b""
        extra = {"content-type": "application/json"} if body is not None else {}
        for attempt in range(2):
            headers = self._sign(method, path, data, extra)
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn = None
                if attempt:
                    raise
                continue
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {raw[:500]!r}")
            return json.loads(raw) if raw else None

    def get(self, path):
        return self.req("GET", path)


# --------------------------------------------------------------------------- the cloud


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spawn(args, logname, **kw):
    f = open(os.path.join(STATE["tmp"], logname), "ab")
    env = dict(os.environ, KUMO_LOG=os.environ.get("KUMO_LOG", "info"))
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env, **kw)
    STATE["procs"].append(p)
    return p


def wait_for(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what} (logs in {STATE['tmp']})")
        time.sleep(interval)


class Cloud:
    def __init__(self, tmp, ns):
        self.tmp, self.ns = tmp, ns
        self.port = free_port()
        boot = os.path.join(tmp, "bootstrap.json")
        self.server = spawn([KUMO, "server", "--listen", f"127.0.0.1:{self.port}", "--data-dir", os.path.join(tmp, "server"),
                             "--bootstrap-file", boot], "server.log")
        wait_for(lambda: os.path.exists(boot), 30, "controller bootstrap file")
        b = json.load(open(boot))
        self.api = Api(self.port, b["access_key_id"], b["secret_access_key"])
        wait_for(self._healthy, 30, "controller health")
        self.host_dir = os.path.join(tmp, "host0")
        self.agent = spawn([KUMO, "agent", "--controller", f"http://127.0.0.1:{self.port}", "--join-token", b["join_token"],
                            "--name", "host0", "--data-dir", self.host_dir, "--hypervisor", "qemu", "--accel", "tcg",
                            "--vm-netns", ns], "agent.log")
        wait_for(lambda: any(h["name"] == "host0" and h["state"] == "up" for h in self.api.get("/api/v1/hosts")["items"]),
                 60, "agent registration", 0.1)

    def _healthy(self):
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            c.request("GET", "/healthz")
            return c.getresponse().status == 200
        except OSError:
            return False

    def import_wait(self, name, kind, path, kernel=None, ramdisk=None, cmdline=None):
        r = self.api.req("POST", "/api/v1/images", {"name": name, "kind": kind, "path": path, "format": None,
                                                    "kernel_id": kernel, "ramdisk_id": ramdisk, "cmdline": cmdline,
                                                    "public": True})
        op = r["operation"]["id"]

        def done():
            o = self.api.get(f"/api/v1/operations/{op}")
            if o["state"] == "failed":
                raise RuntimeError(f"import of {name} failed: {o.get('error')}")
            return o["state"] == "succeeded"

        wait_for(done, 600, f"import of {name}", 0.1)
        return r["image"]["id"]

    def run_dir(self, iid):
        return os.path.join(self.host_dir, "run", iid)

    def vm_dir(self, iid):
        return os.path.join(self.host_dir, "vms", iid)

    def create(self, name, image):
        return self.api.req("POST", "/api/v1/instances", {"name": name, "image": image, "instance_type": "t1.small"})

    def state(self, iid):
        return self.api.get(f"/api/v1/instances/{iid}")

    def qemu_pid(self, iid):
        try:
            return int(open(os.path.join(self.run_dir(iid), "qemu.pid")).read().strip())
        except (OSError, ValueError):
            return None

    def terminate(self, iid):
        self.api.req("DELETE", f"/api/v1/instances/{iid}")
        wait_for(lambda: self.state(iid)["state"] == "terminated", 60, f"{iid} terminated", 0.05)
        wait_for(lambda: not pids_matching(f"kumo-{iid}") and not os.path.exists(self.vm_dir(iid)), 30,
                 f"{iid}'s QEMU and files gone", 0.05)

    def rss_kib(self, proc, field="VmRSS"):
        for line in open(f"/proc/{proc.pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return None


def poll_until(checks, timeout):
    """checks: name -> fn() -> bool. Polls every POLL s; returns name -> seconds (perf_counter) first true.
    Stops when the check named 'done' is true."""
    seen = {}
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        for name, fn in checks.items():
            if name not in seen and fn():
                seen[name] = time.perf_counter()
        if "done" in seen:
            return seen
        if now > deadline:
            raise RuntimeError(f"timed out; seen so far {sorted(seen)} (logs in {STATE['tmp']})")
        time.sleep(POLL)


def has_marker(path):
    def f():
        try:
            with open(path, "rb") as fh:
                return MARKER in fh.read()
        except OSError:
            return False
    return f


def exists(path):
    return lambda: os.path.exists(path)



# --------------------------------------------------------------------------- bare QEMU


def capture_template(c, iid):
    """kumo's QEMU command line for a running VM, plus what a fresh overlay for it needs."""
    pid = c.qemu_pid(iid)
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:-1]
    vd = c.vm_dir(iid)
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", os.path.join(vd, "root.qcow2")],
                                     check=True, capture_output=True).stdout)
    return {"argv": [a.decode() for a in argv], "run_dir": c.run_dir(iid), "vm_dir": vd, "id": iid,
            "backing": info.get("full-backing-filename") or info["backing-filename"], "size": info["virtual-size"]}


def qmp_running(sock_path):
    """A check that is true once QEMU's QMP monitor answers query-status with `running`
    (what kumo's driver waits for before it reports the VM started)."""
    st = {"sock": None, "buf": b""}

    def read_reply(s):
        while True:
            while b"\n" not in st["buf"]:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("QMP closed")
                st["buf"] += chunk
            line, st["buf"] = st["buf"].split(b"\n", 1)
            msg = json.loads(line)
            if "return" in msg or "error" in msg or "QMP" in msg:
                return msg

    def check():
        try:
            if st["sock"] is None:
                if not os.path.exists(sock_path):
                    return False
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                s.connect(sock_path)
                st["sock"] = s
                read_reply(s)  # greeting
                s.sendall(b'{"execute":"qmp_capabilities"}\n')
                read_reply(s)
            st["sock"].sendall(b'{"execute":"query-status"}\n')
            r = read_reply(st["sock"])
            ok = r.get("return", {}).get("status") == "running"
            if ok:
                st["sock"].close()
            return ok
        except OSError:
            if st["sock"] is not None:
                st["sock"].close()
            st["sock"] = None
            return False
    return check


def bare_launch(c, t, tag, until):
    """Launch kumo's QEMU command line `t` by hand in the same netns, with its run-dir paths moved
    to a scratch dir, a fresh overlay of the same backing file and size, and its own tap (QEMU
    creates it). Times from just before exec until `until` ("marker" or "qmp") is seen; kills it."""
    scratch = os.path.join(c.tmp, "bare", tag)
    os.makedirs(scratch)
    disk = os.path.join(scratch, "root.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", t["backing"], disk, str(t["size"])],
                   check=True)
    argv = []
    it = iter(t["argv"])
    for a in it:
        if a == "-name":
            argv += ["-name", f"kbench-bare-{tag}"]
            next(it)
            continue
        a = a.replace(os.path.join(t["vm_dir"], "root.qcow2"), disk).replace(t["run_dir"], scratch)
        a = re.sub(r"ifname=[^,]+", "ifname=kbbare0", a)  # QEMU creates this tap itself
        argv.append(a)
    leftovers = [a for a in argv if t["run_dir"] in a or t["vm_dir"] in a]
    assert not leftovers, f"un-rewritten arguments: {leftovers}"
    with open(os.path.join(c.tmp, f"bare-qemu-cmdline-{tag.split('-')[0]}.txt"), "w") as f:
        f.write("\n".join(argv) + "\n")
    qlog = open(os.path.join(scratch, "qemu.log"), "wb")
    checks = {"pidfile": exists(os.path.join(scratch, "qemu.pid"))}
    if until == "marker":
        checks["done"] = has_marker(os.path.join(scratch, "console.log"))
    else:
        checks["done"] = qmp_running(os.path.join(scratch, "qmp.sock"))
    t0 = time.perf_counter()
    p = subprocess.Popen(["ip", "netns", "exec", c.ns] + argv, cwd=scratch, stdin=subprocess.DEVNULL,
                         stdout=qlog, stderr=qlog, start_new_session=True)
    STATE["bare"].append(p)
    checks["exited"] = lambda: p.poll() is not None
    try:
        seen = poll_until(checks, 120)
    finally:
        p.kill()
        p.wait()
    if "exited" in seen and seen["exited"] <= seen["done"]:
        raise RuntimeError(f"bare QEMU exited early; see {scratch}/qemu.log")
    shutil.rmtree(scratch, ignore_errors=True)
    return {k: v - t0 for k, v in seen.items()}


# --------------------------------------------------------------------------- figure 1


def figure1(c, demo):
    log("figure 1: start overhead (kumo API → boot marker vs bare QEMU exec → boot marker)")
    kumo_ms, bare_ms = [], []
    template = None

    kumo_pid_ms, bare_pid_ms, kumo_exec_ms = [], [], []

    def kumo_run(n):
        nonlocal template
        t0 = time.perf_counter()
        inst = c.create(f"start{n}", demo)
        t_ret = time.perf_counter()
        iid = inst["id"]
        rd, vd = c.run_dir(iid), c.vm_dir(iid)
        seen = poll_until({
            "overlay": exists(os.path.join(vd, "root.qcow2")),
            "qemu.log": exists(os.path.join(rd, "qemu.log")),
            "pidfile": exists(os.path.join(rd, "qemu.pid")),
            "done": has_marker(os.path.join(rd, "console.log")),
        }, 120)
        seen = {k: v - t0 for k, v in seen.items()}
        parts = " ".join(f"{k}={ms(seen[k]):.0f}" for k in ("overlay", "qemu.log", "pidfile") if k in seen)
        log(f"  kumo run {n}: {ms(seen['done']):.0f} ms to marker (API returned {ms(t_ret - t0):.0f}, {parts} ms)")
        if template is None:
            template = capture_template(c, iid)
            with open(os.path.join(c.tmp, "kumo-qemu-cmdline.txt"), "w") as f:
                f.write("\n".join(template["argv"]) + "\n")
        c.terminate(iid)
        return seen

    def bare_run(n):
        seen = bare_launch(c, template, f"start-{n}", "marker")
        log(f"  bare run {n}: {ms(seen['done']):.0f} ms to marker (pidfile={ms(seen['pidfile']):.0f} ms)")
        return seen

    # Warm-up: the first VM of an image on a host fills the agent's image cache and creates the
    # bridge/dnsmasq; it is printed but not part of the medians.
    cold = kumo_run("cold")["done"]
    log(f"  (cold kumo run, excluded from medians: {ms(cold):.0f} ms)")
    time.sleep(1)
    for n in range(START_RUNS):
        k = kumo_run(n)
        kumo_ms.append(ms(k["done"]))
        kumo_pid_ms.append(ms(k["pidfile"]))
        kumo_exec_ms.append(ms(k["qemu.log"]))
        time.sleep(1)
        b = bare_run(n)
        bare_ms.append(ms(b["done"]))
        bare_pid_ms.append(ms(b["pidfile"]))
        time.sleep(1)
    km, bm = med(kumo_ms), med(bare_ms)
    ratio, added = km / bm, km - bm
    ok_ratio, ok_added = ratio <= GOAL_RATIO, added <= GOAL_ADDED_MS
    print(f"  kumo runs (ms): {' '.join(f'{x:.0f}' for x in kumo_ms)}")
    print(f"  bare runs (ms): {' '.join(f'{x:.0f}' for x in bare_ms)}")
    diffs = [k - b for k, b in zip(kumo_ms, bare_ms)]
    print(f"  paired differences kumo - bare (ms): {' '.join(f'{x:+.0f}' for x in diffs)}; median {med(diffs):+.0f} ms")
    print(f"  to qemu.pid (QEMU up): kumo API→pidfile median {med(kumo_pid_ms):.0f} ms (API→exec, i.e. qemu.log created, "
          f"{med(kumo_exec_ms):.0f} ms), bare exec→pidfile median {med(bare_pid_ms):.0f} ms: kumo adds "
          f"{med(kumo_pid_ms) - med(bare_pid_ms):.0f} ms before QEMU is up")
    print(f"RESULT start-overhead: kumo median {km:.0f} ms, bare QEMU median {bm:.0f} ms, ratio {ratio:.3f} "
          f"(goal <= {GOAL_RATIO}: {'MET' if ok_ratio else 'MISSED'}), added {added:.0f} ms "
          f"(goal <= {GOAL_ADDED_MS:.0f} ms: {'MET' if ok_added else 'MISSED'}) [n={START_RUNS} each, cold first kumo run {ms(cold):.0f} ms excluded]",
          flush=True)


# --------------------------------------------------------------------------- figure 2


def make_raw(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(510)
        f.write(b"\x55\xaa")


def figure2(c):
    log("figure 2: provisioning vs image size")
    imgs = {}
    for gib in (1, 10):
        raw = os.path.join(c.tmp, f"raw{gib}g.img")
        make_raw(raw, gib * GIB)
        t = time.perf_counter()
        imgs[gib] = c.import_wait(f"raw{gib}g", "disk", raw)
        log(f"  imported {gib} GiB raw sparse image in {time.perf_counter() - t:.1f} s")
        os.unlink(raw)

    results = {1: [], 10: []}
    cold = {}
    details = {1: [], 10: []}

    templates = {}

    def run(gib, n):
        t0 = time.perf_counter()
        inst = c.create(f"prov{gib}g-{n}", imgs[gib])
        t_ret = time.perf_counter()
        iid = inst["id"]
        rd, vd = c.run_dir(iid), c.vm_dir(iid)
        seen = poll_until({
            "overlay": exists(os.path.join(vd, "root.qcow2")),
            "pidfile": exists(os.path.join(rd, "qemu.pid")),
            "done": lambda: c.state(iid)["state"] == "running",
        }, 60)
        total = ms(seen["done"] - t0)
        parts = f"API returned {ms(t_ret - t0):.0f}, overlay={ms(seen.get('overlay', float('nan')) - t0):.0f}, " \
                f"pidfile={ms(seen.get('pidfile', float('nan')) - t0):.0f} ms"
        log(f"  {gib} GiB run {n}: {total:.0f} ms to state running ({parts})")
        if gib not in templates:
            templates[gib] = capture_template(c, iid)
        c.terminate(iid)
        return total, seen, t0

    for gib in (1, 10):  # first VM of each image on the host: image cache fill
        cold[gib] = run(gib, "cold")[0]
        time.sleep(0.5)
    for n in range(RUNS):
        for gib in (1, 10):
            total, seen, t0 = run(gib, n)
            results[gib].append(total)
            details[gib].append((ms(seen["overlay"] - t0), ms(seen["pidfile"] - t0)))
            time.sleep(0.5)

    # Floor: qemu-img create -b of an overlay on the same cached image, same size as kumo's.
    floor = {}
    floor_info = {}
    for gib in (1, 10):
        backing = os.path.join(c.host_dir, "images", imgs[gib])
        size = str(max(4 * GIB, gib * GIB))  # t1.small has disk_gib 4; kumo sizes max(type, image)
        ts, ti = [], []
        for n in range(RUNS):
            out = os.path.join(c.tmp, f"floor{gib}-{n}.qcow2")
            t = time.perf_counter()
            subprocess.run(["qemu-img", "info", "-U", "--output=json", backing], check=True, capture_output=True)
            t1 = time.perf_counter()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, out, size], check=True)
            t2 = time.perf_counter()
            ti.append(ms(t1 - t))
            ts.append(ms(t2 - t1))
            os.unlink(out)
        floor[gib], floor_info[gib] = med(ts), med(ti)

    # Floor for "QEMU launched": the same QEMU command line by hand, exec → QMP query-status running.
    qfloor, qfloor_pid = {}, {}
    for gib in (1, 10):
        runs = []
        for n in range(RUNS):
            runs.append(bare_launch(c, templates[gib], f"prov{gib}g-{n}", "qmp"))
            time.sleep(0.3)
        qfloor[gib] = med([ms(r["done"]) for r in runs])
        qfloor_pid[gib] = med([ms(r["pidfile"]) for r in runs])
        log(f"  bare QEMU {gib} GiB: exec→QMP running {' '.join(str(round(ms(r['done']))) for r in runs)} ms")

    m1, m10 = med(results[1]), med(results[10])
    ok_abs = max(m1, m10) <= GOAL_PROVISION_MS
    ok_flat = (m10 - m1) <= FLAT_TOLERANCE_MS
    for gib in (1, 10):
        ov = med([d[0] for d in details[gib]])
        pf = med([d[1] for d in details[gib]])
        print(f"  {gib:>2} GiB runs (ms): {' '.join(f'{x:.0f}' for x in results[gib])}; cold first run {cold[gib]:.0f} ms; "
              f"median API→overlay {ov:.0f} ms, API→qemu.pid {pf:.0f} ms; floor qemu-img create -b {floor[gib]:.0f} ms "
              f"(+ qemu-img info {floor_info[gib]:.0f} ms); bare QEMU exec→pidfile {qfloor_pid[gib]:.0f} ms, "
              f"exec→QMP running {qfloor[gib]:.0f} ms")
    print(f"RESULT provisioning: 1 GiB median {m1:.0f} ms, 10 GiB median {m10:.0f} ms (API create → state running) "
          f"(goal <= {GOAL_PROVISION_MS:.0f} ms: {'MET' if ok_abs else 'MISSED'}; flat within {FLAT_TOLERANCE_MS:.0f} ms: "
          f"{'MET' if ok_flat else 'MISSED'}); floor qemu-img create -b: 1 GiB {floor[1]:.0f} ms, 10 GiB {floor[10]:.0f} ms; "
          f"floor bare QEMU exec→QMP running: 1 GiB {qfloor[1]:.0f} ms, 10 GiB {qfloor[10]:.0f} ms "
          f"[n={RUNS} each, cold first runs excluded]", flush=True)


# --------------------------------------------------------------------------- figure 3


def figure3(c, demo, ctl_fresh_kib):
    log("figure 3: memory with 5 running demo VMs")
    ids = [c.create(f"mem{n}", demo)["id"] for n in range(5)]
    for iid in ids:
        wait_for(lambda: c.state(iid)["state"] == "running", 120, f"{iid} running", 0.2)
    for iid in ids:
        wait_for(has_marker(os.path.join(c.run_dir(iid), "console.log")), 180, f"{iid} boot marker", 0.2)
    time.sleep(5)  # let heartbeats and the network loop run with 5 VMs
    agent, ctl = [], []
    for _ in range(5):
        agent.append(c.rss_kib(c.agent))
        ctl.append(c.rss_kib(c.server))
        time.sleep(1)
    a_hwm, c_hwm = c.rss_kib(c.agent, "VmHWM"), c.rss_kib(c.server, "VmHWM")
    a_mib, c_mib = max(agent) / 1024, max(ctl) / 1024
    print(f"  agent VmRSS samples (KiB): {' '.join(map(str, agent))}; VmHWM {a_hwm} KiB")
    print(f"  controller VmRSS samples (KiB): {' '.join(map(str, ctl))}; VmHWM {c_hwm} KiB; right after start-up {ctl_fresh_kib} KiB")
    print(f"RESULT memory: agent VmRSS {a_mib:.1f} MiB with 5 running VMs (goal <= {GOAL_AGENT_MIB:.0f} MiB: "
          f"{'MET' if a_mib <= GOAL_AGENT_MIB else 'MISSED'}), controller VmRSS idle {c_mib:.1f} MiB "
          f"(goal <= {GOAL_CONTROLLER_MIB:.0f} MiB: {'MET' if c_mib <= GOAL_CONTROLLER_MIB else 'MISSED'}) "
          f"[max of 5 samples; separate release-build processes]", flush=True)
    for iid in ids:
        c.terminate(iid)


# --------------------------------------------------------------------------- main


def main():
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, taps)")
    if not os.access(KUMO, os.X_OK):
        sys.exit(f"{KUMO} missing: run `cargo build --release -p kumo` first (or set KUMO_BIN)")
    for tool in ("qemu-system-x86_64", "qemu-img", "dnsmasq", "ip"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    atexit.register(cleanup)
    STATE["tmp"] = tempfile.mkdtemp(prefix="kbench-")
    STATE["netns"] = f"kbench-{os.getpid()}"
    tmp = STATE["tmp"]

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"env: {os.cpu_count()} CPUs ({cpu}), load {os.getloadavg()[0]:.2f}, {qv}, accel tcg, kumo {KUMO}, "
          f"runs {START_RUNS} pairs (figure 1) / {RUNS} (figure 2), poll {POLL * 1000:.0f} ms", flush=True)

    log(f"building the demo guest into {tmp}/guest")
    subprocess.run([KUMO, "dev", "build-guest", "--out", os.path.join(tmp, "guest")], check=True,
                   stdout=subprocess.DEVNULL)
    c = Cloud(tmp, STATE["netns"])
    time.sleep(1)
    ctl_fresh = c.rss_kib(c.server)
    g = os.path.join(tmp, "guest")
    k = c.import_wait("demo-kernel", "kernel", os.path.join(g, "vmlinux"))
    r = c.import_wait("demo-initrd", "ramdisk", os.path.join(g, "initrd.img"))
    demo = c.import_wait("demo", "disk", os.path.join(g, "disk.qcow2"), k, r, "console=ttyS0 quiet")

    figure1(c, demo)
    figure2(c)
    figure3(c, demo, ctl_fresh)
    log("done; tearing down")


if __name__ == "__main__":
    main()
