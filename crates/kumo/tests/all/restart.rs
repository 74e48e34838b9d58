//! Restart safety with real VMs: a SIGKILLed agent leaves its guests running and picks them up
//! again; a SIGKILLed controller finishes creates, stops and terminates exactly once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kumo_types::InstanceState;

use crate::common::{Cloud, Hv};
use crate::e2e::{
    console_count, counter, counter_above, create_vm, leftovers, wait_console_count, wait_http,
    wait_no_qemu, BOOTED, POWEROFF, SLOW,
};

async fn heartbeat(cloud: &Cloud) -> chrono::DateTime<chrono::Utc> {
    let hosts = cloud.client.hosts().await.expect("hosts");
    assert_eq!(hosts.len(), 1);
    hosts[0].last_heartbeat.expect("host has a heartbeat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_leaves_vms_running() {
    let t0 = Instant::now();
    let mut cloud = Cloud::start(Hv::Qemu).await;
    cloud.demo_image().await;
    let a = create_vm(&cloud, "ra").await;
    let b = create_vm(&cloud, "rb").await;
    let mut ips = HashMap::new();
    let mut pids = HashMap::new();
    for id in [&a, &b] {
        let i = cloud.wait_state(id, InstanceState::Running, SLOW).await;
        ips.insert(id.clone(), i.private_ip.expect("ip"));
    }
    let mut before = HashMap::new();
    for id in [&a, &b] {
        wait_http(&cloud, &ips[id], "/", SLOW).await;
        before.insert(id.clone(), counter(&cloud, &ips[id]).await);
        let p = cloud.qemu_pids_for(id);
        assert_eq!(p.len(), 1, "one QEMU for {id}: {p:?}");
        pids.insert(id.clone(), p);
    }
    let hb0 = heartbeat(&cloud).await;

    // SIGKILL the agent: the guests do not notice, the API keeps saying running.
    cloud.kill_agent(0);
    let gap = Instant::now();
    while gap.elapsed() < Duration::from_secs(3) {
        for id in [&a, &b] {
            let i = cloud.client.instance(id).await.expect("instance");
            assert_eq!(
                i.state,
                InstanceState::Running,
                "{id} while the agent is dead"
            );
            assert_eq!(
                cloud.qemu_pids_for(id),
                pids[id],
                "QEMU of {id} survives the agent"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut during = HashMap::new();
    for id in [&a, &b] {
        let c = counter_above(&cloud, &ips[id], before[id]).await;
        during.insert(id.clone(), c);
    }

    // Start it again: it re-attaches, reports both VMs, starts nothing new.
    cloud.start_agent(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for id in [&a, &b] {
            let i = cloud.client.instance(id).await.expect("instance");
            assert_eq!(
                i.state,
                InstanceState::Running,
                "{id} while the agent restarts"
            );
        }
        let hosts = cloud.client.hosts().await.expect("hosts");
        if hosts[0].state == "up"
            && hosts[0]
                .last_heartbeat
                .is_some_and(|t| t > hb0 + chrono::Duration::seconds(1))
        {
            assert_eq!(
                hosts[0].instances, 2,
                "the host reports both VMs: {:?}",
                hosts[0]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent never heartbeated: {:?}",
            hosts[0]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A few more heartbeats: still the same QEMU processes, still running, counters moving.
    let hb1 = heartbeat(&cloud).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while heartbeat(&cloud).await <= hb1 + chrono::Duration::seconds(2) {
        assert!(
            Instant::now() < deadline,
            "heartbeats stopped after the restart"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for id in [&a, &b] {
        assert_eq!(
            cloud.client.instance(id).await.expect("instance").state,
            InstanceState::Running
        );
        assert_eq!(
            cloud.qemu_pids_for(id),
            pids[id],
            "the restarted agent kept QEMU of {id}"
        );
        counter_above(&cloud, &ips[id], during[id]).await;
        assert_eq!(
            console_count(&cloud, id, &format!("{BOOTED}{id}")).await,
            1,
            "{id} was not rebooted"
        );
    }
    assert_eq!(cloud.qemu_pids().len(), 2, "two QEMU processes in all");

    // The agent really re-attached: a graceful stop goes through QMP to the old QEMU.
    cloud
        .client
        .instance_action(&a, "stop")
        .await
        .expect("stop");
    cloud.wait_state(&a, InstanceState::Stopped, SLOW).await;
    wait_console_count(&cloud, &a, POWEROFF, 1, Duration::from_secs(5)).await;
    wait_no_qemu(&cloud, &a, Duration::from_secs(10)).await;
    assert_eq!(
        cloud.qemu_pids_for(&b),
        pids[&b],
        "stopping {a} left {b} alone"
    );
    eprintln!(
        "restart::agent_sigkill_leaves_vms_running took {:?}",
        t0.elapsed()
    );
}

/// Every QEMU process of this cloud, by the instance id in its command line.
fn qemu_by_instance(cloud: &Cloud, ids: &[&String]) -> HashMap<String, usize> {
    let all = cloud.qemu_pids();
    let mut out: HashMap<String, usize> = ids.iter().map(|i| ((*i).clone(), 0)).collect();
    for id in ids {
        out.insert((*id).clone(), cloud.qemu_pids_for(id).len());
    }
    let counted: usize = out.values().sum();
    assert_eq!(
        counted,
        all.len(),
        "QEMU processes that belong to no known instance: {all:?} vs {out:?}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_sigkill_during_create_stop_terminate() {
    let t0 = Instant::now();
    let mut cloud = Cloud::start(Hv::Qemu).await;
    cloud.demo_image().await;

    // Two creates, then the controller dies before either is running.
    let a = create_vm(&cloud, "ca").await;
    let b = create_vm(&cloud, "cb").await;
    cloud.kill_server();
    assert!(
        cloud.qemu_pids().len() < 2,
        "the controller died before both VMs were up"
    );
    cloud.start_server();
    cloud.wait_api().await;
    let mut macs = HashMap::new();
    for id in [&a, &b] {
        let i = cloud.wait_state(id, InstanceState::Running, SLOW).await;
        macs.insert(id.clone(), i.mac.expect("mac"));
        wait_console_count(&cloud, id, &format!("{BOOTED}{id}"), 1, SLOW).await;
    }
    let names: Vec<String> = cloud
        .client
        .instances()
        .await
        .expect("instances")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names.len(), 2, "exactly the two instances exist: {names:?}");
    // Exactly once: one QEMU per instance, and it stays that way.
    for _ in 0..10 {
        let n = qemu_by_instance(&cloud, &[&a, &b]);
        assert_eq!(n[&a], 1, "QEMU processes for {a}: {n:?}");
        assert_eq!(n[&b], 1, "QEMU processes for {b}: {n:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for id in [&a, &b] {
        assert_eq!(
            console_count(&cloud, id, BOOTED).await,
            1,
            "{id} booted once"
        );
    }

    // Stop one, terminate the other, and kill the controller right away.
    let sa = cloud
        .client
        .instance_action(&a, "stop")
        .await
        .expect("stop");
    let sb = cloud.client.terminate(&b).await.expect("terminate");
    cloud.kill_server();
    assert_eq!(
        sa.state,
        InstanceState::Stopping,
        "the stop was under way when the controller died"
    );
    assert_eq!(
        sb.state,
        InstanceState::ShuttingDown,
        "the terminate was under way when the controller died"
    );
    cloud.start_server();
    cloud.wait_api().await;
    cloud.wait_state(&a, InstanceState::Stopped, SLOW).await;
    cloud.wait_state(&b, InstanceState::Terminated, SLOW).await;
    wait_no_qemu(&cloud, &a, Duration::from_secs(10)).await;
    assert!(
        cloud.qemu_pids_for(&b).is_empty(),
        "terminated {b} has no QEMU"
    );
    let left = leftovers(&cloud, &b, &macs[&b]);
    assert!(left.is_empty(), "terminated {b} left: {left:?}");
    assert!(
        cloud.qemu_pids().is_empty(),
        "no QEMU at all: {:?}",
        cloud.qemu_pids()
    );
    // The stopped one keeps its disk; it was stopped once, gracefully.
    assert!(
        cloud.agents[0]
            .data_dir
            .join("pool")
            .join("disks")
            .join(format!("{a}.json"))
            .exists(),
        "stopped {a} keeps its disk"
    );
    assert_eq!(
        console_count(&cloud, &a, POWEROFF).await,
        1,
        "{a} was powered off gracefully, once"
    );
    // Settled: nothing moves any more, nothing comes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cloud.client.instance(&a).await.expect("a").state,
        InstanceState::Stopped
    );
    assert_eq!(
        cloud.client.instance(&b).await.expect("b").state,
        InstanceState::Terminated
    );
    assert!(
        cloud.qemu_pids().is_empty(),
        "nothing restarted: {:?}",
        cloud.qemu_pids()
    );
    eprintln!(
        "restart::controller_sigkill_during_create_stop_terminate took {:?}",
        t0.elapsed()
    );
}
