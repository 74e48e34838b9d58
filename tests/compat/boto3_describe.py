#!/usr/bin/env python3
"""Describing with boto3: filters (AND across, OR within, wildcards, tag:key, tag-key), pages of
MaxResults=5 over six real guests (by hand and with botocore's paginator), tags, images
(including RegisterImage/DeregisterImage), instance types, regions, zones, account attributes."""

import os
import time

from kumo_compat import (
    wait,
    FAST_WAIT,
    GUEST_DIR,
    IMAGE_ID,
    RUN,
    check,
    check_state,
    demo_ami,
    describe,
    ec2,
    eq,
    expect_error,
    instances_of,
    log,
    main,
    run_filter,
    tags_of,
    terminate_quietly,
)

c = ec2()
blue = []  # 4 x t1.nano, env=blue-east
green = []  # 2 x t1.micro, env=green-west, tag-key "special"


def ids_of(insts):
    return sorted(i["InstanceId"] for i in insts)


def launch():
    ami = demo_ami(c)

    def spec(name, env, extra=()):
        tags = [
            {"Key": "Name", "Value": name},
            {"Key": "compat-run", "Value": RUN},
            {"Key": "env", "Value": env},
        ] + list(extra)
        return [{"ResourceType": "instance", "Tags": tags}]

    r = c.run_instances(
        ImageId=ami, InstanceType="t1.nano", MinCount=4, MaxCount=4,
        TagSpecifications=spec(f"blue-{RUN}", "blue-east"),
    )
    blue.extend(i["InstanceId"] for i in r["Instances"])
    eq(len(blue), 4, "instances launched by MinCount=MaxCount=4")
    eq(sorted(i["AmiLaunchIndex"] for i in r["Instances"]), [0, 1, 2, 3], "AmiLaunchIndex of 4")
    eq(len({i["InstanceId"] for i in r["Instances"]}), 4, "distinct ids")
    # Same Name tag twice: EC2 names are tags, not unique keys.
    r = c.run_instances(
        ImageId=ami, InstanceType="t1.micro", MinCount=1, MaxCount=2,
        TagSpecifications=spec(
            f"green-{RUN}",
            "green-west",
            [
                {"Key": "special", "Value": "yes"},
                {"Key": "a:b", "Value": "x*y"},
                {"Key": "spaced", "Value": "hello world"},
                {"Key": "uni", "Value": "日本語 é"},
            ],
        ),
    )
    green.extend(i["InstanceId"] for i in r["Instances"])
    eq(len(green), 2, "instances launched by MinCount=1, MaxCount=2 with room for both")
    log(f"blue {blue}, green {green}")
    wait(c, "instance_running", blue + green)


def filters():
    allids = sorted(blue + green)
    eq(ids_of(describe(c, Filters=run_filter())), allids, "tag:compat-run")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:Name", "Values": [f"blue-{RUN}"]}))), sorted(blue), "tag:Name")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:env", "Values": ["blue-*"]}))), sorted(blue), "tag:env=blue-* (wildcard)")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:env", "Values": ["*-wes?"]}))), sorted(green), "tag:env=*-wes? (wildcards)")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:env", "Values": ["blue-east", "green-west"]}))), allids, "OR within a filter's values")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:env", "Values": ["blue"]}))), [], "no wildcard: exact match only")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag-key", "Values": ["special"]}))), sorted(green), "tag-key")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag-key", "Values": ["spec*"]}))), sorted(green), "tag-key with a wildcard")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:a:b", "Values": ["x*y"]}))), sorted(green), "a tag key with a colon")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:a:b", "Values": ["x\\*y"]}))), sorted(green), "an escaped * matches a literal *")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:a:b", "Values": ["xx\\*y"]}))), [], "an escaped * is not a wildcard")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:spaced", "Values": ["hello world"]}))), sorted(green), "a value with a space")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:uni", "Values": ["日本*"]}))), sorted(green), "a non-ASCII value with a wildcard")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "instance-type", "Values": ["t1.micro"]}))), sorted(green), "instance-type")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "instance-type", "Values": ["t1.*"]}))), allids, "instance-type wildcard")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "instance-state-name", "Values": ["running"]}))), allids, "instance-state-name=running")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "instance-state-name", "Values": ["stopped", "terminated"]}))), [], "instance-state-name=stopped|terminated")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "instance-state-code", "Values": ["16"]}))), allids, "instance-state-code=16")
    eq(
        ids_of(describe(c, Filters=run_filter(
            {"Name": "instance-type", "Values": ["t1.nano"]},
            {"Name": "tag:env", "Values": ["green-west"]},
        ))),
        [],
        "AND across filters",
    )
    eq(ids_of(describe(c, Filters=[{"Name": "instance-id", "Values": green}])), sorted(green), "instance-id filter")
    eq(ids_of(describe(c, InstanceIds=green, Filters=[{"Name": "tag:env", "Values": ["blue-east"]}])), [], "InstanceIds AND filters")
    eq(ids_of(describe(c, Filters=run_filter({"Name": "image-id", "Values": [demo_ami(c)]}))), allids, "image-id filter")
    zone = describe(c, InstanceIds=[blue[0]])[0]["Placement"]["AvailabilityZone"]
    eq(ids_of(describe(c, Filters=run_filter({"Name": "availability-zone", "Values": [zone]}))), allids, "availability-zone filter")
    expect_error(
        "InvalidParameterValue",
        c.describe_instances,
        Filters=[{"Name": "no-such-filter", "Values": ["x"]}],
    )


def pagination():
    allids = sorted(blue + green)
    # By hand: pages of at most 5 instances, NextToken until there is none.
    pages = []
    token = None
    while True:
        kw = {"Filters": run_filter(), "MaxResults": 5}
        if token:
            kw["NextToken"] = token
        resp = c.describe_instances(**kw)
        pages.append(ids_of(instances_of(resp)))
        token = resp.get("NextToken")
        if not token:
            break
        check(len(pages) < 10, f"pagination never ends: {pages}")
    check(len(pages) >= 2, f"six instances in pages of 5 came in {len(pages)} page(s): {pages}")
    for p in pages:
        check(1 <= len(p) <= 5, f"a page has {len(p)} instances (MaxResults=5): {pages}")
    flat = sorted(i for p in pages for i in p)
    eq(flat, allids, "instances over all pages (no loss, no duplicate)")

    # botocore's paginator (it raises if the same NextToken comes twice).
    pg = c.get_paginator("describe_instances")
    seen = []
    n = 0
    for page in pg.paginate(Filters=run_filter(), PaginationConfig={"PageSize": 5}):
        n += 1
        seen.extend(ids_of(instances_of(page)))
    check(n >= 2, f"paginator made {n} page(s)")
    eq(sorted(seen), allids, "instances through the describe_instances paginator")
    # MaxItems across a page boundary, then resume from its token.
    # (The paginator's items are reservations: this run has two, of 4 and 2 instances.)
    first = pg.paginate(Filters=run_filter(), PaginationConfig={"PageSize": 5, "MaxItems": 1}).build_full_result()
    got = ids_of(instances_of(first))
    eq(len(first["Reservations"]), 1, "MaxItems=1 reservation")
    check(first.get("NextToken"), "MaxItems=1 of 2 reservations gives a resume token")
    rest = pg.paginate(
        Filters=run_filter(), PaginationConfig={"PageSize": 5, "StartingToken": first["NextToken"]}
    ).build_full_result()
    eq(sorted(got + ids_of(instances_of(rest))), allids, "MaxItems then StartingToken covers everything once")

    # Unfiltered, the whole project: at least these six, in pages.
    everything = []
    for page in pg.paginate(PaginationConfig={"PageSize": 5}):
        everything.extend(ids_of(instances_of(page)))
    check(set(allids) <= set(everything), "unfiltered pages include this run's instances")
    eq(len(everything), len(set(everything)), "no instance twice across unfiltered pages")

    # DescribeInstanceStatus pages too.
    pg = c.get_paginator("describe_instance_status")
    st = [s["InstanceId"] for page in pg.paginate(PaginationConfig={"PageSize": 5}) for s in page["InstanceStatuses"]]
    check(set(allids) <= set(st), f"describe_instance_status paginator: {st}")
    eq(len(st), len(set(st)), "describe_instance_status pages without duplicates")


def tags():
    b0, b1 = blue[0], blue[1]
    c.create_tags(Resources=[b0, b1], Tags=[{"Key": "added", "Value": "v1"}, {"Key": "keep", "Value": "k"}])
    got = c.describe_tags(Filters=[{"Name": "key", "Values": ["added"]}, {"Name": "resource-id", "Values": blue}])["Tags"]
    eq(
        sorted((t["ResourceId"], t["ResourceType"], t["Key"], t["Value"]) for t in got),
        sorted([(b0, "instance", "added", "v1"), (b1, "instance", "added", "v1")]),
        "DescribeTags after CreateTags on two instances",
    )
    mine = c.describe_tags(Filters=[{"Name": "resource-id", "Values": [b0]}])["Tags"]
    eq(
        {t["Key"]: t["Value"] for t in mine},
        {"Name": f"blue-{RUN}", "compat-run": RUN, "env": "blue-east", "added": "v1", "keep": "k"},
        "all tags of one instance",
    )
    eq(ids_of(describe(c, Filters=run_filter({"Name": "tag:added", "Values": ["v1"]}))), sorted([b0, b1]), "filter on a tag added later")
    # Overwrite a value.
    c.create_tags(Resources=[b0], Tags=[{"Key": "added", "Value": "v2"}])
    eq(tags_of(describe(c, InstanceIds=[b0])[0])["added"], "v2", "CreateTags overwrites a value")
    # DeleteTags with a non-matching value leaves the tag; with no value, deletes it.
    c.delete_tags(Resources=[b0], Tags=[{"Key": "added", "Value": "not-this"}])
    eq(tags_of(describe(c, InstanceIds=[b0])[0]).get("added"), "v2", "DeleteTags with another value keeps the tag")
    c.delete_tags(Resources=[b0, b1], Tags=[{"Key": "added"}])
    got = c.describe_tags(Filters=[{"Name": "key", "Values": ["added"]}, {"Name": "resource-id", "Values": blue}])["Tags"]
    eq(got, [], "DescribeTags after DeleteTags")
    c.delete_tags(Resources=[b1], Tags=[{"Key": "keep", "Value": "k"}])
    eq("keep" in tags_of(describe(c, InstanceIds=[b1])[0]), False, "DeleteTags with the matching value")
    # DeleteTags without Tags deletes every tag of the resource.
    g1 = green[1]
    c.delete_tags(Resources=[g1])
    eq(tags_of(describe(c, InstanceIds=[g1])[0]), {}, "DeleteTags without Tags removes them all")
    c.create_tags(Resources=[g1], Tags=[{"Key": "compat-run", "Value": RUN}, {"Key": "env", "Value": "green-west"}])
    # Wildcards and resource-type in DescribeTags.
    got = c.describe_tags(Filters=[{"Name": "value", "Values": ["green-*"]}, {"Name": "resource-type", "Values": ["instance"]}])["Tags"]
    eq(sorted(t["ResourceId"] for t in got if t["Key"] == "env"), sorted(green), "DescribeTags value wildcard")
    # DescribeTags pages.
    pg = c.get_paginator("describe_tags")
    rows = [t for page in pg.paginate(Filters=[{"Name": "resource-id", "Values": blue + green}], PaginationConfig={"PageSize": 5}) for t in page["Tags"]]
    keys = [(t["ResourceId"], t["Key"]) for t in rows]
    eq(len(keys), len(set(keys)), "describe_tags pages without duplicates")
    check(len(keys) > 5, f"more than one page of tags: {len(keys)}")


def images_and_types():
    ami = demo_ami(c)
    img = c.describe_images(ImageIds=[ami])["Images"]
    eq(len(img), 1, "DescribeImages by id")
    img = img[0]
    eq(img["ImageId"], ami, "ImageId")
    eq(img["Name"], "demo", "Name")
    eq(img["State"], "available", "State")
    eq(img.get("Public"), True, "demo is public")
    eq(img.get("ImageType"), "machine", "ImageType")
    check(img.get("KernelId", "").startswith("aki-"), f"KernelId of demo: {img.get('KernelId')!r}")
    check(img.get("RamdiskId", "").startswith("ari-"), f"RamdiskId of demo: {img.get('RamdiskId')!r}")
    check(img.get("OwnerId"), "no OwnerId")
    check(img.get("CreationDate"), "no CreationDate")
    eq([i["ImageId"] for i in c.describe_images(Filters=[{"Name": "name", "Values": ["de?o"]}])["Images"]], [ami], "image name wildcard")
    eq([i["ImageId"] for i in c.describe_images(ImageIds=[ami], Filters=[{"Name": "state", "Values": ["available"]}])["Images"]], [ami], "image state filter")

    # RegisterImage from a file the server can read, then DeregisterImage.
    check(GUEST_DIR, "KUMO_GUEST_DIR is not set")
    name = f"compat-reg-{RUN}"
    r = c.register_image(
        Name=name,
        ImageLocation=os.path.join(GUEST_DIR, "disk.qcow2"),
        KernelId=img["KernelId"],
        RamdiskId=img["RamdiskId"],
        Description="registered by the compat test",
    )
    new = r["ImageId"]
    check(IMAGE_ID.match(new), f"RegisterImage ImageId {new!r}")
    c.get_waiter("image_available").wait(ImageIds=[new], WaiterConfig=FAST_WAIT)
    got = c.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
    eq([i["ImageId"] for i in got], [new], "the registered image among Owners=self")
    eq(got[0].get("Public"), False, "a registered image is private")
    c.deregister_image(ImageId=new)
    gone = c.describe_images(Filters=[{"Name": "name", "Values": [name]}])["Images"]
    eq([i for i in gone if i.get("State") != "deregistered"], [], "image after DeregisterImage")
    expect_error("InvalidAMIID.NotFound", c.deregister_image, ImageId="ami-0123456789abcdef0")

    # Instance types.
    t = c.describe_instance_types(InstanceTypes=["t1.nano", "t1.micro"])["InstanceTypes"]
    by = {x["InstanceType"]: x for x in t}
    eq(sorted(by), ["t1.micro", "t1.nano"], "DescribeInstanceTypes by name")
    eq(by["t1.nano"]["VCpuInfo"]["DefaultVCpus"], 1, "t1.nano vCPUs")
    eq(by["t1.nano"]["MemoryInfo"]["SizeInMiB"], 128, "t1.nano memory")
    eq(by["t1.micro"]["MemoryInfo"]["SizeInMiB"], 256, "t1.micro memory")
    pg = c.get_paginator("describe_instance_types")
    alltypes = [x["InstanceType"] for page in pg.paginate(PaginationConfig={"PageSize": 5}) for x in page["InstanceTypes"]]
    check({"t1.nano", "t1.micro", "t1.small", "t1.medium", "t1.large", "t1.xlarge", "m1.2xlarge"} <= set(alltypes), f"all types over pages: {alltypes}")
    eq(len(alltypes), len(set(alltypes)), "instance types without duplicates")
    expect_error("InvalidInstanceType", c.describe_instance_types, InstanceTypes=["x9.enormous"])


def regions_zones_account():
    regions = c.describe_regions()["Regions"]
    eq([r["RegionName"] for r in regions], ["kumo"], "DescribeRegions")
    check(regions[0].get("Endpoint"), f"region has no Endpoint: {regions[0]}")
    zones = c.describe_availability_zones()["AvailabilityZones"]
    check(zones, "DescribeAvailabilityZones is empty")
    for z in zones:
        eq(z.get("RegionName"), "kumo", "zone RegionName")
        eq(z.get("State"), "available", f"zone {z.get('ZoneName')} State")
        check(z.get("ZoneName"), f"zone without a ZoneName: {z}")
    inst = describe(c, InstanceIds=[blue[0]])[0]
    check(inst["Placement"]["AvailabilityZone"] in [z["ZoneName"] for z in zones], "the instance's zone is listed")
    z = c.describe_availability_zones(ZoneNames=[zones[0]["ZoneName"]])["AvailabilityZones"]
    eq([x["ZoneName"] for x in z], [zones[0]["ZoneName"]], "DescribeAvailabilityZones by name")
    attrs = c.describe_account_attributes()["AccountAttributes"]
    check(attrs, "DescribeAccountAttributes is empty")
    for a in attrs:
        check(a.get("AttributeName") and a.get("AttributeValues"), f"account attribute shape: {a}")
    names = {a["AttributeName"] for a in attrs}
    check("supported-platforms" in names, f"account attributes: {sorted(names)}")
    one = c.describe_account_attributes(AttributeNames=["supported-platforms"])["AccountAttributes"]
    eq([a["AttributeName"] for a in one], ["supported-platforms"], "DescribeAccountAttributes by name")


def terminate_all():
    ids = blue + green
    r = c.terminate_instances(InstanceIds=ids)["TerminatingInstances"]
    eq(sorted(x["InstanceId"] for x in r), sorted(ids), "TerminatingInstances")
    for x in r:
        check_state(x["CurrentState"], "TerminateInstances CurrentState")
    wait(c, "instance_terminated", ids)
    eq(
        ids_of(describe(c, Filters=run_filter({"Name": "instance-state-name", "Values": ["terminated"]}))),
        sorted(ids),
        "terminated instances stay visible",
    )
    blue.clear()
    green.clear()


if __name__ == "__main__":
    t0 = time.time()
    try:
        main([launch, filters, pagination, tags, images_and_types, regions_zones_account, terminate_all], required=[launch])
    finally:
        terminate_quietly(blue + green)
