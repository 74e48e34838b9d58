//! Magic-number checks for raw disks, kernels and ramdisks.

/// Bytes of a file's head needed by [`raw_disk_signature`] (btrfs's superblock is at 64 KiB).
pub const SNIFF_LEN: usize = 0x10040 + 8;

fn at(buf: &[u8], off: usize, magic: &[u8]) -> bool {
    buf.len() >= off + magic.len() && &buf[off..off + magic.len()] == magic
}

/// What makes `head` (the first [`SNIFF_LEN`] bytes of a raw file) look like a disk, if anything.
pub fn raw_disk_signature(head: &[u8]) -> Option<&'static str> {
    if at(head, 512, b"EFI PART") || at(head, 4096, b"EFI PART") {
        return Some("GPT partition table");
    }
    if at(head, 0, b"XFSB") {
        return Some("XFS filesystem");
    }
    if at(head, 1080, &[0x53, 0xef]) {
        return Some("ext2/3/4 filesystem");
    }
    if at(head, 0x10040, b"_BHRfS_M") {
        return Some("btrfs filesystem");
    }
    if at(head, 32769, b"CD001") {
        return Some("ISO 9660 filesystem");
    }
    if at(head, 512, b"LABELONE") || at(head, 24, b"LABELONE") {
        return Some("LVM physical volume");
    }
    if at(head, 510, &[0x55, 0xaa]) {
        // MBR partition table, or a FAT/NTFS boot sector (which carry the same signature).
        if at(head, 54, b"FAT") || at(head, 82, b"FAT32") {
            return Some("FAT filesystem");
        }
        return Some("MBR boot signature");
    }
    None
}

/// "bzImage" or "ELF" when `head` is the start of a kernel we can boot.
pub fn kernel_kind(head: &[u8]) -> Option<&'static str> {
    if at(head, 0x202, b"HdrS") {
        return Some("bzImage");
    }
    if at(head, 0, b"\x7fELF") {
        return Some("ELF");
    }
    None
}

/// The compression (or "cpio") of an initramfs, from its first bytes.
pub fn ramdisk_kind(head: &[u8]) -> Option<&'static str> {
    const MAGICS: &[(&[u8], &str)] = &[
        (&[0x1f, 0x8b], "gzip"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
        (&[0x04, 0x22, 0x4d, 0x18], "lz4"),
        (b"BZh", "bzip2"),
        (&[0x89, b'L', b'Z', b'O', 0x00], "lzo"),
        (b"070701", "cpio"),
        (b"070702", "cpio"),
    ];
    MAGICS
        .iter()
        .find(|(m, _)| at(head, 0, m))
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_signatures() {
        let mut b = vec![0u8; SNIFF_LEN];
        assert_eq!(raw_disk_signature(&b), None);
        b[510] = 0x55;
        b[511] = 0xaa;
        assert_eq!(raw_disk_signature(&b), Some("MBR boot signature"));
        let mut e = vec![0u8; 4096];
        e[1080] = 0x53;
        e[1081] = 0xef;
        assert_eq!(raw_disk_signature(&e), Some("ext2/3/4 filesystem"));
        let mut iso = vec![0u8; 40000];
        iso[32769..32774].copy_from_slice(b"CD001");
        assert_eq!(raw_disk_signature(&iso), Some("ISO 9660 filesystem"));
        assert_eq!(raw_disk_signature(b"XFSB...."), Some("XFS filesystem"));
        assert_eq!(raw_disk_signature(b"hello world"), None);
    }

    #[test]
    fn kernels_and_ramdisks() {
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(kernel_kind(&bz), Some("bzImage"));
        assert_eq!(kernel_kind(b"\x7fELF\x02\x01"), Some("ELF"));
        assert_eq!(kernel_kind(b"#!/bin/sh"), None);
        assert_eq!(ramdisk_kind(&[0x1f, 0x8b, 8, 0]), Some("gzip"));
        assert_eq!(ramdisk_kind(b"\xfd7zXZ\x00\x00"), Some("xz"));
        assert_eq!(ramdisk_kind(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Some("zstd"));
        assert_eq!(ramdisk_kind(b"07070100000001"), Some("cpio"));
        assert_eq!(ramdisk_kind(&[0x02, 0x21, 0x4c, 0x18]), Some("lz4"));
        assert_eq!(ramdisk_kind(b"hello"), None);
        assert_eq!(ramdisk_kind(&[]), None);
    }
}
