//! Tests of `kumo backup`: argument groups, output lines, and the create/restore flows against
//! a canned HTTP server.

use super::*;
use clap::error::ErrorKind;
use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: BackupCmd,
}

fn parse(args: &[&str]) -> Result<BackupCmd, clap::Error> {
    Cli::try_parse_from(std::iter::once("backup").chain(args.iter().copied())).map(|c| c.cmd)
}

fn parse_err(args: &[&str]) -> ErrorKind {
    match parse(args) {
        Ok(c) => panic!("{args:?} parsed as {c:?}"),
        Err(e) => e.kind(),
    }
}

fn backup(kind: &str, source_kind: &str) -> Backup {
    Backup {
        id: "backup-0000000000000000b".into(),
        project_id: "p-1".into(),
        source_kind: source_kind.into(),
        source_id: if source_kind == "volume" {
            "vol-00000000000000001"
        } else {
            "i-00000000000000001"
        }
        .into(),
        kind: kind.into(),
        parent_id: None,
        state: "completed".into(),
        bytes_written: Some(3 << 20),
        virtual_size: Some(1 << 30),
        operation_id: Some("op-1".into()),
        schedule_id: None,
        error: None,
        created_at: chrono::Utc::now(),
        finished_at: None,
    }
}

fn schedule(keep: [u32; 4]) -> BackupSchedule {
    BackupSchedule {
        id: "bsched-1".into(),
        project_id: "p-1".into(),
        source_kind: "volume".into(),
        source_id: "vol-1".into(),
        cron: "0 3 * * *".into(),
        keep_last: keep[0],
        keep_hourly: keep[1],
        keep_daily: keep[2],
        keep_weekly: keep[3],
        next_run: None,
        created_at: chrono::Utc::now(),
    }
}

#[test]
fn create_needs_exactly_one_source() {
    assert!(matches!(
        parse(&["create", "--instance", "web", "--full"]),
        Ok(BackupCmd::Create { instance: Some(i), volume: None, full: true, .. }) if i == "web"
    ));
    assert_eq!(parse_err(&["create"]), ErrorKind::MissingRequiredArgument);
    assert_eq!(
        parse_err(&["create", "--instance", "web", "--volume", "vol-1"]),
        ErrorKind::ArgumentConflict
    );
}

#[test]
fn restore_is_in_place_or_named_not_both() {
    assert!(matches!(
        parse(&["restore", "backup-1", "--in-place"]),
        Ok(BackupCmd::Restore {
            in_place: true,
            name: None,
            ..
        })
    ));
    assert!(matches!(
        parse(&["restore", "backup-1", "--name", "web2", "--no-wait"]),
        Ok(BackupCmd::Restore { in_place: false, name: Some(n), no_wait: true, .. }) if n == "web2"
    ));
    assert_eq!(
        parse_err(&["restore", "backup-1"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        parse_err(&["restore", "backup-1", "--in-place", "--name", "x"]),
        ErrorKind::ArgumentConflict
    );
}

#[test]
fn schedules_need_a_source_and_a_positive_retention() {
    let create = [
        "schedule",
        "create",
        "--volume",
        "vol-1",
        "--cron",
        "0 3 * * *",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        create.iter().chain(extra).copied().collect()
    };
    assert!(matches!(
        parse(&with(&["--keep-daily", "7", "--keep-weekly", "4"])),
        Ok(BackupCmd::Schedule(ScheduleCmd::Create {
            keep_last: None,
            keep_hourly: None,
            keep_daily: Some(7),
            keep_weekly: Some(4),
            ..
        }))
    ));
    // No retention: the schedule would keep nothing.
    assert_eq!(parse_err(&with(&[])), ErrorKind::MissingRequiredArgument);
    assert_eq!(
        parse_err(&with(&["--keep-last", "0"])),
        ErrorKind::ValueValidation
    );
    assert!(parse(&with(&["--keep-hourly", "-1"])).is_err());
    assert_eq!(
        parse_err(&["schedule", "create", "--cron", "@daily", "--keep-last", "3"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        parse_err(&["schedule", "create", "--volume", "v", "--keep-last", "3"]),
        ErrorKind::MissingRequiredArgument
    );
    assert!(matches!(
        parse(&["schedule", "rm", "bsched-1"]),
        Ok(BackupCmd::Schedule(ScheduleCmd::Delete { id })) if id == "bsched-1"
    ));
}

#[test]
fn summaries_give_kind_parent_written_and_state() {
    let mut b = backup("incremental", "instance");
    b.parent_id = Some("backup-0000000000000000a".into());
    assert_eq!(
        summary(&b),
        "backup-0000000000000000b incremental of instance i-00000000000000001 on top of \
         backup-0000000000000000a: 3.0 MiB written, completed"
    );
    let mut running = backup("", "volume");
    running.state = "running".into();
    running.bytes_written = None;
    assert!(summary(&running).contains(" pending of volume "));
    assert!(summary(&running).ends_with("nothing written yet, running"));
    let mut failed = backup("full", "instance");
    failed.state = "failed".into();
    failed.error = Some("blockdev-backup: no space".into());
    assert!(summary(&failed).ends_with("failed: blockdev-backup: no space"));
    // Failed before the kind was decided: not "pending" forever.
    failed.kind = String::new();
    assert_eq!(kind(&failed), "-");
}

#[test]
fn restores_say_what_they_made() {
    let inst = backup("full", "instance");
    // As a new instance the operation targets the backup, not the instance.
    let r = restored(&inst, false, Some("web2"), &inst.id);
    assert_eq!(
        r,
        Restored::NewInstance {
            name: "web2".into()
        }
    );
    assert_eq!(
        restored_line(&inst.id, &r, Some("i-2")),
        "backup-0000000000000000b restored as instance i-2: it appears in `kumo vm list` as web2"
    );
    assert!(restored_line(&inst.id, &r, None).contains("look for web2 in `kumo vm list`"));
    assert_eq!(
        restoring_line(&inst.id, &r, "op-9"),
        "restoring backup-0000000000000000b as a new instance named web2: follow with `kumo op op-9`"
    );

    let r = restored(&inst, true, None, "i-00000000000000001");
    assert_eq!(
        restored_line(&inst.id, &r, None),
        "backup-0000000000000000b restored in place into instance i-00000000000000001"
    );

    let vol = backup("full", "volume");
    let r = restored(&vol, false, Some("data2"), "vol-2");
    assert_eq!(r, Restored::NewVolume { id: "vol-2".into() });
    assert_eq!(
        restored_line(&vol.id, &r, None),
        "backup-0000000000000000b restored as volume vol-2"
    );
}

#[test]
fn retention_lists_the_rules_in_force() {
    assert_eq!(retention(&schedule([0, 0, 7, 4])), "daily 7, weekly 4");
    assert_eq!(retention(&schedule([3, 24, 0, 0])), "last 3, hourly 24");
    assert_eq!(retention(&schedule([0, 0, 0, 0])), "-");
}

/// A canned HTTP/1.1 server for the create/restore flows: `(method, path)` → status and body.
/// When several routes match, the first is used up (an operation `running`, then `succeeded`);
/// the last stays. Unknown requests get a 404 error body.
mod mock {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    use crate::{Client, ClientConfig};

    pub struct Route {
        pub method: &'static str,
        pub path: String,
        pub status: u16,
        pub body: String,
    }

    pub fn route(method: &'static str, path: &str, status: u16, body: impl ToString) -> Route {
        Route {
            method,
            path: path.into(),
            status,
            body: body.to_string(),
        }
    }

    type Routes = Arc<Mutex<Vec<Route>>>;
    type Seen = Arc<Mutex<Vec<String>>>;

    pub struct Mock {
        pub client: Client,
        seen: Seen,
        task: tokio::task::JoinHandle<()>,
    }

    impl Mock {
        /// Every request so far: `METHOD path body`.
        pub fn seen(&self) -> Vec<String> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Drop for Mock {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    pub async fn start(routes: Vec<Route>) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Routes = Arc::new(Mutex::new(routes));
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, routes.clone(), s.clone()));
            }
        });
        let client = Client::new(ClientConfig {
            endpoint: format!("http://{addr}"),
            region: "kumo".into(),
            access_key_id: "AKIATESTTESTTESTTEST".into(),
            secret_access_key: "secret".into(),
        })
        .unwrap();
        Mock { client, seen, task }
    }

    fn answer(routes: &Routes, method: &str, path: &str) -> (u16, String) {
        let mut routes = routes.lock().unwrap();
        let hits: Vec<usize> = (0..routes.len())
            .filter(|&i| routes[i].method == method && routes[i].path == path)
            .collect();
        match hits.as_slice() {
            [] => (
                404,
                serde_json::json!({"error": {"code": "NotFound", "message": format!("no route {method} {path}"), "request_id": ""}})
                    .to_string(),
            ),
            [only] => (routes[*only].status, routes[*only].body.clone()),
            [first, ..] => {
                let r = routes.remove(*first);
                (r.status, r.body)
            }
        }
    }

    async fn serve(sock: TcpStream, routes: Routes, seen: Seen) {
        let mut r = BufReader::new(sock);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let mut len = 0;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                    return;
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).await.is_err() {
                return;
            }
            let line = format!("{method} {path} {}", String::from_utf8_lossy(&body));
            seen.lock().unwrap().push(line.trim_end().to_string());
            let (status, resp) = answer(&routes, &method, &path);
            let out = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{resp}",
                resp.len()
            );
            if r.get_mut().write_all(out.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

fn op(id: &str, target: &str, state: &str, error: Option<&str>) -> String {
    serde_json::to_string(&kumo_types::api::Operation {
        id: id.into(),
        kind: "restore".into(),
        target_id: target.into(),
        state: state.into(),
        progress: if state == "running" { 0.5 } else { 1.0 },
        error: error.map(Into::into),
        created_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
    })
    .unwrap()
}

fn instance_json(id: &str, name: &str) -> String {
    serde_json::json!({
        "id": id, "name": name, "project_id": "p-1", "image_id": "ami-1",
        "instance_type": "t1.small", "vcpus": 1, "memory_mib": 512, "disk_gib": 1,
        "state": "pending", "desired": "running", "host_id": null, "private_ip": null,
        "mac": null, "generation": 1, "last_error": null,
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        "terminated_at": null, "placement_group_id": null, "requested_site": null,
        "constraints": []
    })
    .to_string()
}

const B: &str = "/api/v1/backups/backup-0000000000000000b";

#[tokio::test]
async fn restoring_an_instance_as_new_finds_it_by_name_once_done() {
    let b = backup("full", "instance");
    let started = serde_json::json!({
        "operation": serde_json::from_str::<serde_json::Value>(&op("op-1", &b.id, "running", None)).unwrap(),
        // As a new instance, the operation's target is the backup.
        "target_id": b.id,
    });
    let m = mock::start(vec![
        mock::route("GET", B, 200, serde_json::to_string(&b).unwrap()),
        mock::route("POST", &format!("{B}/restore"), 202, started),
        mock::route(
            "GET",
            "/api/v1/operations/op-1",
            200,
            op("op-1", &b.id, "running", None),
        ),
        mock::route(
            "GET",
            "/api/v1/operations/op-1",
            200,
            op("op-1", &b.id, "succeeded", None),
        ),
        mock::route(
            "GET",
            "/api/v1/instances/web2",
            200,
            instance_json("i-2", "web2"),
        ),
    ])
    .await;
    let out = restore(
        &m.client,
        &b.id,
        false,
        Some("web2".into()),
        false,
        Output::Table,
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        "backup-0000000000000000b restored as instance i-2: it appears in `kumo vm list` as web2"
    );
    let seen = m.seen();
    assert_eq!(
        seen.iter()
            .filter(|r| r.starts_with("POST"))
            .collect::<Vec<_>>(),
        [&format!(
            "POST {B}/restore {{\"in_place\":false,\"name\":\"web2\"}}"
        )]
    );
    // Looked up only after the operation succeeded.
    assert_eq!(
        seen.last().map(String::as_str),
        Some("GET /api/v1/instances/web2")
    );
    assert_eq!(
        seen.iter()
            .filter(|r| r.contains("/operations/op-1"))
            .count(),
        2
    );
}

#[tokio::test]
async fn a_failed_restore_is_an_error_and_nothing_is_looked_up() {
    let b = backup("full", "volume");
    let started = serde_json::json!({
        "operation": serde_json::from_str::<serde_json::Value>(&op("op-2", "vol-9", "running", None)).unwrap(),
        "target_id": "vol-9",
    });
    let m = mock::start(vec![
        mock::route("GET", B, 200, serde_json::to_string(&b).unwrap()),
        mock::route("POST", &format!("{B}/restore"), 202, started),
        mock::route(
            "GET",
            "/api/v1/operations/op-2",
            200,
            op(
                "op-2",
                "vol-9",
                "failed",
                Some("qemu-img convert: no space"),
            ),
        ),
    ])
    .await;
    let err = restore(
        &m.client,
        &b.id,
        false,
        Some("data2".into()),
        false,
        Output::Json,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ClientError::Failed(m) if m.contains("no space")),
        "{err}"
    );
    assert!(!m.seen().iter().any(|r| r.contains("/volumes/")));
}

#[tokio::test]
async fn restore_with_no_wait_names_the_operation_and_a_wrong_id_posts_nothing() {
    let b = backup("full", "volume");
    let started = serde_json::json!({
        "operation": serde_json::from_str::<serde_json::Value>(&op("op-3", "vol-00000000000000001", "running", None)).unwrap(),
        "target_id": "vol-00000000000000001",
    });
    let m = mock::start(vec![
        mock::route("GET", B, 200, serde_json::to_string(&b).unwrap()),
        mock::route("POST", &format!("{B}/restore"), 202, started),
    ])
    .await;
    let out = restore(&m.client, &b.id, true, None, true, Output::Table)
        .await
        .unwrap();
    assert_eq!(
        out,
        "restoring backup-0000000000000000b in place into volume vol-00000000000000001: follow with `kumo op op-3`"
    );
    let err = restore(&m.client, "backup-nope", true, None, true, Output::Table)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("NotFound"));
    assert_eq!(m.seen().iter().filter(|r| r.starts_with("POST")).count(), 1);
}

#[tokio::test]
async fn create_follows_the_operation_and_prints_the_finished_backup() {
    let mut running = backup("", "volume");
    running.state = "running".into();
    running.bytes_written = None;
    let mut done = backup("incremental", "volume");
    done.parent_id = Some("backup-0000000000000000a".into());
    let started = serde_json::json!({
        "backup": running,
        "operation": serde_json::from_str::<serde_json::Value>(&op("op-4", &done.id, "running", None)).unwrap(),
    });
    let m = mock::start(vec![
        mock::route("POST", "/api/v1/backups", 202, started),
        mock::route(
            "GET",
            "/api/v1/operations/op-4",
            200,
            op("op-4", &done.id, "succeeded", None),
        ),
        mock::route("GET", B, 200, serde_json::to_string(&done).unwrap()),
    ])
    .await;
    let req = CreateBackup {
        instance: None,
        volume: Some("data".into()),
        full: false,
        rate_mib_s: None,
    };
    let out = create(&m.client, &req, false, Output::Table).await.unwrap();
    assert_eq!(
        out,
        "backup-0000000000000000b incremental of volume vol-00000000000000001 on top of \
         backup-0000000000000000a: 3.0 MiB written, completed"
    );
    assert_eq!(
        m.seen()[0],
        "POST /api/v1/backups {\"full\":false,\"instance\":null,\"rate_mib_s\":null,\"volume\":\"data\"}"
    );
    let out = create(&m.client, &req, true, Output::Table).await.unwrap();
    assert!(
        out.ends_with("nothing written yet, running\nbacking up: follow with `kumo op op-4`"),
        "{out}"
    );
}
