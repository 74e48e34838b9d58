//! Lease arithmetic: the agent's view of a lease always ends before the controller's record of
//! it, a PUT never reaches past the heartbeat horizon, fenced VMs wait for a fresh lease, and a
//! restart never lengthens a lease.

use std::time::{Duration, Instant};

use kumo_types::agent::LeaseGrant;

use super::Leases;

const TTL: Duration = Duration::from_secs(6);

fn grant(ids: &[&str]) -> LeaseGrant {
    LeaseGrant {
        ttl_ms: TTL.as_millis() as u64,
        vms: ids.iter().map(|s| s.to_string()).collect(),
    }
}

fn leases() -> (tempfile::TempDir, Leases) {
    let dir = tempfile::tempdir().expect("tempdir");
    let l = Leases::load(dir.path(), super::LeaseFiles::at(None, "host-1"));
    (dir, l)
}

impl Leases {
    fn until(&self, id: &str) -> Option<Instant> {
        self.lock().until.get(id).copied()
    }
}

#[test]
fn the_agent_view_ends_before_the_controller_record() {
    let (_d, l) = leases();
    // Sent 2.5 s ago; the controller received it 1 s later and counts from there.
    let sent = Instant::now() - Duration::from_millis(2500);
    let received = sent + Duration::from_secs(1);
    l.grant_heartbeat(sent, &grant(&["i-a"]));
    let agent_end = l.until("i-a").expect("lease");
    let controller_end = received + TTL;
    assert_eq!(agent_end, sent + TTL);
    assert!(agent_end <= controller_end);
    assert!(l.valid("i-a"));
    // A heartbeat sent so long ago that its lease is already over grants nothing usable.
    let (_d, l) = leases();
    l.grant_heartbeat(
        Instant::now() - TTL - Duration::from_millis(1),
        &grant(&["i-b"]),
    );
    assert!(!l.valid("i-b"));
}

#[test]
fn a_put_lease_never_reaches_past_the_heartbeat_horizon() {
    let (_d, l) = leases();
    // No heartbeat answered yet: a PUT alone grants nothing.
    assert!(!l.grant_one("i-new", TTL));
    assert!(!l.valid("i-new"));
    let sent = Instant::now() - Duration::from_secs(2);
    l.grant_heartbeat(sent, &grant(&[]));
    l.grant_one("i-new", Duration::from_secs(60));
    assert!(l.valid("i-new"));
    assert!(l.until("i-new").expect("lease") <= sent + TTL);
    // A short PUT lease is not cut further, nor does it shorten a longer one.
    l.grant_heartbeat(Instant::now(), &grant(&["i-new"]));
    let long = l.until("i-new").expect("lease");
    l.grant_one("i-new", Duration::from_millis(10));
    assert_eq!(l.until("i-new"), Some(long));
}

#[test]
fn lapsed_leases_and_fenced_vms() {
    let (_d, l) = leases();
    let ids: Vec<String> = ["i-ok", "i-old", "i-never"].map(String::from).to_vec();
    l.grant_heartbeat(
        Instant::now() - TTL - Duration::from_secs(1),
        &grant(&["i-old"]),
    );
    l.grant_heartbeat(Instant::now(), &grant(&["i-ok"]));
    let mut lapsed: Vec<String> = l.lapsed(ids.iter()).into_iter().map(|x| x.0).collect();
    lapsed.sort();
    assert_eq!(lapsed, ["i-never", "i-old"]);

    // A lease counts as lapsed a little before its end, so the kill is over by then.
    let (_d2, l2) = leases();
    let ending = Instant::now() - TTL + super::FENCE_AHEAD / 2;
    l2.grant_heartbeat(ending, &grant(&["i-ending"]));
    assert!(!l2.valid("i-ending"));
    let ahead = l2.lapsed([String::from("i-ending")].iter());
    assert_eq!(ahead.len(), 1);
    assert!(ahead[0].1 > 0, "killed ahead of the end: {ahead:?}");

    // A fenced VM is revived by a fresh lease for it, and only by that.
    l.hold("i-old");
    assert!(l.is_fenced("i-old"));
    assert!(l
        .grant_heartbeat(Instant::now(), &grant(&["i-ok"]))
        .is_empty());
    assert!(l.is_fenced("i-old"));
    let stale = Instant::now() - TTL - Duration::from_secs(1);
    assert!(l.grant_heartbeat(stale, &grant(&["i-old"])).is_empty());
    assert!(
        l.is_fenced("i-old"),
        "an already lapsed grant revives nothing"
    );
    assert_eq!(
        l.grant_heartbeat(Instant::now(), &grant(&["i-ok", "i-old"])),
        vec!["i-old".to_string()]
    );
    assert!(!l.is_fenced("i-old") && l.valid("i-old"));
}

#[test]
fn a_restart_keeps_leases_without_lengthening_them() {
    let (dir, l) = leases();
    l.grant_heartbeat(Instant::now(), &grant(&["i-a"]));
    l.grant_heartbeat(
        Instant::now() - TTL - Duration::from_secs(1),
        &grant(&["i-gone"]),
    );
    l.hold("i-gone");
    l.record_kill("i-gone", 30);
    let before = l.until("i-a").expect("lease");
    l.save().expect("save");
    let again = Leases::load(dir.path(), super::LeaseFiles::at(None, "host-1"));
    let after = again.until("i-a").expect("restored");
    assert!(after <= before, "{after:?} > {before:?}");
    assert!(
        before - after < Duration::from_millis(100),
        "rounded, not lost"
    );
    assert!(again.valid("i-a"));
    assert!(!again.valid("i-gone"));
    assert!(again.is_fenced("i-gone"));
    let reports = again.take_reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (reports[0].id.as_str(), reports[0].ahead_ms),
        ("i-gone", 30)
    );
    assert!(again.take_reports().is_empty(), "reported once");
    again.restore_reports(reports);
    assert_eq!(
        again.take_reports().len(),
        1,
        "a failed heartbeat reports again"
    );
}

#[test]
fn uptime_is_readable_and_monotonic() {
    let a = super::uptime_ms().expect("uptime");
    std::thread::sleep(Duration::from_millis(30));
    let b = super::uptime_ms().expect("uptime");
    assert!(b >= a + 20, "{a} then {b}");
}

#[test]
fn a_fresh_lease_file_of_another_host_blocks_a_start() {
    let pool = tempfile::tempdir().expect("pool");
    let dir = pool.path().join("leases");
    let h1 = super::LeaseFiles::at(Some(dir.clone()), "host-1");
    let h2 = super::LeaseFiles::at(Some(dir.clone()), "host-2");
    let vm = String::from("i-shared");
    assert_eq!(
        h2.claimed_elsewhere(&vm, TTL).expect("read"),
        None,
        "no file yet"
    );
    h1.renew(std::slice::from_ref(&vm)).expect("renew");
    assert_eq!(
        h1.claimed_elsewhere(&vm, TTL).expect("read"),
        None,
        "its own"
    );
    let claim = h2
        .claimed_elsewhere(&vm, TTL)
        .expect("read")
        .expect("claimed");
    assert_eq!(claim.host, "host-1");
    assert!(claim.age < TTL);

    // Renewed more than a lease ago: the other host may start it (and then claims it).
    let old = std::time::SystemTime::now() - TTL - Duration::from_secs(1);
    std::fs::File::options()
        .write(true)
        .open(dir.join(&vm))
        .and_then(|f| f.set_modified(old))
        .expect("age the file");
    assert_eq!(h2.claimed_elsewhere(&vm, TTL).expect("read"), None);
    h2.renew(std::slice::from_ref(&vm)).expect("renew");
    assert_eq!(
        h1.claimed_elsewhere(&vm, TTL)
            .expect("read")
            .map(|c| c.host),
        Some("host-2".to_string())
    );
    // Only the last writer removes it.
    h1.release(&vm);
    assert!(dir.join(&vm).exists());
    h2.release(&vm);
    assert!(!dir.join(&vm).exists());
    // A host-local pool has no lease files.
    let local = super::LeaseFiles::at(None, "host-3");
    local.renew(std::slice::from_ref(&vm)).expect("noop");
    assert_eq!(local.claimed_elsewhere(&vm, TTL).expect("noop"), None);
    let left: Vec<_> = std::fs::read_dir(&dir).expect("dir").flatten().collect();
    assert!(left.is_empty(), "no temp files left: {left:?}");
}
