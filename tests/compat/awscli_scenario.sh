#!/usr/bin/env bash
# One real guest through its life with the real aws CLI, as a person would type it: find the
# demo image, run-instances with user data and tags, `aws ec2 wait instance-running`, describe
# with filters and pages, get-console-output, stop + `wait instance-stopped`, change the type,
# start, reboot, tags, regions/zones/account attributes/instance types, error codes as the CLI
# reports them, terminate + `wait instance-terminated`.
#
# Needs: aws on PATH (or $AWS), KUMO_EC2_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_DEFAULT_REGION=kumo. `aws ec2 wait` polls every 15 s as it does against EC2.
set -euo pipefail

AWS=${AWS:-aws}
RUN="${KUMO_COMPAT_RUN:-$$}-cli"
: "${KUMO_EC2_ENDPOINT:?KUMO_EC2_ENDPOINT is not set}"
: "${AWS_DEFAULT_REGION:?AWS_DEFAULT_REGION is not set}"
BOOTED="KUMO-GUEST-BOOTED id="
passed=0
id=""

ec2() { "$AWS" --endpoint-url "$KUMO_EC2_ENDPOINT" ec2 "$@"; }
log() { echo "[$(date +%H:%M:%S)] $*"; }
fail() {
    log "FAIL: $*"
    echo "$passed passed, 1 failed"
    exit 1
}
ok() {
    passed=$((passed + 1))
    log "ok: $*"
}
expect_eq() { # actual expected what
    [ "$1" == "$2" ] || fail "$3: expected '$2', got '$1'"
    ok "$3"
}
# expect_error CODE aws-args...: the CLI must exit non-zero and name CODE the way it prints errors.
expect_error() {
    local code=$1 out rc
    shift
    set +e
    out=$(ec2 "$@" 2>&1)
    rc=$?
    set -e
    [ $rc -ne 0 ] || fail "aws ec2 $*: expected $code, but it succeeded: $out"
    grep -qF "An error occurred ($code)" <<<"$out" || fail "aws ec2 $*: expected $code, got (exit $rc): $out"
    ok "aws ec2 $1 → $code"
}
cleanup() {
    if [ -n "$id" ]; then
        ec2 terminate-instances --instance-ids "$id" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

log "aws CLI: $("$AWS" --version 2>&1)"

ami=$(ec2 describe-images --filters Name=name,Values=demo --query 'Images[0].ImageId' --output text)
[[ $ami =~ ^ami-[0-9a-f]{17}$ ]] || fail "describe-images name=demo gave '$ami'"
ok "demo is $ami"

user_data="hello from the aws cli $RUN"
id=$(ec2 run-instances --image-id "$ami" --instance-type t1.nano --count 1 \
    --user-data "$user_data" \
    --tag-specifications "ResourceType=instance,Tags=[{Key=Name,Value=cli-$RUN},{Key=compat-run,Value=$RUN}]" \
    --query 'Instances[0].InstanceId' --output text)
[[ $id =~ ^i-[0-9a-f]{17}$ ]] || fail "run-instances gave '$id'"
ok "run-instances → $id"

ec2 wait instance-running --instance-ids "$id"
ok "wait instance-running"

expect_eq "$(ec2 describe-instances --instance-ids "$id" --query 'Reservations[0].Instances[0].State.[Name,Code]' --output text)" \
    "running	16" "state name and code"
expect_eq "$(ec2 describe-instances \
    --filters "Name=tag:Name,Values=cli-$RUN" Name=instance-state-name,Values=running Name=instance-type,Values=t1.nano \
    --query 'Reservations[].Instances[].InstanceId' --output text)" "$id" "describe-instances with filters"
expect_eq "$(ec2 describe-instances --filters "Name=tag:Name,Values=cli-*" "Name=tag-key,Values=compat-run" "Name=tag:compat-run,Values=$RUN" \
    --query 'Reservations[].Instances[].InstanceId' --output text)" "$id" "wildcard tag value and tag-key"
expect_eq "$(ec2 describe-instances --filters "Name=tag:compat-run,Values=$RUN" Name=instance-state-name,Values=stopped \
    --query 'length(Reservations[].Instances[])' --output text)" "0" "a filter that matches nothing"
# The CLI follows NextToken by itself with --page-size (MaxResults); --max-items cuts it.
expect_eq "$(ec2 describe-instances --page-size 5 --filters "Name=tag:compat-run,Values=$RUN" \
    --query 'length(Reservations[].Instances[])' --output text)" "1" "describe-instances --page-size 5"
expect_eq "$(ec2 describe-instances --filters "Name=tag:Name,Values=cli-$RUN" --query 'Reservations[0].Instances[0].Tags[?Key==`Name`].Value | [0]' --output text)" \
    "cli-$RUN" "Name tag"
first=$(ec2 describe-instances --max-items 1 --page-size 5 --output json)
token=$(python3 -c 'import json,sys; print(json.load(sys.stdin).get("NextToken") or "")' <<<"$first" 2>/dev/null || true)
if [ -n "$token" ]; then
    ec2 describe-instances --starting-token "$token" --page-size 5 --output json >/dev/null
    ok "describe-instances --max-items/--starting-token"
else
    log "note: one reservation in the project, --max-items 1 gave no token to resume from"
fi
ec2 describe-instances --output table --instance-ids "$id" >/dev/null
ok "describe-instances --output table"

expect_eq "$(ec2 describe-instance-attribute --instance-id "$id" --attribute userData --query UserData.Value --output text | base64 -d)" \
    "$user_data" "user data, base64-decoded"

# get-console-output: the CLI decodes the base64; poll for the boot marker.
found=""
for _ in $(seq 1 120); do
    if ec2 get-console-output --instance-id "$id" --query Output --output text | grep -qF "$BOOTED$id"; then
        found=1
        break
    fi
    sleep 1
done
[ -n "$found" ] || fail "the console never showed '$BOOTED$id'"
ok "get-console-output shows the boot marker"

expect_eq "$(ec2 describe-instance-status --instance-ids "$id" --query 'InstanceStatuses[0].InstanceState.Name' --output text)" \
    "running" "describe-instance-status"

expect_error IncorrectInstanceState modify-instance-attribute --instance-id "$id" --instance-type Value=t1.micro

ec2 reboot-instances --instance-ids "$id"
ok "reboot-instances"

expect_eq "$(ec2 stop-instances --instance-ids "$id" --query 'StoppingInstances[0].PreviousState.Name' --output text)" \
    "running" "stop-instances"
ec2 wait instance-stopped --instance-ids "$id"
ok "wait instance-stopped"
ec2 modify-instance-attribute --instance-id "$id" --instance-type Value=t1.micro
expect_eq "$(ec2 describe-instances --instance-ids "$id" --query 'Reservations[0].Instances[0].InstanceType' --output text)" \
    "t1.micro" "modify-instance-attribute --instance-type while stopped"
ec2 modify-instance-attribute --instance-id "$id" --attribute instanceType --value t1.small
expect_eq "$(ec2 describe-instance-attribute --instance-id "$id" --attribute instanceType --query InstanceType.Value --output text)" \
    "t1.small" "modify-instance-attribute --attribute instanceType --value (the older form)"
ec2 start-instances --instance-ids "$id" >/dev/null
ec2 wait instance-running --instance-ids "$id"
ok "start-instances + wait instance-running"

ec2 create-tags --resources "$id" --tags Key=team,Value=compat Key=stage,Value=cli
expect_eq "$(ec2 describe-tags --filters "Name=resource-id,Values=$id" Name=key,Values=team,stage \
    --query 'sort_by(Tags,&Key)[].[Key,Value]' --output text | tr '\t\n' '= ')" "stage=cli team=compat " "create-tags/describe-tags"
ec2 delete-tags --resources "$id" --tags Key=team
expect_eq "$(ec2 describe-tags --filters "Name=resource-id,Values=$id" Name=key,Values=team,stage \
    --query 'Tags[].Key' --output text)" "stage" "delete-tags"

expect_eq "$(ec2 describe-regions --query 'Regions[].RegionName' --output text)" "kumo" "describe-regions"
zone=$(ec2 describe-availability-zones --query 'AvailabilityZones[0].ZoneName' --output text)
[ -n "$zone" ] && [ "$zone" != None ] || fail "describe-availability-zones gave '$zone'"
ok "describe-availability-zones → $zone"
expect_eq "$(ec2 describe-instances --instance-ids "$id" --query 'Reservations[0].Instances[0].Placement.AvailabilityZone' --output text)" \
    "$zone" "the instance is in the listed zone"
[ -n "$(ec2 describe-account-attributes --query 'AccountAttributes[].AttributeName' --output text)" ] \
    || fail "describe-account-attributes is empty"
ok "describe-account-attributes"
expect_eq "$(ec2 describe-instance-types --instance-types t1.nano --query 'InstanceTypes[0].[VCpuInfo.DefaultVCpus,MemoryInfo.SizeInMiB]' --output text)" \
    "1	128" "describe-instance-types t1.nano"

# Register an image from a file the server can read, wait for it, deregister it.
if [ -n "${KUMO_GUEST_DIR:-}" ]; then
    img=$(ec2 register-image --name "cli-img-$RUN" --image-location "$KUMO_GUEST_DIR/disk.qcow2" --query ImageId --output text)
    [[ $img =~ ^ami-[0-9a-f]{17}$ ]] || fail "register-image gave '$img'"
    ec2 wait image-available --image-ids "$img"
    expect_eq "$(ec2 describe-images --owners self --filters "Name=name,Values=cli-img-$RUN" --query 'Images[].[ImageId,State]' --output text)" \
        "$img	available" "register-image + wait image-available"
    ec2 deregister-image --image-id "$img"
    expect_eq "$(ec2 describe-images --owners self --filters "Name=name,Values=cli-img-$RUN" Name=state,Values=available --query 'length(Images)' --output text)" \
        "0" "deregister-image"
else
    fail "KUMO_GUEST_DIR is not set (register-image needs a file the server can read)"
fi

# Errors, as the CLI prints them.
expect_error InvalidInstanceID.NotFound describe-instances --instance-ids i-0123456789abcdef0
expect_error InvalidInstanceID.Malformed describe-instances --instance-ids nonsense
expect_error InvalidAMIID.NotFound run-instances --image-id ami-0123456789abcdef0 --count 1
expect_error DryRunOperation run-instances --image-id "$ami" --instance-type t1.nano --count 1 --dry-run
expect_error DryRunOperation stop-instances --instance-ids "$id" --dry-run
expect_error InvalidParameterValue describe-instances --filters Name=no-such-filter,Values=x
expect_error InvalidParameterValue create-volume --size 0 --availability-zone "$zone"
expect_error InvalidKeyPair.NotFound describe-key-pairs --key-names "nope-$RUN"
expect_error InvalidAllocationID.NotFound release-address --allocation-id eipalloc-0123456789abcdef0

expect_eq "$(ec2 terminate-instances --instance-ids "$id" --query 'TerminatingInstances[0].PreviousState.Name' --output text)" \
    "running" "terminate-instances"
ec2 wait instance-terminated --instance-ids "$id"
ok "wait instance-terminated"
expect_eq "$(ec2 describe-instances --filters "Name=tag:compat-run,Values=$RUN" --query 'Reservations[].Instances[].State.Name' --output text)" \
    "terminated" "a terminated instance stays visible"
id=""

echo "$passed passed, 0 failed"
