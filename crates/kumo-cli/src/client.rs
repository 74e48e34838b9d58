//! A typed client for the native API. Every request is signed with SigV4 (service `kumo`).

use std::path::Path;
use std::time::Duration;

use kumo_sigv4::Credentials;
use kumo_types::api::{
    CapacityReport, ConsoleOutput, CreateInstance, CreateInstanceBatch, CreatePlacementGroup,
    ErrorBody, Event, Host, Image, ImportImage, Instance, InstanceType, JoinToken, Operation, Page,
    PlacementGroup, PlacementStats, PlacementVerdict, SetHostState, UpdateHost, UpdateInstance,
    UploadParams, WhoAmI,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::ClientConfig;
use crate::ClientError;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageWithOperation {
    pub image: Image,
    pub operation: Operation,
}

#[derive(Clone)]
pub struct Client {
    pub cfg: ClientConfig,
    pub(crate) http: reqwest::Client,
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(Client { cfg, http })
    }

    fn creds(&self) -> Credentials {
        Credentials {
            access_key_id: self.cfg.access_key_id.clone(),
            secret_access_key: self.cfg.secret_access_key.clone(),
        }
    }

    pub fn url(&self, path_and_query: &str) -> Result<url::Url, ClientError> {
        url::Url::parse(&format!(
            "{}{}",
            self.cfg.endpoint.trim_end_matches('/'),
            path_and_query
        ))
        .map_err(|e| ClientError::Config(format!("bad endpoint: {e}")))
    }

    /// Signed headers for a request (used for websockets too).
    pub fn sign(
        &self,
        method: &str,
        url: &url::Url,
        body: &[u8],
        extra: &[(String, String)],
    ) -> Result<Vec<(String, String)>, ClientError> {
        let host = kumo_sigv4::host_header_for(url).unwrap_or_default();
        let mut headers = vec![("host".to_string(), host)];
        headers.extend_from_slice(extra);
        let mut out = kumo_sigv4::sign(
            method,
            url,
            &headers,
            body,
            &self.creds(),
            &self.cfg.region,
            "kumo",
            chrono::Utc::now(),
        )
        .map_err(|e| ClientError::Config(format!("cannot sign request: {e}")))?;
        out.extend(extra.iter().cloned());
        Ok(out)
    }

    pub async fn request<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        idempotency_key: Option<&str>,
    ) -> Result<T, ClientError> {
        let url = self.url(path)?;
        let bytes = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let mut extra = vec![];
        if body.is_some() {
            extra.push(("content-type".to_string(), "application/json".to_string()));
        }
        if let Some(k) = idempotency_key {
            extra.push(("idempotency-key".to_string(), k.to_string()));
        }
        let headers = self.sign(method, &url, &bytes, &extra)?;
        let m = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let mut rb = self.http.request(m, url.clone());
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        let resp = rb
            .body(bytes)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.cfg.endpoint.clone(), e.to_string()))?;
        decode(resp).await
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request("GET", path, None, None).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let v = serde_json::to_value(body).map_err(|e| ClientError::Http(e.to_string()))?;
        self.request("POST", path, Some(&v), None).await
    }

    // --- typed calls ---

    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.get("/api/v1/whoami").await
    }

    pub async fn instances(&self) -> Result<Vec<Instance>, ClientError> {
        self.paged("/api/v1/instances").await
    }

    async fn paged<T: DeserializeOwned>(&self, base: &str) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("{base}?limit=1000&cursor={c}"),
                None => format!("{base}?limit=1000"),
            };
            let page: Page<T> = self.get(&path).await?;
            out.extend(page.items);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    pub async fn instance(&self, id: &str) -> Result<Instance, ClientError> {
        self.get(&format!("/api/v1/instances/{}", enc(id))).await
    }

    pub async fn create_instance(
        &self,
        req: &CreateInstance,
        idempotency_key: Option<&str>,
    ) -> Result<Instance, ClientError> {
        let v = serde_json::to_value(req).map_err(|e| ClientError::Http(e.to_string()))?;
        self.request("POST", "/api/v1/instances", Some(&v), idempotency_key)
            .await
    }

    pub async fn instance_action(&self, id: &str, action: &str) -> Result<Instance, ClientError> {
        self.request(
            "POST",
            &format!("/api/v1/instances/{}/{action}", enc(id)),
            Some(&serde_json::json!({})),
            None,
        )
        .await
    }

    pub async fn terminate(&self, id: &str) -> Result<Instance, ClientError> {
        self.request(
            "DELETE",
            &format!("/api/v1/instances/{}", enc(id)),
            None,
            None,
        )
        .await
    }

    pub async fn resize(&self, id: &str, instance_type: &str) -> Result<Instance, ClientError> {
        let v = serde_json::to_value(UpdateInstance {
            instance_type: Some(instance_type.into()),
            ..Default::default()
        })
        .map_err(|e| ClientError::Http(e.to_string()))?;
        self.request(
            "PATCH",
            &format!("/api/v1/instances/{}", enc(id)),
            Some(&v),
            None,
        )
        .await
    }

    /// Turn HA on or off and/or set its priority (`None` keeps the value).
    pub async fn set_instance_ha(
        &self,
        id: &str,
        ha: Option<bool>,
        ha_priority: Option<u32>,
    ) -> Result<Instance, ClientError> {
        let v = serde_json::to_value(UpdateInstance {
            ha,
            ha_priority,
            ..Default::default()
        })
        .map_err(|e| ClientError::Http(e.to_string()))?;
        self.request(
            "PATCH",
            &format!("/api/v1/instances/{}", enc(id)),
            Some(&v),
            None,
        )
        .await
    }

    pub async fn console(&self, id: &str, bytes: u64) -> Result<ConsoleOutput, ClientError> {
        self.get(&format!(
            "/api/v1/instances/{}/console?bytes={bytes}",
            enc(id)
        ))
        .await
    }

    pub async fn instance_types(&self) -> Result<Vec<InstanceType>, ClientError> {
        Ok(self
            .get::<Page<InstanceType>>("/api/v1/instance-types")
            .await?
            .items)
    }

    pub async fn images(&self) -> Result<Vec<Image>, ClientError> {
        self.paged("/api/v1/images").await
    }

    pub async fn image(&self, id: &str) -> Result<Image, ClientError> {
        self.get(&format!("/api/v1/images/{}", enc(id))).await
    }

    pub async fn import_image(&self, req: &ImportImage) -> Result<ImageWithOperation, ClientError> {
        self.post("/api/v1/images", req).await
    }

    pub async fn delete_image(&self, id: &str) -> Result<Image, ClientError> {
        self.request("DELETE", &format!("/api/v1/images/{}", enc(id)), None, None)
            .await
    }

    /// Stream a file as an upload; `progress` gets bytes sent so far.
    pub async fn upload_image(
        &self,
        params: &UploadParams,
        file: &Path,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<ImageWithOperation, ClientError> {
        let len = tokio::fs::metadata(file)
            .await
            .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", file.display())))?
            .len();
        let sha = sha256_file(file).await?;
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("name", &params.name);
        for (k, v) in [
            ("kind", &params.kind),
            ("format", &params.format),
            ("kernel_id", &params.kernel_id),
            ("ramdisk_id", &params.ramdisk_id),
            ("cmdline", &params.cmdline),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        if params.public {
            q.append_pair("public", "true");
        }
        let url = self.url(&format!("/api/v1/images/upload?{}", q.finish()))?;
        let host = kumo_sigv4::host_header_for(&url).unwrap_or_default();
        // The body is streamed: the signature covers its declared SHA-256, which the server checks.
        let creds = self.creds();
        let headers = vec![("host".to_string(), host)];
        let opts = kumo_sigv4::SignOptions {
            content_sha256_header: true,
            payload_sha256: Some(sha.clone()),
        };
        let signed = kumo_sigv4::sign_with_options(
            "PUT",
            &url,
            &headers,
            b"",
            &creds,
            &self.cfg.region,
            "kumo",
            chrono::Utc::now(),
            &opts,
        )
        .map_err(|e| ClientError::Config(format!("cannot sign request: {e}")))?;
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", file.display())))?;
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let progress = std::sync::Arc::new(progress);
        let stream = futures::StreamExt::map(
            tokio_util::io::ReaderStream::with_capacity(f, 1 << 20),
            move |chunk| {
                if let Ok(c) = &chunk {
                    let n = sent.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed)
                        + c.len() as u64;
                    progress(n);
                }
                chunk
            },
        );
        let mut rb = self
            .http
            .put(url)
            .timeout(Duration::from_secs(24 * 3600))
            .header("content-length", len);
        for (k, v) in signed {
            rb = rb.header(k, v);
        }
        let resp = rb
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.cfg.endpoint.clone(), e.to_string()))?;
        decode(resp).await
    }

    pub async fn operation(&self, id: &str) -> Result<Operation, ClientError> {
        self.get(&format!("/api/v1/operations/{}", enc(id))).await
    }

    pub async fn operations(&self) -> Result<Vec<Operation>, ClientError> {
        Ok(self
            .get::<Page<Operation>>("/api/v1/operations?limit=100")
            .await?
            .items)
    }

    pub async fn events(&self, limit: u32) -> Result<Vec<Event>, ClientError> {
        Ok(self
            .get::<Page<Event>>(&format!("/api/v1/events?limit={limit}"))
            .await?
            .items)
    }

    /// Every host (all pages).
    pub async fn hosts(&self) -> Result<Vec<Host>, ClientError> {
        self.paged("/api/v1/hosts").await
    }

    /// Set a host's own overcommit ratios and reserved memory (administrators).
    pub async fn update_host(&self, id: &str, req: &UpdateHost) -> Result<Host, ClientError> {
        let v = serde_json::to_value(req).map_err(|e| ClientError::Http(e.to_string()))?;
        self.request(
            "PATCH",
            &format!("/api/v1/hosts/{}", enc(id)),
            Some(&v),
            None,
        )
        .await
    }

    /// Create many instances from one template in one step.
    pub async fn create_instance_batch(
        &self,
        req: &CreateInstanceBatch,
        idempotency_key: Option<&str>,
    ) -> Result<Vec<Instance>, ClientError> {
        let v = serde_json::to_value(req).map_err(|e| ClientError::Http(e.to_string()))?;
        let page: Page<Instance> = self
            .request(
                "POST",
                "/api/v1/instance-batches",
                Some(&v),
                idempotency_key,
            )
            .await?;
        Ok(page.items)
    }

    pub async fn create_placement_group(
        &self,
        req: &CreatePlacementGroup,
    ) -> Result<PlacementGroup, ClientError> {
        self.post("/api/v1/placement-groups", req).await
    }

    pub async fn placement_groups(&self) -> Result<Vec<PlacementGroup>, ClientError> {
        Ok(self
            .get::<Page<PlacementGroup>>("/api/v1/placement-groups")
            .await?
            .items)
    }

    pub async fn delete_placement_group(&self, id: &str) -> Result<(), ClientError> {
        self.delete_no_content(&format!("/api/v1/placement-groups/{}", enc(id)))
            .await
    }

    pub async fn placement_stats(&self) -> Result<PlacementStats, ClientError> {
        self.get("/api/v1/placement/stats").await
    }

    /// DELETE answered by 204 No Content.
    async fn delete_no_content(&self, path: &str) -> Result<(), ClientError> {
        match self
            .request::<serde_json::Value>("DELETE", path, None, None)
            .await
        {
            Ok(_) => Ok(()),
            // 204 has no body.
            Err(ClientError::Http(m)) if m.contains("EOF while parsing") => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn host(&self, id: &str) -> Result<Host, ClientError> {
        self.get(&format!("/api/v1/hosts/{}", enc(id))).await
    }

    pub async fn set_host_state(&self, id: &str, state: &str) -> Result<Host, ClientError> {
        self.post(
            &format!("/api/v1/hosts/{}/state", enc(id)),
            &SetHostState {
                state: state.into(),
            },
        )
        .await
    }

    pub async fn join_tokens(&self) -> Result<Vec<JoinToken>, ClientError> {
        Ok(self
            .get::<Page<JoinToken>>("/api/v1/join-tokens")
            .await?
            .items)
    }

    pub async fn create_join_token(&self) -> Result<JoinToken, ClientError> {
        self.request("POST", "/api/v1/join-tokens", None, None)
            .await
    }

    pub async fn revoke_join_token(&self, token: &str) -> Result<(), ClientError> {
        self.delete_no_content(&format!("/api/v1/join-tokens/{}", enc(token)))
            .await
    }

    pub async fn explain_placement(
        &self,
        instance_type: &str,
        site: Option<&str>,
        constraints: &[String],
        placement_group: Option<&str>,
    ) -> Result<Vec<PlacementVerdict>, ClientError> {
        let mut q = format!(
            "/api/v1/placement/explain?instance_type={}",
            enc(instance_type)
        );
        if let Some(s) = site {
            q.push_str(&format!("&site={}", enc(s)));
        }
        if !constraints.is_empty() {
            q.push_str(&format!("&constraints={}", enc(&constraints.join(","))));
        }
        if let Some(g) = placement_group {
            q.push_str(&format!("&placement_group={}", enc(g)));
        }
        self.get(&q).await
    }

    pub async fn capacity(&self) -> Result<CapacityReport, ClientError> {
        self.get("/api/v1/capacity").await
    }

    /// Open a websocket to an API stream (serial console, port forward), signed.
    pub async fn websocket(
        &self,
        path: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        ClientError,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = self.url(path)?;
        let headers = self.sign("GET", &url, b"", &[])?;
        let ws_url = url
            .as_str()
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        let mut req = ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::Http(e.to_string()))?;
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                v.parse(),
            ) {
                req.headers_mut().insert(k, v);
            }
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((s, _)) => Ok(s),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err(api_error(resp.status().as_u16(), &body))
            }
            Err(e) => Err(ClientError::Unreachable(
                self.cfg.endpoint.clone(),
                e.to_string(),
            )),
        }
    }
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn sha256_file(path: &Path) -> Result<String, ClientError> {
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn api_error(status: u16, body: &str) -> ClientError {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status,
            code: e.error.code,
            message: e.error.message,
            request_id: e.error.request_id,
        },
        Err(_) => ClientError::Api {
            status,
            code: "Unknown".into(),
            message: body.chars().take(500).collect(),
            request_id: String::new(),
        },
    }
}

pub(crate) async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
    let status = resp.status();
    let body = resp
        .text()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    if !status.is_success() {
        return Err(api_error(status.as_u16(), &body));
    }
    serde_json::from_str(&body).map_err(|e| {
        ClientError::Http(format!(
            "unexpected response ({e}): {}",
            body.chars().take(300).collect::<String>()
        ))
    })
}
