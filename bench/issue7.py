#!/usr/bin/env python3
"""EC2 endpoint benchmarks (issue 7): DescribeInstances p50/p99 with 10,000 instances (pages of
1,000), RunInstances p99 (time until the request is accepted), against a real `kumo server`
and a `kumo agent --hypervisor sim` (the instances are simulated: this measures the controller).

Run: `python3 bench/issue7.py` (release build at target/release/kumo, or KUMO_BIN). Everything
runs on 127.0.0.1 in a temp dir that is removed at exit. Knobs: BENCH_INSTANCES (10000),
BENCH_DESCRIBES (60), BENCH_RUNS (200).
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUMO = os.environ.get("KUMO_BIN") or os.path.join(REPO, "target", "release", "kumo")
N = int(os.environ.get("BENCH_INSTANCES", "10000"))
DESCRIBES = int(os.environ.get("BENCH_DESCRIBES", "60"))
RUNS = int(os.environ.get("BENCH_RUNS", "200"))
PROCS = []
TMP = tempfile.mkdtemp(prefix="kbench7-")


def cleanup():
    for p in PROCS:
        if p.poll() is None:
            p.kill()
            p.wait()
    shutil.rmtree(TMP, ignore_errors=True)


atexit.register(cleanup)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Ec2:
    """EC2 Query requests, SigV4-signed (service ec2), on one keep-alive connection."""

    def __init__(self, port, key, secret):
        self.port, self.key, self.secret = port, key, secret
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def call(self, params):
        body = urllib.parse.urlencode(dict(params, Version="2016-11-15")).encode()
        now = datetime.datetime.now(datetime.timezone.utc)
        amz = now.strftime("%Y%m%dT%H%M%SZ")
        date = amz[:8]
        payload = hashlib.sha256(body).hexdigest()
        headers = {"content-type": "application/x-www-form-urlencoded; charset=utf-8", "host": f"127.0.0.1:{self.port}",
                   "x-amz-date": amz}
        names = sorted(headers)
        creq = "\n".join(["POST", "/", "", "".join(f"{n}:{headers[n]}\n" for n in names), ";".join(names), payload])
        scope = f"{date}/kumo/ec2/aws4_request"
        sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(creq.encode()).hexdigest()])
        k = ("AWS4" + self.secret).encode()
        for part in (date, "kumo", "ec2", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = f"AWS4-HMAC-SHA256 Credential={self.key}/{scope}, SignedHeaders={';'.join(names)}, Signature={sig}"
        t = time.perf_counter()
        self.conn.request("POST", "/", body=body, headers=headers)
        resp = self.conn.getresponse()
        raw = resp.read()
        dt = time.perf_counter() - t
        if resp.status != 200:
            raise RuntimeError(f"{params.get('Action')}: HTTP {resp.status}: {raw[:400]!r}")
        return raw, dt


def spawn(args, log):
    f = open(os.path.join(TMP, log), "ab")
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=dict(os.environ, KUMO_LOG="warn"))
    PROCS.append(p)
    return p


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what} (logs in {TMP})")
        time.sleep(0.05)


def main():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    boot = os.path.join(TMP, "bootstrap.json")
    server = spawn([KUMO, "server", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(TMP, "server"),
                    "--bootstrap-file", boot, "--default-cidr", "10.64.0.0/16"], "server.log")
    wait_for(lambda: os.path.exists(boot), 30, "bootstrap")
    b = json.load(open(boot))
    spawn([KUMO, "agent", "--controller", f"http://127.0.0.1:{port}", "--join-token", b["join_token"], "--name", "sim0",
           "--data-dir", os.path.join(TMP, "sim0"), "--hypervisor", "sim", "--capacity", "100000:1000000000"], "agent.log")
    ec2 = Ec2(port, b["access_key_id"], b["secret_access_key"])

    def zones():
        try:
            return b"site1" in ec2.call({"Action": "DescribeAvailabilityZones"})[0]
        except (OSError, RuntimeError, http.client.HTTPException):
            ec2.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            return False

    wait_for(zones, 60, "the sim host")
    img = os.path.join(TMP, "tiny.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"], check=True)
    raw, _ = ec2.call({"Action": "RegisterImage", "Name": "tiny", "ImageLocation": img})
    ami = re.search(rb"<imageId>(ami-[0-9a-f]+)</imageId>", raw).group(1).decode()
    wait_for(lambda: b"available" in ec2.call({"Action": "DescribeImages", "ImageId.1": ami})[0], 60, "the image")

    t0 = time.perf_counter()
    made = 0
    while made < N:
        k = min(100, N - made)
        ec2.call({"Action": "RunInstances", "ImageId": ami, "InstanceType": "t1.nano", "MinCount": str(k), "MaxCount": str(k)})
        made += k
    fill = time.perf_counter() - t0
    print(f"  created {N} instances with RunInstances x100 in {fill:.1f} s ({N / fill:.0f}/s accepted)", flush=True)

    def running():
        raw, _ = ec2.call({"Action": "DescribeInstanceStatus", "MaxResults": "1000"})
        return True

    # Let the reconciler push them all to the sim host before measuring reads.
    time.sleep(5)
    pages, firsts = [], []
    for i in range(DESCRIBES):
        token = None
        first = True
        while True:
            params = {"Action": "DescribeInstances", "MaxResults": "1000"}
            if token:
                params["NextToken"] = token
            raw, dt = ec2.call(params)
            pages.append(dt)
            if first:
                firsts.append(dt)
                first = False
            m = re.search(rb"<nextToken>([^<]+)</nextToken>", raw)
            if not m or i > 0:
                break  # walk all pages once, then measure first pages
            token = m.group(1).decode()
    p50, p99 = pct(pages, 50) * 1000, pct(pages, 99) * 1000
    print(f"RESULT describe-instances: {N} instances, MaxResults=1000: p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(pages)} pages "
          f"(goal p99 <= 100 ms: {'MET' if p99 <= 100 else 'MISSED'})", flush=True)

    runs = []
    for i in range(RUNS):
        _, dt = ec2.call({"Action": "RunInstances", "ImageId": ami, "InstanceType": "t1.nano", "MinCount": "1", "MaxCount": "1"})
        runs.append(dt)
    r50, r99 = pct(runs, 50) * 1000, pct(runs, 99) * 1000
    print(f"RESULT run-instances: accepted p50 {r50:.1f} ms, p99 {r99:.1f} ms over {RUNS} calls with {N}+ instances "
          f"(goal p99 <= 50 ms: {'MET' if r99 <= 50 else 'MISSED'})", flush=True)
    rss = [int(l.split()[1]) for l in open(f"/proc/{server.pid}/status") if l.startswith("VmRSS:")][0]
    print(f"  controller VmRSS {rss / 1024:.1f} MiB with {N + RUNS} instances", flush=True)


if __name__ == "__main__":
    main()
