//! Dual-stack networks: the /64 is checked, unique within a project, and instances' IPv6 addresses
//! (and group members' addresses) are the EUI-64s of their MACs.

use super::*;

fn dual(name: &str, cidr: &str, v6: Option<&str>) -> NewNetwork {
    NewNetwork {
        ipv6: v6.is_none(),
        ipv6_cidr: v6.map(str::to_string),
        ..net(name, cidr)
    }
}

#[tokio::test]
async fn ipv6_prefixes_are_checked_and_addresses_derived() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let alice = member(&s, "team-6").await;
    let bob = member(&s, "team-7").await;

    for (bad, needle) in [
        ("fd60:1::/48", "not a /64"),
        ("fd60:1::1/64", "host bits"),
        ("fe80::/64", "unicast"),
        ("10.0.0.0/24", "IPv6 /64"),
    ] {
        match s
            .create_tenant_network(&alice, &dual("bad", "10.1.0.0/24", Some(bad)))
            .await
        {
            Err(StoreError::Invalid(m)) => assert!(m.contains(needle), "{bad}: {m}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert!(
        s.networks(&alice).await.expect("list").is_empty(),
        "nothing created"
    );

    let n = s
        .create_tenant_network(&alice, &dual("six", "10.1.0.0/24", Some("FD60:1:0::/64")))
        .await
        .expect("dual stack");
    assert_eq!(
        n.ipv6_cidr.as_deref(),
        Some("fd60:1::/64"),
        "canonical text"
    );
    // The same /64 twice in a project overlaps; another project may use it.
    match s
        .create_tenant_network(&alice, &dual("six2", "10.2.0.0/24", Some("fd60:1::/64")))
        .await
    {
        Err(StoreError::Conflict(m)) => assert!(m.contains("six"), "{m}"),
        other => panic!("{other:?}"),
    }
    s.create_tenant_network(&bob, &dual("six", "10.1.0.0/24", Some("fd60:1::/64")))
        .await
        .expect("other project");
    let ula = s
        .create_tenant_network(&alice, &dual("ula", "10.3.0.0/24", None))
        .await
        .expect("generated");
    let ula6 = ula.ipv6_cidr.expect("a ULA");
    assert!(ula6.starts_with("fd") && ula6.ends_with("::/64"), "{ula6}");
    let v4 = s
        .create_tenant_network(&alice, &net("four", "10.4.0.0/24"))
        .await
        .expect("v4 only");
    assert_eq!(v4.ipv6_cidr, None);

    // Instances: the API's address is the EUI-64 of the MAC; none on an IPv4-only network.
    s.register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    let img = image(&s, &admin).await;
    let i = vm(&s, &alice, "a", &img.id, &n.id).await.expect("vm");
    let want = kumo_types::ipv6::address_in(Some("fd60:1::/64"), &i.mac).expect("eui64");
    assert_eq!(i.ipv6, Some(want.to_string()));
    assert!(i.ipv6.as_deref().is_some_and(|a| a.starts_with("fd60:1::")));
    let j = vm(&s, &alice, "b", &img.id, &v4.id).await.expect("vm");
    assert_eq!(j.ipv6, None);

    // Group members: IPv4 addresses first, then IPv6 for dual-stack members.
    let g = s.default_security_group(&alice).await.expect("default");
    for id in [&i.id, &j.id] {
        s.set_instance_security_groups(&alice, id, std::slice::from_ref(&g.id))
            .await
            .expect("join default");
    }
    let members = s
        .group_member_ips(std::slice::from_ref(&g.id))
        .await
        .expect("members");
    let mut v4 = vec![i.private_ip.clone(), j.private_ip.clone()];
    v4.sort();
    let want_members: Vec<(String, String)> = v4
        .into_iter()
        .chain([want.to_string()])
        .map(|ip| (g.id.clone(), ip))
        .collect();
    assert_eq!(members, want_members);
}
