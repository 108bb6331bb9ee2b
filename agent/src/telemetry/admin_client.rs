//! The commands that ask a running agent (`sluice status`, `sluice routes`): one request to its admin endpoint,
//! answered with JSON.

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

/// Asks the agent's admin endpoint at `admin` for `target` (`/status`, `/routes?…`; over HTTP/1.1, with hyper's
/// client).
pub async fn fetch(admin: std::net::SocketAddr, target: &str) -> anyhow::Result<Value> {
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
    let response = tokio::time::timeout(FETCH_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {admin} within {FETCH_TIMEOUT:?}"))?
        .with_context(|| format!("asking the agent for {target}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.context("reading the answer")?.to_bytes();
    let answer = String::from_utf8_lossy(&body);
    anyhow::ensure!(status.is_success(), "the agent at {admin} answered {status}: {}", answer.trim());
    serde_json::from_slice(&body).with_context(|| format!("the agent's {target} is not JSON"))
}

const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
