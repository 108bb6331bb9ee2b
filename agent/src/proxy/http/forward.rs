//! Forwarding one request where routing said: its headers and body made ready, the cluster's admission,
//! the tries (retries, per-try timeouts, backoff, the next endpoint each try), and the response shaped as
//! the route says; with the lookups and TLS settings a destination needs.

use super::*;

impl HttpProxy {
    /// Sends the request where routing said, and answers with the upstream's response or the failure. (An async
    /// block, as `handle` is.)
    #[expect(
        clippy::too_many_arguments,
        reason = "a request's parts as routing left them, taken apart so that its future holds each once"
    )]
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps its arguments once; an async fn keeps them twice in the future every request boxes"
    )]
    pub(super) fn forward<'a>(
        &'a self,
        policy: &'a ProxyPolicy,
        request: Request<Incoming>,
        connection: Connection,
        matched: Option<Matched<'a>>,
        target: Option<&'a Target>,
        authority: &'a str,
        mut destination: Destination<'a>,
        mut record: Box<RequestRecord>,
        started: Instant,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'a {
        async move {
            let route = matched.map(|matched| matched.route);
            destination.hash_request(request.headers(), request.uri(), connection.peer.ip());
            // Faults are injected before anything is sent, as Envoy's fault filter runs before its router.
            if let Some(route) = route {
                if let Some((delay, percent)) = route.fault().and_then(|fault| fault.delay) {
                    if chance(percent) {
                        record.response_flags = ResponseFlag::DelayInjected;
                        tokio::time::sleep(delay).await;
                    }
                }
                if let Some((status, percent)) = route.fault().and_then(|fault| fault.abort) {
                    if chance(percent) {
                        let body = Bytes::from_static(b"fault filter abort");
                        return self.local_reply(
                            status,
                            body,
                            ResponseFlag::FaultInjected,
                            record,
                            started,
                            Some(route),
                        );
                    }
                }
            }
            let cors = route.and_then(|route| route.cors());
            let origin = header_text(request.headers(), header::ORIGIN).filter(|o| cors.is_some_and(|c| c.allows(o)));
            if let (Some(cors), Some(origin)) = (cors, origin.as_deref()) {
                if request.method() == Method::OPTIONS
                    && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
                {
                    let mut response = Response::new(empty());
                    preflight_headers(cors, origin, response.headers_mut());
                    record.response_code = StatusCode::OK.as_u16();
                    return self.finish(response, record, started, route);
                }
            }

            let (mut parts, body) = request.into_parts();
            // An HTTP/1.1 upgrade (WebSocket): its headers go upstream, and a 101 joins the two connections. Only
            // the protocols allowed (Envoy's `upgrade_configs`; Istio's is `websocket`) are: any other would take
            // the connection out of the proxy's hands (an `h2c` upgrade's later streams would never be routed).
            // An h2c upgrade is dropped and the request served as HTTP/1.1, as Envoy does; others get 403.
            let upgrade = match requested_upgrade(&parts.headers) {
                Some(protocol) if policy.allows_upgrade(&protocol) => Some(protocol),
                Some(protocol) if protocol.as_bytes().eq_ignore_ascii_case(b"h2c") => None,
                Some(protocol) => {
                    tracing::debug!(?protocol, "upgrade not allowed");
                    return self.local_failure(Failure::UpgradeNotAllowed, record, started, Some(destination.labels));
                }
                None => None,
            };
            let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<OnUpgrade>());
            // What a streamed body has carried so far (a body kept for retries is counted whole, at once).
            let mut received = None;
            let path_and_query = match routing::rewritten_path(matched, &parts.uri) {
                Ok(path_and_query) => path_and_query,
                Err(error) => {
                    tracing::debug!(%error, route = ?record.route_name, "the route's rewrite makes no valid path");
                    return self.local_failure(Failure::UpstreamReset, record, started, Some(destination.labels));
                }
            };
            let upstream_authority = route.and_then(|route| route.rewrite()?.authority.as_deref()).unwrap_or(authority);
            let headers = &mut parts.headers;
            let trailers = accepts_trailers(headers);
            strip_hop_by_hop(headers);
            // Of TE, only `trailers` goes on (gRPC needs it), as Envoy forwards it.
            if trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
            if let Some(protocol) = &upgrade {
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, protocol.clone());
            }
            // As Istio's Envoys do: a sidecar (intercepted traffic) keeps what the client says and adds what is
            // missing; a gateway (`use_remote_address`) appends the client's address to `x-forwarded-for` and says
            // itself how the request came (plain HTTP here), whatever the client claimed.
            if let Listener::Gateway(_) = connection.listener {
                append_forwarded_for(headers, connection.peer);
                headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
            } else {
                headers.entry(X_FORWARDED_PROTO).or_insert(HeaderValue::from_static("http"));
            }
            if let Some(route) = route {
                route.request_headers().apply(headers);
            }
            if let Some(operations) = target.and_then(|target| target.request_headers()) {
                operations.apply(headers);
            }

            // A body is kept for retries and mirrors when it is small and says so; any other streams through once.
            let retries = route.and_then(|route| route.retries()).unwrap_or(&MESH_RETRIES);
            let mirror = route.and_then(|route| route.mirror()).filter(|mirror| chance(mirror.percent));
            let small = body.size_hint().upper().is_some_and(|size| size <= MAX_REPLAYED_BODY);
            let mut streamed = None;
            let replayable = if small && (retries.attempts > 0 || mirror.is_some()) {
                match tokio::time::timeout(self.limits.stream_idle_timeout, body.collect()).await {
                    Ok(Ok(collected)) => Some(collected.to_bytes()),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, peer = %connection.peer, "client body ended early");
                        return self.local_failure(Failure::BadRequest, record, started, Some(destination.labels));
                    }
                    Err(_) => {
                        tracing::debug!(peer = %connection.peer, "client body not sent within the stream idle timeout");
                        let labels = Some(destination.labels);
                        return self.local_failure(Failure::StreamIdleTimeout, record, started, labels);
                    }
                }
            } else {
                let counted = Arc::new(AtomicU64::new(0));
                let idle = self.limits.stream_idle_timeout;
                streamed = Some(Counted::new(body, counted.clone(), idle).boxed());
                received = Some(counted);
                None
            };
            if let Some(bytes) = &replayable {
                record.bytes_received = bytes.len() as u64;
            }
            if let (Some(mirror), Some(bytes)) = (mirror, &replayable) {
                self.mirror(policy, mirror, &parts, &path_and_query, upstream_authority, bytes.clone(), &connection);
            }

            let idle = self.limits.stream_idle_timeout;
            let clock = TryClock::start(route.and_then(|route| route.timeout()), retries.per_try_timeout, idle);
            // The cluster's connection-pool limits: a slot now, a wait within the pending limit, or 503 UO.
            let cluster = destination.cluster();
            let slot = match clock.admit(cluster).await {
                Ok(slot) => slot,
                Err(failure) => return self.local_failure(failure, record, started, Some(destination.labels)),
            };
            let outlier = cluster.and_then(|cluster| Some((cluster, cluster.policy.outlier.as_ref()?)));
            let mut address = match self.address_of(&destination, routing::host_of(authority)).await {
                Ok(address) => address,
                Err(failure) => return self.local_failure(failure, record, started, Some(destination.labels)),
            };
            // TLS to the endpoints when the DestinationRule originates it; settings that cannot be used refuse the
            // request rather than send it in the clear.
            let tls = match upstream_tls(&destination, upstream_authority) {
                Ok(tls) => tls,
                Err(reason) => {
                    tracing::debug!(destination = %destination.labels.cluster(), %reason, "TLS origination refused");
                    return self.local_failure(Failure::TlsOrigination, record, started, Some(destination.labels));
                }
            };
            let connect = destination.connect(&policy.upstream);
            // An upgrade (WebSocket) stays HTTP/1.1 where only a DestinationRule's h2UpgradePolicy makes the
            // cluster HTTP/2, as Envoy upgrades plain requests only.
            let declared_http2 = destination.service.is_some_and(|choice| choice.service.http2(choice.port));
            let http2 = destination.http2 && (upgrade.is_none() || declared_http2);
            let send = |attempt: u32, deadline: TryDeadline| {
                if attempt > 0 {
                    address = destination.next_address();
                }
                let body = match (&replayable, streamed.take()) {
                    (Some(bytes), _) if bytes.is_empty() => empty(),
                    (Some(bytes), _) => Full::new(bytes.clone()).map_err(|never| match never {}).boxed(),
                    (None, Some(body)) => body,
                    (None, None) => return Err(Failure::UpstreamReset),
                };
                let outgoing = Outgoing {
                    address,
                    http2,
                    authority: upstream_authority,
                    path_and_query: path_and_query.clone(),
                    method: parts.method.clone(),
                    headers: parts.headers.clone(),
                    connect,
                    tls: tls.clone(),
                    reuse: destination.reuse(),
                };
                let (upstream, try_started) = (address, Instant::now());
                // Boxed (`PendingResponse`): the exchange's state is moved no further (through the tries and their
                // timeouts), and the request's own future, which every request boxes whole, stays small.
                let pending = self.upstreams.send(outgoing, body);
                Ok(async move {
                    let result = tokio::time::timeout_at(deadline.at, pending).await.ok();
                    if let Some((cluster, outlier)) = outlier {
                        let outcome = match &result {
                            Some(Ok(response)) => Outcome::Status(response.status().as_u16()),
                            _ => Outcome::Failed,
                        };
                        cluster.state.report(upstream.ip(), outcome, outlier);
                    }
                    match &result {
                        Some(Err(SendError::LocalDestination(error))) => {
                            tracing::info!(%error, %upstream, "upstream refused: the node itself")
                        }
                        Some(Err(error)) => tracing::debug!(?error, %upstream, attempt, "upstream try failed"),
                        _ => {}
                    }
                    Some(result?.map(|response| (response, try_started)))
                })
            };
            let status = |(response, _): &(Response<UpstreamBody>, Instant)| response.status().as_u16();
            let outcome = retry::with_retries(&clock, retries, (replayable.is_some(), cluster), status, send).await;
            record.upstream_host = Some(address);
            let ((response, try_started), not_retried) = match outcome {
                Ok(answered) => answered,
                Err((failure, why, not_retried)) => {
                    if let Some(received) = &received {
                        record.bytes_received = received.load(Ordering::Relaxed);
                    }
                    let labels = Some(destination.labels);
                    // A failure the route would have retried carries why it was not (`UF,URX`), as in Envoy's log.
                    let flagged = (failure, failure.flag().not_retried(not_retried));
                    return match why {
                        Some(why) => self.connect_failure(flagged, &why, record, started, labels),
                        None => {
                            let body = Bytes::from_static(failure.body().as_bytes());
                            self.local_failure_saying(flagged, body, record, started, labels)
                        }
                    };
                }
            };
            if not_retried != ResponseFlag::None {
                record.response_flags = not_retried;
            }
            record.upstream_local = response.body().upstream_local();
            let service_time = try_started.elapsed();
            record.upstream_service_time = Some(service_time);
            let mut response = response;
            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            let mut upgrade = None;
            if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
                // The upgraded connection outlives the HTTP connection it came from: it holds a connection
                // place of its own.
                let Some(place) = self.admit() else {
                    return self.local_failure(Failure::Overflow, record, started, Some(destination.labels));
                };
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                let bounds = Bounds { idle: self.limits.stream_idle_timeout, lifetime: destination.lifetime() };
                upgrade = Some((client_upgrade, upstream_upgrade, bounds, place));
            }
            let (mut parts, body) = response.into_parts();
            if let Some(telemetry) = &record.telemetry {
                telemetry.capture_response_headers(&parts.headers, &mut record.captured_response_headers);
            }
            let upgraded_to = parts.headers.get(header::UPGRADE).cloned().filter(|_| switching);
            strip_hop_by_hop(&mut parts.headers);
            if let Some(protocol) = upgraded_to {
                parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, protocol);
            }
            let service_ms = u64::try_from(service_time.as_millis()).unwrap_or(u64::MAX);
            parts.headers.insert(X_ENVOY_UPSTREAM_SERVICE_TIME, service_time_value(service_ms));
            if let Some(operations) = target.and_then(|target| target.response_headers()) {
                operations.apply(&mut parts.headers);
            }
            if let Some(operations) = route.and_then(|route| route.response_headers()) {
                operations.apply(&mut parts.headers);
            }
            if let (Some(cors), Some(origin)) = (cors, origin.as_deref()) {
                response_cors_headers(cors, origin, &mut parts.headers);
            }
            record.response_code = parts.status.as_u16();
            record.destination = Some(destination.labels);
            let response = Response::from_parts(parts, body.map_err(BoxError::from));
            if let Some((client_upgrade, upstream_upgrade, bounds, place)) = upgrade {
                // Recorded when the upgraded connection ends, with its bytes (the 101 carries none).
                let recording = self.record_when_relayed(record, started);
                let peer = connection.peer;
                let relay = *self.relay();
                tokio::spawn(join_upgraded(client_upgrade, upstream_upgrade, relay, peer, bounds, place, recording));
                return response.map(|body| body.boxed());
            }
            self.finish_streaming(response, record, started, received, slot)
        }
    }

    /// Whether `host` resolves to `address` (a host that is an address is itself); a failed lookup is a no.
    pub(crate) async fn host_resolves_to(&self, host: &str, address: std::net::IpAddr) -> bool {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return ip == address;
        }
        let Some(resolver) = &self.resolver else { return false };
        // Boxed: a lookup's state is large, and most requests need none.
        match Box::pin(resolver.resolves_to(host, address)).await {
            Ok(resolves) => resolves,
            Err(error) => {
                tracing::debug!(%host, %error, "verifying the host by DNS failed");
                false
            }
        }
    }

    /// Where `destination` is: its address, or for a forward-proxied request sent to its original destination
    /// (which routing leaves unspecified), the address `host` resolves to (an IP literal, or a DNS name through
    /// the proxy's resolver).
    pub(super) async fn address_of(&self, destination: &Destination<'_>, host: &str) -> Result<SocketAddr, Failure> {
        let address = destination.address;
        if !address.ip().is_unspecified() {
            return Ok(address);
        }
        self.resolve(host, address.port()).await.ok_or(Failure::DnsFailure)
    }

    /// `host` (an IP literal, or a DNS name through the proxy's resolver) on `port`; `None` when it does not
    /// resolve.
    pub(crate) async fn resolve(&self, host: &str, port: u16) -> Option<SocketAddr> {
        if let Ok(ip) = host.parse() {
            return Some(SocketAddr::new(ip, port));
        }
        let resolver = self.resolver.as_ref()?;
        // Boxed: a lookup's state is large, and most requests need none.
        match Box::pin(resolver.lookup(host)).await {
            Ok(ip) => Some(SocketAddr::new(ip, port)),
            Err(error) => {
                tracing::debug!(%host, %error, "lookup failed");
                None
            }
        }
    }
}

/// The TLS `destination`'s requests go upstream with (`None`: plain), the server name its `sni`, else `host`'s;
/// `Err` when its DestinationRule's TLS settings cannot be used.
pub(super) fn upstream_tls(destination: &routing::Destination<'_>, host: &str) -> Result<Option<UpstreamTls>, String> {
    match destination.cluster().and_then(|cluster| cluster.policy.tls.as_deref()) {
        None => Ok(None),
        Some(TlsOrigination::Unusable(reason)) => Err(reason.clone()),
        Some(TlsOrigination::Ready { config, sni }) => {
            let server_name = match sni {
                Some(sni) => sni.clone(),
                None => rustls::pki_types::ServerName::try_from(routing::host_of(host).to_owned())
                    .map(Arc::new)
                    .map_err(|error| error.to_string())?,
            };
            Ok(Some(UpstreamTls { config: config.clone(), server_name }))
        }
    }
}
