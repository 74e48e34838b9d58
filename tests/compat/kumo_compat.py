"""Shared helpers for kumo's EC2 compatibility scenarios (boto3 and raw signed requests).

Everything comes from the environment, as for any AWS tool:
  KUMO_EC2_ENDPOINT        the controller's EC2 endpoint, e.g. http://127.0.0.1:8080
  AWS_ACCESS_KEY_ID        a key of the main project
  AWS_SECRET_ACCESS_KEY
  AWS_DEFAULT_REGION       kumo
  KUMO_OTHER_ACCESS_KEY_ID / KUMO_OTHER_SECRET_ACCESS_KEY   a key of a second project (tenancy checks)
  KUMO_GUEST_DIR           the test guest's files, readable by the server (RegisterImage)
  KUMO_COMPAT_RUN          a tag value unique to this run (scopes filters); made up if absent

A scenario is a plain function; `main(scenarios)` runs them in order, prints PASS/FAIL per
scenario with the reason, and ends with the line "N passed, N failed". It exits non-zero on any
failure.
"""

import base64
import datetime
import os
import re
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from unittest import mock

import boto3
import botocore.auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

ENDPOINT = os.environ["KUMO_EC2_ENDPOINT"].rstrip("/")
REGION = os.environ.get("AWS_DEFAULT_REGION", "kumo")
KEY = os.environ["AWS_ACCESS_KEY_ID"]
SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]
OTHER_KEY = os.environ.get("KUMO_OTHER_ACCESS_KEY_ID")
OTHER_SECRET = os.environ.get("KUMO_OTHER_SECRET_ACCESS_KEY")
GUEST_DIR = os.environ.get("KUMO_GUEST_DIR")
# Each script tags what it launches with its own value, so scripts can run side by side.
RUN = "{}-{}".format(
    os.environ.get("KUMO_COMPAT_RUN") or uuid.uuid4().hex[:8],
    os.path.splitext(os.path.basename(sys.argv[0]))[0].replace("_", "-"),
)
API_VERSION = "2016-11-15"

BOOTED = "KUMO-GUEST-BOOTED id="
INSTANCE_ID = re.compile(r"^i-[0-9a-f]{17}$")
IMAGE_ID = re.compile(r"^ami-[0-9a-f]{17}$")
RESERVATION_ID = re.compile(r"^r-[0-9a-f]{17}$")
STATE_CODES = {
    "pending": 0,
    "running": 16,
    "shutting-down": 32,
    "terminated": 48,
    "stopping": 64,
    "stopped": 80,
}
# Waiters poll every second here (botocore's default is 15 s); the time limit stays generous
# for guests booting under TCG on a busy 2-core machine.
FAST_WAIT = {"Delay": 1, "MaxAttempts": 180}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ec2(key=None, secret=None, retries=1):
    """A boto3 EC2 client on kumo. retries=1: an error is seen as it is, never retried."""
    return boto3.client(
        "ec2",
        endpoint_url=ENDPOINT,
        region_name=REGION,
        aws_access_key_id=key or KEY,
        aws_secret_access_key=secret or SECRET,
        config=Config(
            retries={"max_attempts": retries, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        ),
    )


def other_ec2():
    check(
        OTHER_KEY and OTHER_SECRET,
        "KUMO_OTHER_ACCESS_KEY_ID/KUMO_OTHER_SECRET_ACCESS_KEY (a second project's key) are not set",
    )
    return ec2(OTHER_KEY, OTHER_SECRET)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def eq(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {actual!r}")


def expect_error(code, fn, *args, status=None, **kwargs):
    """Call a boto3 operation that must fail with exactly `code` (and HTTP `status` if given)."""
    try:
        resp = fn(*args, **kwargs)
    except ClientError as e:
        got = e.response.get("Error", {}).get("Code")
        http = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        msg = e.response.get("Error", {}).get("Message")
        check(
            got == code,
            f"{fn.__name__}{_fmt_args(args, kwargs)}: expected error {code}, got {got} "
            f"(HTTP {http}: {msg!r})",
        )
        if status is not None:
            check(
                http == status,
                f"{fn.__name__}: {code} should be HTTP {status}, was {http}",
            )
        check(msg, f"{fn.__name__}: {code} has an empty Message")
        check(
            e.response.get("ResponseMetadata", {}).get("RequestId"),
            f"{fn.__name__}: {code} carries no RequestID (botocore read none)",
        )
        return e
    raise AssertionError(
        f"{fn.__name__}{_fmt_args(args, kwargs)}: expected error {code}, but it succeeded: "
        f"{_short(resp)}"
    )


def _fmt_args(args, kwargs):
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    s = ", ".join(parts)
    return f"({s[:300]})"


def _short(obj):
    s = repr(obj)
    return s if len(s) < 600 else s[:600] + "..."


class Soft:
    """Collects failed checks so that one scenario reports all of them: s(fn, *args)."""

    def __init__(self):
        self.errors = []

    def __call__(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AssertionError as e:
            self.errors.append(str(e))
        except ClientError as e:
            self.errors.append(f"{getattr(fn, '__name__', fn)}{_fmt_args(args, kwargs)}: unexpected {e}")
        return None

    def done(self):
        if self.errors:
            raise AssertionError(
                f"{len(self.errors)} check(s) failed:\n    " + "\n    ".join(self.errors)
            )


def tags_of(obj):
    return {t["Key"]: t["Value"] for t in obj.get("Tags", [])}


def instances_of(resp):
    return [i for r in resp.get("Reservations", []) for i in r.get("Instances", [])]


def describe(client, **kw):
    """All instances matching, following NextToken by hand."""
    out = []
    token = None
    seen = set()
    while True:
        if token:
            kw["NextToken"] = token
        resp = client.describe_instances(**kw)
        out.extend(instances_of(resp))
        token = resp.get("NextToken")
        if not token:
            return out
        check(token not in seen, f"NextToken {token!r} came twice")
        seen.add(token)


def run_filter(*extra):
    """Filters scoped to this run's instances."""
    return [{"Name": "tag:compat-run", "Values": [RUN]}] + list(extra)


def demo_ami(client=None):
    client = client or ec2()
    imgs = client.describe_images(Filters=[{"Name": "name", "Values": ["demo"]}])["Images"]
    eq(len(imgs), 1, "images named demo (describe-images Filters name=demo)")
    ami = imgs[0]["ImageId"]
    check(IMAGE_ID.match(ami), f"demo's ImageId {ami!r} is not ami- + 17 hex")
    return ami


def state_of(client, iid):
    insts = instances_of(client.describe_instances(InstanceIds=[iid]))
    eq(len(insts), 1, f"instances returned for {iid}")
    return insts[0]["State"]


def check_state(state, where):
    name = state.get("Name")
    check(name in STATE_CODES, f"{where}: unknown state name {name!r}")
    eq(state.get("Code"), STATE_CODES[name], f"{where}: state code of {name}")


def wait(client, waiter, ids, config=None):
    """A botocore waiter over instances; on failure, say where each instance is."""
    from botocore.exceptions import WaiterError

    started = time.time()
    try:
        client.get_waiter(waiter).wait(InstanceIds=ids, WaiterConfig=config or FAST_WAIT)
    except WaiterError as e:
        try:
            where = {
                i["InstanceId"]: (i["State"]["Name"], i.get("StateReason", {}).get("Message"))
                for i in instances_of(client.describe_instances(InstanceIds=ids))
            }
        except ClientError as d:
            where = f"(describe failed: {d})"
        raise AssertionError(
            f"waiter {waiter} for {ids} gave up after {time.time() - started:.0f}s ({e}); states: {where}"
        ) from None


def wait_console(client, iid, needle, count=1, timeout=120):
    """Poll GetConsoleOutput (boto3 decodes its base64) until `needle` shows `count` times."""
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        resp = client.get_console_output(InstanceId=iid)
        eq(resp.get("InstanceId"), iid, "GetConsoleOutput InstanceId")
        last = resp.get("Output") or ""
        if last.count(needle) >= count:
            return last
        time.sleep(1)
    raise AssertionError(
        f"{iid}'s console output never showed {needle!r} {count} time(s) in {timeout}s; "
        f"last output ends with: {last[-800:]!r}"
    )


def terminate_quietly(ids):
    ids = [i for i in ids if i]
    if not ids:
        return
    try:
        ec2(retries=3).terminate_instances(InstanceIds=ids)
    except Exception as e:  # cleanup only; the scenario already failed or passed
        log(f"cleanup: terminating {ids} failed: {e}")


# ---------------------------------------------------------------------------------------------
# Raw signed requests: for what botocore validates away before sending.


class RawResponse:
    def __init__(self, status, body):
        self.status = status
        self.body = body
        self.text = body.decode("utf-8", "replace")
        self.xml = None
        try:
            self.xml = ET.fromstring(body)
        except ET.ParseError:
            pass

    @property
    def code(self):
        """The EC2 error code, from <Response><Errors><Error><Code>."""
        if self.xml is None or self.xml.tag != "Response":
            return None
        el = self.xml.find("./Errors/Error/Code")
        return el.text if el is not None else None

    def find(self, local):
        """Text of the first element with this local name (namespace ignored)."""
        if self.xml is None:
            return None
        for el in self.xml.iter():
            if el.tag.split("}")[-1] == local:
                return el.text
        return None


def raw(
    params,
    key=None,
    secret=None,
    region=None,
    service="ec2",
    when=None,
    tamper=None,
    method="POST",
    unsigned=False,
):
    """Send an EC2 Query request signed by botocore's own SigV4 signer.

    params: list of (name, value) or dict; Version is added unless present.
    when: a datetime to sign with (expired-date tests); tamper: f(bytes)->bytes applied to the
    body after signing.
    """
    if isinstance(params, dict):
        params = list(params.items())
    if not any(k == "Version" for k, _ in params):
        params = params + [("Version", API_VERSION)]
    query = urllib.parse.urlencode(params)
    if method == "POST":
        url = ENDPOINT + "/"
        data = query.encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    else:
        url = ENDPOINT + "/?" + query
        data = b""
        headers = {}
    req = AWSRequest(method=method, url=url, data=data, headers=headers)
    if not unsigned:
        signer = SigV4Auth(Credentials(key or KEY, secret or SECRET), service, region or REGION)
        if when is not None:
            with mock.patch.object(botocore.auth, "get_current_datetime", lambda: when):
                signer.add_auth(req)
        else:
            signer.add_auth(req)
    prepared = req.prepare()
    body = prepared.body or b""
    if isinstance(body, str):
        body = body.encode()
    if tamper is not None:
        body = tamper(body)
    hreq = urllib.request.Request(
        prepared.url,
        data=body if method == "POST" else None,
        method=method,
        # urllib sets Content-Length from the (possibly tampered) body.
        headers={k: v for k, v in prepared.headers.items() if k.lower() != "content-length"},
    )
    try:
        with urllib.request.urlopen(hreq, timeout=60) as r:
            return RawResponse(r.status, r.read())
    except urllib.error.HTTPError as e:
        return RawResponse(e.code, e.read())


def raw_error(code, params, status=None, **kw):
    """A raw request that must fail with exactly `code`, in EC2's error document."""
    r = raw(params, **kw)
    what = f"{_fmt_args((params,), kw)}"
    check(
        r.status >= 400,
        f"raw {what}: expected error {code}, got HTTP {r.status}: {r.text[:400]}",
    )
    check(
        r.xml is not None and r.xml.tag == "Response",
        f"raw {what}: the error is not <Response><Errors>... XML (HTTP {r.status}): {r.text[:400]}",
    )
    check(
        r.code == code,
        f"raw {what}: expected error {code}, got {r.code} (HTTP {r.status}): {r.text[:400]}",
    )
    check(
        r.xml.find("./RequestID") is not None and r.xml.find("./RequestID").text,
        f"raw {what}: error has no <RequestID>: {r.text[:400]}",
    )
    msg = r.xml.find("./Errors/Error/Message")
    check(msg is not None and msg.text, f"raw {what}: error has no Message: {r.text[:400]}")
    if status is not None:
        check(r.status == status, f"raw {what}: {code} should be HTTP {status}, was {r.status}")
    return r


def b64(s):
    return base64.b64encode(s.encode()).decode()


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------------


def _where(exc):
    """The scenario's own frames of a traceback (not botocore's), and the error."""
    here = os.path.dirname(os.path.abspath(__file__))
    frames = [
        f"  {os.path.basename(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
        for f in traceback.extract_tb(exc.__traceback__)
        if os.path.dirname(os.path.abspath(f.filename)) == here
    ]
    return "\n".join(frames + [f"  {type(exc).__name__}: {exc}"])


def main(scenarios, required=()):
    """Run scenarios in order. If one in `required` fails, the rest are not run (and fail)."""
    log(f"kumo EC2 compatibility: endpoint {ENDPOINT}, region {REGION}, run tag {RUN}")
    passed = failed = 0
    t0 = time.time()
    blocked = None
    for fn in scenarios:
        if blocked:
            failed += 1
            log(f"FAIL {fn.__name__}: not run, {blocked} failed")
            continue
        start = time.time()
        log(f"--- {fn.__name__}")
        try:
            fn()
        except Exception as e:
            failed += 1
            log(f"FAIL {fn.__name__} ({time.time() - start:.1f}s)\n{_where(e)}")
            if os.environ.get("KUMO_COMPAT_TRACEBACK"):
                traceback.print_exc(file=sys.stdout)
            if fn in required:
                blocked = fn.__name__
        else:
            passed += 1
            log(f"PASS {fn.__name__} ({time.time() - start:.1f}s)")
        sys.stdout.flush()
    log(f"done in {time.time() - t0:.1f}s")
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)
