#!/usr/bin/env bash
# build-cloud-guest.sh OUT_DIR — build a stock Debian 12 (bookworm) cloud guest with debootstrap.
#
# The point of this guest is that it is *unchanged*: Debian's own cloud-init package with the
# configuration Debian ships (no datasource_list, no ds-identify tweaks), so booting it on kumo
# proves that stock images configure themselves from kumo's metadata service (NoCloud through
# the SMBIOS serial `ds=nocloud-net;s=http://169.254.169.254/nocloud/`). The only files written
# are the ones every image build (or the Debian installer) writes: /etc/fstab, /etc/hostname,
# /etc/hosts, /etc/default/locale and an empty /etc/machine-id.
#
# Produces in OUT_DIR:
#   vmlinuz        the Debian kernel (linux-image-amd64), from the rootfs's /boot
#   initrd.img     its initramfs-tools initramfs (MODULES=most: finds virtio and ext4 by itself)
#   disk.qcow2     the root filesystem: ext4 straight on the disk (no partition table), made with
#                  `mkfs.ext4 -d ROOTFS` and converted to qcow2; boot with root=/dev/vda
#   cmdline        the kernel command line to boot it with
#   manifest.json  script_sha256, versions, package list, sizes and sha256 of every file
#
# A second run with the same script is a no-op (OUT_DIR/manifest.json names this script's
# sha256 and the files are all there). Downloaded packages are kept in
#   ${KUMO_CLOUD_GUEST_CACHE:-$HOME/.cache/kumo/cloud-guest}
# so a rebuild after a change to this script downloads nothing.
#
# Environment:
#   KUMO_CLOUD_GUEST_CACHE    package cache (see above)
#   KUMO_CLOUD_GUEST_MIRROR   Debian mirror; default: the first bookworm/main source in the
#                             machine's apt configuration, else http://deb.debian.org/debian
#
# Must run as root (debootstrap, chroot). Needs debootstrap, e2fsprogs and qemu-utils.
set -euo pipefail
# Files written into the rootfs get the usual modes whatever the caller's umask.
umask 022

PROG=${0##*/}
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
trap 'printf "%s: error: command failed (exit %s) at line %s: %s\n" "$PROG" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

[[ $# -eq 1 && -n $1 && $1 != -* ]] || {
    printf 'usage: %s OUT_DIR\n' "$PROG" >&2
    exit 2
}
OUTDIR=$1
SUITE=bookworm
CMDLINE="console=ttyS0 root=/dev/vda rw"
# What a Debian cloud image needs to boot and run cloud-init: an init, udev (device and NIC
# names), the kernel and its initramfs, cloud-init with what it recommends and what its
# fallback network config (DHCP on the first NIC, rendered for ifupdown) needs.
PACKAGES=(systemd-sysv udev linux-image-amd64 initramfs-tools zstd
    cloud-init cloud-guest-utils sudo ifupdown isc-dhcp-client iproute2 netbase e2fsprogs)

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and chroot need it)"
export PATH="$PATH:/usr/sbin:/sbin"

missing=() missing_pkgs=()
need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    missing+=("$1 (Debian package: $2)")
    [[ " ${missing_pkgs[*]} " == *" $2 "* ]] || missing_pkgs+=("$2")
}
need debootstrap debootstrap
need mkfs.ext4 e2fsprogs
need qemu-img qemu-utils
need chroot coreutils
need sha256sum coreutils
need flock util-linux
need findmnt util-linux
need umount mount
if ((${#missing[@]})); then
    printf '%s: error: missing host tools:\n' "$PROG" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    printf 'install them with: apt-get install %s\n' "${missing_pkgs[*]}" >&2
    exit 1
fi

SELF_SHA=$(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)
mkdir -p "$OUTDIR" || die "cannot create output directory $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
OUTPUTS=(vmlinuz initrd.img disk.qcow2 cmdline)

# One build per OUT_DIR at a time (parallel test binaries share it).
exec 9>"$OUTDIR/.lock"
flock 9

# ---------------------------------------------------------------- cache check
manifest_value() { # KEY -> the value of a top-level "KEY": "VALUE" line of the manifest
    sed -n "s/^  \"$1\": \"\\(.*\\)\",\{0,1\}\$/\\1/p" "$OUTDIR/manifest.json" | head -n1
}
up_to_date() {
    [[ -f $OUTDIR/manifest.json ]] || return 1
    [[ $(manifest_value script_sha256) == "$SELF_SHA" ]] || return 1
    local f size
    for f in "${OUTPUTS[@]}"; do
        [[ -f $OUTDIR/$f ]] || return 1
        # Sizes, not hashes: hashing the disk on every test run would cost more than it saves.
        size=$(sed -n "s/^    \"$f\": \([0-9]*\),\{0,1\}\$/\1/p" "$OUTDIR/manifest.json" | head -n1)
        [[ -n $size && $(stat -c %s "$OUTDIR/$f") == "$size" ]] || return 1
    done
}
if up_to_date; then
    log "up to date in $OUTDIR (manifest matches this script)"
    exit 0
fi

# ---------------------------------------------------------------- mirror
# The first deb source of the machine that carries bookworm/main, one-line or deb822 format.
find_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        awk -v suite="$SUITE" '
            { sub(/#.*/, ""); gsub(/\[[^]]*\]/, "") }
            $1 == "deb" && $3 == suite {
                for (i = 4; i <= NF; i++) if ($i == "main") { print $2; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        awk -v suite="$SUITE" '
            function has(list, word,   n, a, i) {
                n = split(list, a, /[ \t]+/)
                for (i = 1; i <= n; i++) if (a[i] == word) return 1
                return 0
            }
            BEGIN { RS = "" }
            {
                types = uris = suites = comps = ""; enabled = "yes"
                n = split($0, lines, "\n")
                for (i = 1; i <= n; i++) {
                    l = lines[i]
                    if (l ~ /^[ \t]*#/) continue
                    k = tolower(l); sub(/:.*/, "", k)
                    v = l; sub(/^[^:]*:[ \t]*/, "", v)
                    if (k == "types") types = v
                    else if (k == "uris") uris = v
                    else if (k == "suites") suites = v
                    else if (k == "components") comps = v
                    else if (k == "enabled") enabled = tolower(v)
                }
                if (enabled != "no" && has(types, "deb") && has(suites, suite) && has(comps, "main")) {
                    split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$f"
    done
}
MIRROR=${KUMO_CLOUD_GUEST_MIRROR:-}
if [[ -z $MIRROR ]]; then
    while read -r m; do
        # The chroot's apt uses it too, so only network mirrors (no file:, cdrom:, mirror+).
        [[ $m =~ ^https?:// ]] && { MIRROR=$m; break; }
    done < <(find_mirror)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}
log "mirror $MIRROR"

# ---------------------------------------------------------------- work area
CACHE=${KUMO_CLOUD_GUEST_CACHE:-${HOME:-/root}/.cache/kumo/cloud-guest}
mkdir -p "$CACHE/debs" || die "cannot create cache directory $CACHE"
CACHE=$(cd "$CACHE" && pwd)
# In OUT_DIR, so the finished files are renamed into place, never copied half-way.
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
ROOT=$WORK/root

unmount_root() {
    local m
    # Deepest first; a lazy unmount as the last resort so rm below never walks into /proc or /sys.
    while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(findmnt -rn -o TARGET | grep -F "$ROOT" | sort -r)
}
cleanup() {
    unmount_root
    if findmnt -rn -o TARGET | grep -qF "$ROOT"; then
        log "warning: mounts remain under $ROOT; leaving $WORK in place"
        return
    fi
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
# A signal ends the build through the EXIT trap too, so /proc never stays mounted in the rootfs.
trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------- debootstrap + apt
started=$(date +%s)
log "debootstrap $SUITE (minbase)"
if ! debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
    "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [[ -f $ROOT/debootstrap/debootstrap.log ]] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
    die "debootstrap of $SUITE from $MIRROR failed (is the mirror reachable?)"
fi
unmount_root

# apt, not debootstrap --include, installs the rest: debootstrap cannot resolve virtual packages
# (python3-cryptography needs python3-cffi-backend-api-*). The package cache is shared with
# debootstrap's (same file names), so a rebuild downloads nothing.
log "apt-get install ${PACKAGES[*]}"
# Nothing may start as a service inside the build chroot.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
mount -t proc proc "$ROOT/proc"
for f in "$CACHE"/debs/*.deb; do
    [[ -e $f ]] || continue
    t=$ROOT/var/cache/apt/archives/${f##*/}
    # debootstrap already placed the ones it used; apt re-checks every file's hash.
    [[ -e $t ]] || ln "$f" "$t" 2>/dev/null || cp "$f" "$t"
done
in_root() { chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"; }
if ! { in_root apt-get -q update && in_root apt-get -q -y install --no-install-recommends "${PACKAGES[@]}"; } \
    >"$WORK/apt.log" 2>&1; then
    tail -n 30 "$WORK/apt.log" >&2
    die "installing packages into the rootfs from $MIRROR failed"
fi
for f in "$ROOT"/var/cache/apt/archives/*.deb; do
    [[ -e $CACHE/debs/${f##*/} ]] || cp "$f" "$CACHE/debs/"
done
rm -f "$ROOT/usr/sbin/policy-rc.d"
unmount_root

# ---------------------------------------------------------------- what every image build does
kver=$(find "$ROOT/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)
[[ -n $kver && -f $ROOT/boot/vmlinuz-$kver ]] || die "no kernel installed in the rootfs"
if [[ ! -f $ROOT/boot/initrd.img-$kver ]]; then
    # The kernel's postinst defers to initramfs-tools' trigger; make sure it ran.
    mount -t proc proc "$ROOT/proc"
    chroot "$ROOT" update-initramfs -c -k "$kver" >&2
    umount "$ROOT/proc"
fi
[[ -f $ROOT/boot/initrd.img-$kver ]] || die "initramfs for $kver was not built"

cat >"$ROOT/etc/fstab" <<'EOF'
/dev/vda / ext4 rw,errors=remount-ro 0 1
EOF
# debootstrap copied the build machine's names; cloud-init sets the guest's own at first boot.
rm -f "$ROOT/etc/hostname" "$ROOT/etc/hosts"
echo localhost >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
rm -f "$ROOT/etc/resolv.conf"
# The system locale an installer would set: without one cloud-init asks for en_US.UTF-8, which
# Debian's locale-gen does not build on request (cc_locale then fails).
printf 'LANG=C.UTF-8\n' >"$ROOT/etc/default/locale"
# Empty, not absent: systemd then makes a fresh id on first boot, so no two VMs share one.
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
# cloud-init renders its network config for ifupdown only if ifupdown's own file is there and
# reads interfaces.d (where cloud-init writes 50-cloud-init); ifupdown's postinst makes it so.
grep -qs '^source.*interfaces\.d' "$ROOT/etc/network/interfaces" ||
    die "ifupdown left no /etc/network/interfaces sourcing interfaces.d"

# Keep it small: downloaded packages, apt lists, documentation and translations.
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/lib/apt/lists/*
find "$ROOT/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/*
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
rm -rf "$ROOT/debootstrap" "$ROOT"/var/log/*.log "$ROOT"/tmp/* "$ROOT"/var/tmp/*

cloud_init_version=$(chroot "$ROOT" dpkg-query -W -f '${Version}' cloud-init)
kernel_package_version=$(chroot "$ROOT" dpkg-query -W -f '${Version}' linux-image-amd64)
package_count=$(chroot "$ROOT" dpkg-query -W -f '${binary:Package}\n' | wc -l)

# ---------------------------------------------------------------- outputs
cp "$ROOT/boot/vmlinuz-$kver" "$WORK/vmlinuz"
cp "$ROOT/boot/initrd.img-$kver" "$WORK/initrd.img"
printf '%s\n' "$CMDLINE" >"$WORK/cmdline"

# Room for cloud-init's first boot (locales, logs); the VM's disk and filesystem grow anyway
# (kumo sizes the disk by instance type, cloud-init's resizefs grows ext4 to fill it).
used_mib=$(du -s --apparent-size -m "$ROOT" | cut -f1)
size_mib=$(((used_mib * 5 / 4 + 256 + 63) / 64 * 64))
log "rootfs ${used_mib} MiB; filesystem ${size_mib} MiB"
# Fixed UUID and hash seed: the same rootfs gives the same image.
mkfs.ext4 -q -F -L kumo-root -U 6b756d6f-636c-6f75-6467-756573743031 \
    -E hash_seed=6b756d6f-636c-6f75-6467-756573743032 \
    -d "$ROOT" "$WORK/disk.raw" "${size_mib}M" >&2
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
rm -f "$WORK/disk.raw"

sha() { sha256sum "$WORK/$1" | cut -d' ' -f1; }
sz() { stat -c %s "$WORK/$1"; }
{
    printf '{\n'
    printf '  "script_sha256": "%s",\n' "$SELF_SHA"
    printf '  "suite": "%s",\n' "$SUITE"
    printf '  "mirror": "%s",\n' "$MIRROR"
    printf '  "kernel_version": "%s",\n' "$kver"
    printf '  "kernel_package_version": "%s",\n' "$kernel_package_version"
    printf '  "cloud_init_version": "%s",\n' "$cloud_init_version"
    printf '  "packages_installed": %s,\n' "$package_count"
    printf '  "installed_on_minbase": "%s",\n' "${PACKAGES[*]}"
    printf '  "cmdline": "%s",\n' "$CMDLINE"
    printf '  "rootfs_mib": %s,\n' "$used_mib"
    printf '  "filesystem_mib": %s,\n' "$size_mib"
    printf '  "build_seconds": %s,\n' "$(($(date +%s) - started))"
    printf '  "size": {\n'
    for i in "${!OUTPUTS[@]}"; do
        sep=,; ((i == ${#OUTPUTS[@]} - 1)) && sep=
        printf '    "%s": %s%s\n' "${OUTPUTS[$i]}" "$(sz "${OUTPUTS[$i]}")" "$sep"
    done
    printf '  },\n'
    printf '  "sha256": {\n'
    for i in "${!OUTPUTS[@]}"; do
        sep=,; ((i == ${#OUTPUTS[@]} - 1)) && sep=
        printf '    "%s": "%s"%s\n' "${OUTPUTS[$i]}" "$(sha "${OUTPUTS[$i]}")" "$sep"
    done
    printf '  }\n'
    printf '}\n'
} >"$WORK/manifest.json"

# The old manifest goes first and the new one last: an interrupted install is never "up to date".
rm -f "$OUTDIR/manifest.json"
for f in "${OUTPUTS[@]}"; do
    mv -f "$WORK/$f" "$OUTDIR/$f"
done
mv -f "$WORK/manifest.json" "$OUTDIR/manifest.json"
log "built in $OUTDIR in $(($(date +%s) - started)) s: kernel $kver, cloud-init $cloud_init_version"
