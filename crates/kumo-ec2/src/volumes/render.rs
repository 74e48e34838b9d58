//! The XML of volumes, attachments, modifications and snapshots as botocore's `Volume`,
//! `VolumeAttachment`, `VolumeModification` and `Snapshot` shapes read them, and their
//! values for Describe filters.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use kumo_store::{SnapshotRow, VolumeRow, GIB};

use crate::filter::tag_values;
use crate::render::tag_set;
use crate::xml::{ts, Xml};

/// The type kumo shows for every volume: it has one kind, and gp2 is EC2's default.
pub const VOLUME_TYPE: &str = "gp2";
/// EC2's volume id of a snapshot whose source is no volume (here: an instance's root disk).
pub const NO_VOLUME: &str = "vol-ffffffff";

pub const VOLUME_FILTERS: &[&str] = &[
    "volume-id",
    "status",
    "size",
    "snapshot-id",
    "availability-zone",
    "create-time",
    "volume-type",
    "encrypted",
    "multi-attach-enabled",
    "attachment.instance-id",
    "attachment.status",
    "attachment.device",
    "attachment.delete-on-termination",
];

pub const SNAPSHOT_FILTERS: &[&str] = &[
    "snapshot-id",
    "volume-id",
    "status",
    "owner-id",
    "description",
    "progress",
    "start-time",
    "volume-size",
    "encrypted",
    "storage-tier",
];

/// Whole GiB, rounded up (volumes made natively may have any multiple of 512 bytes).
pub fn gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

/// The device name shown for the `n`th volume (from 0) attached to an instance: /dev/sdf,
/// /dev/sdg, … /dev/sdz, then /dev/sdaa, /dev/sdab, … The guest does not see this name: it
/// finds a volume by its serial, `/dev/disk/by-id/virtio-<volume id>` (the first 20
/// characters of the id: virtio truncates serials).
pub fn device_name(n: usize) -> String {
    const FIRST: u8 = b'f';
    let span = usize::from(b'z' - FIRST) + 1;
    let letter = |i: usize| char::from(b'a' + (i % 26) as u8);
    if n < span {
        format!("/dev/sd{}", char::from(FIRST + n as u8))
    } else {
        let m = n - span;
        format!("/dev/sd{}{}", letter(m / 26), letter(m))
    }
}

/// Volume id → device name, for `rows` in the store's order (creation, then id): each
/// instance's volumes take the names in that order.
pub fn devices<'a>(rows: impl IntoIterator<Item = &'a VolumeRow>) -> HashMap<String, String> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut out = HashMap::new();
    for v in rows {
        if let Some(i) = v.instance_id.as_deref() {
            let n = count.entry(i).or_insert(0);
            out.insert(v.id.clone(), device_name(*n));
            *n += 1;
        }
    }
    out
}

/// Availability zones (kumo sites) of storage: a local pool's disk is in its host's site; a
/// shared pool's in the site of its first host.
pub struct Zones {
    hosts: Vec<(String, String, String)>,
    region: String,
}

impl Zones {
    /// From the hosts' (id, site, pool name).
    pub fn new(hosts: impl IntoIterator<Item = (String, String, String)>, region: &str) -> Zones {
        let mut hosts: Vec<(String, String, String)> = hosts.into_iter().collect();
        hosts.sort();
        Zones {
            hosts,
            region: region.to_string(),
        }
    }

    pub fn zone(&self, pool: &str, host_id: Option<&str>) -> String {
        let found = match host_id {
            Some(h) => self.hosts.iter().find(|(id, _, _)| id == h),
            None => self.hosts.iter().find(|(_, _, p)| p == pool),
        };
        // A pool whose hosts are all gone still needs some zone: the region's name.
        found
            .map(|(_, site, _)| site.clone())
            .unwrap_or_else(|| self.region.clone())
    }
}

/// What rendering volumes needs besides their rows.
pub struct VolumeLookups {
    pub zones: Zones,
    pub devices: HashMap<String, String>,
    pub tags: HashMap<String, Vec<(String, String)>>,
}

impl VolumeLookups {
    pub fn zone(&self, v: &VolumeRow) -> String {
        self.zones.zone(&v.pool, v.host_id.as_deref())
    }
    pub fn device(&self, v: &VolumeRow) -> &str {
        self.devices.get(&v.id).map(String::as_str).unwrap_or("")
    }
    pub fn tags_of(&self, id: &str) -> &[(String, String)] {
        self.tags.get(id).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// A `VolumeAttachment`'s members. kumo keeps no attach time: `attach_time` is given only
/// when the attachment is being made now (AttachVolume's answer).
pub fn attachment(x: &mut Xml, v: &VolumeRow, device: &str, attach_time: Option<DateTime<Utc>>) {
    x.leaf("volumeId", &v.id);
    x.opt("instanceId", v.instance_id.as_deref());
    x.leaf("device", device);
    x.leaf("status", v.attach_state.as_deref().unwrap_or("detached"));
    if let Some(t) = attach_time {
        x.leaf("attachTime", &ts(t));
    }
    x.bool("deleteOnTermination", false);
}

/// A `Volume`'s members.
pub fn volume(x: &mut Xml, v: &VolumeRow, l: &VolumeLookups) {
    x.leaf("volumeId", &v.id);
    x.num("size", gib(v.size_bytes));
    x.leaf("snapshotId", v.snapshot_id.as_deref().unwrap_or(""));
    x.leaf("availabilityZone", &l.zone(v));
    x.leaf("status", &v.state);
    x.leaf("createTime", &ts(v.created_at));
    let attached: Vec<&VolumeRow> = v.instance_id.iter().map(|_| v).collect();
    x.set("attachmentSet", &attached, |x, v| {
        attachment(x, v, l.device(v), None)
    });
    tag_set(x, l.tags_of(&v.id));
    x.leaf("volumeType", VOLUME_TYPE);
    x.bool("encrypted", false);
    x.bool("multiAttachEnabled", false);
    x.bool("fastRestored", false);
    x.leaf("ownerId", &v.project_id);
}

pub fn volume_values(v: &VolumeRow, l: &VolumeLookups, name: &str) -> Vec<String> {
    if let Some(t) = tag_values(name, l.tags_of(&v.id)) {
        return t;
    }
    let one = |s: &str| vec![s.to_string()];
    let attached = v.instance_id.is_some();
    match name {
        "volume-id" => one(&v.id),
        "status" => one(&v.state),
        "size" => one(&gib(v.size_bytes).to_string()),
        "snapshot-id" => v.snapshot_id.iter().cloned().collect(),
        "availability-zone" => one(&l.zone(v)),
        "create-time" => one(&ts(v.created_at)),
        "volume-type" => one(VOLUME_TYPE),
        "encrypted" | "multi-attach-enabled" => one("false"),
        "attachment.instance-id" => v.instance_id.iter().cloned().collect(),
        "attachment.status" => v.attach_state.iter().cloned().collect(),
        "attachment.device" if attached => one(l.device(v)),
        "attachment.delete-on-termination" if attached => one("false"),
        _ => vec![],
    }
}

/// A ModifyVolume's `VolumeModification`: kumo grows at once, so it is completed.
pub fn modification(x: &mut Xml, id: &str, from_gib: u64, to_gib: u64, at: DateTime<Utc>) {
    x.leaf("volumeId", id);
    x.leaf("modificationState", "completed");
    x.num("targetSize", to_gib);
    x.leaf("targetVolumeType", VOLUME_TYPE);
    x.bool("targetMultiAttachEnabled", false);
    x.num("originalSize", from_gib);
    x.leaf("originalVolumeType", VOLUME_TYPE);
    x.bool("originalMultiAttachEnabled", false);
    x.num("progress", 100);
    x.leaf("startTime", &ts(at));
    x.leaf("endTime", &ts(at));
}

/// The volume a snapshot is of, as EC2 names it.
pub fn snapshot_volume(s: &SnapshotRow) -> &str {
    if s.source_kind == "volume" {
        &s.source_id
    } else {
        NO_VOLUME
    }
}

fn progress(s: &SnapshotRow) -> &'static str {
    // kumo answers CreateSnapshot when the snapshot is made: pending is momentary.
    if s.state == "pending" {
        "0%"
    } else {
        "100%"
    }
}

/// The description shown: the user's, else what the snapshot is of (EC2 shows "" when none
/// was given; kumo's root-disk snapshots say whose root disk it is).
fn description(s: &SnapshotRow) -> String {
    match (&s.description, s.source_kind.as_str()) {
        (Some(d), _) => d.clone(),
        (None, "instance") => format!("root disk of {}", s.source_id),
        (None, _) => String::new(),
    }
}

/// A `Snapshot`'s members.
pub fn snapshot(x: &mut Xml, s: &SnapshotRow, tags: &[(String, String)]) {
    x.leaf("snapshotId", &s.id);
    x.leaf("volumeId", snapshot_volume(s));
    x.leaf("status", &s.state);
    if s.state == "error" {
        x.opt("statusMessage", s.last_error.as_deref());
    }
    x.leaf("startTime", &ts(s.created_at));
    x.leaf("progress", progress(s));
    x.leaf("ownerId", &s.project_id);
    x.num("volumeSize", gib(s.size_bytes));
    x.leaf("description", &description(s));
    x.bool("encrypted", false);
    x.leaf("storageTier", "standard");
    tag_set(x, tags);
}

pub fn snapshot_values(s: &SnapshotRow, tags: &[(String, String)], name: &str) -> Vec<String> {
    if let Some(t) = tag_values(name, tags) {
        return t;
    }
    let one = |s: &str| vec![s.to_string()];
    match name {
        "snapshot-id" => one(&s.id),
        "volume-id" => one(snapshot_volume(s)),
        "status" => one(&s.state),
        "owner-id" => one(&s.project_id),
        "description" => one(&description(s)),
        "progress" => one(progress(s)),
        "start-time" => one(&ts(s.created_at)),
        "volume-size" => one(&gib(s.size_bytes).to_string()),
        "encrypted" => one("false"),
        "storage-tier" => one("standard"),
        _ => vec![],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    pub(crate) fn vol(id: &str, instance: Option<&str>) -> VolumeRow {
        VolumeRow {
            id: id.into(),
            project_id: "proj-1".into(),
            name: None,
            size_bytes: GIB,
            pool: "local".into(),
            host_id: Some("host-1".into()),
            state: if instance.is_some() {
                "in-use"
            } else {
                "available"
            }
            .into(),
            instance_id: instance.map(str::to_string),
            attach_state: instance.map(|_| "attached".to_string()),
            snapshot_id: None,
            last_error: None,
            created_at: t0(),
        }
    }

    fn host(id: &str, site: &str, pool: &str) -> (String, String, String) {
        (id.into(), site.into(), pool.into())
    }

    fn lookups(rows: &[VolumeRow]) -> VolumeLookups {
        VolumeLookups {
            zones: Zones::new(
                [
                    host("host-2", "site2", "shared"),
                    host("host-1", "site1", "local"),
                ],
                "kumo",
            ),
            devices: devices(rows),
            tags: HashMap::new(),
        }
    }

    #[test]
    fn sizes_round_up_to_whole_gib() {
        assert_eq!(gib(GIB), 1);
        assert_eq!(gib(GIB + 512), 2);
        assert_eq!(gib(512), 1);
        assert_eq!(gib(16 * GIB), 16);
    }

    #[test]
    fn devices_follow_each_instance_s_volumes() {
        assert_eq!(device_name(0), "/dev/sdf");
        assert_eq!(device_name(1), "/dev/sdg");
        assert_eq!(device_name(20), "/dev/sdz");
        assert_eq!(device_name(21), "/dev/sdaa");
        assert_eq!(device_name(22), "/dev/sdab");
        assert_eq!(device_name(21 + 26), "/dev/sdba");
        let rows = [
            vol("vol-a", Some("i-1")),
            vol("vol-b", None),
            vol("vol-c", Some("i-2")),
            vol("vol-d", Some("i-1")),
        ];
        let d = devices(&rows);
        assert_eq!(d.get("vol-a").map(String::as_str), Some("/dev/sdf"));
        assert_eq!(d.get("vol-c").map(String::as_str), Some("/dev/sdf"));
        assert_eq!(d.get("vol-d").map(String::as_str), Some("/dev/sdg"));
        assert!(!d.contains_key("vol-b"));
    }

    #[test]
    fn zones_come_from_the_host_or_the_pool() {
        let z = Zones::new(
            [
                host("host-2", "site2", "shared"),
                host("host-3", "site3", "shared"),
                host("host-1", "site1", "local"),
            ],
            "kumo",
        );
        assert_eq!(z.zone("local", Some("host-1")), "site1");
        assert_eq!(z.zone("shared", None), "site2");
        assert_eq!(z.zone("gone", None), "kumo");
        assert_eq!(z.zone("local", Some("host-9")), "kumo");
    }

    #[test]
    fn volume_xml_is_botocore_s_volume() {
        let free = vol("vol-0123456789abcdef0", None);
        let l = lookups(std::slice::from_ref(&free));
        let mut x = Xml::new();
        x.elem("item", |x| volume(x, &free, &l));
        assert_eq!(
            x.finish(),
            concat!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><item>",
                "<volumeId>vol-0123456789abcdef0</volumeId><size>1</size><snapshotId/>",
                "<availabilityZone>site1</availabilityZone><status>available</status>",
                "<createTime>2024-01-01T00:00:00.000Z</createTime><attachmentSet/><tagSet/>",
                "<volumeType>gp2</volumeType><encrypted>false</encrypted>",
                "<multiAttachEnabled>false</multiAttachEnabled><fastRestored>false</fastRestored>",
                "<ownerId>proj-1</ownerId></item>"
            )
        );
        let mut used = vol("vol-0123456789abcdef1", Some("i-0123456789abcdef0"));
        used.snapshot_id = Some("snap-0123456789abcdef0".into());
        let l = lookups(std::slice::from_ref(&used));
        let mut x = Xml::new();
        x.elem("item", |x| volume(x, &used, &l));
        let xml = x.finish();
        assert!(
            xml.contains("<snapshotId>snap-0123456789abcdef0</snapshotId>"),
            "{xml}"
        );
        assert!(
            xml.contains(concat!(
                "<attachmentSet><item><volumeId>vol-0123456789abcdef1</volumeId>",
                "<instanceId>i-0123456789abcdef0</instanceId><device>/dev/sdf</device>",
                "<status>attached</status><deleteOnTermination>false</deleteOnTermination>",
                "</item></attachmentSet>"
            )),
            "{xml}"
        );
        assert_eq!(
            volume_values(&used, &l, "attachment.device"),
            vec!["/dev/sdf"]
        );
        assert_eq!(volume_values(&used, &l, "size"), vec!["1"]);
        assert_eq!(
            volume_values(&used, &l, "attachment.instance-id"),
            vec!["i-0123456789abcdef0"]
        );
        assert!(volume_values(&free, &l, "attachment.device").is_empty());
        assert!(volume_values(&free, &l, "snapshot-id").is_empty());
        assert!(volume_values(&free, &l, "tag:Name").is_empty());
    }

    #[test]
    fn attachment_and_modification_xml() {
        let mut v = vol("vol-0123456789abcdef0", Some("i-0123456789abcdef0"));
        v.attach_state = Some("attaching".into());
        let mut x = Xml::new();
        x.response("AttachVolume", "req-1", |x| {
            attachment(x, &v, "/dev/sdf", Some(t0()))
        });
        let xml = x.finish();
        assert!(
            xml.contains(concat!(
                "<requestId>req-1</requestId><volumeId>vol-0123456789abcdef0</volumeId>",
                "<instanceId>i-0123456789abcdef0</instanceId><device>/dev/sdf</device>",
                "<status>attaching</status><attachTime>2024-01-01T00:00:00.000Z</attachTime>",
                "<deleteOnTermination>false</deleteOnTermination></AttachVolumeResponse>"
            )),
            "{xml}"
        );
        let mut x = Xml::new();
        x.elem("volumeModification", |x| {
            modification(x, "vol-0123456789abcdef0", 1, 2, t0())
        });
        let xml = x.finish();
        assert!(
            xml.contains(
                "<modificationState>completed</modificationState><targetSize>2</targetSize>"
            ),
            "{xml}"
        );
        assert!(xml.contains("<originalSize>1</originalSize>"), "{xml}");
    }

    #[test]
    fn snapshot_xml_is_botocore_s_snapshot() {
        let mut s = SnapshotRow {
            id: "snap-0123456789abcdef0".into(),
            project_id: "proj-1".into(),
            description: Some("nightly".into()),
            source_kind: "volume".into(),
            source_id: "vol-0123456789abcdef0".into(),
            size_bytes: GIB,
            pool: "local".into(),
            host_id: Some("host-1".into()),
            state: "completed".into(),
            io_pause_ms: None,
            image_id: None,
            last_error: None,
            created_at: t0(),
        };
        let mut x = Xml::new();
        x.elem("item", |x| snapshot(x, &s, &[]));
        assert_eq!(
            x.finish(),
            concat!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><item>",
                "<snapshotId>snap-0123456789abcdef0</snapshotId>",
                "<volumeId>vol-0123456789abcdef0</volumeId><status>completed</status>",
                "<startTime>2024-01-01T00:00:00.000Z</startTime><progress>100%</progress>",
                "<ownerId>proj-1</ownerId><volumeSize>1</volumeSize>",
                "<description>nightly</description><encrypted>false</encrypted>",
                "<storageTier>standard</storageTier><tagSet/></item>"
            )
        );
        assert_eq!(snapshot_values(&s, &[], "volume-size"), vec!["1"]);
        s.source_kind = "instance".into();
        s.source_id = "i-0123456789abcdef0".into();
        s.description = None;
        s.state = "error".into();
        s.last_error = Some("disk full".into());
        let mut x = Xml::new();
        x.elem("item", |x| snapshot(x, &s, &[]));
        let xml = x.finish();
        assert!(xml.contains("<volumeId>vol-ffffffff</volumeId><status>error</status><statusMessage>disk full</statusMessage>"), "{xml}");
        assert!(
            xml.contains("<description>root disk of i-0123456789abcdef0</description>"),
            "{xml}"
        );
        assert_eq!(snapshot_values(&s, &[], "volume-id"), vec![NO_VOLUME]);
    }
}
