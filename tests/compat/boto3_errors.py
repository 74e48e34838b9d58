#!/usr/bin/env python3
"""EC2's error codes, provoked through boto3 where botocore sends the request, and through raw
requests signed by botocore's own SigV4 signer where botocore would refuse to send it.
Every code is asserted exactly, with EC2's error document (<Response><Errors><Error>... and
<RequestID>) and, where EC2 fixes it, the HTTP status."""

import datetime
import os
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


def unsupported():
    """Actions of capabilities that have not landed: UnsupportedOperation, never a fake success."""
    iid = state["iid"]
    vol = "vol-0123456789abcdef0"
    sg = "sg-0123456789abcdef0"
    perm = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    zone = c.describe_availability_zones()["AvailabilityZones"][0]["ZoneName"]
    calls = [
        (c.create_image, dict(InstanceId=iid, Name=f"img-{RUN}")),
        (c.create_volume, dict(Size=1, AvailabilityZone=zone)),
        (c.describe_volumes, {}),
        (c.attach_volume, dict(Device="/dev/vdb", InstanceId=iid, VolumeId=vol)),
        (c.detach_volume, dict(VolumeId=vol)),
        (c.delete_volume, dict(VolumeId=vol)),
        (c.modify_volume, dict(VolumeId=vol, Size=2)),
        (c.create_snapshot, dict(VolumeId=vol)),
        (c.describe_snapshots, {}),
        (c.delete_snapshot, dict(SnapshotId="snap-0123456789abcdef0")),
        (c.allocate_address, {}),
        (c.associate_address, dict(AllocationId="eipalloc-0123456789abcdef0", InstanceId=iid)),
        (c.disassociate_address, dict(AssociationId="eipassoc-0123456789abcdef0")),
        (c.release_address, dict(AllocationId="eipalloc-0123456789abcdef0")),
        (c.describe_addresses, {}),
        (c.create_security_group, dict(GroupName=f"sg-{RUN}", Description="compat")),
        (c.delete_security_group, dict(GroupId=sg)),
        (c.describe_security_groups, {}),
        (c.authorize_security_group_ingress, dict(GroupId=sg, IpPermissions=perm)),
        (c.authorize_security_group_egress, dict(GroupId=sg, IpPermissions=perm)),
        (c.revoke_security_group_ingress, dict(GroupId=sg, IpPermissions=perm)),
        (c.revoke_security_group_egress, dict(GroupId=sg, IpPermissions=perm)),
        (c.create_key_pair, dict(KeyName=f"k-{RUN}")),
        (c.import_key_pair, dict(KeyName=f"k-{RUN}", PublicKeyMaterial=b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4rT3vTt99Ox5kndS4HmgTrKBT8SKzhK4rhGkEVGlCI compat")),
        (c.delete_key_pair, dict(KeyName=f"k-{RUN}")),
        (c.describe_key_pairs, {}),
        (c.create_vpc, dict(CidrBlock="10.77.0.0/16")),
        (c.describe_vpcs, {}),
        (c.delete_vpc, dict(VpcId="vpc-0123456789abcdef0")),
        (c.create_subnet, dict(VpcId="vpc-0123456789abcdef0", CidrBlock="10.77.1.0/24")),
        (c.describe_subnets, {}),
        (c.delete_subnet, dict(SubnetId="subnet-0123456789abcdef0")),
    ]
    # Parameters of RunInstances that need those capabilities are refused too, not ignored.
    ami = state["ami"]
    base = dict(ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, TagSpecifications=TAGS)
    calls += [
        (c.run_instances, {**base, "KeyName": f"k-{RUN}"}),
        (c.run_instances, {**base, "SecurityGroupIds": [sg]}),
        (c.run_instances, {**base, "SubnetId": "subnet-0123456789abcdef0"}),
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
        main([setup, not_found_and_malformed, parameters, auth, tenancy, idempotency, dry_run, states_and_capacity, placement_groups, unsupported, cleanup], required=[setup])
    finally:
        try:
            left = [i["InstanceId"] for i in describe(ec2(retries=3), Filters=run_filter()) if i["State"]["Name"] != "terminated"]
        except Exception:
            left = [state.get("iid"), state.get("token_iid")]
        terminate_quietly(left)
        if state.get("priv"):
            try:
                c.deregister_image(ImageId=state["priv"])
            except Exception:
                pass
