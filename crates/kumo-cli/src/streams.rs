//! Interactive serial console and port forwarding over the API's websockets.

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::{Client, ClientError};

/// Ctrl-] ends the console session, as in telnet and virsh.
const ESCAPE: u8 = 0x1d;

struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enter() -> RawMode {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a valid termios buffer.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawMode(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawMode(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawMode(Some(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the attributes read in `enter`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

pub async fn console(client: &Client, id: &str) -> Result<(), ClientError> {
    let ws = client
        .websocket(&format!("/api/v1/instances/{id}/serial"))
        .await?;
    eprintln!("Connected to the serial console of {id}. Press Ctrl-] to leave.\r");
    let raw = RawMode::enter();
    let (mut tx, mut rx) = ws.split();
    let up = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if let Some(pos) = chunk.iter().position(|b| *b == ESCAPE) {
                if pos > 0 {
                    let _ = tx
                        .send(Message::Binary(bytes::Bytes::copy_from_slice(
                            &chunk[..pos],
                        )))
                        .await;
                }
                break;
            }
            if tx
                .send(Message::Binary(bytes::Bytes::copy_from_slice(chunk)))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = tx.close().await;
    };
    let down = async {
        let mut out = tokio::io::stdout();
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Binary(b) = m {
                let _ = out.write_all(&b).await;
                let _ = out.flush().await;
            }
        }
    };
    tokio::select! { _ = up => {}, _ = down => {} }
    drop(raw);
    eprintln!("\nConsole closed.");
    Ok(())
}

/// Listen on 127.0.0.1:`local` and forward every connection to the guest's `remote` port.
pub async fn port_forward(
    client: &Client,
    id: &str,
    local: u16,
    remote: u16,
) -> Result<(), ClientError> {
    // Fail early with a clear message if the instance cannot be reached.
    let inst = client.instance(id).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", local))
        .await
        .map_err(|e| ClientError::Failed(format!("cannot listen on 127.0.0.1:{local}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ClientError::Failed(e.to_string()))?;
    println!(
        "Forwarding 127.0.0.1:{} -> {}:{remote} ({}). Ctrl-C to stop.",
        bound.port(),
        inst.id,
        inst.private_ip.unwrap_or_default()
    );
    loop {
        let (sock, _) = listener
            .accept()
            .await
            .map_err(|e| ClientError::Failed(e.to_string()))?;
        let client = client.clone();
        let path = format!("/api/v1/instances/{}/tcp/{remote}", inst.id);
        tokio::spawn(async move {
            let ws = match client.websocket(&path).await {
                Ok(ws) => ws,
                Err(e) => {
                    eprintln!("forward failed: {e}");
                    return;
                }
            };
            let (mut rd, mut wr) = sock.into_split();
            let (mut tx, mut rx) = ws.split();
            let up = async {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tx
                                .send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n])))
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                }
                let _ = tx.close().await;
            };
            let down = async {
                while let Some(Ok(m)) = rx.next().await {
                    match m {
                        Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
                let _ = wr.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}
