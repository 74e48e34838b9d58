//! Interactive streams proxied to the VM's host: the serial console and TCP port forwarding.
//! Client ⇄ controller and controller ⇄ agent are websockets carrying binary frames.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use futures::{SinkExt, StreamExt};
use kumo_types::InstanceState;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as TMessage;

use crate::auth::Caller;
use crate::error::{ApiError, ApiPath};
use crate::AppState;

async fn agent_url(
    st: &AppState,
    c: &Caller,
    id: &str,
    tail: &str,
) -> Result<(String, String), ApiError> {
    let row = st.ctl.store.instance(&c.scope(), id).await?;
    if row.state != InstanceState::Running {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "IncorrectState",
            format!("instance {} is {}, not running", row.id, row.state),
        ));
    }
    let host = st
        .ctl
        .store
        .host(row.host_id.as_deref().unwrap_or_default())
        .await?;
    let base = host
        .address
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    Ok((
        format!("{base}/agent/v1/vms/{}/{tail}", row.id),
        kumo_controller::credential(&host),
    ))
}

pub async fn serial(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (url, cred) = agent_url(&st, &c, &id, "serial").await?;
    Ok(ws.on_upgrade(move |socket| proxy(socket, url, cred)))
}

pub async fn tcp(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath((id, port)): ApiPath<(String, u16)>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    if port == 0 {
        return Err(ApiError::invalid("port must be 1 to 65535"));
    }
    let (url, cred) = agent_url(&st, &c, &id, &format!("tcp/{port}")).await?;
    Ok(ws.on_upgrade(move |socket| proxy(socket, url, cred)))
}

async fn proxy(client: WebSocket, url: String, cred: String) {
    let mut req = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "bad agent url");
            return;
        }
    };
    if let Ok(v) = format!("Bearer {cred}").parse() {
        req.headers_mut().insert("authorization", v);
    }
    let agent = match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    {
        Ok(Ok((s, _))) => s,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, %url, "cannot reach agent stream");
            return;
        }
        Err(_) => return,
    };
    let (mut a_tx, mut a_rx) = agent.split();
    let (mut c_tx, mut c_rx) = client.split();
    let up = async {
        while let Some(Ok(m)) = c_rx.next().await {
            let out = match m {
                Message::Binary(b) => TMessage::Binary(b),
                Message::Text(t) => TMessage::Binary(bytes::Bytes::copy_from_slice(t.as_bytes())),
                Message::Close(_) => break,
                _ => continue,
            };
            if a_tx.send(out).await.is_err() {
                break;
            }
        }
        let _ = a_tx.close().await;
    };
    let down = async {
        while let Some(Ok(m)) = a_rx.next().await {
            let out = match m {
                TMessage::Binary(b) => Message::Binary(b),
                TMessage::Text(t) => Message::Binary(bytes::Bytes::copy_from_slice(t.as_bytes())),
                TMessage::Close(_) => break,
                _ => continue,
            };
            if c_tx.send(out).await.is_err() {
                break;
            }
        }
        let _ = c_tx.close().await;
    };
    tokio::select! { _ = up => {}, _ = down => {} }
}
