//! The commands that ask a running agent (`sluice status`, `sluice routes`, `sluice observe`): one request to its
//! admin endpoint, answered with JSON (or, for `sluice observe`, a stream of JSON lines).

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

/// Asks the agent's admin endpoint at `admin` for `target` (`/status`, `/routes?…`; over HTTP/1.1, with hyper's
/// client).
pub async fn fetch(admin: std::net::SocketAddr, target: &str) -> anyhow::Result<Value> {
    let response = ask(admin, target).await?;
    let status = response.status();
    let body = response.into_body().collect().await.context("reading the answer")?.to_bytes();
    let answer = String::from_utf8_lossy(&body);
    anyhow::ensure!(status.is_success(), "the agent at {admin} answered {status}: {}", answer.trim());
    serde_json::from_slice(&body).with_context(|| format!("the agent's {target} is not JSON"))
}

/// Asks the agent's admin endpoint for the stream at `target` (`/observe?…`) and hands each JSON line to `line`
/// until it returns false or the agent closes the stream. Empty lines (the agent's heartbeat) are skipped.
pub async fn follow(
    admin: std::net::SocketAddr,
    target: &str,
    mut line: impl FnMut(Value) -> bool,
) -> anyhow::Result<()> {
    let response = ask(admin, target).await?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let answer = body.collect().await.context("reading the answer")?.to_bytes();
        anyhow::bail!("the agent at {admin} answered {status}: {}", String::from_utf8_lossy(&answer).trim());
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the stream")?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
            let text: Vec<u8> = pending.drain(..=end).collect();
            if text.len() > 1 {
                let value = serde_json::from_slice(&text).context("the agent's stream is not JSON lines")?;
                if !line(value) {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(pending.len() <= MAX_LINE, "the agent's stream has a line over {MAX_LINE} bytes");
    }
    Ok(())
}

/// Longest line of a stream taken.
const MAX_LINE: usize = 1 << 20;

/// Sends `GET target` to the admin endpoint; the response's head within FETCH_TIMEOUT.
async fn ask(admin: std::net::SocketAddr, target: &str) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = tokio::time::timeout(FETCH_TIMEOUT, tokio::net::TcpStream::connect(admin))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {admin} within {FETCH_TIMEOUT:?}"))?
        .with_context(|| format!("no agent's admin endpoint at {admin} (is the agent running? see --admin-addr)"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .context("HTTP to the agent")?;
    tokio::spawn(connection);
    let request = hyper::Request::get(target)
        .header(hyper::header::HOST, admin.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .context("the request")?;
    tokio::time::timeout(FETCH_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {admin} within {FETCH_TIMEOUT:?}"))?
        .with_context(|| format!("asking the agent for {target}"))
}

const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
