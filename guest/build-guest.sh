#!/usr/bin/env bash
# build-guest.sh OUTDIR — build kumo's small test guest from Debian's own packages.
#
# Produces in OUTDIR:
#   vmlinux        uncompressed ELF kernel (PVH entry point: boot with `qemu -kernel vmlinux`)
#   initrd.img     gzip'd newc cpio: busybox-static, kernel modules, /init and the guest scripts
#   disk.qcow2     64 MiB qcow2 data disk (ext4, preformatted on the host when mkfs.ext4 exists,
#                  otherwise blank and formatted by the guest at first boot)
#   manifest.json  {"kernel_version", "busybox_version", "sha256": {file: hash}, ...}
#
# Downloads (apt-get download, never installed on the host) are cached in
#   ${KUMO_GUEST_CACHE:-$HOME/.cache/kumo/guest}
# so a second run is fast and works offline. Output is reproducible: fixed timestamps,
# owners, inode numbers, filesystem UUID and hash seed, so the same packages give the same hashes.
#
# Environment:
#   KUMO_GUEST_CACHE           cache directory (see above)
#   KUMO_GUEST_KERNEL_PACKAGE  kernel package to use instead of what linux-image-amd64 depends on
#   KUMO_GUEST_DISK_SIZE       data disk size (qemu-img syntax), default 64M
#
# Guest contract (see guest/README.md): /init prints `KUMO-GUEST-BOOTED id=<ID>` first, then the
# guest sets its hostname, mounts /dev/vda on /data, writes /data/counter every 100 ms, serves
# HTTP on :80, gets an address with udhcpc (prints `KUMO-GUEST-IP <addr>`), and powers off on
# the ACPI power button (prints `KUMO-GUEST-POWEROFF`).
set -euo pipefail

PROG=${0##*/}
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
trap 'printf "%s: error: command failed (exit %s) at line %s: %s\n" "$PROG" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

[[ $# -eq 1 && -n $1 && $1 != -* ]] || {
    printf 'usage: %s OUTDIR\n' "$PROG" >&2
    exit 2
}
OUTDIR=$1
CACHE=${KUMO_GUEST_CACHE:-${HOME:-/root}/.cache/kumo/guest}
DISK_SIZE=${KUMO_GUEST_DISK_SIZE:-64M}
# Fixed timestamp for everything we generate (2024-01-01T00:00:00Z) -> reproducible output.
EPOCH=${SOURCE_DATE_EPOCH:-1704067200}
# Modules to load in the guest, in this order (each one's dependencies are checked and, if
# missing from this list, inserted before it). button+evdev first: they give acpid the ACPI power
# button as early as possible; virtio order as in /work/shared/ENVIRONMENT.md; crc32c_generic
# provides the "crc32c" crypto that ext4/jbd2 metadata checksums need (a soft dependency that
# insmod cannot resolve).
GUEST_MODULES=(button evdev
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    failover net_failover virtio_net virtio_blk
    crc32c_generic crc16 mbcache jbd2 ext4)

# ---------------------------------------------------------------- host tool checks
missing=() missing_pkgs=()
need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    missing+=("$1 (Debian package: $2)")
    [[ " ${missing_pkgs[*]} " == *" $2 "* ]] || missing_pkgs+=("$2")
}
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need xz xz-utils
need gzip gzip
need qemu-img qemu-utils
need sha256sum coreutils
need od coreutils
need stat coreutils
need grep grep
need sed sed
need find findutils
need flock util-linux
if ((${#missing[@]})); then
    printf '%s: error: missing host tools:\n' "$PROG" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    printf 'install them with: apt-get install %s\n' "${missing_pkgs[*]}" >&2
    exit 1
fi
MKFS_EXT4=$(command -v mkfs.ext4 || command -v /sbin/mkfs.ext4 || command -v /usr/sbin/mkfs.ext4 || true)

mkdir -p "$CACHE/debs" "$CACHE/kernel" || die "cannot create cache directory $CACHE"
mkdir -p "$OUTDIR" || die "cannot create output directory $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

# One build at a time per cache (concurrent test runs share it).
exec 9>"$CACHE/.lock"
flock 9

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kumo-guest-build.XXXXXX")
cleanup() { rm -rf "$WORK" "$OUTDIR"/.build.*; }
trap cleanup EXIT

# ---------------------------------------------------------------- package download (cached)
APT_OPTS=(-q -o APT::Sandbox::User=root)
[[ $(id -u) -eq 0 ]] || APT_OPTS=(-q)

# apt-cache is slow here (~1 s a call), so the resolution (package -> version, file, SHA256) is
# remembered in the cache and reused while the apt lists and sources stay the same.
apt_fingerprint() {
    { ls -l --time-style=+%s /var/lib/apt/lists/ /etc/apt/sources.list /etc/apt/sources.list.d/ \
        /etc/apt/preferences.d/ 2>/dev/null || true; } | sha256sum | cut -c1-16
}
RESOLVED="$CACHE/resolved-$(apt_fingerprint)"
touch "$RESOLVED"
resolved_get() { sed -n "s/^$1=//p" "$RESOLVED" | tail -n1; }
resolved_set() { printf '%s=%s\n' "$1" "$2" >>"$RESOLVED"; }

candidate() { # PKG -> "VERSION ARCH SHA256" of apt's candidate ("" if apt does not know PKG)
    local r
    r=$(resolved_get "cand.$1")
    if [[ -z $r ]]; then
        r=$(apt-cache show --no-all-versions "$1" 2>/dev/null | awk '
            /^Version:/ && !v { v = $2 } /^Architecture:/ && !a { a = $2 } /^SHA256:/ && !h { h = $2 }
            END { if (v != "") print v, (a == "" ? "amd64" : a), (h == "" ? "-" : h) }' || true)
        [[ -n $r ]] && resolved_set "cand.$1" "$r"
    fi
    printf '%s\n' "$r"
}

deb_ok() { # FILE SHA256|- -> the cached file exists and matches the archive's SHA256
    [[ -s $1 ]] || return 1
    [[ $2 == - ]] && return 0
    [[ -e $1.sha256-ok && $1.sha256-ok -nt $1 ]] && [[ $(cat "$1.sha256-ok") == "$2" ]] && return 0
    [[ $(sha256sum "$1" | cut -d' ' -f1) == "$2" ]] || return 1
    printf '%s\n' "$2" >"$1.sha256-ok"
}

fetch_deb() { # PKG -> prints path of the cached .deb
    local pkg=$1 ver arch sha file newest
    read -r ver arch sha <<<"$(candidate "$pkg")" || true
    if [[ -z $ver ]]; then
        log "apt does not know $pkg; running apt-get update"
        apt-get "${APT_OPTS[@]}" update >&2 || true
        RESOLVED="$CACHE/resolved-$(apt_fingerprint)"; touch "$RESOLVED"
        read -r ver arch sha <<<"$(candidate "$pkg")" || true
    fi
    if [[ -n $ver ]]; then
        file="$CACHE/debs/${pkg}_${ver//:/%3a}_${arch}.deb"
        if deb_ok "$file" "$sha"; then
            printf '%s\n' "$file"; return 0
        fi
        rm -f "$file" "$file.sha256-ok"
        log "downloading $pkg $ver"
        if ! (cd "$CACHE/debs" && apt-get "${APT_OPTS[@]}" download "$pkg=$ver") >&2; then
            log "apt-get download $pkg failed; running apt-get update and retrying"
            if apt-get "${APT_OPTS[@]}" update >&2; then
                RESOLVED="$CACHE/resolved-$(apt_fingerprint)"; touch "$RESOLVED"
                read -r ver arch sha <<<"$(candidate "$pkg")" || true
                file="$CACHE/debs/${pkg}_${ver//:/%3a}_${arch}.deb"
                (cd "$CACHE/debs" && apt-get "${APT_OPTS[@]}" download "$pkg=$ver") >&2 || true
            fi
        fi
        if deb_ok "$file" "$sha"; then
            printf '%s\n' "$file"; return 0
        fi
    fi
    # Offline fallback: any cached version of the package.
    newest=$(ls -1 "$CACHE/debs/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
    if [[ -n $newest ]]; then
        log "warning: using cached $newest (could not get ${pkg} ${ver:-<no candidate>})"
        printf '%s\n' "$newest"; return 0
    fi
    die "cannot download package $pkg (apt has no candidate or the download failed); try 'apt-get update'"
}

deb_field() { dpkg-deb -f "$1" "$2"; }

# Resolve the real kernel image package behind the linux-image-amd64 metapackage.
kernel_dep() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -n1 || true
}
KPKG=${KUMO_GUEST_KERNEL_PACKAGE:-$(resolved_get kernel)}
if [[ -z $KPKG ]]; then
    KPKG=$(kernel_dep)
    if [[ -z $KPKG ]]; then
        # Lists may be missing: try once after apt-get update, then fall back to the cache.
        apt-get "${APT_OPTS[@]}" update >&2 || true
        RESOLVED="$CACHE/resolved-$(apt_fingerprint)"; touch "$RESOLVED"
        KPKG=$(kernel_dep)
    fi
    if [[ -n $KPKG ]]; then
        resolved_set kernel "$KPKG"
    else
        KPKG=$(ls -1 "$CACHE/debs/" 2>/dev/null | sed -n 's/^\(linux-image-[0-9][^_]*\)_.*\.deb$/\1/p' |
            sort -V | tail -n1 || true)
        [[ -n $KPKG ]] || die "cannot resolve the package linux-image-amd64 depends on (apt-cache depends linux-image-amd64 gave nothing)"
        log "warning: apt does not know linux-image-amd64; using cached $KPKG"
    fi
fi

KDEB=$(fetch_deb "$KPKG")
BDEB=$(fetch_deb busybox-static)
KPKG_VERSION=$(deb_field "$KDEB" Version)
BB_VERSION=$(deb_field "$BDEB" Version)
log "kernel package: $KPKG $KPKG_VERSION"
log "busybox-static: $BB_VERSION"

# ---------------------------------------------------------------- kernel: vmlinux + modules (cached)
KCACHE="$CACHE/kernel/${KPKG}_${KPKG_VERSION//:/%3a}"
# The stamp names the module list, so editing GUEST_MODULES re-extracts.
KSTAMP_NAME=".complete-$(printf '%s ' "${GUEST_MODULES[@]}" | sha256sum | cut -c1-12)"
KSTAMP="$KCACHE/$KSTAMP_NAME"

extract_vmlinux() { # VMLINUZ OUT -> decompress the xz payload into an ELF vmlinux
    local z=$1 out=$2 off
    # Every offset of the xz stream magic FD 37 7A 58 5A 00; the first one that yields an ELF wins.
    for off in $(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$z" | cut -d: -f1); do
        tail -c "+$((off + 1))" "$z" >"$WORK/payload.xz"
        if xz -dc --single-stream "$WORK/payload.xz" >"$out" 2>/dev/null &&
            [[ $(head -c 4 "$out" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
            return 0
        fi
    done
    return 1
}

if [[ ! -e $KSTAMP ]]; then
    log "extracting $KDEB"
    rm -rf "$KCACHE" "$KCACHE.tmp" "$WORK/kpkg"
    mkdir -p "$WORK/kpkg" "$KCACHE.tmp/modules"
    dpkg-deb -x "$KDEB" "$WORK/kpkg" || die "dpkg-deb -x $KDEB failed"
    VMLINUZ=$(ls -1 "$WORK"/kpkg/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
    [[ -n $VMLINUZ ]] || die "no /boot/vmlinuz-* in $KDEB"
    KREL=${VMLINUZ##*/vmlinuz-}
    MODDIR="$WORK/kpkg/lib/modules/$KREL"
    [[ -d $MODDIR ]] || die "no /lib/modules/$KREL in $KDEB"
    cp "$WORK/kpkg/boot/config-$KREL" "$KCACHE.tmp/config" || die "no /boot/config-$KREL in $KDEB"
    extract_vmlinux "$VMLINUZ" "$KCACHE.tmp/vmlinux" ||
        die "could not find an xz-compressed ELF kernel in $VMLINUZ (kernel not built with CONFIG_KERNEL_XZ?)"
    grep -q '^CONFIG_PVH=y' "$KCACHE.tmp/config" ||
        log "warning: kernel lacks CONFIG_PVH=y; QEMU cannot boot vmlinux directly (use vmlinuz)"

    # Resolve the module list: config says =y (built in, skip) or =m (copy + dependencies).
    declare -A seen=()
    order=()
    modpath() { find "$MODDIR/kernel" -name "$1.ko" -print -quit; }
    moddeps() { # the modinfo "depends=" field, read straight from the .ko
        LC_ALL=C grep -a -o 'depends=[A-Za-z0-9_,-]*' "$1" | head -n1 | sed 's/^depends=//; s/,/ /g'
    }
    add_module() {
        local m=${1//-/_} f d
        [[ -n ${seen[$m]:-} ]] && return 0
        seen[$m]=1
        f=$(modpath "$m")
        [[ -n $f ]] || f=$(modpath "${m//_/-}")
        if [[ -z $f ]]; then
            log "note: module $m not found in $KPKG (assuming built in)"
            return 0
        fi
        for d in $(moddeps "$f"); do add_module "$d"; done
        cp "$f" "$KCACHE.tmp/modules/$m.ko"
        order+=("$m")
    }
    for m in "${GUEST_MODULES[@]}"; do add_module "$m"; done
    printf '%s\n' "${order[@]}" >"$KCACHE.tmp/modules.order"
    printf '%s\n' "$KREL" >"$KCACHE.tmp/release"
    rm -rf "$WORK/kpkg"
    touch "$KCACHE.tmp/$KSTAMP_NAME"
    mv "$KCACHE.tmp" "$KCACHE"
fi
KREL=$(cat "$KCACHE/release")

# ---------------------------------------------------------------- busybox
mkdir -p "$WORK/bb"
dpkg-deb -x "$BDEB" "$WORK/bb" || die "dpkg-deb -x $BDEB failed"
BUSYBOX="$WORK/bb/bin/busybox"
[[ -x $BUSYBOX ]] || die "no /bin/busybox in $BDEB"
# Applet list from the binary itself (static amd64 — runs on the build host); if it cannot run
# here, the guest installs its links at boot instead.
APPLETS=$("$BUSYBOX" --list-full 2>/dev/null || true)
for a in sh init mount insmod udhcpc httpd acpid mke2fs poweroff ip hostname cttyhack sync mv wget nc sed timeout; do
    [[ -z $APPLETS ]] || grep -qE "(^|/)$a\$" <<<"$APPLETS" || die "busybox-static $BB_VERSION lacks the '$a' applet"
done

# ---------------------------------------------------------------- initramfs contents
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc/init.d,etc/kumo,etc/acpi/PWRF,proc,sys,dev,run,tmp,data,www,root,var/log,var/run}
mkdir -p "$R/lib/modules/$KREL"
cp "$BUSYBOX" "$R/bin/busybox"
cp "$KCACHE"/modules/*.ko "$R/lib/modules/$KREL/"
cp "$KCACHE/modules.order" "$R/etc/kumo/modules"

cat >"$R/init" <<'EOF'
#!/bin/sh
# kumo test guest, stage 1 (PID 1). Prints the boot marker as early as possible, then hands over
# to busybox init (/etc/inittab).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
/bin/busybox mount -t proc -o nosuid,nodev,noexec proc /proc
[ -e /bin/mount ] || /bin/busybox --install -s
read -r CMDLINE </proc/cmdline
KUMO_ID=unknown
KUMO_HOSTNAME=kumo-guest
for arg in $CMDLINE; do
    case $arg in
    kumo.id=*) KUMO_ID=${arg#kumo.id=} ;;
    kumo.hostname=*) KUMO_HOSTNAME=${arg#kumo.hostname=} ;;
    esac
done
echo "KUMO-GUEST-BOOTED id=$KUMO_ID"
# Only shell-safe values go into the environment file.
case $KUMO_ID in *[!A-Za-z0-9._:@+-]*) KUMO_ID=invalid ;; esac
case $KUMO_HOSTNAME in '' | *[!A-Za-z0-9.-]*) KUMO_HOSTNAME=kumo-guest ;; esac
printf 'KUMO_ID=%s\nKUMO_HOSTNAME=%s\n' "$KUMO_ID" "$KUMO_HOSTNAME" >/etc/kumo/env
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts -o nosuid,noexec devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
exec /sbin/init
EOF

cat >"$R/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rcK
EOF

cat >"$R/etc/init.d/rcS" <<'EOF'
#!/bin/sh
# kumo test guest, stage 2 (busybox init sysinit). Everything slow runs in the background.
. /etc/kumo/env
hostname "$KUMO_HOSTNAME"
echo "$KUMO_HOSTNAME" >/etc/hostname
echo /bin/false >/proc/sys/kernel/modprobe   # no modules.dep; everything needed is insmod'ed here
KREL=$(uname -r)
# ACPI power button -> /etc/acpi/PWRF/00000080. busybox acpid watches the /dev/input/event*
# that exist when it starts, so it starts right after button+evdev (first in the list): a
# system_powerdown that arrives before that is lost (callers should repeat it until QEMU exits).
start_acpid() { acpid -c /etc/acpi -l /var/log/acpid.log -p /run/acpid.pid; ACPID=1; }
ACPID=
while read -r m; do
    insmod "/lib/modules/$KREL/$m.ko" || echo "kumo: insmod $m failed"
    [ "$m" = evdev ] && start_acpid
done </etc/kumo/modules
[ -n "$ACPID" ] || start_acpid
ip link set lo up

# Data disk: the disk whose serial is this instance's id (kumo's root disk; device names follow
# PCI probe order, which volumes plugged in early can change), else /dev/vda. Mount it on /data;
# format it (ext2 via busybox mke2fs, mounted by the ext4 driver) only if its first MiB is all
# zeros, i.e. it carries no filesystem at all.
DISK=/dev/vda
for s in /sys/block/vd*/serial; do
    [ -r "$s" ] && [ "$(cat "$s")" = "$KUMO_ID" ] && { d=${s%/serial}; DISK=/dev/${d##*/}; }
done
if [ -b $DISK ]; then
    if ! mount -t ext4 -o noatime $DISK /data 2>/dev/null; then
        if cmp -s -n 1048576 $DISK /dev/zero; then
            echo "kumo: $DISK is blank, formatting"
            mke2fs -q -L kumo-data -m 0 $DISK && mount -t ext4 -o noatime $DISK /data
        fi
    fi
fi
if grep -q ' /data ' /proc/mounts; then
    DATA_OK=1
else
    echo "KUMO-GUEST-DATA-ERROR cannot mount $DISK on /data"
    DATA_OK=
fi

# HTTP: GET / (static page), GET /counter (file replaced atomically on every tick).
cat >/www/index.html <<PAGE
kumo test guest
instance-id: $KUMO_ID
hostname: $KUMO_HOSTNAME
kernel: $KREL
PAGE
echo 0 >/www/counter
httpd -p 80 -h /www

[ -n "$DATA_OK" ] && start-stop-daemon -S -b -m -p /run/kumo-counter.pid -x /etc/kumo/counter

# DHCP in the background (output goes to the console; never pipe it: the renewing daemon
# would hold the pipe open).
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -s /etc/kumo/udhcpc.script -x "hostname:$KUMO_HOSTNAME" -T 1 -t 5 -A 2 -b >/dev/console 2>&1 </dev/null &
else
    echo "kumo: no eth0"
fi
EOF

cat >"$R/etc/init.d/rcK" <<'EOF'
#!/bin/sh
# busybox init shutdown action: stop the writer and leave /data clean.
if [ -f /run/kumo-counter.pid ]; then
    kill "$(cat /run/kumo-counter.pid)" 2>/dev/null
    rm -f /run/kumo-counter.pid
fi
sync
if grep -q ' /data ' /proc/mounts; then
    umount /data 2>/dev/null || mount -o remount,ro /data
fi
echo "kumo: shutdown complete"
EOF

cat >"$R/etc/kumo/counter" <<'EOF'
#!/bin/sh
# Append an increasing counter line to /data/counter every 100 ms (fdatasync'd), continuing after
# the last durable value. Cheap under TCG: sleeping is a `read -t` on a FIFO and the clock is
# /proc/uptime (no fork); only `sync` and `mv` fork per tick. Ticks are scheduled on a 100 ms
# grid so the rate stays 10/s; if the guest falls behind, the grid restarts (no bursts).
F=/data/counter
n=$(tail -n 20 "$F" 2>/dev/null | grep -E '^[0-9]+$' | tail -n 1)
n=${n:-0}
rm -f /run/kumo-tick
mkfifo /run/kumo-tick
exec 3<>/run/kumo-tick
trap 'exit 0' TERM INT
cs() { read -r up _ </proc/uptime; up=${up%.*}${up#*.}; now=$((10#$up)); } # centiseconds
cs; next=$now
while :; do
    n=$((n + 1))
    echo "$n" >>"$F"
    sync -d "$F"
    echo "$n" >/www/.counter.tmp
    mv -f /www/.counter.tmp /www/counter
    next=$((next + 10))
    cs
    left=$((next - now))
    if [ "$left" -le 0 ]; then
        next=$now
    else
        read -r -t "$((left / 100)).$((left / 10 % 10))$((left % 10))" -u 3 _ || :
    fi
done
EOF

cat >"$R/etc/kumo/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc event script: configure address, routes, DNS; report the lease on the console.
[ -n "$1" ] || exit 1
case $1 in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    rm -f /run/kumo-ip
    ;;
bound | renew)
    old=$(cat /run/kumo-ip 2>/dev/null)
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    if [ "$old" != "$ip" ] || [ "$1" = bound ]; then
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    fi
    if [ -n "$router" ]; then
        set -- $router
        ip route replace default via "$1" dev "$interface"
    fi
    : >/etc/resolv.conf.new
    [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf.new
    for s in $dns; do echo "nameserver $s" >>/etc/resolv.conf.new; done
    mv -f /etc/resolv.conf.new /etc/resolv.conf
    echo "$ip" >/run/kumo-ip
    if [ "$old" != "$ip" ]; then
        echo "KUMO-GUEST-IP $ip" >/dev/console
        /etc/kumo/metadata </dev/null >/dev/null 2>&1 &
    fi
    ;;
leasefail | nak)
    echo "kumo: dhcp $1 on $interface" >/dev/console
    ;;
esac
exit 0
EOF

cat >"$R/etc/kumo/metadata" <<'EOF'
#!/bin/sh
# Reads this guest's metadata (IMDSv1, then IMDSv2 with a token taken by PUT) and serves what it got
# under /www/md/; reports on the console. busybox wget cannot PUT: the token request goes through nc.
MD=http://169.254.169.254
mkdir -p /www/md
get() { timeout 10 wget -q -O "$2" ${3:+--header "$3"} "$MD/$1" 2>/dev/null; }
i=0
while [ $i -lt 30 ]; do
    get latest/meta-data/instance-id /www/md/instance-id && break
    i=$((i + 1)); sleep 1
done
get latest/user-data /www/md/user-data || rm -f /www/md/user-data
get latest/meta-data/local-ipv4 /www/md/local-ipv4
get latest/meta-data/public-ipv4 /www/md/public-ipv4 || rm -f /www/md/public-ipv4
# stdin stays open a moment: nc may stop reading the answer once its input ends.
for i in 1 2 3; do
    TOKEN=$( (printf 'PUT /latest/api/token HTTP/1.0\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n'; sleep 3) |
        timeout 10 nc 169.254.169.254 80 | sed '1,/^\r*$/d')
    [ -n "$TOKEN" ] && break
done
V2=none
if [ -n "$TOKEN" ]; then
    get latest/meta-data/instance-id /www/md/instance-id-v2 "X-aws-ec2-metadata-token: $TOKEN"
    V2=$?
fi
echo "KUMO-GUEST-METADATA instance-id=$(cat /www/md/instance-id 2>/dev/null) v2=$(cat /www/md/instance-id-v2 2>/dev/null) token-length=${#TOKEN} v2-status=$V2" >/dev/console
EOF

cat >"$R/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# ACPI power button (QMP system_powerdown): clean poweroff via busybox init (runs rcK).
echo "KUMO-GUEST-POWEROFF" >/dev/console
exec poweroff
EOF

cat >"$R/etc/profile" <<'EOF'
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PS1='\h:\w\$ '
export HOME=/root
cd /root
EOF
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"
printf '127.0.0.1 localhost\n' >"$R/etc/hosts"
: >"$R/etc/resolv.conf"

chmod 0755 "$R/init" "$R/etc/init.d/rcS" "$R/etc/init.d/rcK" "$R/etc/kumo/counter" \
    "$R/etc/kumo/udhcpc.script" "$R/etc/kumo/metadata" "$R/etc/acpi/PWRF/00000080"

# ---------------------------------------------------------------- cpio (newc) writer
# Written in bash (the format is ASCII headers + data) so that we need no cpio tool, no root for
# device nodes, and get a reproducible archive: inode numbers, owners and mtimes are fixed.
INO=300000
CPIO="$WORK/initrd.cpio"
CPIO_SIZE=0
: >"$CPIO"
cpio_pad() { # pad the archive to a multiple of 4
    local r=$(((4 - CPIO_SIZE % 4) % 4))
    ((r == 0)) || { printf '%*s' "$r" '' | tr ' ' '\0' >>"$CPIO"; CPIO_SIZE=$((CPIO_SIZE + r)); }
}
cpio_hdr() { # NAME MODE NLINK SIZE RMAJ RMIN
    INO=$((INO + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
        "$INO" "$2" 0 0 "$3" "$EPOCH" "$4" 0 0 "$5" "$6" $((${#1} + 1)) 0 "$1" >>"$CPIO"
    CPIO_SIZE=$((CPIO_SIZE + 110 + ${#1} + 1))
    cpio_pad
}
cpio_dir() { cpio_hdr "$1" $((8#040755)) 2 0 0 0; }
cpio_file() { # ARCHIVE-NAME SOURCE-FILE
    local mode=0644 size
    [[ -x $2 ]] && mode=0755
    size=$(stat -c %s "$2")
    cpio_hdr "$1" $((8#100000 | 8#$mode)) 1 "$size" 0 0
    cat "$2" >>"$CPIO"
    CPIO_SIZE=$((CPIO_SIZE + size))
    cpio_pad
}
cpio_link() { # ARCHIVE-NAME TARGET
    cpio_hdr "$1" $((8#120777)) 1 "${#2}" 0 0
    printf '%s' "$2" >>"$CPIO"
    CPIO_SIZE=$((CPIO_SIZE + ${#2}))
    cpio_pad
}
cpio_chr() { cpio_hdr "$1" $((8#020000 | 8#$2)) 1 0 "$3" "$4"; } # NAME PERM MAJ MIN

(cd "$R" && find . -mindepth 1 | sed 's|^\./||' | LC_ALL=C sort) >"$WORK/list"
while IFS= read -r p; do
    if [[ -d $R/$p ]]; then
        cpio_dir "$p"
    else
        cpio_file "$p" "$R/$p"
    fi
done <"$WORK/list"
cpio_chr dev/console 600 5 1
cpio_chr dev/null 666 1 3
cpio_chr dev/ttyS0 660 4 64
# Applet links (/bin/sh -> busybox etc.), relative so they also resolve in a chroot.
if [[ -n $APPLETS ]]; then
    while IFS= read -r a; do
        [[ $a == bin/busybox || -z $a ]] && continue
        [[ -e $R/$a ]] && continue
        d=${a%/*}
        case $d in
        bin | sbin) rel=../bin/busybox ;;
        usr/bin | usr/sbin) rel=../../bin/busybox ;;
        *) continue ;;
        esac
        cpio_link "$a" "$rel"
    done < <(LC_ALL=C sort <<<"$APPLETS")
else
    cpio_link bin/sh busybox
fi
cpio_hdr 'TRAILER!!!' 0 1 0 0 0
# Pad to 512 like cpio(1) does.
r=$(((512 - CPIO_SIZE % 512) % 512))
((r == 0)) || head -c "$r" /dev/zero >>"$CPIO"
[[ $(stat -c %s "$CPIO") -eq $((CPIO_SIZE + r)) ]] || die "internal error: cpio size mismatch"

# ---------------------------------------------------------------- outputs
T="$OUTDIR/.build.$$"
mkdir -p "$T"
cp "$KCACHE/vmlinux" "$T/vmlinux"
gzip -n -6 <"$CPIO" >"$T/initrd.img"

if [[ -n $MKFS_EXT4 ]]; then
    # Preformatted ext4 (journal: survives system_reset cleanly). Fixed UUID/hash seed/time.
    qemu-img create -q -f raw "$WORK/disk.raw" "$DISK_SIZE"
    E2FSPROGS_FAKE_TIME=$EPOCH "$MKFS_EXT4" -q -F -L kumo-data -m 0 \
        -U 6b756d6f-6775-6573-742d-646174610001 \
        -E hash_seed=6b756d6f-6775-6573-742d-686173680001,lazy_itable_init=0,lazy_journal_init=0,nodiscard \
        "$WORK/disk.raw" || die "mkfs.ext4 failed"
    qemu-img convert -q -f raw -O qcow2 "$WORK/disk.raw" "$T/disk.qcow2"
    DISK_FS=ext4
else
    log "note: mkfs.ext4 (e2fsprogs) not found; disk.qcow2 is blank and the guest formats it (ext2) at first boot"
    qemu-img create -q -f qcow2 "$T/disk.qcow2" "$DISK_SIZE"
    DISK_FS=none
fi

sha() { sha256sum "$T/$1" | cut -d' ' -f1; }
cat >"$T/manifest.json" <<EOF
{
  "kernel_version": "$KREL",
  "kernel_package": "$KPKG",
  "kernel_package_version": "$KPKG_VERSION",
  "busybox_version": "$BB_VERSION",
  "disk_filesystem": "$DISK_FS",
  "sha256": {
    "vmlinux": "$(sha vmlinux)",
    "initrd.img": "$(sha initrd.img)",
    "disk.qcow2": "$(sha disk.qcow2)"
  }
}
EOF
for f in vmlinux initrd.img disk.qcow2 manifest.json; do
    mv -f "$T/$f" "$OUTDIR/$f"
done
rmdir "$T"
log "built guest in $OUTDIR (kernel $KREL, busybox $BB_VERSION)"
ls -l "$OUTDIR"/vmlinux "$OUTDIR"/initrd.img "$OUTDIR"/disk.qcow2 "$OUTDIR"/manifest.json >&2
