//! Connections that leave HTTP behind: `CONNECT` tunnels on the forward-proxy port and HTTP/1.1 upgrades
//! (WebSocket), joined end to end with a connection place of their own and an idle timeout.

use hyper::upgrade::Upgraded;
use std::io;

use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::*;
use crate::{
    proxy::{
        relay::{Ended, Relayed},
        upstreams,
    },
    telemetry::access_log::format::Fields,
};

impl HttpProxy {
    /// `CONNECT host:port` on the forward-proxy port: a tunnel, if the registry (or ALLOW_ANY) admits the host on
    /// that port; its bytes are relayed untouched.
    pub(super) async fn tunnel(
        &self,
        policy: &ProxyPolicy,
        request: Request<Incoming>,
        authority: &str,
        mut record: Box<RequestRecord>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let host = routing::host_of(authority).to_owned();
        let Some(port) = request.uri().port_u16() else {
            return self.local_failure(Failure::BadRequest, record, started, None);
        };
        let unresolved = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
        let source = record.downstream_remote.and_then(|peer| self.workload(peer.ip()));
        let viewer = routing::viewer(Listener::Forward, source.as_deref());
        let destination = match routing::destination(policy, &host, port, None, Listener::Forward, unresolved, viewer) {
            Ok(destination) => destination,
            Err((failure, labels)) => return self.local_failure(failure, record, started, labels),
        };
        let address = match self.address_of(&destination, &host).await {
            Ok(address) => address,
            Err(failure) => return self.local_failure(failure, record, started, Some(destination.labels)),
        };
        record.upstream_host = Some(address);
        let upstream = match tcp::connect(address, &self.limits.sockets, destination.connect(&policy.upstream)).await {
            Ok(upstream) => upstream,
            Err(error) if tcp::is_local_destination(&error) => {
                return self.local_failure(Failure::LocalDestination, record, started, Some(destination.labels));
            }
            Err(error) => {
                let why = ConnectFailure::from_connect(&error);
                return self.connect_failure(
                    (Failure::UpstreamConnect, Failure::UpstreamConnect.flag()),
                    &why,
                    record,
                    started,
                    Some(destination.labels),
                );
            }
        };
        record.upstream_local = upstream.local_addr().ok();
        // The tunnel outlives the HTTP connection it came from: it holds a connection place of its own.
        let Some(place) = self.admit() else {
            return self.local_failure(Failure::Overflow, record, started, Some(destination.labels));
        };
        let peer = record.downstream_remote;
        let tcp_labels = TcpLabels::new(&destination.labels, ResponseFlag::None);
        // Labelled as the Telemetry API's tag overrides say, where some apply to the TCP metrics.
        let tagged = self.telemetry.connection_tags().map(|in_force| {
            let cluster = destination.labels.cluster();
            let fields = Fields {
                response_flags: "-",
                upstream_host: Some(address),
                upstream_cluster: Some(&cluster),
                downstream_remote: peer,
                ..Fields::default()
            };
            tcp_labels.clone().tagged(&in_force.tags, &fields)
        });
        let tcp = self.telemetry.tcp.clone();
        let bounds = Bounds { idle: self.limits.stream_idle_timeout, lifetime: destination.lifetime() };
        let relay = *self.relay();
        record.response_code = StatusCode::OK.as_u16();
        record.destination = Some(destination.labels);
        let recording = self.record_when_relayed(record, started);
        tokio::spawn(async move {
            match hyper::upgrade::on(request).await {
                Ok(upgraded) => {
                    // Untagged, its series are found by its labels' texts (no hashing of the labels per tunnel).
                    let open = match &tagged {
                        Some(each) => tcp.opened_labelled(each.clone()),
                        None => tcp.opened(&tcp_labels),
                    };
                    let joined = relay_tunnel(relay, upgraded, upstream, bounds).await;
                    // Ended by its lifetime: closed under `DT`, as Istio labels a connection's last report.
                    let open = match joined.ended {
                        Ended::Lifetime => {
                            drop(open);
                            let each = tagged.unwrap_or_else(|| std::array::from_fn(|_| tcp_labels.clone()));
                            tcp.ending(each.map(|labels| labels.with_flag(ResponseFlag::DurationTimeout)))
                        }
                        _ => open,
                    };
                    open.closed(joined.from_first, joined.from_second);
                    tracing::debug!(?peer, upstream = %address, ?joined, "tunnel ended");
                    recording.ended(Some(&joined));
                }
                Err(error) => {
                    tracing::debug!(?peer, %error, "tunnel not established");
                    recording.ended(None);
                }
            }
            drop(place);
        });
        Response::new(empty())
    }
}

/// Relays a tunnel's bytes: between the two sockets with the relay's engine when the client's connection is a
/// plain socket (after the bytes the HTTP server had already read past the `CONNECT`), else by copying.
async fn relay_tunnel(relay: Relay, upgraded: Upgraded, mut upstream: TcpStream, bounds: Bounds) -> Relayed {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let mut client = parts.io.into_inner();
            if let Err(error) = upstream.write_all(&parts.read_buf).await {
                return Relayed {
                    from_first: 0,
                    from_second: 0,
                    ended: Ended::Failed(error.kind()),
                    engine: relay.engine(),
                };
            }
            let mut relayed = relay.sockets(&mut client, &mut upstream, bounds).await;
            relayed.from_first += parts.read_buf.len() as u64;
            relayed
        }
        Err(upgraded) => Relay::streams(&mut TokioIo::new(upgraded), &mut upstream, bounds).await,
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` with `Upgrade: …`).
pub(super) fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks =
        headers.get_all(header::CONNECTION).iter().any(|value| upstreams::http1::framing::lists(value, "upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// Relays bytes between an upgraded client connection and its upgraded upstream until either closes, both are
/// silent for the idle timeout or it has lasted its lifetime (`bounds`); `place` is its share of
/// `--max-connections`, held until then; the request is recorded then.
pub(super) async fn join_upgraded(
    client: OnUpgrade,
    upstream: OnUpgrade,
    relay: Relay,
    peer: SocketAddr,
    bounds: Bounds,
    place: OwnedSemaphorePermit,
    recording: RecordedWhenRelayed,
) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let joined = relay_upgraded(relay, client, upstream, bounds).await;
            tracing::debug!(%peer, ?joined, "upgraded connection ended");
            recording.ended(joined.as_ref().ok());
        }
        Err(error) => {
            tracing::debug!(%peer, %error, "upgrade failed");
            recording.ended(None);
        }
    }
    drop(place);
}

/// Relays an upgraded connection: between the two sockets with the relay's engine when both are plain sockets,
/// else by copying; what each HTTP side had already read past the switch is written to the other first.
async fn relay_upgraded(
    relay: Relay,
    client: Upgraded,
    upstream: Upgraded,
    bounds: Bounds,
) -> Result<Relayed, io::Error> {
    let client = match client.downcast::<TokioIo<TcpStream>>() {
        Ok(client) => client,
        Err(client) => return Ok(Relay::streams(&mut TokioIo::new(client), &mut TokioIo::new(upstream), bounds).await),
    };
    let mut client_socket = client.io.into_inner();
    let (mut upstream_io, upstream_read): (Box<dyn upstreams::Io>, _) =
        match upstream.downcast::<TokioIo<Box<dyn upstreams::Io>>>() {
            Ok(upstream) => (upstream.io.into_inner(), upstream.read_buf),
            Err(upstream) => (Box::new(TokioIo::new(upstream)), Default::default()),
        };
    upstream_io.write_all(&client.read_buf).await?;
    client_socket.write_all(&upstream_read).await?;
    let mut relayed = if upstreams::is_plain_socket(upstream_io.as_ref()) {
        let Some(mut upstream_socket) = upstreams::into_plain_socket(upstream_io) else {
            return Err(io::Error::other("the upstream connection is not the socket it was checked to be"));
        };
        relay.sockets(&mut client_socket, &mut upstream_socket, bounds).await
    } else {
        // Upstream TLS: copied.
        Relay::streams(&mut client_socket, &mut upstream_io, bounds).await
    };
    relayed.from_first += client.read_buf.len() as u64;
    relayed.from_second += upstream_read.len() as u64;
    Ok(relayed)
}
