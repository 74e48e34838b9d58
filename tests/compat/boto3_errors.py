#!/usr/bin/env python3
"""EC2's error codes, provoked through boto3 where botocore sends the request, and through raw
requests signed by botocore's own SigV4 signer where botocore would refuse to send it.
Every code is asserted exactly, with EC2's error document (<Response><Errors><Error>... and
<RequestID>) and, where EC2 fixes it, the HTTP status."""

import datetime
import os
import re
import time

from kumo_compat import (
    wait,
    Soft,
    FAST_WAIT,
    GUEST_DIR,
    RUN,
    check,
    demo_ami,
    describe,
    ec2,
    eq,
    expect_error,
    instances_of,
    log,
    main,
    other_ec2,
    raw,
    raw_error,
    run_filter,
    state_of,
    terminate_quietly,
    utcnow,
)
from botocore.exceptions import ClientError

c = ec2()
TAGS = [{"ResourceType": "instance", "Tags": [{"Key": "compat-run", "Value": RUN}]}]
FAKE_I = "i-0123456789abcdef0"
FAKE_AMI = "ami-0123456789abcdef0"
state = {}


def setup():
    """One real instance of this project, for the checks below."""
    ami = demo_ami(c)
    state["ami"] = ami
    r = c.run_instances(ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, TagSpecifications=TAGS)
    state["iid"] = r["Instances"][0]["InstanceId"]
    log(f"instance {state['iid']}")
    wait(c, "instance_running", [state["iid"]])


def not_found_and_malformed():
    s = Soft()
    iid = state["iid"]
    e = s(expect_error, "InvalidInstanceID.NotFound", c.describe_instances, InstanceIds=[FAKE_I], status=400)
    if e:
        s(check, FAKE_I in e.response["Error"]["Message"], f"the NotFound message names the id: {e.response['Error']['Message']!r}")
    # One unknown id among known ones fails the whole call, naming the unknown one.
    e = s(expect_error, "InvalidInstanceID.NotFound", c.describe_instances, InstanceIds=[iid, FAKE_I])
    if e:
        msg = e.response["Error"]["Message"]
        s(check, FAKE_I in msg and iid not in msg, f"NotFound names only the unknown id: {msg!r}")
    for op in (c.terminate_instances, c.stop_instances, c.start_instances, c.reboot_instances):
        s(expect_error, "InvalidInstanceID.NotFound", op, InstanceIds=[FAKE_I])
    s(expect_error, "InvalidInstanceID.NotFound", c.get_console_output, InstanceId=FAKE_I)
    s(expect_error, "InvalidInstanceID.NotFound", c.describe_instance_attribute, InstanceId=FAKE_I, Attribute="instanceType")
    s(expect_error, "InvalidInstanceID.NotFound", c.modify_instance_attribute, InstanceId=FAKE_I, InstanceType={"Value": "t1.micro"})
    s(expect_error, "InvalidInstanceID.NotFound", c.describe_instance_status, InstanceIds=[FAKE_I])
    s(expect_error, "InvalidInstanceID.NotFound", c.create_tags, Resources=[FAKE_I], Tags=[{"Key": "k", "Value": "v"}])
    # A call naming a known and an unknown instance fails whole: the known one is untouched.
    s(expect_error, "InvalidInstanceID.NotFound", c.terminate_instances, InstanceIds=[iid, FAKE_I])
    s(expect_error, "InvalidInstanceID.NotFound", c.stop_instances, InstanceIds=[iid, FAKE_I])
    s(expect_error, "InvalidInstanceID.NotFound", c.create_tags, Resources=[iid, FAKE_I], Tags=[{"Key": "half", "Value": "1"}])
    s(eq, state_of(c, iid)["Name"], "running", "the known instance after a failed TerminateInstances/StopInstances")
    s(check, "half" not in {t["Key"] for t in instances_of(c.describe_instances(InstanceIds=[iid]))[0].get("Tags", [])}, "a failed CreateTags tagged the known instance")
    for bad in ("i-xyz", "nothing", "i-"):
        s(expect_error, "InvalidInstanceID.Malformed", c.describe_instances, InstanceIds=[bad], status=400)
    s(expect_error, "InvalidInstanceID.Malformed", c.terminate_instances, InstanceIds=["i-zz"])
    s(expect_error, "InvalidInstanceID.Malformed", c.get_console_output, InstanceId="bogus")
    s(expect_error, "InvalidAMIID.NotFound", c.describe_images, ImageIds=[FAKE_AMI])
    s(expect_error, "InvalidAMIID.Malformed", c.describe_images, ImageIds=["ami-zz"])
    s(expect_error, "InvalidAMIID.NotFound", c.run_instances, ImageId=FAKE_AMI, MinCount=1, MaxCount=1, TagSpecifications=TAGS)
    s(expect_error, "InvalidAMIID.Malformed", c.run_instances, ImageId="bogus", MinCount=1, MaxCount=1, TagSpecifications=TAGS)
    # An unknown attribute name.
    s(expect_error, "InvalidParameterValue", c.describe_instance_attribute, InstanceId=iid, Attribute="noSuchAttribute")
    s.done()


def parameters():
    s = Soft()
    ami = state["ami"]
    iid = state["iid"]
    # botocore sends these as they are.
    s(expect_error, "MissingParameter", c.run_instances, MinCount=1, MaxCount=1, TagSpecifications=TAGS, status=400)
    s(expect_error, "InvalidParameterValue", c.run_instances, ImageId=ami, InstanceType="x9.enormous", MinCount=1, MaxCount=1, TagSpecifications=TAGS)
    s(expect_error, "InvalidParameterValue", c.run_instances, ImageId=ami, InstanceType="t1.nano", MinCount=3, MaxCount=2, TagSpecifications=TAGS)
    s(expect_error, "InvalidParameterValue", c.run_instances, ImageId=ami, InstanceType="t1.nano", MinCount=0, MaxCount=1, TagSpecifications=TAGS)
    s(expect_error, "InvalidParameterValue", c.run_instances, ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, UserData="x" * 20000, TagSpecifications=TAGS)
    s(expect_error, "InvalidParameterValue", c.describe_instances, MaxResults=4)
    s(expect_error, "InvalidParameterValue", c.describe_instances, MaxResults=1001)
    s(expect_error, "InvalidParameterCombination", c.describe_instances, InstanceIds=[iid], MaxResults=5)
    s(expect_error, "InvalidParameterValue", c.describe_instances, Filters=[{"Name": "no-such-filter", "Values": ["x"]}])
    s(expect_error, "InvalidParameterValue", c.describe_instances, NextToken="not-a-token")
    # Raw: what botocore would refuse to send or cannot express.
    base = [("Action", "DescribeInstances")]
    s(raw_error, "UnknownParameter", base + [("Bogus", "1")], status=400)
    s(raw_error, "UnknownParameter", [("Action", "TerminateInstances"), ("InstanceId.1", iid), ("Frobnicate", "yes")])
    s(raw_error, "InvalidParameterValue", base + [("InstanceId.0", iid)], status=400)
    s(raw_error, "InvalidParameterValue", base + [("InstanceId.x", iid)])
    s(raw_error, "InvalidParameterValue", base + [("InstanceId.-1", iid)])
    s(raw_error, "InvalidParameterValue", base + [("Filter.1.Name", "tag-key"), ("Filter.1.Value.0", "x")])
    s(raw_error, "InvalidParameterValue", base + [("MaxResults", "abc")], status=400)
    s(raw_error, "InvalidParameterValue", base + [("MaxResults", "5.5")])
    s(raw_error, "InvalidParameterValue", base + [("DryRun", "maybe")])
    s(raw_error, "InvalidParameterValue", [("Action", "RunInstances"), ("ImageId", ami), ("MinCount", "one"), ("MaxCount", "1")])
    s(raw_error, "InvalidParameterValue", base + [("MaxResults", "100000000000000000000")])
    s(raw_error, "MissingParameter", [("Action", "TerminateInstances")], status=400)
    s(raw_error, "MissingParameter", [("Action", "GetConsoleOutput")])
    s(raw_error, "MissingParameter", [("Action", "RunInstances"), ("ImageId", ami), ("MaxCount", "1")])
    s(raw_error, "InvalidParameterValue", [("Action", "RunInstances"), ("ImageId", ami), ("MinCount", "1"), ("MaxCount", "1"), ("UserData", "%%% not base64 %%%")])
    s(raw_error, "InvalidAction", [("Action", "FrobnicateInstances")], status=400)
    # The success document's shape, as botocore's parser expects it.
    r = raw([("Action", "DescribeRegions")])
    eq(r.status, 200, f"raw DescribeRegions status ({r.text[:300]})")
    eq(r.xml.tag, "{http://ec2.amazonaws.com/doc/2016-11-15/}DescribeRegionsResponse", "success root element")
    check(r.find("requestId"), f"no requestId: {r.text[:300]}")
    eq(r.find("regionName"), "kumo", "regionInfo/item/regionName")
    # GET with the query in the URL is signed and served too.
    r = raw([("Action", "DescribeRegions")], method="GET")
    eq(r.status, 200, f"signed GET DescribeRegions ({r.text[:300]})")
    s.done()


def auth():
    s = Soft()
    # Through boto3.
    bad = ec2(key="AKIAKUMONOSUCHKEY000", secret="x" * 40)
    s(expect_error, "AuthFailure", bad.describe_regions, status=401)
    wrong = ec2(secret="y" * 40)
    s(expect_error, "AuthFailure", wrong.describe_instances, status=401)
    # Raw.
    q = [("Action", "DescribeInstances"), ("MaxResults", "5")]
    ok = raw(q)
    eq(ok.status, 200, f"the untampered request works ({ok.text[:300]})")
    s(raw_error, "AuthFailure", q, tamper=lambda b: b.replace(b"MaxResults=5", b"MaxResults=6"), status=401)
    s(raw_error, "AuthFailure", q, tamper=lambda b: b + b"&DryRun=true", status=401)
    s(raw_error, "AuthFailure", q, key="AKIAKUMONOSUCHKEY000", secret="x" * 40, status=401)
    s(raw_error, "AuthFailure", q, region="us-east-1", status=401)
    s(raw_error, "AuthFailure", q, service="s3", status=401)
    now = utcnow()
    eq(raw(q, when=now - datetime.timedelta(minutes=2)).status, 200, "a date 2 minutes old is inside the skew window")
    s(raw_error, "RequestExpired", q, when=now - datetime.timedelta(hours=1), status=400)
    s(raw_error, "RequestExpired", q, when=now + datetime.timedelta(hours=1), status=400)
    r = raw(q, unsigned=True)
    check(r.status in (401, 403) and r.code in ("AuthFailure", "MissingAuthenticationToken"), f"unsigned request: HTTP {r.status} {r.code}: {r.text[:300]}")
    s.done()


def tenancy():
    """Another project's ids are NotFound, exactly as ids that never existed."""
    s = Soft()
    o = other_ec2()
    iid = state["iid"]
    e1 = s(expect_error, "InvalidInstanceID.NotFound", o.describe_instances, InstanceIds=[iid])
    e2 = s(expect_error, "InvalidInstanceID.NotFound", o.describe_instances, InstanceIds=[FAKE_I])
    if e1 and e2:
        s(
            eq,
            e1.response["Error"]["Message"].replace(iid, "ID"),
            e2.response["Error"]["Message"].replace(FAKE_I, "ID"),
            "another project's id and a never-existing id get the same message",
        )
    check(iid not in [i["InstanceId"] for i in describe(o)], "another project's instance is listed")
    eq(o.describe_tags(Filters=[{"Name": "resource-id", "Values": [iid]}])["Tags"], [], "another project's tags")
    eq(o.describe_instance_status(IncludeAllInstances=True)["InstanceStatuses"], [], "the other project has no instance status")
    for op in (o.terminate_instances, o.stop_instances, o.start_instances, o.reboot_instances, o.describe_instance_status):
        s(expect_error, "InvalidInstanceID.NotFound", op, InstanceIds=[iid])
    s(expect_error, "InvalidInstanceID.NotFound", o.get_console_output, InstanceId=iid)
    s(expect_error, "InvalidInstanceID.NotFound", o.describe_instance_attribute, InstanceId=iid, Attribute="userData")
    s(expect_error, "InvalidInstanceID.NotFound", o.modify_instance_attribute, InstanceId=iid, InstanceType={"Value": "t1.micro"})
    s(expect_error, "InvalidInstanceID.NotFound", o.create_tags, Resources=[iid], Tags=[{"Key": "pwned", "Value": "1"}])
    s(expect_error, "InvalidInstanceID.NotFound", o.delete_tags, Resources=[iid], Tags=[{"Key": "compat-run"}])
    eq(state_of(c, iid)["Name"], "running", "the instance is untouched")
    eq(
        {t["Key"] for t in instances_of(c.describe_instances(InstanceIds=[iid]))[0].get("Tags", [])},
        {"compat-run"},
        "its tags are untouched",
    )
    # The public demo image is visible to everyone; a private one is not.
    eq([i["ImageId"] for i in o.describe_images(ImageIds=[state["ami"]])["Images"]], [state["ami"]], "public image seen by another project")
    check(GUEST_DIR, "KUMO_GUEST_DIR is not set")
    demo = c.describe_images(ImageIds=[state["ami"]])["Images"][0]
    priv = c.register_image(
        Name=f"private-{RUN}",
        ImageLocation=os.path.join(GUEST_DIR, "disk.qcow2"),
        KernelId=demo["KernelId"],
        RamdiskId=demo["RamdiskId"],
    )["ImageId"]
    state["priv"] = priv
    c.get_waiter("image_available").wait(ImageIds=[priv], WaiterConfig=FAST_WAIT)
    s(expect_error, "InvalidAMIID.NotFound", o.describe_images, ImageIds=[priv])
    check(priv not in [i["ImageId"] for i in o.describe_images()["Images"]], "another project's private image is listed")
    s(expect_error, "InvalidAMIID.NotFound", o.run_instances, ImageId=priv, MinCount=1, MaxCount=1)
    s(expect_error, "InvalidAMIID.NotFound", o.deregister_image, ImageId=priv)
    # The public image is visible to the other project, but not its to deregister.
    s(expect_error, "UnauthorizedOperation", o.deregister_image, ImageId=state["ami"])
    s(expect_error, "UnauthorizedOperation", o.deregister_image, ImageId=state["ami"], DryRun=True)
    c.deregister_image(ImageId=priv)
    state.pop("priv")
    s.done()


def idempotency():
    ami = state["ami"]
    token = f"compat-{RUN}-{time.time()}"
    kw = dict(ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, ClientToken=token, TagSpecifications=TAGS)
    r1 = c.run_instances(**kw)
    state["token_iid"] = r1["Instances"][0]["InstanceId"]
    r2 = c.run_instances(**kw)
    eq(r2["Instances"][0]["InstanceId"], r1["Instances"][0]["InstanceId"], "same ClientToken, same parameters: the same instance")
    eq(r2["ReservationId"], r1["ReservationId"], "same ClientToken: the same reservation")
    expect_error("IdempotentParameterMismatch", c.run_instances, **{**kw, "InstanceType": "t1.micro"}, status=400)
    expect_error("IdempotentParameterMismatch", c.run_instances, **{**kw, "MaxCount": 2, "MinCount": 2})
    n = len([i for i in describe(c, Filters=run_filter()) if i["InstanceId"] != state["iid"]])
    eq(n, 1, "instances made by one ClientToken used four times")
    # Tokens belong to a project: another project's same token neither replays this project's
    # instance nor reveals that the token was used.
    o = other_ec2()
    try:
        r = o.run_instances(**kw)
    except ClientError as e:
        code = e.response["Error"]["Code"]
        check(code != "IdempotentParameterMismatch", f"another project's ClientToken leaks: {code}")
        log(f"another project's RunInstances with the same token: {code} ({e.response['Error']['Message']})")
    else:
        theirs = r["Instances"][0]["InstanceId"]
        check(theirs != state["token_iid"], "another project's RunInstances with the same ClientToken got this project's instance")
        o.terminate_instances(InstanceIds=[theirs])
    # botocore makes a fresh token per call when none is given: two calls, two instances.
    c.terminate_instances(InstanceIds=[state["token_iid"]])


def dry_run():
    s = Soft()
    ami = state["ami"]
    iid = state["iid"]
    before = len(describe(c, Filters=run_filter()))
    s(expect_error, "DryRunOperation", c.run_instances, ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, DryRun=True, TagSpecifications=TAGS, status=412)
    eq(len(describe(c, Filters=run_filter())), before, "a DryRun RunInstances launches nothing")
    s(expect_error, "DryRunOperation", c.describe_instances, DryRun=True, status=412)
    s(expect_error, "DryRunOperation", c.stop_instances, InstanceIds=[iid], DryRun=True)
    s(expect_error, "DryRunOperation", c.terminate_instances, InstanceIds=[iid], DryRun=True)
    s(expect_error, "DryRunOperation", c.create_tags, Resources=[iid], Tags=[{"Key": "dry", "Value": "1"}], DryRun=True)
    s(expect_error, "DryRunOperation", c.describe_images, DryRun=True)
    eq(state_of(c, iid)["Name"], "running", "DryRun stop/terminate changed nothing")
    check("dry" not in {t["Key"] for t in instances_of(c.describe_instances(InstanceIds=[iid]))[0].get("Tags", [])}, "DryRun CreateTags tagged")
    # A dry run of something invalid reports the real problem, not DryRunOperation.
    s(expect_error, "InvalidInstanceID.NotFound", c.stop_instances, InstanceIds=[FAKE_I], DryRun=True)
    s.done()


def states_and_capacity():
    s = Soft()
    ami = state["ami"]
    iid = state["iid"]
    s(expect_error, "IncorrectInstanceState", c.modify_instance_attribute, InstanceId=iid, InstanceType={"Value": "t1.micro"}, status=400)
    # The agent offers 4 vCPUs / 8 GiB: m1.2xlarge (16 GiB) fits nowhere.
    s(expect_error, "InsufficientInstanceCapacity", c.run_instances, ImageId=ami, InstanceType="m1.2xlarge", MinCount=1, MaxCount=1, TagSpecifications=TAGS)
    s(expect_error, "InstanceLimitExceeded", c.run_instances, ImageId=ami, InstanceType="t1.nano", MinCount=100000, MaxCount=100000, TagSpecifications=TAGS)
    s.done()


def placement_groups():
    """A spread group on a one-host cloud: one member fits, a second does not; the group
    cannot be deleted while in use; unknown and duplicate names get EC2's codes."""
    ami = state["ami"]
    pg = f"pg-{RUN}"
    r = c.create_placement_group(GroupName=pg, Strategy="spread")
    eq(r["PlacementGroup"]["GroupName"], pg, "CreatePlacementGroup's group")
    check(r["PlacementGroup"]["GroupId"].startswith("pg-"), "group id pg-...")
    expect_error("InvalidPlacementGroup.Duplicate", c.create_placement_group, GroupName=pg, Strategy="spread", status=400)
    expect_error("UnsupportedOperation", c.create_placement_group, GroupName=f"cl-{RUN}", Strategy="cluster", status=400)
    groups = c.describe_placement_groups(GroupNames=[pg])["PlacementGroups"]
    eq([(g["GroupName"], g["Strategy"], g["State"]) for g in groups], [(pg, "spread", "available")], "DescribePlacementGroups")
    expect_error("InvalidPlacementGroup.Unknown", c.describe_placement_groups, GroupNames=[f"nope-{RUN}"], status=400)
    expect_error("InvalidPlacementGroup.Unknown", c.run_instances, ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1,
                 Placement={"GroupName": f"nope-{RUN}"}, TagSpecifications=TAGS, status=400)
    r = c.run_instances(ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1,
                        Placement={"GroupName": pg}, TagSpecifications=TAGS)
    member = r["Instances"][0]["InstanceId"]
    try:
        eq(r["Instances"][0]["Placement"].get("GroupName"), pg, "the member's Placement.GroupName")
        # One host, one member per host: a second member has nowhere to go.
        expect_error("InsufficientInstanceCapacity", c.run_instances, ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1,
                     Placement={"GroupName": pg}, TagSpecifications=TAGS)
        expect_error("InvalidPlacementGroup.InUse", c.delete_placement_group, GroupName=pg, status=400)
    finally:
        c.terminate_instances(InstanceIds=[member])
    wait(c, "instance_terminated", [member])
    c.delete_placement_group(GroupName=pg)
    left = [g["GroupName"] for g in c.describe_placement_groups()["PlacementGroups"]]
    check(pg not in left, f"{pg} still listed after DeletePlacementGroup: {left}")


def native(method, path, body=None):
    """A request to kumo's native REST API (JSON, SigV4 service `kumo`), signed by botocore's
    signer with the main key: for what EC2 has no action for (the public address pool)."""
    import json
    import urllib.error
    import urllib.request

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from kumo_compat import ENDPOINT, KEY, REGION, SECRET

    data = json.dumps(body).encode() if body is not None else b""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = AWSRequest(method=method, url=ENDPOINT + path, data=data, headers=headers)
    SigV4Auth(Credentials(KEY, SECRET), "kumo", REGION).add_auth(req)
    prepared = req.prepare()
    hreq = urllib.request.Request(
        prepared.url,
        data=data if body is not None else None,
        method=method,
        headers={k: v for k, v in prepared.headers.items() if k.lower() != "content-length"},
    )
    try:
        with urllib.request.urlopen(hreq, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def addresses_and_vpcs():
    """Elastic IPs (kumo's addresses) and VPCs (kumo's networks): allocate, associate (the
    instance's PublicIpAddress and the ip-address filter), reassociation, disassociate, release;
    a small pool running out; another project's ids are NotFound; Create/Describe/DeleteVpc and
    RunInstances on a VPC's id as SubnetId."""
    s = Soft()
    iid = state["iid"]
    ami = state["ami"]
    o = other_ec2()
    fake_alloc = "eipalloc-0123456789abcdef0"
    fake_assoc = "eipassoc-0123456789abcdef0"
    nowhere = "192.0.2.99"
    # The public pool is the operator's (native API, administrators): a small one if none is set.
    status, pool = native("GET", "/api/v1/address-pool")
    if status == 404:
        status, pool = native(
            "PUT",
            "/api/v1/address-pool",
            {"cidr": "198.51.100.0/24", "gateway": "198.51.100.1", "first": "198.51.100.10", "last": "198.51.100.17"},
        )
    eq(status, 200, f"the address pool ({pool})")
    state["allocs"] = []

    def allocate(client=c):
        r = client.allocate_address(Domain="vpc")
        state["allocs"].append((client, r["AllocationId"]))
        return r

    a = allocate()
    check(a["AllocationId"].startswith("eipalloc-"), f"AllocationId {a['AllocationId']!r}")
    eq(a["Domain"], "vpc", "AllocateAddress Domain")
    ip = a["PublicIp"]
    b = allocate()
    check(b["PublicIp"] != ip, "two allocations got the same address")
    s(expect_error, "DryRunOperation", c.allocate_address, Domain="vpc", DryRun=True, status=412)
    got = c.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"]
    eq([(x["PublicIp"], x["Domain"], x.get("InstanceId")) for x in got], [(ip, "vpc", None)], "DescribeAddresses of a new address")

    # Associate: the instance shows the address.
    assoc = c.associate_address(AllocationId=a["AllocationId"], InstanceId=iid)["AssociationId"]
    check(assoc.startswith("eipassoc-"), f"AssociationId {assoc!r}")
    inst = instances_of(c.describe_instances(InstanceIds=[iid]))[0]
    eq(inst.get("PublicIpAddress"), ip, "DescribeInstances PublicIpAddress")
    eq(inst["NetworkInterfaces"][0].get("Association", {}).get("PublicIp"), ip, "the interface's Association.PublicIp")
    eq(inst.get("SubnetId"), inst.get("VpcId"), "SubnetId is the network (kumo's networks are one subnet)")
    found = [i["InstanceId"] for i in describe(c, Filters=[{"Name": "ip-address", "Values": [ip]}])]
    eq(found, [iid], "DescribeInstances filter ip-address")
    for name, value in (("instance-id", iid), ("association-id", assoc), ("public-ip", ip), ("allocation-id", a["AllocationId"])):
        got = c.describe_addresses(Filters=[{"Name": name, "Values": [value]}])["Addresses"]
        s(eq, [(x["AllocationId"], x.get("InstanceId"), x.get("AssociationId")) for x in got], [(a["AllocationId"], iid, assoc)], f"DescribeAddresses filter {name}")
    got = c.describe_addresses(PublicIps=[ip])["Addresses"][0]
    eq((got.get("InstanceId"), got.get("AssociationId"), got.get("PrivateIpAddress")), (iid, assoc, inst["PrivateIpAddress"]), "DescribeAddresses of an associated address")
    s(expect_error, "InvalidParameterValue", c.describe_addresses, Filters=[{"Name": "no-such-filter", "Values": ["x"]}])

    # Another instance: an associated address moves only with AllowReassociation.
    r = c.run_instances(ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, TagSpecifications=TAGS)
    second = r["Instances"][0]["InstanceId"]
    state["second"] = second
    s(expect_error, "Resource.AlreadyAssociated", c.associate_address, AllocationId=a["AllocationId"], InstanceId=second, status=400)
    eq(state_public_ip(iid), ip, "a refused reassociation kept the address on its instance")
    c.associate_address(AllocationId=a["AllocationId"], InstanceId=second, AllowReassociation=True)
    eq(state_public_ip(iid), None, "after AllowReassociation moved it, the first instance's PublicIpAddress")
    eq(state_public_ip(second), ip, "the second instance's PublicIpAddress")
    # An instance holds one address: a second one replaces the first (by PublicIp this time).
    c.associate_address(PublicIp=b["PublicIp"], InstanceId=second)
    eq(state_public_ip(second), b["PublicIp"], "the instance's new address")
    eq(c.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"][0].get("InstanceId"), None, "the replaced address is disassociated")
    b_assoc = c.describe_addresses(AllocationIds=[b["AllocationId"]])["Addresses"][0]["AssociationId"]
    s(expect_error, "InvalidIPAddress.InUse", c.release_address, AllocationId=b["AllocationId"], status=400)
    check(c.describe_addresses(AllocationIds=[b["AllocationId"]])["Addresses"], "a refused release released")

    # NotFound codes.
    s(expect_error, "InvalidAllocationID.NotFound", c.describe_addresses, AllocationIds=[fake_alloc], status=400)
    s(expect_error, "InvalidAddress.NotFound", c.describe_addresses, PublicIps=[nowhere])
    s(expect_error, "InvalidAllocationID.NotFound", c.associate_address, AllocationId=fake_alloc, InstanceId=iid)
    s(expect_error, "InvalidAddress.NotFound", c.associate_address, PublicIp=nowhere, InstanceId=iid)
    s(expect_error, "InvalidInstanceID.NotFound", c.associate_address, AllocationId=a["AllocationId"], InstanceId=FAKE_I)
    s(expect_error, "InvalidAssociationID.NotFound", c.disassociate_address, AssociationId=fake_assoc)
    s(expect_error, "InvalidAddress.NotFound", c.disassociate_address, PublicIp=nowhere)
    s(expect_error, "InvalidAllocationID.NotFound", c.release_address, AllocationId=fake_alloc)
    s(expect_error, "InvalidAddress.NotFound", c.release_address, PublicIp=nowhere)

    # Another project's addresses do not exist for it, and are not changed by it.
    s(expect_error, "InvalidAllocationID.NotFound", o.describe_addresses, AllocationIds=[b["AllocationId"]])
    s(expect_error, "InvalidAddress.NotFound", o.describe_addresses, PublicIps=[b["PublicIp"]])
    check(b["AllocationId"] not in [x["AllocationId"] for x in o.describe_addresses()["Addresses"]], "another project's address is listed")
    s(expect_error, "InvalidAllocationID.NotFound", o.associate_address, AllocationId=a["AllocationId"], InstanceId=iid)
    s(expect_error, "InvalidAssociationID.NotFound", o.disassociate_address, AssociationId=b_assoc)
    s(expect_error, "InvalidAllocationID.NotFound", o.release_address, AllocationId=a["AllocationId"])
    theirs = allocate(o)
    s(expect_error, "InvalidInstanceID.NotFound", o.associate_address, AllocationId=theirs["AllocationId"], InstanceId=iid)
    eq(state_public_ip(second), b["PublicIp"], "the instance kept its address")

    # Disassociate, then release; a released allocation is gone.
    c.disassociate_address(AssociationId=b_assoc)
    eq(state_public_ip(second), None, "PublicIpAddress after DisassociateAddress")
    s(expect_error, "InvalidAssociationID.NotFound", c.disassociate_address, AssociationId=b_assoc)
    c.release_address(AllocationId=b["AllocationId"])
    s(expect_error, "InvalidAllocationID.NotFound", c.describe_addresses, AllocationIds=[b["AllocationId"]])
    s(expect_error, "InvalidAllocationID.NotFound", c.release_address, AllocationId=b["AllocationId"])
    # Terminating an instance disassociates its address; the allocation stays.
    c.associate_address(AllocationId=a["AllocationId"], InstanceId=second)
    c.terminate_instances(InstanceIds=[second])
    got = c.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"]
    eq([(x["PublicIp"], x.get("InstanceId")) for x in got], [(ip, None)], "the address of a terminated instance")

    # The pool runs out: AddressLimitExceeded (every address this scenario took is released below).
    for _ in range(1024):
        try:
            allocate()
        except ClientError as e:
            eq(e.response["Error"]["Code"], "AddressLimitExceeded", f"allocating from a full pool ({e})")
            break
    else:
        raise AssertionError("1024 allocations and the pool never ran out")
    for client, alloc in state.pop("allocs"):
        try:
            client.release_address(AllocationId=alloc)
        except ClientError as e:
            check(e.response["Error"]["Code"] == "InvalidAllocationID.NotFound", f"releasing {alloc}: {e}")
    check(ip not in [x["PublicIp"] for x in c.describe_addresses()["Addresses"]], "released addresses are still listed")

    # VPCs are kumo's networks.
    cidr = "10.98.0.0/24"
    v = c.create_vpc(CidrBlock=cidr)["Vpc"]
    vid = v["VpcId"]
    state["vpc"] = vid
    check(vid.startswith("vpc-"), f"VpcId {vid!r}")
    eq((v["CidrBlock"], v["State"], v["IsDefault"]), (cidr, "available", False), "CreateVpc's vpc")
    eq([x["VpcId"] for x in c.describe_vpcs(VpcIds=[vid])["Vpcs"]], [vid], "DescribeVpcs VpcIds")
    eq([x["VpcId"] for x in c.describe_vpcs(Filters=[{"Name": "cidr", "Values": [cidr]}])["Vpcs"]], [vid], "DescribeVpcs filter cidr")
    eq([x["VpcId"] for x in c.describe_vpcs(Filters=[{"Name": "vpc-id", "Values": [vid]}])["Vpcs"]], [vid], "DescribeVpcs filter vpc-id")
    check(any(x["IsDefault"] for x in c.describe_vpcs()["Vpcs"]), "no default VPC (the project's default network) is listed")
    for bad in ("10.98.0.0/33", "10.98.1.5/24", "10.98.1.0/29", "10.0.0.0/8", "10.98.0.128/25", "nonsense"):
        s(expect_error, "InvalidVpc.Range", c.create_vpc, CidrBlock=bad, status=400)
    eq([x["VpcId"] for x in c.describe_vpcs(Filters=[{"Name": "cidr", "Values": ["10.98.*"]}])["Vpcs"]], [vid], "refused CreateVpc calls made VPCs")
    s(expect_error, "InvalidVpcID.NotFound", c.describe_vpcs, VpcIds=["vpc-0123456789abcdef0"], status=400)
    s(expect_error, "InvalidVpcID.NotFound", c.delete_vpc, VpcId="vpc-0123456789abcdef0")
    s(expect_error, "InvalidVpcID.NotFound", o.describe_vpcs, VpcIds=[vid])
    s(expect_error, "InvalidVpcID.NotFound", o.delete_vpc, VpcId=vid)
    s(expect_error, "InvalidSubnetID.NotFound", o.run_instances, ImageId=ami, MinCount=1, MaxCount=1, SubnetId=vid)
    s(expect_error, "InvalidSubnetID.NotFound", c.run_instances, ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, SubnetId="subnet-0123456789abcdef0", TagSpecifications=TAGS, status=400)
    # An instance on the VPC, by its id as SubnetId: the VPC cannot go while it lives.
    r = c.run_instances(ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, SubnetId=vid, TagSpecifications=TAGS)
    inside = r["Instances"][0]
    state["inside"] = inside["InstanceId"]
    eq((inside.get("VpcId"), inside.get("SubnetId")), (vid, vid), "RunInstances on the VPC: VpcId and SubnetId")
    check(inside["PrivateIpAddress"].startswith("10.98.0."), f"the instance's address {inside['PrivateIpAddress']} is outside {cidr}")
    found = [i["InstanceId"] for i in describe(c, Filters=[{"Name": "vpc-id", "Values": [vid]}])]
    eq(found, [inside["InstanceId"]], "DescribeInstances filter vpc-id")
    s(expect_error, "DependencyViolation", c.delete_vpc, VpcId=vid, status=400)
    c.terminate_instances(InstanceIds=[inside["InstanceId"], second])
    wait(c, "instance_terminated", [inside["InstanceId"], second])
    c.delete_vpc(VpcId=vid)
    state.pop("vpc")
    s(expect_error, "InvalidVpcID.NotFound", c.describe_vpcs, VpcIds=[vid])
    s.done()


def state_public_ip(iid):
    return instances_of(c.describe_instances(InstanceIds=[iid]))[0].get("PublicIpAddress")


# An OpenSSH public key and the fingerprint `ssh-keygen -l -E sha256` prints for it.
ED25519_PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF2UTqqTm3O46VP9U6wi5zRgsKtgAgYTehtK6/sPyjCM alice@example"
ED25519_FP = "SHA256:pbWboIsoReH8UXlLIkVwJkUm70deR28+j3WO9BX0EbY"
FAKE_SG = "sg-0123456789abcdef0"


def _perms(group):
    """A group's permissions as comparable tuples: (protocol, from, to, peer)."""
    out = set()
    for key in ("IpPermissions", "IpPermissionsEgress"):
        for p in group.get(key, []):
            ports = (p.get("FromPort"), p.get("ToPort"))
            for r in p.get("IpRanges", []):
                out.add((key, p["IpProtocol"], *ports, r["CidrIp"]))
            for g in p.get("UserIdGroupPairs", []):
                out.add((key, p["IpProtocol"], *ports, g["GroupId"]))
    return out


def _groups_of(instance):
    return [(g["GroupId"], g["GroupName"]) for g in instance.get("SecurityGroups", [])]


def security_groups_and_keys():
    """Security groups (create, describe, authorize, revoke, delete) and key pairs (create,
    import, describe, delete) with EC2's codes; RunInstances with SecurityGroupIds and KeyName,
    ModifyInstanceAttribute's Groups; another project sees none of it."""
    s = Soft()
    ami = state["ami"]
    name = f"web-{RUN}"
    gid = c.create_security_group(GroupName=name, Description="compat web")["GroupId"]
    state.setdefault("groups", []).append(gid)
    check(re.match(r"^sg-[0-9a-f]{17}$", gid), f"group id {gid!r}")
    s(expect_error, "InvalidGroup.Duplicate", c.create_security_group, GroupName=name, Description="again", status=400)
    s(expect_error, "InvalidGroup.Reserved", c.create_security_group, GroupName="default", Description="x")
    s(raw_error, "MissingParameter", [("Action", "CreateSecurityGroup"), ("GroupName", f"nodesc-{RUN}")], status=400)
    g = c.describe_security_groups(GroupIds=[gid])["SecurityGroups"]
    eq([(x["GroupName"], x["Description"], x["IpPermissions"], x["IpPermissionsEgress"]) for x in g], [(name, "compat web", [], [])], "a new group")
    d = c.describe_security_groups(GroupNames=["default"])["SecurityGroups"]
    eq(len(d), 1, "the project's default group")
    did = d[0]["GroupId"]
    eq(_perms(d[0]), {("IpPermissions", "-1", None, None, did), ("IpPermissionsEgress", "-1", None, None, "0.0.0.0/0")}, "the default group's rules")

    # Authorize: one rule per CIDR and group; a repeat is a duplicate; bad input changes nothing.
    perms = [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.0.0.0/8", "Description": "ssh"}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": did}]},
    ]
    r = c.authorize_security_group_ingress(GroupId=gid, IpPermissions=perms)
    eq(r.get("Return"), True, "AuthorizeSecurityGroupIngress Return")
    rules = r.get("SecurityGroupRules", [])
    eq(sorted((x["IpProtocol"], x["FromPort"], x["ToPort"], x.get("CidrIpv4"), x.get("ReferencedGroupInfo", {}).get("GroupId")) for x in rules),
       sorted([("tcp", 22, 22, "10.0.0.0/8", None), ("-1", -1, -1, None, did)]), "SecurityGroupRules")
    check(all(re.match(r"^sgr-[0-9a-f]{17}$", x["SecurityGroupRuleId"]) for x in rules), f"rule ids: {rules}")
    s(expect_error, "InvalidPermission.Duplicate", c.authorize_security_group_ingress, GroupId=gid, IpPermissions=perms[:1], status=400)
    for bad in (
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "10.0.0.5/24"}]},
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 70000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "gre", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    ):
        s(expect_error, "InvalidParameterValue", c.authorize_security_group_ingress, GroupId=gid, IpPermissions=[bad])
    # All or nothing: a good permission next to a bad one is not added.
    s(expect_error, "InvalidParameterValue", c.authorize_security_group_ingress, GroupId=gid,
      IpPermissions=[{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}, {"CidrIp": "1.2.3.4/8"}]}])
    s(expect_error, "InvalidGroup.NotFound", c.authorize_security_group_ingress, GroupId=FAKE_SG, IpPermissions=perms[:1])
    s(expect_error, "InvalidGroup.NotFound", c.authorize_security_group_ingress, GroupId=gid,
      IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": FAKE_SG}]}])
    s(expect_error, "InvalidGroupId.Malformed", c.describe_security_groups, GroupIds=["sg-zz"])
    s(expect_error, "InvalidGroup.NotFound", c.describe_security_groups, GroupIds=[FAKE_SG])
    s(expect_error, "InvalidGroup.NotFound", c.describe_security_groups, GroupNames=[f"nope-{RUN}"])
    want = {("IpPermissions", "tcp", 22, 22, "10.0.0.0/8"), ("IpPermissions", "-1", None, None, did)}
    eq(_perms(c.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]), want, "rules after refused requests")
    # Egress, the legacy top-level form, filters, and revoking by permission and by rule id.
    r = c.authorize_security_group_egress(GroupId=gid, IpPermissions=[{"IpProtocol": "udp", "FromPort": 53, "ToPort": 53, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    egress_id = r["SecurityGroupRules"][0]["SecurityGroupRuleId"]
    eq(r["SecurityGroupRules"][0]["IsEgress"], True, "IsEgress")
    c.authorize_security_group_ingress(GroupName=name, IpProtocol="tcp", FromPort=443, ToPort=443, CidrIp="0.0.0.0/0")
    found = c.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    eq(_perms(found[0]) if found else set(), want | {("IpPermissionsEgress", "udp", 53, 53, "0.0.0.0/0"), ("IpPermissions", "tcp", 443, 443, "0.0.0.0/0")}, "rules by filter")
    https = [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    eq(c.revoke_security_group_ingress(GroupId=gid, IpPermissions=https).get("Return"), True, "RevokeSecurityGroupIngress")
    s(expect_error, "InvalidPermission.NotFound", c.revoke_security_group_ingress, GroupId=gid, IpPermissions=https, status=400)
    s(expect_error, "InvalidSecurityGroupRuleId.NotFound", c.revoke_security_group_ingress, GroupId=gid, SecurityGroupRuleIds=[egress_id])
    c.revoke_security_group_egress(GroupId=gid, SecurityGroupRuleIds=[egress_id])
    eq(_perms(c.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]), want, "rules after revoking")

    # Key pairs.
    kname, iname = f"k-{RUN}", f"imp-{RUN}"
    k = c.create_key_pair(KeyName=kname, KeyType="ed25519")
    state.setdefault("keys", []).extend([kname, iname])
    check(k["KeyMaterial"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----"), f"KeyMaterial: {k['KeyMaterial'][:40]!r}")
    check(k["KeyFingerprint"].startswith("SHA256:") and k["KeyPairId"].startswith("key-"), f"CreateKeyPair: {k}")
    s(expect_error, "InvalidKeyPair.Duplicate", c.create_key_pair, KeyName=kname, status=400)
    imp = c.import_key_pair(KeyName=iname, PublicKeyMaterial=ED25519_PUB.encode())
    eq(imp["KeyFingerprint"], ED25519_FP, "ImportKeyPair's fingerprint is ssh-keygen's")
    s(expect_error, "InvalidKeyPair.Duplicate", c.import_key_pair, KeyName=iname, PublicKeyMaterial=ED25519_PUB.encode())
    for junk in (b"not a key", ED25519_PUB.replace("ssh-ed25519", "ssh-rsa").encode(), b"ssh-ed25519 AAAA"):
        s(expect_error, "InvalidKey.Format", c.import_key_pair, KeyName=f"bad-{RUN}", PublicKeyMaterial=junk, status=400)
    kp = c.describe_key_pairs(KeyNames=[kname, iname], IncludePublicKey=True)["KeyPairs"]
    eq(sorted((x["KeyName"], x["KeyType"], x["KeyFingerprint"] == (imp["KeyFingerprint"] if x["KeyName"] == iname else k["KeyFingerprint"])) for x in kp),
       sorted([(kname, "ed25519", True), (iname, "ed25519", True)]), "DescribeKeyPairs")
    eq([x.get("PublicKey") for x in kp if x["KeyName"] == iname], [ED25519_PUB], "IncludePublicKey")
    s(expect_error, "InvalidKeyPair.NotFound", c.describe_key_pairs, KeyNames=[f"nope-{RUN}"], status=400)
    eq([x["KeyName"] for x in c.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [iname]}])["KeyPairs"]], [iname], "key-name filter")

    # RunInstances with groups and a key; unknown ones are refused before anything launches.
    base = dict(ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, TagSpecifications=TAGS)
    s(expect_error, "InvalidGroup.NotFound", c.run_instances, **base, SecurityGroupIds=[FAKE_SG])
    s(expect_error, "InvalidGroup.NotFound", c.run_instances, **base, SecurityGroups=[f"nope-{RUN}"])
    s(expect_error, "InvalidGroupId.Malformed", c.run_instances, **base, SecurityGroupIds=["sg-zz"])
    s(expect_error, "InvalidKeyPair.NotFound", c.run_instances, **base, KeyName=f"nope-{RUN}")
    r = c.run_instances(**base, SecurityGroupIds=[gid], SecurityGroups=["default"], KeyName=iname)
    iid = r["Instances"][0]["InstanceId"]
    state["sg_iid"] = iid
    try:
        eq(_groups_of(r["Instances"][0]), [(gid, name), (did, "default")], "RunInstances' SecurityGroups")
        inst = instances_of(c.describe_instances(InstanceIds=[iid]))[0]
        eq(_groups_of(inst), [(gid, name), (did, "default")], "DescribeInstances' SecurityGroups")
        eq(inst.get("KeyName"), iname, "DescribeInstances' KeyName")
        eq([(g["GroupId"], g["GroupName"]) for g in inst["NetworkInterfaces"][0]["Groups"]], [(gid, name), (did, "default")], "the interface's groups")
        # Groups in use or named by another group's rule stay.
        s(expect_error, "DependencyViolation", c.delete_security_group, GroupId=gid, status=400)
        src = c.create_security_group(GroupName=f"src-{RUN}", Description="refers to web")["GroupId"]
        state["groups"].append(src)
        c.authorize_security_group_ingress(GroupId=src, IpPermissions=[{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": gid}]}])
        c.modify_instance_attribute(InstanceId=iid, Groups=[did])
        eq(_groups_of(instances_of(c.describe_instances(InstanceIds=[iid]))[0]), [(did, "default")], "groups after ModifyInstanceAttribute")
        attr = c.describe_instance_attribute(InstanceId=iid, Attribute="groupSet").get("Groups", [])
        eq([(g["GroupId"], g["GroupName"]) for g in attr], [(did, "default")], "DescribeInstanceAttribute groupSet")
        s(expect_error, "InvalidGroup.NotFound", c.modify_instance_attribute, InstanceId=iid, Groups=[FAKE_SG])
        s(expect_error, "DependencyViolation", c.delete_security_group, GroupId=gid)
        c.delete_security_group(GroupId=src)
        c.delete_security_group(GroupName=name)
        s(expect_error, "InvalidGroup.NotFound", c.describe_security_groups, GroupIds=[gid])
        s(expect_error, "CannotDelete", c.delete_security_group, GroupName="default", status=400)
        # Deleting a key pair (twice: EC2's DeleteKeyPair is idempotent) leaves the instance its key.
        eq(c.delete_key_pair(KeyName=iname).get("Return"), True, "DeleteKeyPair")
        eq(c.delete_key_pair(KeyName=iname).get("Return"), True, "DeleteKeyPair of a deleted key")
        s(expect_error, "InvalidKeyPair.NotFound", c.describe_key_pairs, KeyNames=[iname])
        eq(instances_of(c.describe_instances(InstanceIds=[iid]))[0].get("KeyName"), iname, "KeyName after DeleteKeyPair")
        c.delete_key_pair(KeyPairId=k["KeyPairId"])
        s(expect_error, "InvalidKeyPair.NotFound", c.describe_key_pairs, KeyPairIds=[k["KeyPairId"]])
    finally:
        c.terminate_instances(InstanceIds=[iid])
    wait(c, "instance_terminated", [iid])
    state.pop("sg_iid", None)

    # Another project: the default group is its own; this project's groups and keys do not exist.
    o = other_ec2()
    mine = c.create_security_group(GroupName=f"private-{RUN}", Description="not theirs")["GroupId"]
    state["groups"].append(mine)
    c.import_key_pair(KeyName=kname, PublicKeyMaterial=ED25519_PUB.encode())
    theirs = o.describe_security_groups(GroupNames=["default"])["SecurityGroups"]
    check(len(theirs) == 1 and theirs[0]["GroupId"] != did, f"the other project's default group: {theirs}")
    check(mine not in [x["GroupId"] for x in o.describe_security_groups()["SecurityGroups"]], "another project's group is listed")
    s(expect_error, "InvalidGroup.NotFound", o.describe_security_groups, GroupIds=[mine])
    s(expect_error, "InvalidGroup.NotFound", o.delete_security_group, GroupId=mine)
    s(expect_error, "InvalidGroup.NotFound", o.authorize_security_group_ingress, GroupId=mine, IpPermissions=perms[:1])
    s(expect_error, "InvalidGroup.NotFound", o.run_instances, **base, SecurityGroupIds=[mine])
    s(expect_error, "InvalidKeyPair.NotFound", o.describe_key_pairs, KeyNames=[kname])
    s(expect_error, "InvalidKeyPair.NotFound", o.run_instances, **base, KeyName=kname)
    eq(o.describe_key_pairs()["KeyPairs"], [], "the other project's key pairs")
    eq(_perms(c.describe_security_groups(GroupIds=[mine])["SecurityGroups"][0]), set(), "the group is untouched")
    c.delete_security_group(GroupId=mine)
    c.delete_key_pair(KeyName=kname)
    state["groups"] = []
    state["keys"] = []
    s.done()


def unsupported():
    """Actions of capabilities that have not landed: UnsupportedOperation, never a fake success."""
    iid = state["iid"]
    calls = [
        (c.create_image, dict(InstanceId=iid, Name=f"img-{RUN}")),
        (c.create_subnet, dict(VpcId="vpc-0123456789abcdef0", CidrBlock="10.77.1.0/24")),
        (c.describe_subnets, {}),
        (c.delete_subnet, dict(SubnetId="subnet-0123456789abcdef0")),
    ]
    # Parameters of RunInstances that need those capabilities are refused too, not ignored.
    ami = state["ami"]
    base = dict(ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, TagSpecifications=TAGS)
    calls += [
        (c.run_instances, {**base, "BlockDeviceMappings": [{"DeviceName": "/dev/vdb", "Ebs": {"VolumeSize": 5}}]}),
        (c.run_instances, {**base, "TagSpecifications": [{"ResourceType": "volume", "Tags": [{"Key": "k", "Value": "v"}]}]}),
    ]
    failures = []
    for fn, kw in calls:
        try:
            expect_error("UnsupportedOperation", fn, status=400, **kw)
        except AssertionError as e:
            failures.append(str(e))
    check(not failures, "\n  ".join([f"{len(failures)} of {len(calls)} unlanded actions:"] + failures))


def cleanup():
    ids = [i["InstanceId"] for i in describe(c, Filters=run_filter()) if i["State"]["Name"] != "terminated"]
    if ids:
        c.terminate_instances(InstanceIds=ids)
        wait(c, "instance_terminated", ids)


if __name__ == "__main__":
    try:
        main([setup, not_found_and_malformed, parameters, auth, tenancy, idempotency, dry_run, states_and_capacity, placement_groups, addresses_and_vpcs, security_groups_and_keys, unsupported, cleanup], required=[setup])
    finally:
        try:
            left = [i["InstanceId"] for i in describe(ec2(retries=3), Filters=run_filter()) if i["State"]["Name"] != "terminated"]
        except Exception:
            left = [state.get("iid"), state.get("token_iid")]
        terminate_quietly(left + [state.get("second"), state.get("inside"), state.get("sg_iid")])
        for client, alloc in state.get("allocs", []):
            try:
                client.release_address(AllocationId=alloc)
            except Exception:
                pass
        if state.get("vpc"):
            try:
                c.delete_vpc(VpcId=state["vpc"])
            except Exception:
                pass
        for gid in reversed(state.get("groups", [])):
            try:
                c.delete_security_group(GroupId=gid)
            except Exception:
                pass
        for key in state.get("keys", []):
            try:
                c.delete_key_pair(KeyName=key)
            except Exception:
                pass
        if state.get("priv"):
            try:
                c.deregister_image(ImageId=state["priv"])
            except Exception:
                pass
