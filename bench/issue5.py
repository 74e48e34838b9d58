#!/usr/bin/env python3
"""Storage benchmarks (issue 5): live snapshot I/O pause, clone creation time against disk size,
incremental backup bytes against bytes changed, image import throughput.

Run as root on a test machine (see BENCHMARKS.md, "Issue 5"):

    cargo build --release -p kumo
    python3 bench/issue5.py

It starts `kumo server` on 127.0.0.1 and one `kumo agent --hypervisor qemu --accel tcg --vm-netns
kbench5-<pid>-vm` (its pool: the dir pool DATA_DIR/pool, in the temp dir), imports the test guest
(`kumo dev build-guest`) as image `demo` and boots it through the API. The guest appends to
/data/counter every 100 ms with fdatasync, so its root disk has I/O in flight during every snapshot.

1. Live snapshot I/O pause: BENCH_SNAPSHOTS live snapshots of the guest (POST /api/v1/snapshots, 0.5 s
   apart): the API's `io_pause_ms` and the call's latency; side by side, the same QMP `transaction` of
   `blockdev-snapshot-sync` sent straight to a bare QEMU (kumo's QEMU command line for the guest
   without its NIC, on a fresh qcow2 overlay of disk.qcow2), alternating with kumo's.
2. Clone creation against size: per size a volume written whole from the host with qemu-io while
   detached, snapshotted; then POST /api/v1/volumes {"snapshot"} (median of BENCH_CLONE_RUNS) against
   one `qemu-img convert -O qcow2` of the same chain. Then a hot clone of the running guest (POST
   /api/v1/instances/{id}/clone) until the API answers and until its console shows KUMO-GUEST-BOOTED.
3. Incremental backup bytes: a BENCH_BACKUP_MIB volume attached to the guest, a full backup, then per
   change pattern (written inside the guest through its serial console socket) an incremental one.
4. Import throughput: a raw file (BENCH_IMPORT_GIB GiB, half random data, half holes) imported through
   the API (POST /api/v1/images, format raw) against `qemu-img convert -O qcow2` of the same file into
   the same filesystem, alternating; then once each from a read-only loop device over the file.

Everything stays on 127.0.0.1 and in namespaces named kbench5-<pid>-*. On exit, also on failure, Ctrl-C
and SIGTERM, it kills what it started (and every process inside those namespaces or naming its temp
dir), detaches its loop device, deletes the namespaces, the temp dir and its tmpfs scratch dir.

Disk space: figure 2 writes each volume whole (4 GiB for the largest size) and figure 4 needs about
3 GiB; a size that would leave less than 1.5 GiB free on the pool's filesystem is skipped (and says
so; figure 4 likewise). `TMPDIR=/dev/shm` puts everything in memory instead (room there: the memory
available less 4 GiB). The full copy of figure 2 goes next to the volume when there is room for it,
else into /dev/shm (the output line says which).

Knobs: BENCH_FIGURES ("1,2,3,4"), BENCH_SNAPSHOTS (30), BENCH_CLONE_SIZES ("256M,1G,4G"),
BENCH_CLONE_RUNS (5), BENCH_BACKUP_MIB (512), BENCH_IMPORT_RUNS (3 each), BENCH_IMPORT_GIB (2),
BENCH_KEEP=1 (keep the temp dir), KUMO_BIN, TMPDIR (where the temp dir goes).
"""

import atexit
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no __pycache__ in bench/
from issue2 import Api, free_port  # noqa: E402  (the SigV4 client of issue 2's benchmark)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUMO = os.environ.get("KUMO_BIN") or os.path.join(REPO, "target", "release", "kumo")
FIGURES = {int(x) for x in os.environ.get("BENCH_FIGURES", "1,2,3,4").split(",") if x.strip()}
SNAPSHOTS = int(os.environ.get("BENCH_SNAPSHOTS", "30"))
CLONE_SIZES = [x.strip() for x in os.environ.get("BENCH_CLONE_SIZES", "256M,1G,4G").split(",") if x.strip()]
CLONE_RUNS = int(os.environ.get("BENCH_CLONE_RUNS", "5"))
BACKUP_MIB = int(os.environ.get("BENCH_BACKUP_MIB", "512"))
IMPORT_RUNS = int(os.environ.get("BENCH_IMPORT_RUNS", "3"))
IMPORT_GIB = int(os.environ.get("BENCH_IMPORT_GIB", "2"))
PREFIX = f"kbench5-{os.getpid()}"
MIB, GIB = 1 << 20, 1 << 30
POLL = 0.01
BOOTED = b"KUMO-GUEST-BOOTED"
IP_LINE = re.compile(rb"KUMO-GUEST-IP (\d+\.\d+\.\d+\.\d+)")
FREE_MARGIN = 1.5 * GIB  # what the benchmark leaves free on the disk, for everyone else on the machine
# Goals of issue 5.
PAUSE_GOAL_MS = 10.0
BACKUP_GOAL = 1.1
IMPORT_GOAL = 0.95

STATE = {"tmp": None, "shm": None, "procs": [], "loops": []}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def out(line):
    print(line, flush=True)


def ms(s):
    return s * 1000.0


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, p):
    """Percentile by linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def size_bytes(s):
    m = re.fullmatch(r"(\d+)([KMG]?)", s.strip().upper())
    if not m:
        raise SystemExit(f"bad size {s!r} (e.g. 256M, 1G)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def human(n):
    return f"{n / GIB:.3g} GiB" if n >= GIB else f"{n / MIB:.3g} MiB"


# --------------------------------------------------------------------------- teardown


def all_pids():
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid()]


def pids_matching(needle):
    found = []
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append(pid)
    return found


def our_namespaces():
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(PREFIX + "-"))
    except FileNotFoundError:
        return []


def pids_in_netns(ns):
    try:
        ino = os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return []
    found = []
    for pid in all_pids():
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == ino:
                found.append(pid)
        except OSError:
            continue
    return found


def kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_all():
    """Stops every process this script started or that runs in its namespaces; deletes the namespaces."""
    for p in STATE["procs"]:
        if p.poll() is None:
            p.terminate()
    for p in STATE["procs"]:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    STATE["procs"] = []
    # QEMU (detached by the agent), dnsmasq (daemonized), qemu-img/qemu-io children: by temp dir and namespace.
    needles = [d for d in (STATE["tmp"], STATE["shm"]) if d]
    for _ in range(3):
        pids = set()
        for n in needles:
            pids.update(pids_matching(n))
        for ns in our_namespaces():
            pids.update(pids_in_netns(ns))
        if not pids:
            break
        for pid in pids:
            kill_pid(pid)
        time.sleep(0.3)
    for ns in our_namespaces():
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
    left = our_namespaces()
    if left:
        log(f"WARNING: namespaces left behind: {left}")


def detach_loops():
    for dev in STATE["loops"]:
        r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"WARNING: losetup -d {dev}: {r.stderr.strip()}")
    STATE["loops"] = []


def cleanup():
    stop_all()
    detach_loops()
    if STATE["shm"]:
        shutil.rmtree(STATE["shm"], ignore_errors=True)
    tmp = STATE["tmp"]
    if tmp and os.path.isdir(tmp):
        if os.environ.get("BENCH_KEEP"):
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def on_signal(signum, _frame):
    sys.exit(128 + signum)


# --------------------------------------------------------------------------- helpers


def sh(*args, ok=True, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if ok and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def timed(*args):
    """Runs a command, returns its wall time in seconds."""
    t0 = time.perf_counter()
    sh(*args)
    return time.perf_counter() - t0


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


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def free_bytes(path):
    """Free space; on a tmpfs, also bounded by the memory available beyond a 4 GiB reserve for the machine."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if fs_type(path) == "tmpfs":
        avail = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
        free = min(free, avail - 4 * GIB)
    return free


def fs_type(path):
    best, kind = "", "?"
    for line in open("/proc/mounts"):
        parts = line.split()
        mnt = parts[1]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def environment():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    qv = sh("qemu-system-x86_64", "--version").stdout.splitlines()[0]
    commit = sh("git", "-C", REPO, "rev-parse", "--short", "HEAD").stdout.strip()
    dirty = len(sh("git", "-C", REPO, "status", "--porcelain").stdout.splitlines())
    tmp = STATE["tmp"]
    return (f"env: {os.cpu_count()} CPUs ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} "
            f"GiB RAM, load {os.getloadavg()[0]:.2f}, kernel {os.uname().release}, {qv}, temp dir on "
            f"{fs_type(tmp)} ({human(free_bytes(tmp))} free), Python {sys.version.split()[0]}, git {commit} "
            f"(+{dirty} uncommitted paths)")


def qemu_map_has_data(path):
    """Whether a qcow2 layer holds guest data of its own (not only its backing chain's)."""
    r = sh("qemu-img", "map", "-U", "-f", "qcow2", "--output=json", path)
    return any(e.get("data") and e.get("depth") == 0 for e in json.loads(r.stdout))


# --------------------------------------------------------------------------- the cloud


class Cloud:
    """`kumo server` + one `kumo agent --hypervisor qemu --accel tcg` with its VMs in namespace `ns`."""

    def __init__(self, tmp, ns):
        self.tmp, self.ns = tmp, ns
        self.port = free_port()
        boot = os.path.join(tmp, "bootstrap.json")
        self.server_dir = os.path.join(tmp, "server")
        self.server = spawn([KUMO, "server", "--listen", f"127.0.0.1:{self.port}", "--data-dir", self.server_dir,
                             "--bootstrap-file", boot], "server.log")
        wait_for(lambda: os.path.exists(boot) and os.path.getsize(boot) > 0, 30, "controller bootstrap file")
        time.sleep(0.1)
        b = json.load(open(boot))
        self.api = Api(self.port, b["access_key_id"], b["secret_access_key"])
        wait_for(self._healthy, 30, "controller health")
        self.host_dir = os.path.join(tmp, "host0")
        self.pool = os.path.join(self.host_dir, "pool")
        self.agent = spawn([KUMO, "agent", "--controller", f"http://127.0.0.1:{self.port}", "--join-token",
                            b["join_token"], "--name", "host0", "--data-dir", self.host_dir, "--hypervisor", "qemu",
                            "--accel", "tcg", "--vm-netns", ns], "agent.log")
        wait_for(lambda: any(h["name"] == "host0" and h["state"] == "up" for h in self.api.get("/api/v1/hosts")["items"]),
                 60, "agent registration", 0.1)

    def _healthy(self):
        import http.client
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            c.request("GET", "/healthz")
            return c.getresponse().status == 200
        except OSError:
            return False

    def wait_op(self, op, what, timeout=600, interval=0.02):
        def done():
            o = self.api.get(f"/api/v1/operations/{op}")
            if o["state"] == "failed":
                raise RuntimeError(f"{what} failed: {o.get('error')}")
            return o["state"] == "succeeded"

        wait_for(done, timeout, what, interval)

    def import_wait(self, name, kind, path, kernel=None, ramdisk=None, cmdline=None, fmt=None):
        r = self.api.req("POST", "/api/v1/images", {"name": name, "kind": kind, "path": path, "format": fmt,
                                                    "kernel_id": kernel, "ramdisk_id": ramdisk, "cmdline": cmdline,
                                                    "public": True})
        self.wait_op(r["operation"]["id"], f"import of {name}")
        return r["image"]["id"]

    def image_path(self, image_id):
        return os.path.join(self.server_dir, "images", image_id)

    def run_dir(self, iid):
        return os.path.join(self.host_dir, "run", iid)

    def console(self, iid):
        return read(os.path.join(self.run_dir(iid), "console.log"))

    def state(self, iid):
        return self.api.get(f"/api/v1/instances/{iid}")

    def layer(self, name):
        return os.path.join(self.pool, "layers", f"{name}.qcow2")

    def disk_manifest(self, disk_id):
        return json.load(open(os.path.join(self.pool, "disks", f"{disk_id}.json")))

    def snapshot_layer(self, snap_id):
        return self.layer(json.load(open(os.path.join(self.pool, "snapshots", f"{snap_id}.json")))["layer"])

    def terminate(self, iid):
        self.api.req("DELETE", f"/api/v1/instances/{iid}")
        wait_for(lambda: self.state(iid)["state"] == "terminated", 60, f"{iid} terminated", 0.05)
        wait_for(lambda: not pids_matching(f"kumo-{iid}"), 30, f"{iid}'s QEMU gone", 0.05)

    def volume(self, vid):
        return self.api.get(f"/api/v1/volumes/{vid}")


def boot_guest(c, image, name):
    """Creates an instance and waits until its guest is fully up (DHCP lease: its counter writer runs)."""
    t0 = time.perf_counter()
    iid = c.api.req("POST", "/api/v1/instances", {"name": name, "image": image, "instance_type": "t1.micro"})["id"]
    wait_for(lambda: BOOTED in c.console(iid), 180, f"{iid} boot marker", POLL)
    booted = time.perf_counter() - t0
    wait_for(lambda: IP_LINE.search(c.console(iid)), 180, f"{iid} DHCP lease", 0.1)
    return iid, booted


class Serial:
    """The guest's shell on its serial console, through QEMU's socket (`serial.sock` in the VM's run dir)."""

    seq = 0

    def __init__(self, path):
        self.path = path

    def run(self, cmd, timeout=300):
        Serial.seq += 1
        n = Serial.seq
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        try:
            # The terminal echoes the typed line: the quotes split the marker there, not in the output.
            s.sendall(f"\n{cmd}; echo KB5-DO''NE-{n}\n".encode())
            want = f"KB5-DONE-{n}".encode()
            buf = b""
            deadline = time.monotonic() + timeout
            while want not in buf:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"guest command did not finish in {timeout} s: {cmd[:80]}… got {buf[-300:]!r}")
                part = s.recv(65536)
                if not part:
                    raise RuntimeError(f"serial console closed; got {buf[-300:]!r}")
                buf += part
            text = buf[:buf.index(want)].decode(errors="replace")
            echo = text.rfind(f"KB5-DO''NE-{n}")
            return text[echo:].split("\n", 1)[1] if echo >= 0 and "\n" in text[echo:] else text
        finally:
            s.close()


class Qmp:
    """A minimal QMP client on a unix socket."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(60)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            r = json.loads(line)
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")

    def close(self):
        self.f.close()
        self.s.close()


# --------------------------------------------------------------------------- figure 1


class BareVm:
    """kumo's QEMU command line for the guest, without its NIC, with its run dir moved and a fresh qcow2 overlay
    of disk.qcow2 as the root disk (same virtual size as kumo's), QMP on a unix socket."""

    def __init__(self, c, iid, disk_qcow2, tmp):
        pid = int(read(os.path.join(c.run_dir(iid), "qemu.pid")).strip())
        argv = [a.decode() for a in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:-1]]
        self.dir = os.path.join(tmp, "bare")
        os.makedirs(self.dir)
        self.root = os.path.join(self.dir, "root.qcow2")
        kumo_root = c.layer(c.disk_manifest(iid)["active"])
        vsize = json.loads(sh("qemu-img", "info", "-U", "--output=json", kumo_root).stdout)["virtual-size"]
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk_qcow2, self.root, str(vsize))
        run_dir = c.run_dir(iid)
        argv2, it, self.node = [], iter(argv), None
        for a in it:
            if a not in ("-name", "-netdev", "-device", "-blockdev"):
                argv2.append(a.replace(run_dir, self.dir))
                continue
            val = next(it)
            if a == "-name":
                val = f"{PREFIX}-bare"
            elif a == "-netdev" or val.startswith("virtio-net-pci"):
                continue  # no NIC: the storage path is what is compared here
            elif a == "-blockdev":
                bd = json.loads(val)
                if bd["file"]["filename"] == kumo_root:
                    bd["file"]["filename"] = self.root
                    self.node = bd["node-name"]
                val = json.dumps(bd)
            argv2 += [a, val]
        if self.node is None:
            raise RuntimeError(f"no -blockdev for {kumo_root} in kumo's QEMU command line")
        left = [a for a in argv2 if run_dir in a or kumo_root in a]
        if left:
            raise RuntimeError(f"un-rewritten QEMU arguments: {left}")
        self.argv = argv2
        self.proc = None
        self.overlays = []

    def start(self):
        qlog = open(os.path.join(self.dir, "qemu.log"), "wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                                     start_new_session=True)
        STATE["procs"].append(self.proc)
        console = os.path.join(self.dir, "console.log")
        # rcS prints "no eth0" right after it has started the counter writer.
        wait_for(lambda: b"kumo: no eth0" in read(console) or self.proc.poll() is not None, 180, "bare guest up", 0.1)
        if self.proc.poll() is not None:
            raise RuntimeError(f"bare QEMU exited; see {self.dir}/qemu.log")
        if b"KUMO-GUEST-DATA-ERROR" in read(console):
            raise RuntimeError("bare guest cannot mount its data disk")
        self.qmp = Qmp(os.path.join(self.dir, "qmp.sock"))

    def snapshot(self, n):
        overlay = os.path.join(self.dir, f"snap{n}.qcow2")
        new = f"{self.node[:20]}.b{n}"
        actions = [{"type": "blockdev-snapshot-sync",
                    "data": {"node-name": self.node, "snapshot-file": overlay, "snapshot-node-name": new,
                             "format": "qcow2", "mode": "absolute-paths"}}]
        t0 = time.perf_counter()
        self.qmp.cmd("transaction", {"actions": actions})
        dt = time.perf_counter() - t0
        self.overlays.append(overlay)
        self.node = new
        return dt


def figure1(c, iid, guest_dir):
    log(f"figure 1: {SNAPSHOTS} live snapshots through the API, alternating with a bare QEMU's QMP transaction")
    bare = BareVm(c, iid, os.path.join(guest_dir, "disk.qcow2"), STATE["tmp"])
    bare.start()
    time.sleep(2)
    pause, api, raw, snaps = [], [], [], []
    for n in range(SNAPSHOTS):
        t0 = time.perf_counter()
        s = c.api.req("POST", "/api/v1/snapshots", {"instance": iid, "description": f"bench {n}"})
        api.append(ms(time.perf_counter() - t0))
        if s.get("io_pause_ms") is None or s["state"] != "completed":
            raise RuntimeError(f"snapshot {n}: no live pause recorded: {s}")
        pause.append(s["io_pause_ms"])
        snaps.append(s["id"])
        time.sleep(0.5)
        raw.append(ms(bare.snapshot(n)))
        time.sleep(0.5)
        log(f"  {n}: kumo io_pause {pause[-1]:.1f} ms (API call {api[-1]:.1f} ms), bare transaction {raw[-1]:.1f} ms")
    # The guests did write while being snapshotted: the layers frozen between consecutive snapshots hold data.
    kumo_written = sum(qemu_map_has_data(c.snapshot_layer(s)) for s in snaps[1:])
    bare_written = sum(qemu_map_has_data(o) for o in ([bare.root] + bare.overlays)[1:-1])
    bare.qmp.close()
    bare.proc.kill()
    bare.proc.wait()

    def row(name, xs):
        return (f"  {name} (ms): p50 {pct(xs, 50):.1f}, p99 {pct(xs, 99):.1f}, max {max(xs):.1f}; all: "
                f"{' '.join(f'{x:.1f}' for x in xs)}")

    out(row("kumo io_pause_ms (QMP transaction, agent)", pause))
    out(row("kumo POST /api/v1/snapshots latency     ", api))
    out(row("bare QEMU QMP transaction               ", raw))
    out(f"  layers frozen between two snapshots that hold guest writes: kumo {kumo_written}/{len(snaps) - 1}, "
        f"bare {bare_written}/{len(bare.overlays) - 1}")
    p99, p99b = pct(pause, 99), pct(raw, 99)
    out(f"RESULT snapshot-pause: live snapshot of a TCG guest writing every 100 ms (fdatasync): io_pause p50 "
        f"{pct(pause, 50):.1f} / p99 {p99:.1f} / max {max(pause):.1f} ms (goal p99 <= {PAUSE_GOAL_MS:g} ms: "
        f"{'MET' if p99 <= PAUSE_GOAL_MS else 'MISSED'}); API call p50 {pct(api, 50):.0f} / p99 {pct(api, 99):.0f} / "
        f"max {max(api):.0f} ms; bare QEMU transaction p50 {pct(raw, 50):.1f} / p99 {p99b:.1f} / max {max(raw):.1f} ms; "
        f"p99 ratio kumo/bare {p99 / p99b:.2f} [n={SNAPSHOTS} each, alternating, 0.5 s apart, chains {SNAPSHOTS} "
        f"layers deep at the end]")
    return snaps


# --------------------------------------------------------------------------- figure 2


def figure2(c, iid, fresh_boot):
    log("figure 2: clone creation (copy-on-write volume from a snapshot) against size; full copy side by side")
    # Clones are copy-on-write but count their full virtual size against the pool (thin provisioning): five
    # 4 GiB clones on a small pool need the operator's overcommit.
    c.api.req("PATCH", "/api/v1/storage-pools/local", {"overcommit": 20.0})
    rows = []
    for label in CLONE_SIZES:
        size = size_bytes(label)
        free = free_bytes(c.pool)
        if free - size < FREE_MARGIN:
            out(f"  {label}: SKIPPED: writing {human(size)} would leave {human(max(free - size, 0))} free on the pool's "
                f"filesystem ({human(free)} free; the benchmark keeps {human(FREE_MARGIN)})")
            continue
        v = c.api.req("POST", "/api/v1/volumes", {"name": f"clone-src-{label}", "size_bytes": size})
        vid = v["id"]
        layer = c.layer(c.disk_manifest(vid)["active"])
        # qemu-io allocates a buffer per request: 256 MiB at a time.
        chunk = min(size, 256 * MIB)
        cmds = []
        for off in range(0, size, chunk):
            cmds += ["-c", f"write -q -P 0xab {off} {min(chunk, size - off)}"]
        t_write = timed("qemu-io", "-f", "qcow2", *cmds, layer)
        sh("sync")
        t0 = time.perf_counter()
        snap = c.api.req("POST", "/api/v1/snapshots", {"volume": vid})
        t_snap = time.perf_counter() - t0
        frozen = c.snapshot_layer(snap["id"])
        clone_s, clones = [], []
        for _ in range(CLONE_RUNS):
            t0 = time.perf_counter()
            cl = c.api.req("POST", "/api/v1/volumes", {"snapshot": snap["id"]})
            clone_s.append(time.perf_counter() - t0)
            if cl["state"] != "available":
                raise RuntimeError(f"clone volume {cl['id']} is {cl['state']}")
            clones.append(cl["id"])
            time.sleep(0.2)
        # The clone really is an overlay on the frozen layer (copy-on-write), not a copy.
        cl_layer = c.layer(c.disk_manifest(clones[0])["active"])
        info = json.loads(sh("qemu-img", "info", "-U", "--output=json", cl_layer).stdout)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if backing != frozen:
            raise RuntimeError(f"clone {clones[0]}'s layer is backed by {backing}, not the snapshot's {frozen}")
        # The full copy, next to the volume when the disk has room for it.
        where = c.pool if free_bytes(c.pool) - size >= FREE_MARGIN else STATE["shm"]
        dest = os.path.join(where, f"kbench5-copy-{label}.qcow2")
        sh("sync")
        t_copy = timed("qemu-img", "convert", "-U", "-O", "qcow2", frozen, dest)
        os.unlink(dest)
        for cid in clones:
            c.api.req("DELETE", f"/api/v1/volumes/{cid}")
        c.api.req("DELETE", f"/api/v1/volumes/{vid}")
        c.api.req("DELETE", f"/api/v1/snapshots/{snap['id']}")
        where_name = (f"the pool's filesystem ({fs_type(c.pool)})" if where == c.pool
                      else f"{where} (tmpfs: the pool's filesystem has no room for it)")
        out(f"  {label}: clone (POST /api/v1/volumes {{snapshot}}) ms: {' '.join(f'{ms(x):.1f}' for x in clone_s)} "
            f"(median {ms(med(clone_s)):.1f}); full copy `qemu-img convert -O qcow2` of the chain into {where_name}: "
            f"{t_copy:.2f} s ({size / t_copy / 1e6:.0f} MB/s); [setup: qemu-io write {t_write:.1f} s, offline snapshot "
            f"{ms(t_snap):.0f} ms]")
        rows.append((label, med(clone_s), t_copy))
    if rows:
        first, last = rows[0][1], rows[-1][1]
        flat = last <= first * 1.5 + 0.005
        parts = "; ".join(f"{lab} clone {ms(cl):.1f} ms vs copy {cp * 1000:.0f} ms ({cp / cl:.0f}x)" for lab, cl, cp in rows)
        out(f"RESULT clone-time: copy-on-write volume from a snapshot, median of {CLONE_RUNS}: {parts}; "
            f"{rows[-1][0]}/{rows[0][0]} clone time ratio {last / first:.2f} (goal flat: {'MET' if flat else 'MISSED'})")

    # The hot clone of the running guest.
    t0 = time.perf_counter()
    r = c.api.req("POST", f"/api/v1/instances/{iid}/clone", {"name": "hotclone"})
    t_api = time.perf_counter() - t0
    cid = r["instance"]["id"]
    wait_for(lambda: BOOTED in c.console(cid), 180, "the hot clone's boot marker", POLL)
    t_boot = time.perf_counter() - t0
    source_ok = BOOTED in c.console(iid) and c.state(iid)["state"] == "running"
    c.terminate(cid)
    out(f"RESULT hot-clone: POST /api/v1/instances/{{id}}/clone answered in {ms(t_api):.0f} ms (its live snapshot "
        f"paused I/O {r['snapshot']['io_pause_ms']:.1f} ms); the clone's console shows KUMO-GUEST-BOOTED "
        f"{t_boot:.2f} s after the call (a fresh instance of the image: {fresh_boot:.2f} s from its create call); "
        f"source still running: {'yes' if source_ok else 'NO'}")
    return t_boot


# --------------------------------------------------------------------------- figure 3


def figure3(c, iid):
    log(f"figure 3: incremental backups of a {BACKUP_MIB} MiB volume attached to the running guest")
    size = BACKUP_MIB * MIB
    v = c.api.req("POST", "/api/v1/volumes", {"name": "backup-vol", "size_bytes": size, "instance": iid})
    vid = v["id"]
    c.api.req("POST", f"/api/v1/volumes/{vid}/attach", {"instance": iid})
    wait_for(lambda: c.volume(vid).get("attach_state") == "attached", 120, f"{vid} attached", 0.1)
    shell = Serial(os.path.join(c.run_dir(iid), "serial.sock"))
    serial = vid.replace("-", "", 1)[:20]

    def device():
        o = shell.run("for s in /sys/block/vd*/serial; do echo DEV ${s#/sys/block/} $(cat $s); done", 60)
        for line in o.splitlines():
            w = line.split()
            if len(w) == 3 and w[0] == "DEV" and w[2] == serial:
                return w[1].split("/")[0]
        return None

    dev = wait_for(device, 60, f"the guest's device with serial {serial}", 0.5)
    log(f"  {vid} is /dev/{dev} in the guest")

    def backup(kind_wanted):
        t0 = time.perf_counter()
        r = c.api.req("POST", "/api/v1/backups", {"volume": vid})
        c.wait_op(r["operation"]["id"], "backup", 600, 0.05)
        dt = time.perf_counter() - t0
        b = c.api.get(f"/api/v1/backups/{r['backup']['id']}")
        if b["state"] != "completed" or b["kind"] != kind_wanted:
            raise RuntimeError(f"backup {b['id']}: {b['state']} {b['kind']}, wanted a completed {kind_wanted} one")
        return b, dt

    full, t_full = backup("full")
    out(f"  full backup of the {BACKUP_MIB} MiB volume (blank): bytes_written {full['bytes_written']} "
        f"({human(full['bytes_written'])}), {t_full:.1f} s")
    rng = random.Random(5)
    slots = rng.sample(range(size // (64 * 1024)), 256)
    patterns = [
        ("8 MiB sequential", 8 * MIB, f"dd if=/dev/urandom of=/dev/{dev} bs=1M seek=64 count=8 conv=fsync 2>/dev/null"),
        ("64 MiB sequential", 64 * MIB,
         f"dd if=/dev/urandom of=/dev/{dev} bs=1M seek=128 count=64 conv=fsync 2>/dev/null"),
        # busybox's shell never finished a 1.5 KB command line (its line editor's limit): 32 writes per line.
        ("256 x 4 KiB scattered (64 KiB apart or more)", 256 * 4096,
         [f"for s in {' '.join(str(x * 16) for x in slots[i:i + 32])}; do dd if=/dev/urandom of=/dev/{dev} bs=4k "
          f"seek=$s count=1 conv=fsync 2>/dev/null; done" for i in range(0, len(slots), 32)]),
    ]
    results = []
    for name, changed, cmds in patterns:
        t0 = time.perf_counter()
        for cmd in cmds if isinstance(cmds, list) else [cmds]:
            if len(cmd) > 1000:  # a guard: 32 writes stay far below that limit
                raise RuntimeError(f"guest command line too long for busybox ({len(cmd)} characters)")
            shell.run(cmd, 600)
        t_write = time.perf_counter() - t0
        b, dt = backup("incremental")
        ratio = b["bytes_written"] / changed
        results.append((name, changed, b["bytes_written"], ratio))
        out(f"  {name}: changed {changed} bytes ({human(changed)}), incremental bytes_written {b['bytes_written']} "
            f"({b['bytes_written'] / MIB:.2f} MiB), ratio {ratio:.3f}; backup {dt:.1f} s (guest write {t_write:.1f} s)")
    c.api.req("POST", f"/api/v1/volumes/{vid}/detach")
    parts = "; ".join(f"{n}: {w / MIB:.2f} MiB for {ch / MIB:g} MiB changed = {r:.2f}x "
                      f"({'MET' if r <= BACKUP_GOAL else 'MISSED'})" for n, ch, w, r in results)
    out(f"RESULT backup-bytes: incremental backup bytes_written / bytes changed (goal <= {BACKUP_GOAL}x): {parts} "
        f"[{BACKUP_MIB} MiB volume attached to a running TCG guest, written inside the guest with dd conv=fsync; "
        f"dirty bitmap and qcow2 cluster granularity 64 KiB]")


# --------------------------------------------------------------------------- figure 4


def figure4(c):
    size = IMPORT_GIB * GIB
    data = size // 2
    work = os.path.join(STATE["tmp"], "import")
    os.makedirs(work)
    need = data * 2 + FREE_MARGIN
    if free_bytes(work) < need:
        out(f"RESULT import: SKIPPED: needs {human(need)} free on the temp dir's filesystem, it has "
            f"{human(free_bytes(work))}")
        return
    log(f"figure 4: import of a {IMPORT_GIB} GiB raw file ({human(data)} random data) vs qemu-img convert")
    src = os.path.join(work, "src.raw")
    # Random data in 64 MiB pieces every 128 MiB: half the file is data, half holes.
    piece = 64 * MIB
    with open(src, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * piece):
            f.seek(off)
            f.write(os.urandom(piece))
    sh("sync")
    dest = os.path.join(os.path.dirname(c.image_path("x")), "kbench5-convert.qcow2")
    kumo_s, plain_s = [], []

    def kumo_import(path, name):
        sh("sync")
        t0 = time.perf_counter()
        r = c.api.req("POST", "/api/v1/images", {"name": name, "kind": "disk", "path": path, "format": "raw"})
        c.wait_op(r["operation"]["id"], f"import of {name}", 600, 0.01)
        dt = time.perf_counter() - t0
        img = r["image"]["id"]
        info = json.loads(sh("qemu-img", "info", "--output=json", c.image_path(img)).stdout)
        if info["format"] != "qcow2" or info["virtual-size"] != size:
            raise RuntimeError(f"imported image {img}: {info['format']}, {info['virtual-size']} bytes")
        c.api.req("DELETE", f"/api/v1/images/{img}")
        return dt

    extra = {"fsync": [], "sha256": []}

    def plain_convert(path):
        sh("sync")
        t = timed("qemu-img", "convert", "-f", "raw", "-O", "qcow2", path, dest)
        # What kumo does beyond the conversion, timed by hand on the same output (not part of t): a SHA-256 of the
        # output for the image record, an fsync before publishing it.
        t0 = time.perf_counter()
        h = hashlib.sha256()
        with open(dest, "rb") as f:
            while chunk := f.read(4 * MIB):
                h.update(chunk)
        t1 = time.perf_counter()
        fd = os.open(dest, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        if path == src:
            extra["sha256"].append(t1 - t0)
            extra["fsync"].append(time.perf_counter() - t1)
        os.unlink(dest)
        return t

    for n in range(IMPORT_RUNS):
        # Alternate which goes first, so a drift of the machine's load hits both alike.
        for which in (("kumo", "plain") if n % 2 == 0 else ("plain", "kumo")):
            if which == "kumo":
                kumo_s.append(kumo_import(src, f"imp{n}"))
                log(f"  run {n}: kumo import {kumo_s[-1]:.2f} s")
            else:
                plain_s.append(plain_convert(src))
                log(f"  run {n}: qemu-img convert {plain_s[-1]:.2f} s")
    loop = sh("losetup", "-f", "--show", "-r", src).stdout.strip()
    STATE["loops"].append(loop)
    k_loop = kumo_import(loop, "imp-loop")
    p_loop = plain_convert(loop)
    detach_loops()

    def show(xs):
        return f"{' '.join(f'{x:.2f}' for x in xs)} s (median {med(xs):.2f} s, {size / med(xs) / 1e6:.0f} MB/s)"

    out(f"  file: kumo image import (POST /api/v1/images → operation succeeded): {show(kumo_s)}")
    out(f"  file: qemu-img convert -f raw -O qcow2 (same filesystem): {show(plain_s)}")
    out(f"  the same output afterwards, by hand (what kumo adds): SHA-256 of the file (Python hashlib) "
        f"{' '.join(f'{x:.2f}' for x in extra['sha256'])} s, then fsync {' '.join(f'{x:.2f}' for x in extra['fsync'])} s; "
        f"convert + SHA-256 + fsync median {med([a + b + c for a, b, c in zip(plain_s, extra['sha256'], extra['fsync'])]):.2f} s")
    out(f"  loop device (losetup -r over the same file), once each: kumo import {k_loop:.2f} s "
        f"({size / k_loop / 1e6:.0f} MB/s), qemu-img convert {p_loop:.2f} s ({size / p_loop / 1e6:.0f} MB/s), "
        f"ratio {p_loop / k_loop:.3f}")
    ratio = med(plain_s) / med(kumo_s)
    out(f"RESULT import: {IMPORT_GIB} GiB raw ({human(data)} random data, the rest holes) to qcow2: kumo import "
        f"median {med(kumo_s):.2f} s ({size / med(kumo_s) / 1e6:.0f} MB/s) vs qemu-img convert {med(plain_s):.2f} s "
        f"({size / med(plain_s) / 1e6:.0f} MB/s): throughput ratio {ratio:.3f} (goal >= {IMPORT_GOAL}: "
        f"{'MET' if ratio >= IMPORT_GOAL else 'MISSED'}); from a loop device {p_loop / k_loop:.3f} "
        f"[n={IMPORT_RUNS} each, alternating; MB/s of the virtual size]")


# --------------------------------------------------------------------------- main


def main():
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, taps, loop devices)")
    if not os.access(KUMO, os.X_OK):
        sys.exit(f"{KUMO} missing: run `cargo build --release -p kumo` first (or set KUMO_BIN)")
    for tool in ("ip", "qemu-system-x86_64", "qemu-img", "qemu-io", "losetup", "git"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    atexit.register(cleanup)
    STATE["tmp"] = tempfile.mkdtemp(prefix="kbench5-")
    STATE["shm"] = tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/dev/shm")
    out(environment())
    t_start = time.perf_counter()
    guest_dir = os.path.join(STATE["tmp"], "guest")
    log(f"building the test guest into {guest_dir}")
    sh(KUMO, "dev", "build-guest", "--out", guest_dir)
    c = Cloud(STATE["tmp"], f"{PREFIX}-vm")
    iid = None
    if FIGURES & {1, 2, 3}:
        k = c.import_wait("demo-kernel", "kernel", os.path.join(guest_dir, "vmlinux"))
        r = c.import_wait("demo-initrd", "ramdisk", os.path.join(guest_dir, "initrd.img"))
        image = c.import_wait("demo", "disk", os.path.join(guest_dir, "disk.qcow2"), k, r, "console=ttyS0 quiet")
        iid, booted = boot_guest(c, image, "bench")
        log(f"guest {iid} up (boot marker {booted:.2f} s after the create call)")
    if 1 in FIGURES:
        figure1(c, iid, guest_dir)
    if 2 in FIGURES:
        figure2(c, iid, booted)
    if 3 in FIGURES:
        figure3(c, iid)
    if iid:
        c.terminate(iid)
    if 4 in FIGURES:
        figure4(c)
    out(f"  total {time.perf_counter() - t_start:.0f} s; load average at the end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    log("done; tearing down")


if __name__ == "__main__":
    main()
