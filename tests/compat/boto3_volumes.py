#!/usr/bin/env python3
"""EBS volumes and snapshots with boto3 and its waiters, against a real guest: create (Size=1)
and describe, volume_available, attach (volume_in_use, then attached), VolumeInUse for a second
attach and for a delete while attached, a live snapshot (snapshot_completed), a volume made from
it, InvalidSnapshot.InUse while that volume exists, detach, grow with ModifyVolume, delete; the
errors of bad parameters; another project sees none of it and gets NotFound for every id."""

import datetime
import re
import time

from kumo_compat import (
    wait,
    Soft,
    FAST_WAIT,
    RUN,
    check,
    demo_ami,
    ec2,
    eq,
    expect_error,
    log,
    main,
    other_ec2,
    raw_error,
    terminate_quietly,
)

VOLUME_ID = re.compile(r"^vol-[0-9a-f]{17}$")
SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]{17}$")
FAKE_VOL = "vol-0123456789abcdef0"
FAKE_SNAP = "snap-0123456789abcdef0"

c = ec2()
state = {}


def tags(kind):
    return [{"ResourceType": kind, "Tags": [{"Key": "compat-run", "Value": RUN}]}]


def ours():
    return [{"Name": "tag:compat-run", "Values": [RUN]}]


def vwait(waiter, ids, client=None):
    """A volume or snapshot waiter (botocore's acceptors); on failure, say where each one is."""
    from botocore.exceptions import WaiterError

    client = client or c
    key = "SnapshotIds" if waiter.startswith("snapshot") else "VolumeIds"
    started = time.time()
    try:
        client.get_waiter(waiter).wait(**{key: ids}, WaiterConfig=FAST_WAIT)
    except WaiterError as e:
        raise AssertionError(f"waiter {waiter} for {ids} gave up after {time.time() - started:.0f}s ({e})") from None


def volume(vid, client=None):
    vols = (client or c).describe_volumes(VolumeIds=[vid])["Volumes"]
    eq(len(vols), 1, f"volumes returned for {vid}")
    return vols[0]


def wait_attachment(vid, want, timeout=180):
    """Poll until the volume's one attachment is in state `want` (the guest has it plugged)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        v = volume(vid)
        last = v.get("Attachments")
        if last and last[0].get("State") == want:
            return v
        time.sleep(1)
    raise AssertionError(f"{vid} never got an attachment in state {want!r} in {timeout}s: {last!r}")


def setup():
    """One running instance to attach to."""
    ami = demo_ami(c)
    r = c.run_instances(ImageId=ami, InstanceType="t1.nano", MinCount=1, MaxCount=1, TagSpecifications=tags("instance"))
    state["iid"] = r["Instances"][0]["InstanceId"]
    state["owner"] = r["OwnerId"]
    state["zone"] = c.describe_availability_zones()["AvailabilityZones"][0]["ZoneName"]
    log(f"instance {state['iid']} in {state['zone']}")
    wait(c, "instance_running", [state["iid"]])


def create_and_describe():
    zone = state["zone"]
    v = c.create_volume(Size=1, AvailabilityZone=zone, VolumeType="gp2", TagSpecifications=tags("volume"))
    vid = v["VolumeId"]
    state["vid"] = vid
    log(f"volume {vid}")
    s = Soft()
    s(check, VOLUME_ID.match(vid), f"VolumeId {vid!r} is not vol- + 17 hex")
    s(eq, v["Size"], 1, "CreateVolume's Size (GiB)")
    s(check, v["State"] in ("creating", "available"), f"CreateVolume's State: {v['State']!r}")
    s(eq, v["AvailabilityZone"], zone, "CreateVolume's AvailabilityZone")
    s(eq, (v["Encrypted"], v["MultiAttachEnabled"], v["VolumeType"]), (False, False, "gp2"), "Encrypted, MultiAttachEnabled, VolumeType")
    s(eq, v.get("SnapshotId", ""), "", "a blank volume's SnapshotId")
    s(check, isinstance(v.get("CreateTime"), datetime.datetime), f"CreateTime: {v.get('CreateTime')!r}")
    s(eq, {t["Key"]: t["Value"] for t in v.get("Tags", [])}, {"compat-run": RUN}, "tags from TagSpecifications")
    vwait("volume_available", [vid])
    d = volume(vid)
    s(eq, (d["Size"], d["State"], d["Attachments"]), (1, "available", []), "DescribeVolumes: Size, State, Attachments")
    for f in (
        [{"Name": "volume-id", "Values": [vid]}],
        [{"Name": "status", "Values": ["available"]}, {"Name": "tag:compat-run", "Values": [RUN]}],
        [{"Name": "size", "Values": ["1"]}, {"Name": "volume-id", "Values": ["vol-*"]}, {"Name": "tag-key", "Values": ["compat-run"]}],
        [{"Name": "availability-zone", "Values": [zone]}, {"Name": "tag:compat-run", "Values": [RUN]}],
    ):
        got = [x["VolumeId"] for x in c.describe_volumes(Filters=f)["Volumes"]]
        s(check, vid in got, f"DescribeVolumes Filters={f} does not list {vid}: {got}")
    for f in (
        [{"Name": "status", "Values": ["in-use"]}, {"Name": "volume-id", "Values": [vid]}],
        [{"Name": "attachment.instance-id", "Values": [state["iid"]]}, {"Name": "volume-id", "Values": [vid]}],
        [{"Name": "size", "Values": ["2"]}, {"Name": "volume-id", "Values": [vid]}],
    ):
        s(eq, c.describe_volumes(Filters=f)["Volumes"], [], f"DescribeVolumes Filters={f}")
    pages = list(c.get_paginator("describe_volumes").paginate(Filters=ours(), PaginationConfig={"PageSize": 5}))
    s(check, vid in [x["VolumeId"] for p in pages for x in p["Volumes"]], "the paginator lists the volume")
    s.done()


def parameters():
    """Bad input gets EC2's codes and changes nothing; DryRun and ClientToken as in EC2."""
    s = Soft()
    zone = state["zone"]
    before = {v["VolumeId"] for v in c.describe_volumes()["Volumes"]}
    s(expect_error, "InvalidParameterValue", c.create_volume, Size=0, AvailabilityZone=zone, status=400)
    s(expect_error, "InvalidParameterValue", c.create_volume, Size=16385, AvailabilityZone=zone)
    s(expect_error, "MissingParameter", c.create_volume, AvailabilityZone=zone)
    s(expect_error, "InvalidParameterValue", c.create_volume, Size=1, AvailabilityZone="nowhere-1z")
    s(expect_error, "UnsupportedOperation", c.create_volume, Size=1, AvailabilityZone=zone, VolumeType="io2", Iops=1000)
    s(expect_error, "UnsupportedOperation", c.create_volume, Size=1, AvailabilityZone=zone, Encrypted=True)
    s(expect_error, "InvalidSnapshot.NotFound", c.create_volume, SnapshotId=FAKE_SNAP, AvailabilityZone=zone)
    s(expect_error, "DryRunOperation", c.create_volume, Size=1, AvailabilityZone=zone, DryRun=True, status=412)
    s(raw_error, "InvalidParameterValue", [("Action", "CreateVolume"), ("Size", "one"), ("AvailabilityZone", zone)])
    s(raw_error, "UnknownParameter", [("Action", "CreateVolume"), ("Size", "1"), ("Bogus", "1")])
    s(expect_error, "InvalidVolume.NotFound", c.describe_volumes, VolumeIds=[FAKE_VOL], status=400)
    s(expect_error, "InvalidVolume.NotFound", c.describe_volumes, VolumeIds=[state["vid"], FAKE_VOL])
    s(expect_error, "InvalidParameterValue", c.describe_volumes, Filters=[{"Name": "no-such-filter", "Values": ["x"]}])
    s(expect_error, "InvalidVolume.NotFound", c.attach_volume, VolumeId=FAKE_VOL, InstanceId=state["iid"], Device="/dev/sdf")
    s(expect_error, "InvalidInstanceID.NotFound", c.attach_volume, VolumeId=state["vid"], InstanceId="i-0123456789abcdef0", Device="/dev/sdf")
    s(expect_error, "DryRunOperation", c.attach_volume, VolumeId=state["vid"], InstanceId=state["iid"], Device="/dev/sdf", DryRun=True)
    s(expect_error, "IncorrectState", c.detach_volume, VolumeId=state["vid"])
    s(expect_error, "InvalidVolume.NotFound", c.delete_volume, VolumeId=FAKE_VOL)
    s(expect_error, "InvalidVolume.NotFound", c.create_snapshot, VolumeId=FAKE_VOL)
    s(expect_error, "InvalidSnapshot.NotFound", c.describe_snapshots, SnapshotIds=[FAKE_SNAP])
    s(expect_error, "InvalidSnapshot.NotFound", c.delete_snapshot, SnapshotId=FAKE_SNAP)
    s(expect_error, "InvalidParameterValue", c.modify_volume, VolumeId=state["vid"], Size=0)
    after = {v["VolumeId"] for v in c.describe_volumes()["Volumes"]}
    s(eq, after - before, set(), "volumes made by refused requests")
    eq(volume(state["vid"])["State"], "available", "the volume is untouched")
    # ClientToken: a retry returns the same volume; other arguments with the token are refused.
    token = f"vol-{RUN}"[:64]
    kw = dict(Size=1, AvailabilityZone=zone, ClientToken=token, TagSpecifications=tags("volume"))
    first = c.create_volume(**kw)["VolumeId"]
    try:
        again = c.create_volume(**kw)["VolumeId"]
        s(eq, again, first, "CreateVolume retried with its ClientToken")
        s(expect_error, "IdempotentParameterMismatch", c.create_volume, **{**kw, "Size": 2})
        vwait("volume_available", [first])
    finally:
        c.delete_volume(VolumeId=first)
    vwait("volume_deleted", [first])
    s.done()


def attach():
    vid, iid = state["vid"], state["iid"]
    a = c.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    s = Soft()
    s(eq, (a["VolumeId"], a["InstanceId"], a["Device"]), (vid, iid, "/dev/sdf"), "AttachVolume's VolumeId, InstanceId, Device")
    s(check, a["State"] in ("attaching", "attached"), f"AttachVolume's State: {a['State']!r}")
    s(check, isinstance(a.get("AttachTime"), datetime.datetime), f"AttachTime: {a.get('AttachTime')!r}")
    vwait("volume_in_use", [vid])
    v = wait_attachment(vid, "attached")
    att = v["Attachments"][0]
    s(eq, (v["State"], att["InstanceId"], att["Device"], att["DeleteOnTermination"]), ("in-use", iid, "/dev/sdf", False), "the attachment in DescribeVolumes")
    got = c.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [iid]}, {"Name": "attachment.status", "Values": ["attached"]}])
    s(eq, [x["VolumeId"] for x in got["Volumes"]], [vid], "DescribeVolumes by attachment.instance-id and attachment.status")
    s(expect_error, "VolumeInUse", c.attach_volume, VolumeId=vid, InstanceId=iid, Device="/dev/sdg", status=400)
    s(expect_error, "VolumeInUse", c.delete_volume, VolumeId=vid, status=400)
    s(expect_error, "IncorrectState", c.detach_volume, VolumeId=vid, InstanceId="i-0123456789abcdef0")
    eq(volume(vid)["Attachments"][0]["State"], "attached", "still attached after the refusals")
    s.done()


def snapshots():
    vid = state["vid"]
    snap = c.create_snapshot(VolumeId=vid, Description=f"live {RUN}", TagSpecifications=tags("snapshot"))
    sid = snap["SnapshotId"]
    state["sid"] = sid
    log(f"snapshot {sid} of the attached {vid}")
    s = Soft()
    s(check, SNAPSHOT_ID.match(sid), f"SnapshotId {sid!r} is not snap- + 17 hex")
    s(eq, (snap["VolumeId"], snap["VolumeSize"], snap["State"]), (vid, 1, "completed"), "CreateSnapshot's VolumeId, VolumeSize, State")
    s(eq, (snap["Progress"], snap["OwnerId"], snap["Description"], snap["Encrypted"]), ("100%", state["owner"], f"live {RUN}", False), "Progress, OwnerId, Description, Encrypted")
    vwait("snapshot_completed", [sid])
    d = c.describe_snapshots(SnapshotIds=[sid])["Snapshots"]
    s(eq, [(x["SnapshotId"], x["VolumeId"], x["State"], x["VolumeSize"]) for x in d], [(sid, vid, "completed", 1)], "DescribeSnapshots by id")
    for kw in (
        dict(OwnerIds=["self"], Filters=[{"Name": "volume-id", "Values": [vid]}]),
        dict(Filters=[{"Name": "status", "Values": ["completed"]}, {"Name": "tag:compat-run", "Values": [RUN]}]),
        dict(OwnerIds=[state["owner"]], Filters=[{"Name": "snapshot-id", "Values": [sid]}]),
    ):
        got = [x["SnapshotId"] for x in c.describe_snapshots(**kw)["Snapshots"]]
        s(eq, got, [sid], f"DescribeSnapshots {kw}")
    s(eq, c.describe_snapshots(OwnerIds=["amazon"], Filters=[{"Name": "snapshot-id", "Values": [sid]}])["Snapshots"], [], "Owner amazon")
    pages = list(c.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], PaginationConfig={"PageSize": 5}))
    s(check, sid in [x["SnapshotId"] for p in pages for x in p["Snapshots"]], "the paginator lists the snapshot")
    # A volume from the snapshot: as big as the snapshot, and the snapshot is now in use.
    v2 = c.create_volume(SnapshotId=sid, AvailabilityZone=state["zone"], TagSpecifications=tags("volume"))
    state["vid2"] = v2["VolumeId"]
    log(f"volume {v2['VolumeId']} from {sid}")
    s(eq, (v2["Size"], v2["SnapshotId"]), (1, sid), "a volume from the snapshot: Size, SnapshotId")
    vwait("volume_available", [v2["VolumeId"]])
    s(eq, volume(v2["VolumeId"])["SnapshotId"], sid, "DescribeVolumes' SnapshotId")
    got = c.describe_volumes(Filters=[{"Name": "snapshot-id", "Values": [sid]}])["Volumes"]
    s(eq, [x["VolumeId"] for x in got], [v2["VolumeId"]], "DescribeVolumes Filters snapshot-id")
    s(expect_error, "InvalidSnapshot.InUse", c.delete_snapshot, SnapshotId=sid, status=400)
    s(eq, c.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"], "completed", "the snapshot survives the refused delete")
    s.done()


def detach_and_modify():
    vid, iid = state["vid"], state["iid"]
    d = c.detach_volume(VolumeId=vid, InstanceId=iid)
    s = Soft()
    s(eq, (d["VolumeId"], d["InstanceId"], d["Device"]), (vid, iid, "/dev/sdf"), "DetachVolume's VolumeId, InstanceId, Device")
    s(check, d["State"] in ("detaching", "detached"), f"DetachVolume's State: {d['State']!r}")
    vwait("volume_available", [vid])
    s(eq, volume(vid)["Attachments"], [], "no attachment after the detach")
    s(expect_error, "IncorrectState", c.detach_volume, VolumeId=vid)
    m = c.modify_volume(VolumeId=vid, Size=2)["VolumeModification"]
    s(eq, (m["VolumeId"], m["ModificationState"], m["OriginalSize"], m["TargetSize"]), (vid, "completed", 1, 2), "ModifyVolume's VolumeModification")
    s(eq, volume(vid)["Size"], 2, "DescribeVolumes' Size after ModifyVolume")
    s(expect_error, "InvalidParameterValue", c.modify_volume, VolumeId=vid, Size=1)
    s(eq, volume(vid)["Size"], 2, "the size after a refused shrink")
    s.done()


def tenancy():
    """Another project sees none of it, and every id is NotFound to it."""
    o = other_ec2()
    s = Soft()
    vid, vid2, sid = state["vid"], state["vid2"], state["sid"]
    seen = [v["VolumeId"] for v in o.describe_volumes()["Volumes"]]
    s(check, vid not in seen and vid2 not in seen, f"another project lists our volumes: {seen}")
    seen = [x["SnapshotId"] for x in o.describe_snapshots()["Snapshots"]]
    s(check, sid not in seen, f"another project lists our snapshot: {seen}")
    s(eq, o.describe_snapshots(OwnerIds=[state["owner"]])["Snapshots"], [], "our snapshots by our owner id, to another project")
    s(expect_error, "InvalidVolume.NotFound", o.describe_volumes, VolumeIds=[vid])
    s(expect_error, "InvalidSnapshot.NotFound", o.describe_snapshots, SnapshotIds=[sid])
    s(expect_error, "InvalidVolume.NotFound", o.attach_volume, VolumeId=vid, InstanceId=state["iid"], Device="/dev/sdf")
    s(expect_error, "InvalidVolume.NotFound", o.delete_volume, VolumeId=vid)
    s(expect_error, "InvalidVolume.NotFound", o.modify_volume, VolumeId=vid, Size=3)
    s(expect_error, "InvalidVolume.NotFound", o.create_snapshot, VolumeId=vid)
    s(expect_error, "InvalidVolume.NotFound", o.detach_volume, VolumeId=vid)
    s(expect_error, "InvalidSnapshot.NotFound", o.delete_snapshot, SnapshotId=sid)
    s(expect_error, "InvalidSnapshot.NotFound", o.create_volume, SnapshotId=sid, AvailabilityZone=state["zone"])
    v = volume(vid)
    s(eq, (v["State"], v["Size"]), ("available", 2, ), "our volume is untouched")
    s.done()


def delete_all():
    s = Soft()
    vid, vid2, sid = state["vid"], state["vid2"], state["sid"]
    c.delete_volume(VolumeId=vid2)
    vwait("volume_deleted", [vid2])
    c.delete_snapshot(SnapshotId=sid)
    s(expect_error, "InvalidSnapshot.NotFound", c.describe_snapshots, SnapshotIds=[sid])
    c.delete_volume(VolumeId=vid)
    vwait("volume_deleted", [vid])
    s(expect_error, "InvalidVolume.NotFound", c.describe_volumes, VolumeIds=[vid])
    s(expect_error, "InvalidVolume.NotFound", c.delete_volume, VolumeId=vid)
    s(eq, c.describe_volumes(Filters=ours())["Volumes"], [], "this run's volumes after the deletes")
    s(eq, c.describe_snapshots(Filters=ours())["Snapshots"], [], "this run's snapshots after the deletes")
    for k in ("vid", "vid2", "sid"):
        state.pop(k)
    s.done()


def leftovers():
    """Whatever a failed scenario left: detach, delete, terminate (quietly)."""
    cl = ec2(retries=3)
    try:
        vols = cl.describe_volumes(Filters=ours())["Volumes"]
        for v in vols:
            if v.get("Attachments"):
                cl.detach_volume(VolumeId=v["VolumeId"])
        deadline = time.time() + 120
        while time.time() < deadline and any(x.get("Attachments") for x in cl.describe_volumes(Filters=ours())["Volumes"]):
            time.sleep(1)
        # Volumes made from a snapshot first: the snapshot cannot go before them.
        for v in sorted(vols, key=lambda v: not v.get("SnapshotId")):
            cl.delete_volume(VolumeId=v["VolumeId"])
        for snap in cl.describe_snapshots(Filters=ours())["Snapshots"]:
            cl.delete_snapshot(SnapshotId=snap["SnapshotId"])
    except Exception as e:  # cleanup only
        log(f"cleanup of volumes and snapshots failed: {e}")
    terminate_quietly([state.get("iid")])


if __name__ == "__main__":
    try:
        main(
            [setup, create_and_describe, parameters, attach, snapshots, detach_and_modify, tenancy, delete_all],
            required=[setup, create_and_describe, attach, snapshots],
        )
    finally:
        leftovers()
