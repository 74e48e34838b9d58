//! A small asynchronous QMP (QEMU Machine Protocol) client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kumo_hypervisor::qmp::QmpError> {
//! use kumo_hypervisor::qmp::Qmp;
//! let qmp = Qmp::connect("/run/kumo/vms/i-0123/qmp.sock").await?;
//! let status = qmp.execute("query-status", serde_json::Value::Null).await?;
//! let mut events = qmp.events();
//! # let _ = (status, events.recv().await);
//! # Ok(()) }
//! ```
//!
//! One reader task per connection routes replies to callers by command id and broadcasts
//! asynchronous events. Every call has a timeout. Note that a QMP socket serves one client at a
//! time: a second connection only gets its greeting once the first one closes.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

/// Default timeout for connecting (socket + greeting + capabilities negotiation).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout for one command.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP I/O error")]
    Io(#[from] io::Error),
    #[error("QMP {what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP JSON encoding")]
    Json(#[from] serde_json::Error),
}

impl QmpError {
    /// The QMP error class (`GenericError`, `CommandNotFound`, `DeviceNotActive`...), if the
    /// command itself failed.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// An asynchronous event (`SHUTDOWN`, `RESET`, `STOP`, `RESUME`, `BLOCK_JOB_READY`...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    /// `(seconds, microseconds)` as QEMU reports it.
    #[serde(default)]
    pub timestamp: Option<(i64, i64)>,
}

/// Result of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: String,
    #[serde(default)]
    pub singlestep: bool,
}

type Pending = HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>;

struct Shared {
    /// `None` once the connection is closed: nothing new may wait for a reply.
    pending: Mutex<Option<Pending>>,
}

/// A connected, capabilities-negotiated QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    reader: JoinHandle<()>,
    greeting: Value,
    command_timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        // The reader task owns the read half; stopping it closes the socket.
        self.reader.abort();
    }
}

impl Qmp {
    /// Connect with the default timeouts.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, QmpError> {
        Self::connect_with_timeout(path, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// Connect, read the greeting and negotiate capabilities, all within `timeout`.
    pub async fn connect_with_timeout(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<Self, QmpError> {
        let path = path.as_ref().to_path_buf();
        match tokio::time::timeout(timeout, Self::connect_inner(path.clone())).await {
            Ok(r) => r,
            Err(_) => Err(QmpError::Timeout {
                what: format!("connect to {}", path.display()),
                after: timeout,
            }),
        }
    }

    async fn connect_inner(path: PathBuf) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.clone(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Err(QmpError::Closed);
        }
        let greeting: Value = serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("bad greeting {line:?}: {e}")))?;
        let greeting = greeting
            .get("QMP")
            .cloned()
            .ok_or_else(|| QmpError::Protocol(format!("greeting without QMP key: {line:?}")))?;

        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
        });
        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        let task = tokio::spawn(read_loop(
            reader,
            Arc::clone(&shared),
            events.clone(),
            closed_tx,
        ));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(writer),
            shared,
            next_id: AtomicU64::new(1),
            events,
            closed,
            reader: task,
            greeting,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        };
        qmp.execute("qmp_capabilities", Value::Null).await?;
        Ok(qmp)
    }

    /// The `QMP` object of the greeting (QEMU version and capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Change the timeout used by [`Qmp::execute`].
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// A receiver of every event that arrives from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Whether the connection has been closed (QEMU exited or the socket broke).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Wait until the connection closes.
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        // An error means the reader task is gone, i.e. closed too.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Run a command with the default timeout. `arguments` may be `Value::Null` (no arguments) or
    /// a JSON object. Returns the `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.command_timeout)
            .await
    }

    /// Run a command, failing with [`QmpError::Timeout`] after `timeout`.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        match arguments {
            Value::Null => {}
            Value::Object(ref m) if m.is_empty() => {}
            Value::Object(_) => msg["arguments"] = arguments,
            other => {
                return Err(QmpError::Protocol(format!(
                    "arguments of {command} must be an object, got {other}"
                )))
            }
        }
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.shared.pending);
            match pending.as_mut() {
                Some(p) => {
                    p.insert(id, tx);
                }
                None => return Err(QmpError::Closed),
            }
        }
        let fut = async {
            {
                let mut w = self.writer.lock().await;
                w.write_all(&line).await?;
                w.flush().await?;
            }
            match rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err((class, desc))) => Err(QmpError::Command {
                    command: command.to_string(),
                    class,
                    desc,
                }),
                Err(_) => Err(QmpError::Closed),
            }
        };
        let result = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(QmpError::Timeout {
                what: format!("command {command}"),
                after: timeout,
            }),
        };
        if result.is_err() {
            if let Some(p) = lock(&self.shared.pending).as_mut() {
                p.remove(&id);
            }
        }
        result
    }

    /// `query-status`, typed.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        let v = self.execute("query-status", Value::Null).await?;
        Ok(serde_json::from_value(v)?)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another task panicked while holding it; the map is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "QMP read failed");
                break;
            }
        }
        let msg: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, line = %line.trim_end(), "unparseable QMP message");
                continue;
            }
        };
        if let Some(event) = msg.get("event").and_then(Value::as_str) {
            let ts = msg.get("timestamp");
            let ev = QmpEvent {
                event: event.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
                timestamp: ts
                    .and_then(|t| t.get("seconds"))
                    .and_then(Value::as_i64)
                    .zip(
                        ts.and_then(|t| t.get("microseconds"))
                            .and_then(Value::as_i64),
                    ),
            };
            // No receivers is fine.
            let _ = events.send(ev);
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::debug!(msg = %msg, "QMP reply without our id");
            continue;
        };
        let reply = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = msg.get("error") {
            Err((
                err.get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("GenericError")
                    .to_string(),
                err.get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            ))
        } else {
            tracing::debug!(msg = %msg, "unexpected QMP message");
            continue;
        };
        let tx = lock(&shared.pending).as_mut().and_then(|p| p.remove(&id));
        if let Some(tx) = tx {
            let _ = tx.send(reply);
        }
    }
    // Dropping the senders wakes every waiter with Closed.
    lock(&shared.pending).take();
    let _ = closed.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake QMP server: greeting, then answers commands; `query-status` gets an event first.
    async fn fake_server(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap() == 0 {
                return;
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let reply = match v["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}, "id": id}),
                "query-status" => {
                    w.write_all(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"RESUME\"}\r\n").await.unwrap();
                    json!({"return": {"status": "running", "singlestep": false, "running": true}, "id": id})
                }
                "echo" => json!({"return": v["arguments"], "id": id}),
                "hang" => continue,
                "quit" => {
                    w.write_all(format!("{}\r\n", json!({"return": {}, "id": id})).as_bytes())
                        .await
                        .unwrap();
                    return;
                }
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                }
            };
            w.write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn talks_to_a_fake_server() {
        tokio::time::timeout(Duration::from_secs(20), fake_server_session())
            .await
            .unwrap();
    }

    async fn fake_server_session() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(listener));
        let qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.greeting()["version"]["qemu"]["major"], 7);
        let mut events = qmp.events();
        let st = qmp.query_status().await.unwrap();
        assert!(st.running);
        assert_eq!(st.status, "running");
        let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.event, "RESUME");
        assert_eq!(ev.timestamp, Some((1, 2)));
        let v = qmp.execute("echo", json!({"a": 1})).await.unwrap();
        assert_eq!(v, json!({"a": 1}));
        let err = qmp.execute("nope", Value::Null).await.unwrap_err();
        assert_eq!(err.class(), Some("CommandNotFound"));
        let err = qmp
            .execute_with_timeout("hang", Value::Null, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(qmp.execute("echo", json!([1])).await.is_err());
        qmp.execute("quit", Value::Null).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), qmp.closed())
            .await
            .unwrap();
        assert!(qmp.is_closed());
        assert!(matches!(
            qmp.execute("echo", Value::Null).await,
            Err(QmpError::Closed)
        ));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn greeting_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let err = Qmp::connect_with_timeout(&path, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        let err = Qmp::connect(dir.path().join("missing.sock"))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    }
}
