//! HTTP client for agents. Every call has a timeout; the reconciler never blocks on a host.

use std::time::Duration;

use kumo_store::HostRow;
use kumo_types::agent::{ConsoleTail, VmDesired, VmObserved};

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

    /// Remove the VM and everything it had on the host. Ok once it is gone.
    pub async fn delete_vm(&self, host: &HostRow, id: &str) -> Result<(), AgentError> {
        let url = format!("{}/agent/v1/vms/{id}", host.address);
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

impl From<AgentError> for crate::OpError {
    fn from(e: AgentError) -> Self {
        crate::OpError::Unavailable(e.to_string())
    }
}

/// The bearer credential both directions of agent traffic use: `<host-id>:<secret>`.
pub fn credential(host: &HostRow) -> String {
    format!("{}:{}", host.id, host.secret)
}
