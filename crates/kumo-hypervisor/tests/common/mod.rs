//! Helpers the QEMU test binaries share.

/// Every live process whose command line has `-name kumo-<id>`.
pub fn qemu_pids(id: &str) -> Vec<u32> {
    let want = format!("kumo-{id}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rfind(')')
            .map(|i| stat[i + 1..].trim_start().starts_with('Z'))
            .unwrap_or(true);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if !zombie
            && args
                .windows(2)
                .any(|w| w[0] == b"-name" && w[1] == want.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}
