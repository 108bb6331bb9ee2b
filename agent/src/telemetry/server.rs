//! The agent's HTTP endpoints: metrics (`/stats/prometheus` and `/metrics`, Istio's port 15090), readiness
//! (`/healthz/ready`, 15021) and the admin endpoints on loopback (`/config_dump`, `/ready`, 15000).

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{net::TcpListener, sync::watch};

use super::flows::{Filter, FlowStream, Next, MAX_WATCHERS};
use crate::config::workloads::KnownWorkloads;

type Body = BoxBody<Bytes, Infallible>;

/// Serves `registry` on `listener` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, registry: Arc<Registry>) {
    serve(listener, "metrics", move |request, _| match request.uri().path() {
        "/stats/prometheus" | "/metrics" => {
            let mut body = String::new();
            if encode(&mut body, &registry).is_err() {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encoding metrics failed\n".into());
            }
            // The format Envoy's /stats/prometheus serves (family names as sampled, `istio_requests_total`), which
            // every scraper and promtool read.
            text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", prometheus_text(&body))
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found: try /stats/prometheus\n".into()),
    })
    .await
}

/// Serves the admin endpoints: `/config_dump` (the configuration and policy in force, as JSON), `/status`,
/// `/routes`, `/observe` (flow decisions as they happen, one JSON object a line) and `/ready`.
pub async fn serve_admin(listener: TcpListener, status: super::status::AgentState) {
    serve(listener, "admin", move |request, progress| match request.uri().path() {
        "/config_dump" => {
            let dump = status.dump.borrow().clone();
            text(StatusCode::OK, "application/json", dump.render())
        }
        "/status" => text(StatusCode::OK, "application/json", status.render()),
        "/routes" => match status.route(request.uri().query().unwrap_or("")) {
            Ok(answer) => text(StatusCode::OK, "application/json", answer),
            Err(why) => text(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n")),
        },
        "/observe" => observe(&status.flows, &status.workloads, request.uri().query().unwrap_or(""), progress),
        "/ready" => text(StatusCode::OK, "text/plain", "LIVE\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /status, /routes, /observe, /config_dump or /ready\n".into(),
        ),
    })
    .await
}

/// What readiness waits for: the configuration listed (with --kube), and the classifier on every interface
/// the agent was told to intercept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Whether every configuration source has been read whole.
    pub listed: bool,
    /// Configured interfaces without the classifier, each with why: traffic entering them is not enforced.
    pub unenforced: Vec<(String, String)>,
    /// The agent is stopping (or has handed over to a successor): load balancers should move on.
    pub draining: bool,
}

impl Readiness {
    /// Why the agent is not ready, or `None` when it is.
    pub fn not_ready_because(&self) -> Option<String> {
        if self.draining {
            return Some("draining: the agent is stopping".to_owned());
        }
        if !self.listed {
            return Some("the configuration has not been listed yet".to_owned());
        }
        let unenforced: Vec<String> =
            self.unenforced.iter().map(|(interface, why)| format!("{interface} ({why})")).collect();
        (!unenforced.is_empty()).then(|| format!("no classifier on {}", unenforced.join(", ")))
    }
}

/// Serves `/healthz/ready` (Istio's readiness path): 200 when `readiness` holds, 503 naming what is missing.
pub async fn serve_readiness(listener: TcpListener, readiness: watch::Receiver<Readiness>) {
    serve(listener, "readiness", move |request, _| match request.uri().path() {
        "/healthz/ready" => match readiness.borrow().not_ready_because() {
            None => text(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found: try /healthz/ready\n".into()),
    })
    .await
}

/// Connections each endpoint serves at once: scrapers, probes and operators need a few; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's head, and a connection may stay open at all: these endpoints
/// answer at once, so a client holding one longer is not a scraper.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// A stream (`/observe`) writes at least this often (an empty line when no flow came)…
const HEARTBEAT: Duration = Duration::from_secs(10);
/// …and is closed when its client has not taken a line for this long: a client that stopped reading.
const STREAM_STALL: Duration = Duration::from_secs(35);

/// Whether a connection streams, and when its client last took a line: a stream outlives `CONNECTION_LIFETIME`
/// for as long as its client reads.
#[derive(Clone, Default)]
pub struct Progress(Arc<Mutex<Option<Instant>>>);

impl Progress {
    /// The connection streams; its client took a line now.
    fn taken(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Whether a connection opened at `opened` has been held longer than it may.
    fn overstayed(&self, opened: Instant) -> bool {
        match *self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(taken) => taken.elapsed() > STREAM_STALL,
            None => opened.elapsed() > CONNECTION_LIFETIME,
        }
    }
}

/// `/observe?verdict=…&host=…&source=…`: the flows the filter selects, as they are decided, one JSON object a line
/// (`{"lost": N}` when the client fell behind and N flows were lost to it), until the client goes.
fn observe(flows: &FlowStream, workloads: &Arc<KnownWorkloads>, query: &str, progress: &Progress) -> Response<Body> {
    let filter = match Filter::from_query(query) {
        Ok(filter) => filter,
        Err(why) => return text(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n")),
    };
    let Some(watcher) = flows.watch(filter) else {
        let why = format!("{MAX_WATCHERS} clients already observe: try again when one has gone\n");
        return text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why);
    };
    progress.taken();
    let state = (watcher, workloads.clone(), progress.clone());
    let lines = futures_util::stream::unfold(state, |(mut watcher, workloads, progress)| async move {
        // Asked for the next line: the client took the last one.
        progress.taken();
        let line = match tokio::time::timeout(HEARTBEAT, watcher.next(&workloads)).await {
            Err(_) => "\n".to_owned(),
            Ok(Next::Flow(flow)) => serde_json::to_string(&*flow).unwrap_or_default() + "\n",
            Ok(Next::Lost(lost)) => format!("{{\"lost\":{lost}}}\n"),
            Ok(Next::Closed) => return None,
        };
        Some((Ok(Frame::data(Bytes::from(line))), (watcher, workloads, progress)))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(StreamBody::new(lines).boxed())
        .expect("static headers are valid")
}

/// Accepts HTTP/1.1 connections on `listener` and answers each request with `respond`: at most
/// `MAX_CONNECTIONS` at once, each within `CONNECTION_LIFETIME` (a stream: while its client reads); an accept that
/// fails (out of descriptors) is retried after a pause rather than at once.
async fn serve<F>(listener: TcpListener, what: &'static str, respond: F)
where
    F: Fn(&Request<Incoming>, &Progress) -> Response<Body> + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, endpoint = what, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, endpoint = what, "too many connections: closed");
            continue;
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let (progress, opened) = (Progress::default(), Instant::now());
            let shown = progress.clone();
            let service = service_fn(move |request| {
                let response = respond(&request, &shown);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let overstayed = async {
                while !progress.overstayed(opened) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            };
            tokio::select! {
                ended = connection => if let Err(error) = ended {
                    tracing::debug!(%error, %peer, endpoint = what, "connection ended");
                },
                () = overstayed => tracing::debug!(%peer, endpoint = what, "connection held too long: closed"),
            }
            drop(slot);
        });
    }
}

/// OpenMetrics text → Prometheus text format 0.0.4: counter families are named with their `_total` suffix, and
/// the `# EOF` and `# UNIT` lines go.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) && !name.ends_with("_total") { "_total" } else { "" };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_prometheus_text_with_counters_named_as_sampled() {
        let openmetrics = "# HELP istio_requests Requests.\n# TYPE istio_requests counter\n\
                           istio_requests_total{response_code=\"200\"} 1\n# HELP up Up.\n# TYPE up gauge\nup 1\n# EOF\n";
        assert_eq!(
            prometheus_text(openmetrics),
            "# HELP istio_requests_total Requests.\n# TYPE istio_requests_total counter\n\
             istio_requests_total{response_code=\"200\"} 1\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}
