//! The QEMU command line of a VM.

use super::*;

/// Escape a value for QEMU's `key=value,...` option syntax.
pub(super) fn opt(s: &str) -> String {
    s.replace(',', ",,")
}

pub(super) fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The QEMU command line (without the binary) for `spec`, with all sockets and logs in
/// `run_dir`. Pure: touches nothing.
pub fn qemu_args(spec: &VmSpec, accel: Accel, run_dir: &Path) -> Vec<String> {
    let f = |name: &str| path_str(&run_dir.join(name));
    let mut a: Vec<String> = Vec::with_capacity(64);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("kumo-{}", spec.id)]);
    push(&["-machine", MACHINE]);
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    if let Some(uuid) = &spec.uuid {
        push(&["-uuid", uuid]);
    }
    if let Some(serial) = &spec.smbios_serial {
        push(&["-smbios", &format!("type=1,serial={}", opt(serial))]);
    }
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // A VGA device so the VNC console shows something (costs nothing measurable at boot).
    push(&["-vga", "std"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            opt(&f(SERIAL_SOCK)),
            opt(&f(CONSOLE_LOG))
        ),
        "-serial",
        "chardev:serial0",
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt(&f(QMP_SOCK))
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp-aux,path={},server=on,wait=off",
            opt(&f(QMP_AUX_SOCK))
        ),
        "-mon",
        "chardev=qmp-aux,mode=control",
    ]);
    push(&["-vnc", &format!("unix:{}", f(VNC_SOCK))]);
    push(&["-pidfile", &f(PID_FILE)]);
    push(&[
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng0,id=rng0dev",
    ]);
    for (i, d) in spec.disks.iter().enumerate() {
        let node = crate::block::node_name(i, d);
        let blockdev = json!({
            "driver": d.format,
            "node-name": node,
            "read-only": d.read_only,
            "discard": "unmap",
            "file": {
                "driver": "file",
                "node-name": format!("{node}-file"),
                "filename": path_str(&d.path),
                "read-only": d.read_only,
                "discard": "unmap",
            }
        });
        push(&["-blockdev", &blockdev.to_string()]);
        let mut dev = format!(
            "virtio-blk-pci,id={},drive={node}",
            crate::block::device_id(i, d)
        );
        if let Some(serial) = &d.serial {
            dev.push_str(&format!(",serial={}", opt(serial)));
        }
        if i == 0 {
            dev.push_str(",bootindex=1");
        }
        push(&["-device", &dev]);
    }
    for (i, n) in spec.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!(
                "tap,id=net{i},ifname={},script=no,downscript=no",
                opt(&n.tap)
            ),
            "-device",
            &format!("virtio-net-pci,id=nic{i},netdev=net{i},mac={}", opt(&n.mac)),
        ]);
    }
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &path_str(k)]);
    }
    if let Some(i) = &spec.initrd {
        push(&["-initrd", &path_str(i)]);
    }
    if let Some(c) = &spec.cmdline {
        push(&["-append", c]);
    }
    a
}
