//! The XML of instances and reservations, shaped as botocore's model reads them.

use std::collections::HashMap;

use kumo_store::{ImageRow, InstanceRow};
use sha2::{Digest, Sha256};

use crate::xml::{ts, Xml};

pub const ROOT_DEVICE: &str = "/dev/vda";

/// What rendering instances needs besides their rows.
#[derive(Default)]
pub struct Lookups {
    /// host id → site (availability zone).
    pub sites: HashMap<String, String>,
    /// placement group id → name.
    pub groups: HashMap<String, String>,
    /// security group id → name.
    pub security_groups: HashMap<String, String>,
    /// image id → image (for kernel and ramdisk ids).
    pub images: HashMap<String, ImageRow>,
    /// resource id → tags.
    pub tags: HashMap<String, Vec<(String, String)>>,
}

impl Lookups {
    pub fn zone(&self, i: &InstanceRow) -> String {
        i.host_id
            .as_ref()
            .and_then(|h| self.sites.get(h))
            .cloned()
            .unwrap_or_default()
    }
    pub fn tags_of(&self, id: &str) -> &[(String, String)] {
        self.tags.get(id).map(Vec::as_slice).unwrap_or(&[])
    }
    pub fn kernel(&self, i: &InstanceRow) -> Option<String> {
        self.images
            .get(&i.image_id)
            .and_then(|m| m.kernel_id.clone())
    }
    pub fn ramdisk(&self, i: &InstanceRow) -> Option<String> {
        self.images
            .get(&i.image_id)
            .and_then(|m| m.ramdisk_id.clone())
    }
}

/// An id of `prefix` derived stably from another id (17 hex digits, like EC2's).
pub fn derived_id(prefix: &str, from: &str) -> String {
    let h = hex::encode(Sha256::digest(from.as_bytes()));
    format!("{prefix}-{}", &h[..17])
}

pub fn reservation_id(i: &InstanceRow) -> String {
    i.reservation_id
        .clone()
        .unwrap_or_else(|| derived_id("r", &i.id))
}

pub fn private_dns(i: &InstanceRow, region: &str) -> String {
    format!(
        "ip-{}.{region}.compute.internal",
        i.private_ip.replace('.', "-")
    )
}

pub fn state(x: &mut Xml, name: &str, s: kumo_types::InstanceState) {
    x.elem(name, |x| {
        x.num("code", s.code());
        x.leaf("name", s.as_str());
    });
}

pub fn tag_set(x: &mut Xml, tags: &[(String, String)]) {
    x.set("tagSet", tags, |x, (k, v)| {
        x.leaf("key", k);
        x.leaf("value", v);
    });
}

/// The instance's security groups: `groupSet` items with `groupId` and `groupName`.
pub fn group_set(x: &mut Xml, i: &InstanceRow, l: &Lookups) {
    x.set("groupSet", &i.security_group_ids, |x, g| {
        x.leaf("groupId", g);
        x.opt("groupName", l.security_groups.get(g).map(String::as_str));
    });
}

pub fn instance(x: &mut Xml, i: &InstanceRow, l: &Lookups, region: &str) {
    let dns = private_dns(i, region);
    x.leaf("instanceId", &i.id);
    x.leaf("imageId", &i.image_id);
    state(x, "instanceState", i.state);
    x.leaf("privateDnsName", &dns);
    x.empty("dnsName");
    x.leaf("reason", i.last_error.as_deref().unwrap_or(""));
    x.opt("keyName", i.key_name.as_deref());
    x.num("amiLaunchIndex", i.launch_index);
    x.empty("productCodes");
    x.leaf("instanceType", &i.instance_type);
    x.leaf("launchTime", &ts(i.created_at));
    x.elem("placement", |x| {
        x.leaf("availabilityZone", &l.zone(i));
        match i.placement_group_id.as_ref().and_then(|g| l.groups.get(g)) {
            Some(g) => x.leaf("groupName", g),
            None => x.empty("groupName"),
        }
        x.leaf("tenancy", "default");
    });
    x.opt("kernelId", l.kernel(i).as_deref());
    x.opt("ramdiskId", l.ramdisk(i).as_deref());
    x.elem("monitoring", |x| x.leaf("state", "disabled"));
    x.leaf("vpcId", &i.network_id);
    x.leaf("privateIpAddress", &i.private_ip);
    x.bool("sourceDestCheck", true);
    group_set(x, i, l);
    x.leaf("architecture", "x86_64");
    x.leaf("rootDeviceType", "ebs");
    x.leaf("rootDeviceName", ROOT_DEVICE);
    x.empty("blockDeviceMapping");
    x.leaf("virtualizationType", "hvm");
    x.opt("clientToken", i.client_token.as_deref());
    tag_set(x, l.tags_of(&i.id));
    x.leaf("hypervisor", "kvm");
    // kumo's networks are their own single subnet.
    x.leaf("subnetId", &i.network_id);
    x.opt("ipAddress", i.public_ip.as_deref());
    x.elem("networkInterfaceSet", |x| {
        x.elem("item", |x| {
            x.leaf("networkInterfaceId", &derived_id("eni", &i.id));
            x.leaf("subnetId", &i.network_id);
            x.leaf("vpcId", &i.network_id);
            x.leaf("ownerId", &i.project_id);
            x.leaf("status", "in-use");
            x.leaf("macAddress", &i.mac);
            x.leaf("privateIpAddress", &i.private_ip);
            x.leaf("privateDnsName", &dns);
            x.bool("sourceDestCheck", true);
            group_set(x, i, l);
            x.elem("attachment", |x| {
                x.leaf("attachmentId", &derived_id("eni-attach", &i.id));
                x.num("deviceIndex", 0);
                x.leaf("status", "attached");
                x.leaf("attachTime", &ts(i.created_at));
                x.bool("deleteOnTermination", true);
            });
            if let Some(ip) = &i.public_ip {
                x.elem("association", |x| {
                    x.leaf("publicIp", ip);
                    x.empty("publicDnsName");
                    x.leaf("ipOwnerId", &i.project_id);
                });
            }
            x.elem("privateIpAddressesSet", |x| {
                x.elem("item", |x| {
                    x.leaf("privateIpAddress", &i.private_ip);
                    x.leaf("privateDnsName", &dns);
                    x.bool("primary", true);
                    if let Some(ip) = &i.public_ip {
                        x.elem("association", |x| {
                            x.leaf("publicIp", ip);
                            x.empty("publicDnsName");
                            x.leaf("ipOwnerId", &i.project_id);
                        });
                    }
                });
            });
            x.leaf("interfaceType", "interface");
        });
    });
    x.bool("ebsOptimized", false);
    x.bool("enaSupport", false);
    x.elem("cpuOptions", |x| {
        x.num("coreCount", i.vcpus);
        x.num("threadsPerCore", 1);
    });
    x.leaf("platformDetails", "Linux/UNIX");
}

/// `reservationId`, `ownerId`, `groupSet`, `instancesSet` (inside an item or a response).
pub fn reservation_body(x: &mut Xml, rid: &str, rows: &[&InstanceRow], l: &Lookups, region: &str) {
    let owner = rows.first().map(|i| i.project_id.as_str()).unwrap_or("");
    x.leaf("reservationId", rid);
    x.leaf("ownerId", owner);
    x.empty("groupSet");
    x.set("instancesSet", rows, |x, i| instance(x, i, l, region));
}

/// Group instances into reservations, in order of first appearance.
pub fn group(rows: &[InstanceRow]) -> Vec<(String, Vec<&InstanceRow>)> {
    let mut out: Vec<(String, Vec<&InstanceRow>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for r in rows {
        let rid = reservation_id(r);
        match index.get(&rid) {
            Some(&n) => out[n].1.push(r),
            None => {
                index.insert(rid.clone(), out.len());
                out.push((rid, vec![r]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use kumo_types::InstanceState;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    fn row() -> InstanceRow {
        InstanceRow {
            id: "i-0123456789abcdef0".into(),
            project_id: "proj-1".into(),
            name: "web".into(),
            image_id: "ami-0123456789abcdef0".into(),
            instance_type: "t1.small".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 4,
            state: InstanceState::Running,
            desired: "running".into(),
            reboot_seq: 0,
            host_id: Some("host-1".into()),
            network_id: "vpc-1".into(),
            mac: "52:54:00:00:00:01".into(),
            private_ip: "10.77.0.10".into(),
            generation: 1,
            observed_generation: 1,
            last_error: None,
            created_at: t0(),
            updated_at: t0(),
            terminated_at: None,
            user_data: None,
            reservation_id: Some("r-0123456789abcdef0".into()),
            launch_index: 0,
            client_token: Some("tok".into()),
            placement_group_id: None,
            requested_site: None,
            constraints: vec![],
            public_ip: None,
            ipv6: None,
            root_snapshot_id: None,
            smbios_uuid: None,
            security_group_ids: vec![],
            key_name: None,
            ha: false,
            ha_priority: 500,
        }
    }

    #[test]
    fn reservation_snapshot() {
        let mut l = Lookups::default();
        l.sites.insert("host-1".into(), "site1".into());
        l.tags.insert(
            "i-0123456789abcdef0".into(),
            vec![("Name".into(), "a<b>&c".into())],
        );
        let r = row();
        let mut x = Xml::new();
        x.response("RunInstances", "req-1", |x| {
            reservation_body(x, "r-0123456789abcdef0", &[&r], &l, "kumo")
        });
        let expected = concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
            "<RunInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>req-1</requestId>",
            "<reservationId>r-0123456789abcdef0</reservationId><ownerId>proj-1</ownerId><groupSet/>",
            "<instancesSet><item>",
            "<instanceId>i-0123456789abcdef0</instanceId><imageId>ami-0123456789abcdef0</imageId>",
            "<instanceState><code>16</code><name>running</name></instanceState>",
            "<privateDnsName>ip-10-77-0-10.kumo.compute.internal</privateDnsName><dnsName/><reason/>",
            "<amiLaunchIndex>0</amiLaunchIndex><productCodes/><instanceType>t1.small</instanceType>",
            "<launchTime>2024-01-01T00:00:00.000Z</launchTime>",
            "<placement><availabilityZone>site1</availabilityZone><groupName/><tenancy>default</tenancy></placement>",
            "<monitoring><state>disabled</state></monitoring><vpcId>vpc-1</vpcId>",
            "<privateIpAddress>10.77.0.10</privateIpAddress><sourceDestCheck>true</sourceDestCheck><groupSet/>",
            "<architecture>x86_64</architecture><rootDeviceType>ebs</rootDeviceType><rootDeviceName>/dev/vda</rootDeviceName>",
            "<blockDeviceMapping/><virtualizationType>hvm</virtualizationType><clientToken>tok</clientToken>",
            "<tagSet><item><key>Name</key><value>a&lt;b&gt;&amp;c</value></item></tagSet>",
            "<hypervisor>kvm</hypervisor>",
        );
        let xml = x.finish();
        assert!(xml.starts_with(expected), "{xml}");
        assert!(xml.contains("<macAddress>52:54:00:00:00:01</macAddress>"));
        assert!(xml.ends_with("<platformDetails>Linux/UNIX</platformDetails></item></instancesSet></RunInstancesResponse>"), "{xml}");
    }

    #[test]
    fn derived_reservations_are_stable() {
        let mut r = row();
        r.reservation_id = None;
        let a = reservation_id(&r);
        assert_eq!(a, reservation_id(&r));
        assert!(a.starts_with("r-") && a.len() == 19, "{a}");
        let rows = vec![row(), r.clone(), row()];
        let g = group(&rows);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].1.len(), 2);
    }
}
