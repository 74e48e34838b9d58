#!/usr/bin/env python3
"""One real guest through its whole life with boto3 and its waiters: run with user data and
tags, instance_running, console output, status, reboot, stop, change type while stopped (and the
refusal while running), start, terminate and instance_terminated."""

import base64
import datetime
import time

from kumo_compat import (
    wait,
    BOOTED,
    FAST_WAIT,
    INSTANCE_ID,
    RESERVATION_ID,
    RUN,
    check,
    check_state,
    demo_ami,
    ec2,
    eq,
    expect_error,
    instances_of,
    log,
    main,
    state_of,
    tags_of,
    terminate_quietly,
    wait_console,
)

USER_DATA = "#!/bin/sh\necho 'hello from boto3' \u00e9\n"

c = ec2()
ids = []


def lifecycle():
    ami = demo_ami(c)
    resp = c.run_instances(
        ImageId=ami,
        InstanceType="t1.nano",
        MinCount=1,
        MaxCount=1,
        UserData=USER_DATA,  # boto3 base64-encodes it
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "Name", "Value": f"life-{RUN}"},
                    {"Key": "compat-run", "Value": RUN},
                    {"Key": "empty", "Value": ""},
                ],
            }
        ],
    )
    check(RESERVATION_ID.match(resp.get("ReservationId", "")), f"ReservationId: {resp.get('ReservationId')!r}")
    check(resp.get("OwnerId"), "RunInstances has no OwnerId")
    eq(len(resp["Instances"]), 1, "instances launched")
    inst = resp["Instances"][0]
    iid = inst["InstanceId"]
    ids.append(iid)
    log(f"launched {iid}")
    check(INSTANCE_ID.match(iid), f"InstanceId {iid!r} is not i- + 17 hex")
    eq(inst["ImageId"], ami, "ImageId of the new instance")
    eq(inst["InstanceType"], "t1.nano", "InstanceType of the new instance")
    check_state(inst["State"], "RunInstances")
    eq(inst["State"]["Name"], "pending", "state right after RunInstances")
    check(isinstance(inst.get("LaunchTime"), datetime.datetime), f"LaunchTime: {inst.get('LaunchTime')!r}")
    eq(inst.get("AmiLaunchIndex"), 0, "AmiLaunchIndex")
    eq(tags_of(inst), {"Name": f"life-{RUN}", "compat-run": RUN, "empty": ""}, "tags in RunInstances' answer")

    # The waiter reads Reservations[].Instances[].State.Name.
    wait(c, "instance_exists", [iid])
    wait(c, "instance_running", [iid])
    d = c.describe_instances(InstanceIds=[iid])
    eq(len(d["Reservations"]), 1, "reservations for one instance id")
    eq(d["Reservations"][0]["ReservationId"], resp["ReservationId"], "ReservationId in DescribeInstances")
    inst = instances_of(d)[0]
    check_state(inst["State"], "DescribeInstances")
    eq(inst["State"]["Name"], "running", "state after instance_running")
    eq(tags_of(inst), {"Name": f"life-{RUN}", "compat-run": RUN, "empty": ""}, "tags in DescribeInstances")
    check(inst.get("Placement", {}).get("AvailabilityZone"), f"no Placement.AvailabilityZone: {inst.get('Placement')}")
    eq(inst.get("Architecture"), "x86_64", "Architecture")

    # User data comes back as given (base64 on the wire).
    ud = c.describe_instance_attribute(InstanceId=iid, Attribute="userData")
    eq(ud.get("InstanceId"), iid, "DescribeInstanceAttribute InstanceId")
    got = base64.b64decode(ud["UserData"]["Value"]).decode()
    eq(got, USER_DATA, "userData attribute, base64-decoded")
    it = c.describe_instance_attribute(InstanceId=iid, Attribute="instanceType")
    eq(it["InstanceType"]["Value"], "t1.nano", "instanceType attribute")

    # Console output: boto3 decodes the base64; the guest's boot marker names the instance.
    wait_console(c, iid, BOOTED + iid)
    out = c.get_console_output(InstanceId=iid, Latest=True)
    check(isinstance(out.get("Timestamp"), datetime.datetime), f"GetConsoleOutput Timestamp: {out.get('Timestamp')!r}")
    check(BOOTED + iid in out.get("Output", ""), "GetConsoleOutput Latest=true has the boot marker")

    # Status of running instances.
    st = c.describe_instance_status(InstanceIds=[iid])["InstanceStatuses"]
    eq(len(st), 1, "DescribeInstanceStatus entries for a running instance")
    eq(st[0]["InstanceId"], iid, "DescribeInstanceStatus InstanceId")
    eq(st[0]["InstanceState"], {"Code": 16, "Name": "running"}, "DescribeInstanceStatus InstanceState")
    check(st[0].get("AvailabilityZone"), "DescribeInstanceStatus has no AvailabilityZone")
    for k in ("InstanceStatus", "SystemStatus"):
        check(st[0].get(k, {}).get("Status"), f"DescribeInstanceStatus {k}.Status missing: {st[0]}")
    wait(c, "instance_status_ok", [iid])

    # The type can change only while stopped.
    expect_error(
        "IncorrectInstanceState",
        c.modify_instance_attribute,
        InstanceId=iid,
        InstanceType={"Value": "t1.micro"},
    )

    # Reboot: the guest boots a second time.
    c.reboot_instances(InstanceIds=[iid])
    wait_console(c, iid, BOOTED + iid, count=2)
    eq(state_of(c, iid)["Name"], "running", "state after reboot")

    # Stop (ACPI) and the instance_stopped waiter.
    r = c.stop_instances(InstanceIds=[iid])["StoppingInstances"]
    eq(len(r), 1, "StoppingInstances")
    eq(r[0]["InstanceId"], iid, "StoppingInstances InstanceId")
    eq(r[0]["PreviousState"], {"Code": 16, "Name": "running"}, "StopInstances PreviousState")
    check_state(r[0]["CurrentState"], "StopInstances CurrentState")
    check(r[0]["CurrentState"]["Name"] in ("stopping", "stopped"), f"StopInstances CurrentState {r[0]['CurrentState']}")
    wait(c, "instance_stopped", [iid])
    eq(state_of(c, iid), {"Code": 80, "Name": "stopped"}, "state after instance_stopped")
    stopped_console = c.get_console_output(InstanceId=iid).get("Output") or ""

    # Stopped instances are not in DescribeInstanceStatus unless IncludeAllInstances.
    st = c.describe_instance_status(InstanceIds=[iid])["InstanceStatuses"]
    eq(st, [], "DescribeInstanceStatus of a stopped instance without IncludeAllInstances")
    st = c.describe_instance_status(InstanceIds=[iid], IncludeAllInstances=True)["InstanceStatuses"]
    eq([s["InstanceState"]["Name"] for s in st], ["stopped"], "DescribeInstanceStatus IncludeAllInstances")

    # Stopping again is fine (EC2 answers with the current state).
    r = c.stop_instances(InstanceIds=[iid])["StoppingInstances"]
    eq(r[0]["CurrentState"]["Name"], "stopped", "StopInstances of a stopped instance")

    # Change the type while stopped.
    c.modify_instance_attribute(InstanceId=iid, InstanceType={"Value": "t1.micro"})
    eq(instances_of(c.describe_instances(InstanceIds=[iid]))[0]["InstanceType"], "t1.micro", "type after modify")
    eq(
        c.describe_instance_attribute(InstanceId=iid, Attribute="instanceType")["InstanceType"]["Value"],
        "t1.micro",
        "instanceType attribute after modify",
    )
    expect_error(
        "InvalidParameterValue",
        c.modify_instance_attribute,
        InstanceId=iid,
        InstanceType={"Value": "x9.enormous"},
    )

    # Start again; it boots (a third marker: two boots before, one now).
    r = c.start_instances(InstanceIds=[iid])["StartingInstances"]
    eq(r[0]["PreviousState"], {"Code": 80, "Name": "stopped"}, "StartInstances PreviousState")
    check(r[0]["CurrentState"]["Name"] in ("pending", "running"), f"StartInstances CurrentState {r[0]['CurrentState']}")
    wait(c, "instance_running", [iid])
    inst = instances_of(c.describe_instances(InstanceIds=[iid]))[0]
    eq(inst["InstanceType"], "t1.micro", "type after start")
    # A new boot: the console shows one more marker than when stopped (or starts afresh).
    deadline = time.time() + 120
    while True:
        out = c.get_console_output(InstanceId=iid).get("Output") or ""
        if out.count(BOOTED + iid) > stopped_console.count(BOOTED + iid) or (
            BOOTED + iid in out and not out.startswith(stopped_console)
        ):
            break
        check(time.time() < deadline, f"no new boot marker after StartInstances; console ends {out[-500:]!r}")
        time.sleep(1)

    # Terminate and instance_terminated; it stays visible as terminated.
    r = c.terminate_instances(InstanceIds=[iid])["TerminatingInstances"]
    eq(r[0]["InstanceId"], iid, "TerminatingInstances InstanceId")
    eq(r[0]["PreviousState"], {"Code": 16, "Name": "running"}, "TerminateInstances PreviousState")
    check(
        r[0]["CurrentState"]["Name"] in ("shutting-down", "terminated"),
        f"TerminateInstances CurrentState {r[0]['CurrentState']}",
    )
    check_state(r[0]["CurrentState"], "TerminateInstances CurrentState")
    wait(c, "instance_terminated", [iid])
    eq(state_of(c, iid), {"Code": 48, "Name": "terminated"}, "state after instance_terminated")
    # Terminating again succeeds and says terminated.
    r = c.terminate_instances(InstanceIds=[iid])["TerminatingInstances"]
    eq(r[0]["CurrentState"], {"Code": 48, "Name": "terminated"}, "TerminateInstances of a terminated instance")
    # A terminated instance cannot be started.
    expect_error("IncorrectInstanceState", c.start_instances, InstanceIds=[iid])
    ids.clear()


if __name__ == "__main__":
    try:
        main([lifecycle], required=[lifecycle])
    finally:
        terminate_quietly(ids)
