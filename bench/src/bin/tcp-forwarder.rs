//! The least a TCP proxy built on Sluice's stack can do: tokio on one thread, with Sluice's allocator, each
//! accepted connection joined to a new one to one origin, bytes copied both ways and a half-close passed on (as
//! Sluice, Envoy's `tcp_proxy` and HAProxy do). No server name read, no decision, no telemetry. The bench runs it
//! beside Sluice to tell what the stack costs from what Sluice adds.
//!
//! `tcp-forwarder LISTEN ORIGIN` (two socket addresses).

use std::net::SocketAddr;

use anyhow::Context as _;

#[global_allocator]
static ALLOCATOR: sluice_agent::allocator::Allocator = sluice_agent::allocator::Allocator;

/// Each direction's buffer: Sluice's relay starts a socket pair's directions at this.
const BUFFER: usize = 16 * 1024;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|arg| arg.parse::<SocketAddr>());
    let (Some(Ok(listen)), Some(Ok(origin))) = (args.next(), args.next()) else {
        anyhow::bail!("usage: tcp-forwarder LISTEN ORIGIN (socket addresses)");
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(mut upstream) = tokio::net::TcpStream::connect(origin).await else { return };
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER, BUFFER).await;
            });
        }
    })
}
