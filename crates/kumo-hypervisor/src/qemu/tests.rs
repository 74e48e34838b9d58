use super::*;
use crate::NicSpec;

fn spec() -> VmSpec {
    VmSpec {
        id: "i-0123456789abcdef0".into(),
        vcpus: 2,
        memory_mib: 512,
        disks: vec![
            DiskSpec {
                path: "/var/lib/kumo/disks/root.qcow2".into(),
                format: "qcow2".into(),
                serial: Some("vol-root".into()),
                read_only: false,
                device_id: None,
            },
            DiskSpec {
                path: "/srv/seed.img".into(),
                format: "raw".into(),
                serial: None,
                read_only: true,
                device_id: None,
            },
        ],
        nics: vec![NicSpec {
            mac: "52:54:00:aa:bb:cc".into(),
            tap: "tap-i0123".into(),
        }],
        kernel: Some("/boot/vmlinux".into()),
        initrd: Some("/boot/initrd.img".into()),
        cmdline: Some("console=ttyS0 root=/dev/vda".into()),
        netns: None,
        smbios_serial: None,
        uuid: None,
    }
}

/// The value following `flag`, for every occurrence.
fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

#[test]
fn args_full_spec() {
    let run = Path::new("/run/kumo/vms/i-0123456789abcdef0");
    let a = qemu_args(&spec(), Accel::Tcg, run);
    assert_eq!(values(&a, "-name"), ["kumo-i-0123456789abcdef0"]);
    assert_eq!(values(&a, "-machine"), ["pc"]);
    assert_eq!(values(&a, "-accel"), ["tcg"]);
    assert_eq!(values(&a, "-cpu"), ["max"]);
    assert_eq!(values(&a, "-smp"), ["2"]);
    assert_eq!(values(&a, "-m"), ["512M"]);
    for flag in ["-nodefaults", "-no-user-config"] {
        assert!(a.iter().any(|x| x == flag), "{flag} missing");
    }
    assert_eq!(values(&a, "-display"), ["none"]);
    assert_eq!(
        values(&a, "-chardev"),
        [
            "socket,id=serial0,path=/run/kumo/vms/i-0123456789abcdef0/serial.sock,server=on,wait=off,logfile=/run/kumo/vms/i-0123456789abcdef0/console.log,logappend=on",
            "socket,id=qmp,path=/run/kumo/vms/i-0123456789abcdef0/qmp.sock,server=on,wait=off",
            "socket,id=qmp-aux,path=/run/kumo/vms/i-0123456789abcdef0/qmp-aux.sock,server=on,wait=off",
        ]
    );
    assert_eq!(values(&a, "-serial"), ["chardev:serial0"]);
    assert_eq!(
        values(&a, "-mon"),
        ["chardev=qmp,mode=control", "chardev=qmp-aux,mode=control"]
    );
    assert_eq!(
        values(&a, "-vnc"),
        ["unix:/run/kumo/vms/i-0123456789abcdef0/vnc.sock"]
    );
    assert_eq!(
        values(&a, "-pidfile"),
        ["/run/kumo/vms/i-0123456789abcdef0/qemu.pid"]
    );
    let blockdevs: Vec<Value> = values(&a, "-blockdev")
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
    assert_eq!(blockdevs.len(), 2);
    assert_eq!(blockdevs[0]["driver"], "qcow2");
    assert_eq!(blockdevs[0]["node-name"], "disk0");
    assert_eq!(blockdevs[0]["read-only"], false);
    assert_eq!(
        blockdevs[0]["file"]["filename"],
        "/var/lib/kumo/disks/root.qcow2"
    );
    assert_eq!(blockdevs[1]["driver"], "raw");
    assert_eq!(blockdevs[1]["read-only"], true);
    assert_eq!(blockdevs[1]["file"]["read-only"], true);
    let devices = values(&a, "-device");
    assert!(
        devices.contains(&"virtio-blk-pci,id=virtio-disk0,drive=disk0,serial=vol-root,bootindex=1")
    );
    assert!(devices.contains(&"virtio-blk-pci,id=virtio-disk1,drive=disk1"));
    assert!(devices.contains(&"virtio-net-pci,id=nic0,netdev=net0,mac=52:54:00:aa:bb:cc"));
    assert_eq!(
        values(&a, "-netdev"),
        ["tap,id=net0,ifname=tap-i0123,script=no,downscript=no"]
    );
    assert_eq!(values(&a, "-kernel"), ["/boot/vmlinux"]);
    assert_eq!(values(&a, "-initrd"), ["/boot/initrd.img"]);
    assert_eq!(values(&a, "-append"), ["console=ttyS0 root=/dev/vda"]);
}

#[test]
fn args_device_ids() {
    let mut s = spec();
    s.disks[1].device_id = Some("vol-0123456789abcdef0".into());
    s.disks[1].serial = Some("vol-0123456789abcdef0".into());
    let a = qemu_args(&s, Accel::Tcg, Path::new("/r/x"));
    let nodes: Vec<Value> = values(&a, "-blockdev")
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
    assert_eq!(nodes[0]["node-name"], "disk0");
    assert_eq!(nodes[1]["node-name"], "vol-0123456789abcdef0");
    assert_eq!(nodes[1]["file"]["node-name"], "vol-0123456789abcdef0-file");
    let devices = values(&a, "-device");
    assert!(
        devices.contains(&"virtio-blk-pci,id=virtio-disk0,drive=disk0,serial=vol-root,bootindex=1")
    );
    assert!(devices.contains(
        &"virtio-blk-pci,id=vol-0123456789abcdef0,drive=vol-0123456789abcdef0,serial=vol-0123456789abcdef0"
    ));
    // A device id clashing with another disk's default one is refused before QEMU runs.
    s.disks[1].device_id = Some("virtio-disk0".into());
    assert!(validate_spec(&s).is_err());
}

#[test]
fn args_kvm_and_minimal() {
    let mut s = spec();
    s.disks.clear();
    s.nics.clear();
    s.kernel = None;
    s.initrd = None;
    s.cmdline = None;
    let a = qemu_args(&s, Accel::Kvm, Path::new("/r/x"));
    assert_eq!(values(&a, "-accel"), ["kvm"]);
    assert_eq!(values(&a, "-cpu"), ["host"]);
    for flag in ["-blockdev", "-netdev", "-kernel", "-initrd", "-append"] {
        assert!(!a.iter().any(|x| x == flag), "{flag} present");
    }
    // netns does not change QEMU's own arguments (it wraps the command instead).
    s.netns = Some("host1".into());
    assert_eq!(qemu_args(&s, Accel::Kvm, Path::new("/r/x")), a);
}

#[test]
fn args_escape_commas() {
    let mut s = spec();
    s.disks.truncate(1);
    s.disks[0].path = "/odd,dir/root.qcow2".into();
    let a = qemu_args(&s, Accel::Tcg, Path::new("/r,un/x"));
    // JSON blockdev needs no escaping.
    let bd: Value = serde_json::from_str(values(&a, "-blockdev")[0]).unwrap();
    assert_eq!(bd["file"]["filename"], "/odd,dir/root.qcow2");
    assert!(values(&a, "-chardev")[1].contains("path=/r,,un/x/qmp.sock"));
}

#[test]
fn power_mapping() {
    assert_eq!(status_to_power("running"), PowerState::Running);
    assert_eq!(status_to_power("paused"), PowerState::Paused);
    assert_eq!(status_to_power("inmigrate"), PowerState::Paused);
    assert_eq!(status_to_power("shutdown"), PowerState::Stopped);
}

#[test]
fn own_process_is_not_a_vm() {
    assert!(!proc_is_ours(std::process::id(), "i-x"));
    assert!(!proc_is_ours(u32::MAX - 1, "i-x"));
}
