//! HTTP client for agents. Every call has a timeout; the reconciler never blocks on a host.

use std::time::Duration;

use kumo_store::HostRow;
use kumo_types::agent::{ConsoleTail, VmDesired, VmObserved};
use kumo_types::storage::{
    AgentJob, CreateDisk, DiskReport, JobRequest, ResizeVolume, SnapshotTaken, TakeSnapshot,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent at {url} did not answer")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("agent at {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("could not build the agent HTTP client")]
    Client(#[source] reqwest::Error),
}

#[derive(Clone)]
pub struct AgentClient {
    http: reqwest::Client,
}

impl AgentClient {
    pub fn new() -> Result<AgentClient, AgentError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(4)
            .build()
            .map_err(AgentError::Client)?;
        Ok(AgentClient { http })
    }

    async fn check(
        url: &str,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, AgentError> {
        let resp = resp.map_err(|source| AgentError::Unreachable {
            url: url.to_string(),
            source,
        })?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            Err(AgentError::Status {
                url: url.to_string(),
                status,
                body,
            })
        }
    }

    pub async fn put_vm(&self, host: &HostRow, spec: &VmDesired) -> Result<VmObserved, AgentError> {
        let url = format!("{}/agent/v1/vms/{}", host.address, spec.id);
        let resp = self
            .http
            .put(&url)
            .bearer_auth(credential(host))
            .json(spec)
            .send()
            .await;
        let resp = Self::check(&url, resp).await?;
        resp.json()
            .await
            .map_err(|source| AgentError::Unreachable { url, source })
    }

    /// Remove the VM and everything it had on the host (but its disk with `keep_disk`: the VM
    /// lives on another host of the same shared pool). Ok once it is gone.
    pub async fn delete_vm(
        &self,
        host: &HostRow,
        id: &str,
        keep_disk: bool,
    ) -> Result<(), AgentError> {
        let url = format!("{}/agent/v1/vms/{id}?keep_disk={keep_disk}", host.address);
        let resp = self
            .http
            .delete(&url)
            .bearer_auth(credential(host))
            .send()
            .await;
        Self::check(&url, resp).await.map(|_| ())
    }

    pub async fn console(
        &self,
        host: &HostRow,
        id: &str,
        bytes: u64,
    ) -> Result<String, AgentError> {
        let url = format!("{}/agent/v1/vms/{id}/console?bytes={bytes}", host.address);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(credential(host))
            .send()
            .await;
        let resp = Self::check(&url, resp).await?;
        let tail: ConsoleTail = resp
            .json()
            .await
            .map_err(|source| AgentError::Unreachable { url, source })?;
        Ok(tail.output)
    }
}

/// Storage calls (see kumo_agent's storage module).
impl AgentClient {
    async fn send_json<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        host: &HostRow,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<R, AgentError> {
        let url = format!("{}{path}", host.address);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(credential(host))
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = Self::check(&url, req.send().await).await?;
        resp.json()
            .await
            .map_err(|source| AgentError::Unreachable { url, source })
    }

    async fn delete_path(&self, host: &HostRow, path: &str) -> Result<(), AgentError> {
        let url = format!("{}{path}", host.address);
        let resp = self
            .http
            .delete(&url)
            .bearer_auth(credential(host))
            .send()
            .await;
        Self::check(&url, resp).await.map(|_| ())
    }

    /// Make a disk in the host's pool (blank or copy-on-write on a snapshot: quick).
    pub async fn create_disk(
        &self,
        host: &HostRow,
        id: &str,
        req: &CreateDisk,
    ) -> Result<DiskReport, AgentError> {
        let path = format!("/agent/v1/disks/{id}");
        self.send_json(
            reqwest::Method::PUT,
            host,
            &path,
            Some(req),
            Duration::from_secs(120),
        )
        .await
    }

    pub async fn delete_disk(&self, host: &HostRow, id: &str) -> Result<(), AgentError> {
        self.delete_path(host, &format!("/agent/v1/disks/{id}"))
            .await
    }

    /// Grow a disk no VM is using.
    pub async fn grow_disk(
        &self,
        host: &HostRow,
        id: &str,
        size_bytes: u64,
    ) -> Result<DiskReport, AgentError> {
        let path = format!("/agent/v1/disks/{id}/grow");
        let body = ResizeVolume { size_bytes };
        self.send_json(
            reqwest::Method::POST,
            host,
            &path,
            Some(&body),
            Duration::from_secs(120),
        )
        .await
    }

    pub async fn take_snapshot(
        &self,
        host: &HostRow,
        req: &TakeSnapshot,
    ) -> Result<SnapshotTaken, AgentError> {
        self.send_json(
            reqwest::Method::POST,
            host,
            "/agent/v1/snapshots",
            Some(req),
            Duration::from_secs(120),
        )
        .await
    }

    pub async fn delete_snapshot(&self, host: &HostRow, id: &str) -> Result<(), AgentError> {
        self.delete_path(host, &format!("/agent/v1/snapshots/{id}"))
            .await
    }

    /// Start a long job (copy, backup, export, import); poll it with `job`.
    pub async fn start_job(
        &self,
        host: &HostRow,
        req: &JobRequest,
    ) -> Result<AgentJob, AgentError> {
        self.send_json(
            reqwest::Method::POST,
            host,
            "/agent/v1/jobs",
            Some(req),
            Duration::from_secs(60),
        )
        .await
    }

    pub async fn job(&self, host: &HostRow, id: &str) -> Result<AgentJob, AgentError> {
        self.send_json::<(), _>(
            reqwest::Method::GET,
            host,
            &format!("/agent/v1/jobs/{id}"),
            None,
            Duration::from_secs(30),
        )
        .await
    }

    /// Whether the agent reports a missing resource (404), as opposed to failing.
    pub fn is_not_found(e: &AgentError) -> bool {
        matches!(e, AgentError::Status { status: 404, .. })
    }
}

impl From<AgentError> for crate::OpError {
    fn from(e: AgentError) -> Self {
        crate::OpError::Unavailable(e.to_string())
    }
}

/// The bearer credential both directions of agent traffic use: `<host-id>:<secret>`.
pub fn credential(host: &HostRow) -> String {
    format!("{}:{}", host.id, host.secret)
}

/// Live-migration calls (see kumo_agent's migrate module).
impl AgentClient {
    async fn send_no_content<B: serde::Serialize>(
        &self,
        method: reqwest::Method,
        host: &HostRow,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let url = format!("{}{path}", host.address);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(credential(host))
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        Self::check(&url, req.send().await).await.map(|_| ())
    }

    /// The disks of a running VM on its host (what a storage migration copies).
    pub async fn source_disks(
        &self,
        host: &HostRow,
        id: &str,
    ) -> Result<Vec<kumo_types::migration::SourceDisk>, AgentError> {
        self.send_json::<(), _>(
            reqwest::Method::GET,
            host,
            &format!("/agent/v1/vms/{id}/disks"),
            None,
            Duration::from_secs(30),
        )
        .await
    }

    /// Ask the destination to get ready (disks, port, paused QEMU listening).
    pub async fn start_incoming(
        &self,
        host: &HostRow,
        req: &kumo_types::migration::IncomingRequest,
    ) -> Result<kumo_types::migration::MigrationTarget, AgentError> {
        self.send_json(
            reqwest::Method::POST,
            host,
            "/agent/v1/migrations",
            Some(req),
            Duration::from_secs(300),
        )
        .await
    }

    pub async fn incoming_state(
        &self,
        host: &HostRow,
        id: &str,
    ) -> Result<kumo_types::migration::IncomingState, AgentError> {
        self.send_json::<(), _>(
            reqwest::Method::GET,
            host,
            &format!("/agent/v1/migrations/{id}"),
            None,
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn commit_incoming(
        &self,
        host: &HostRow,
        id: &str,
        c: &kumo_types::migration::CommitIncoming,
    ) -> Result<(), AgentError> {
        self.send_no_content(
            reqwest::Method::POST,
            host,
            &format!("/agent/v1/migrations/{id}/commit"),
            Some(c),
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn abort_incoming(&self, host: &HostRow, id: &str) -> Result<(), AgentError> {
        self.send_no_content::<()>(
            reqwest::Method::DELETE,
            host,
            &format!("/agent/v1/migrations/{id}"),
            None,
            Duration::from_secs(60),
        )
        .await
    }

    /// Roll a source back: cancel what is left of the migration, resume the VM.
    pub async fn resume_source(&self, host: &HostRow, id: &str) -> Result<(), AgentError> {
        self.send_no_content::<()>(
            reqwest::Method::POST,
            host,
            &format!("/agent/v1/vms/{id}/resume"),
            None,
            Duration::from_secs(60),
        )
        .await
    }

    pub async fn cancel_job(&self, host: &HostRow, id: &str) -> Result<(), AgentError> {
        self.send_no_content::<()>(
            reqwest::Method::DELETE,
            host,
            &format!("/agent/v1/jobs/{id}"),
            None,
            Duration::from_secs(10),
        )
        .await
    }
}
