#!/usr/bin/env bash
# test-guest.sh — build the kumo test guest and prove its contract under real QEMU TCG.
#
# Everything runs in a fresh network namespace (bridge 10.213.0.1/24 + tap, dnsmasq handing the
# guest's MAC 10.213.0.10); no traffic leaves it. Steps: build -> boot -> boot marker -> DHCP
# lease line -> HTTP / and /counter -> serial shell -> system_reset (counter continues) ->
# system_powerdown (QEMU exits by itself) -> counter file on the disk is 1..N without gaps.
# Cleans up namespace, processes and files on exit, also on failure (KUMO_TEST_KEEP=1 keeps files).
#
# Environment: KUMO_TEST_MACHINE (default pc; q35 works too), KUMO_TEST_MEM (default 256),
# KUMO_TEST_SMP (default 1), KUMO_TEST_BLANK_DISK=1 (boot a blank disk: guest formats it),
# KUMO_GUEST_CACHE (passed to build-guest.sh).
set -euo pipefail

PROG=${0##*/}
HERE=$(cd "$(dirname "$0")" && pwd)
die() { printf '%s: FAIL: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
ok() { printf '%s: ok: %s\n' "$PROG" "$*" >&2; }

[[ $(id -u) -eq 0 ]] || die "must run as root (network namespace, tap device)"
for t in ip qemu-system-x86_64 qemu-img dnsmasq; do
    command -v "$t" >/dev/null || die "missing $t (apt-get install iproute2 qemu-system-x86 qemu-utils dnsmasq-base)"
done
if command -v curl >/dev/null; then
    http_get() { ip netns exec "$NS" curl -fsS --max-time 5 "http://$GUEST_IP$1"; }
elif command -v busybox >/dev/null; then
    # busybox 1.35 wget -T segfaults: bound it with timeout instead.
    http_get() { ip netns exec "$NS" timeout 5 busybox wget -q -O - "http://$GUEST_IP$1"; }
else
    die "need curl or busybox for HTTP checks"
fi
if command -v socat >/dev/null; then
    sock_send() { # SOCKET -> send stdin, then linger briefly for replies
        socat -t 1 - "UNIX-CONNECT:$1"
    }
elif command -v python3 >/dev/null; then
    sock_send() {
        python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
for line in sys.stdin.buffer:
    s.sendall(line); time.sleep(0.2)
time.sleep(1); s.settimeout(0.5)
try:
    while s.recv(65536): pass
except Exception: pass
' "$1"
    }
else
    die "need socat or python3 to talk to QMP"
fi

MACHINE=${KUMO_TEST_MACHINE:-pc}
MEM=${KUMO_TEST_MEM:-256}
SMP=${KUMO_TEST_SMP:-1}
GUEST_ID=i-0123456789abcdef
GUEST_NAME=web-test1
GUEST_MAC=52:54:00:6b:75:01
GUEST_IP=10.213.0.10
NS=kumo-guest-test-$$
TMP=$(mktemp -d /tmp/kumo-guest-test.XXXXXX)
QEMU_PID='' DNSMASQ_PID=''

cleanup() {
    local rc=$?
    set +e
    if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID"
        for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$QEMU_PID" 2>/dev/null
    fi
    if [[ -n $DNSMASQ_PID ]] && kill -0 "$DNSMASQ_PID" 2>/dev/null; then
        kill "$DNSMASQ_PID"; wait "$DNSMASQ_PID" 2>/dev/null
    fi
    ip netns del "$NS" 2>/dev/null
    if ((rc != 0)) && [[ -f $TMP/serial.log ]]; then
        log "--- last 60 lines of the serial console ---"
        tail -n 60 "$TMP/serial.log" | tr -d '\r' >&2
        [[ -f $TMP/dnsmasq.log ]] && { log "--- dnsmasq log ---"; tail -n 20 "$TMP/dnsmasq.log" >&2; }
    fi
    if [[ -n ${KUMO_TEST_KEEP:-} ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    ((rc == 0)) && log "PASS" || log "FAILED (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { printf '%s\n' "${EPOCHREALTIME/./}"; } # microseconds
ms_since() { echo $((($(now) - $1) / 1000)); }

wait_for() { # PATTERN(fixed string) COUNT TIMEOUT_S -> waits until the serial log has COUNT matches
    local pat=$1 count=$2 deadline=$(($(now) + $3 * 1000000)) n
    while :; do
        n=0
        [[ -f $TMP/serial.log ]] && n=$(tr -d '\r' <"$TMP/serial.log" | grep -cF -- "$pat" || true)
        ((n >= count)) && return 0
        [[ -n $QEMU_PID ]] && ! kill -0 "$QEMU_PID" 2>/dev/null && die "QEMU exited while waiting for '$pat'"
        (($(now) > deadline)) && die "timed out after $3 s waiting for '$pat' (#$count) on the serial console"
        sleep 0.05
    done
}

qmp() { # COMMAND-JSON... -> runs them after qmp_capabilities, prints replies
    { printf '{"execute":"qmp_capabilities"}\n'; printf '%s\n' "$@"; } | sock_send "$TMP/qmp.sock"
}

counter_value() {
    local v
    v=$(http_get /counter | tr -d ' \r\n')
    [[ $v =~ ^[0-9]+$ ]] || die "GET /counter returned '$v', not a number"
    printf '%s\n' "$v"
}

qemu_rss_kib() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$QEMU_PID/status"; }
qemu_cpu_ticks() { awk '{print $14 + $15}' "/proc/$QEMU_PID/stat"; }

# ------------------------------------------------------------------ build
t0=$(now)
"$HERE/build-guest.sh" "$TMP/out" || die "build-guest.sh failed"
BUILD_MS=$(ms_since "$t0")
ok "build took ${BUILD_MS} ms"
for f in vmlinux initrd.img disk.qcow2 manifest.json; do [[ -s $TMP/out/$f ]] || die "build produced no $f"; done
(cd "$TMP/out" && python3 - <<'EOF' 2>/dev/null) || log "note: python3 missing or manifest check skipped"
import hashlib, json
m = json.load(open("manifest.json"))
assert m["kernel_version"] and m["busybox_version"], m
for f, h in m["sha256"].items():
    assert hashlib.sha256(open(f, "rb").read()).hexdigest() == h, f
print("manifest.json: valid, hashes match")
EOF
if [[ -n ${KUMO_TEST_BLANK_DISK:-} ]]; then
    qemu-img create -q -f qcow2 "$TMP/disk.qcow2" 64M
else
    cp "$TMP/out/disk.qcow2" "$TMP/disk.qcow2"
fi

# ------------------------------------------------------------------ namespace network
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
ip -n "$NS" addr add 10.213.0.1/24 dev br0
ip -n "$NS" link set br0 up
ip -n "$NS" tuntap add dev tap0 mode tap
ip -n "$NS" link set tap0 master br0
ip -n "$NS" link set tap0 up
printf '%s,%s,%s\n' "$GUEST_MAC" "$GUEST_IP" "$GUEST_NAME" >"$TMP/dhcp-hosts"
: >"$TMP/leases"
ip netns exec "$NS" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-hosts --no-resolv \
    --user=root --port=0 --interface=br0 --bind-interfaces \
    --dhcp-range=10.213.0.0,static,255.255.255.0,1h --dhcp-hostsfile="$TMP/dhcp-hosts" \
    --dhcp-leasefile="$TMP/leases" --log-dhcp --log-facility="$TMP/dnsmasq.log" \
    --pid-file="$TMP/dnsmasq.pid" &
DNSMASQ_PID=$!

# ------------------------------------------------------------------ boot
APPEND="console=ttyS0 quiet panic=-1 kumo.id=$GUEST_ID kumo.hostname=$GUEST_NAME"
t_start=$(now)
ip netns exec "$NS" qemu-system-x86_64 -accel tcg -machine "$MACHINE" -m "$MEM" -smp "$SMP" \
    -nodefaults -no-user-config -display none \
    -kernel "$TMP/out/vmlinux" -initrd "$TMP/out/initrd.img" -append "$APPEND" \
    -drive "file=$TMP/disk.qcow2,if=virtio,format=qcow2,cache=writeback" \
    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
    -device "virtio-net-pci,netdev=n0,mac=$GUEST_MAC" \
    -chardev "socket,id=ser0,path=$TMP/serial.sock,server=on,wait=off,logfile=$TMP/serial.log" \
    -serial chardev:ser0 \
    -qmp "unix:$TMP/qmp.sock,server=on,wait=off" &
QEMU_PID=$!

wait_for "KUMO-GUEST-BOOTED id=$GUEST_ID" 1 120
T_MARKER=$(ms_since "$t_start")
ok "boot marker after ${T_MARKER} ms"
wait_for "KUMO-GUEST-IP $GUEST_IP" 1 120
T_IP=$(ms_since "$t_start")
ok "DHCP lease line after ${T_IP} ms"

# ------------------------------------------------------------------ HTTP
page=''
for _ in $(seq 50); do page=$(http_get / 2>/dev/null) && break; sleep 0.2; done
[[ -n $page ]] || die "GET http://$GUEST_IP/ failed"
T_HTTP=$(ms_since "$t_start")
grep -qxF "instance-id: $GUEST_ID" <<<"$page" || die "GET / lacks 'instance-id: $GUEST_ID': $page"
grep -qxF "hostname: $GUEST_NAME" <<<"$page" || die "GET / lacks 'hostname: $GUEST_NAME': $page"
ok "GET / after ${T_HTTP} ms shows instance-id and hostname"

c1=$(counter_value); sleep 2; c2=$(counter_value)
((c2 > c1)) || die "counter did not increase ($c1 -> $c2)"
ok "counter increases: $c1 -> $c2 in 2 s ($(((c2 - c1) / 2))/s; nominal 10/s)"

# ------------------------------------------------------------------ serial shell
printf '\recho KUMO-SHELL-$((40+2)) $(hostname) $(cat /proc/mounts | grep -c " /data ")\r' | sock_send "$TMP/serial.sock" >/dev/null
wait_for "KUMO-SHELL-42 $GUEST_NAME 1" 1 20
ok "serial console shell answers (hostname $GUEST_NAME, /data mounted)"

# ------------------------------------------------------------------ cost while idle
sleep 1
RSS_KIB=$(qemu_rss_kib)
clk=$(getconf CLK_TCK)
cpu0=$(qemu_cpu_ticks); sleep 5; cpu1=$(qemu_cpu_ticks)
IDLE_CPU_PCT=$(((cpu1 - cpu0) * 100 / (5 * clk)))
ok "QEMU RSS ${RSS_KIB} KiB (-m $MEM), CPU while guest idles ${IDLE_CPU_PCT}% of one core"

# ------------------------------------------------------------------ reset: comes back, counter continues
c3=$(counter_value)
qmp '{"execute":"system_reset"}' >/dev/null
t_reset=$(now)
wait_for "KUMO-GUEST-BOOTED id=$GUEST_ID" 2 120
T_RESET_MARKER=$(ms_since "$t_reset")
wait_for "KUMO-GUEST-IP $GUEST_IP" 2 120
T_RESET_IP=$(ms_since "$t_reset")
c4=''
for _ in $(seq 50); do c4=$(http_get /counter 2>/dev/null | tr -d ' \r\n') && [[ $c4 =~ ^[0-9]+$ ]] && ((c4 > 0)) && break; sleep 0.2; done
[[ $c4 =~ ^[0-9]+$ ]] || die "GET /counter after reset failed"
((c4 > c3)) || die "counter did not continue after system_reset ($c3 before, $c4 after)"
ok "system_reset: marker again after ${T_RESET_MARKER} ms, IP after ${T_RESET_IP} ms, counter $c3 -> $c4"

# ------------------------------------------------------------------ ACPI powerdown
qmp '{"execute":"system_powerdown"}' >/dev/null
t_pd=$(now)
for _ in $(seq 600); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.05; done
kill -0 "$QEMU_PID" 2>/dev/null && die "QEMU still running 30 s after system_powerdown"
wait "$QEMU_PID" || die "QEMU exited with status $?"
T_PD=$(ms_since "$t_pd")
QEMU_PID=''
grep -qF KUMO-GUEST-POWEROFF "$TMP/serial.log" || die "no KUMO-GUEST-POWEROFF on the console"
ok "system_powerdown: KUMO-GUEST-POWEROFF printed, QEMU exited by itself after ${T_PD} ms"

# ------------------------------------------------------------------ disk contents
if command -v debugfs >/dev/null || [[ -x /sbin/debugfs ]]; then
    DEBUGFS=$(command -v debugfs || echo /sbin/debugfs)
    qemu-img convert -f qcow2 -O raw "$TMP/disk.qcow2" "$TMP/disk.raw"
    "$DEBUGFS" -R 'cat /counter' "$TMP/disk.raw" 2>/dev/null >"$TMP/counter.txt"
    awk 'NR != $0 { printf "line %d is \"%s\"\n", NR, $0; bad = 1; exit } END { exit bad }' "$TMP/counter.txt" ||
        die "/data/counter is not 1..N"
    N=$(wc -l <"$TMP/counter.txt")
    ((N >= c4)) || die "/data/counter has $N lines, but the guest served $c4"
    ok "/data/counter on the disk: 1..$N, consecutive across the reset (clean unmount: $("$DEBUGFS" -R stats "$TMP/disk.raw" 2>/dev/null | sed -n 's/^Filesystem state: *//p'))"
else
    log "note: debugfs (e2fsprogs) not found; disk contents not checked"
fi

cat >&2 <<EOF

==================== kumo test guest: measurements ====================
machine $MACHINE, -m $MEM, -smp $SMP, TCG
build (cached)            ${BUILD_MS} ms
QEMU start -> marker      ${T_MARKER} ms
QEMU start -> IP line     ${T_IP} ms
QEMU start -> HTTP 200    ${T_HTTP} ms
reset -> marker / IP      ${T_RESET_MARKER} / ${T_RESET_IP} ms
powerdown -> QEMU exit    ${T_PD} ms
QEMU RSS                  ${RSS_KIB} KiB
QEMU CPU, guest idle      ${IDLE_CPU_PCT}% of one core
outputs: $(cd "$TMP/out" && stat -c '%n %s' vmlinux initrd.img disk.qcow2 manifest.json | paste -sd ' ')
========================================================================
EOF
