//! A request's access-log line — Envoy's default text line, Sluice's JSON line, the timestamp they start with —
//! and the bounded queue that takes lines to the writer thread, off the request's path.

use std::{
    fmt::Write as _,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::SystemTime,
};

use tokio::sync::mpsc;

use super::RequestRecord;

/// The access-log lines on their way to the writer, bounded in count and in bytes: clients whose requests make
/// long lines cannot fill memory while standard output is slow.
#[derive(Clone)]
pub(super) struct LineQueue {
    lines: mpsc::Sender<String>,
    /// The bytes of the lines queued and not yet taken: reserved before a line is queued, released as it is taken.
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The writer's end of a [`LineQueue`].
pub(super) struct LineQueueReader {
    lines: mpsc::Receiver<String>,
    queued: Arc<AtomicUsize>,
}

impl LineQueue {
    pub(super) fn new(max_lines: usize, max_bytes: usize) -> (LineQueue, LineQueueReader) {
        let (sender, receiver) = mpsc::channel(max_lines);
        let queued = Arc::new(AtomicUsize::new(0));
        (LineQueue { lines: sender, queued: queued.clone(), max_bytes }, LineQueueReader { lines: receiver, queued })
    }

    /// Queues `line` unless that would pass a bound: whether it was queued.
    pub(super) fn offer(&self, line: String) -> bool {
        let size = line.len();
        if self.queued.fetch_add(size, Ordering::Relaxed) + size > self.max_bytes {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        if self.lines.try_send(line).is_err() {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        true
    }
}

impl LineQueueReader {
    /// The next line, waiting for one; `None` once every sender is gone.
    pub(super) fn blocking_next(&mut self) -> Option<String> {
        self.lines.blocking_recv().inspect(|line| self.release(line))
    }

    /// The next line if one is queued.
    pub(super) fn try_next(&mut self) -> Option<String> {
        self.lines.try_recv().ok().inspect(|line| self.release(line))
    }

    fn release(&self, line: &str) {
        self.queued.fetch_sub(line.len(), Ordering::Relaxed);
    }
}

fn or_dash(value: Option<&str>) -> &str {
    match value {
        Some(value) if !value.is_empty() => value,
        _ => "-",
    }
}

/// Envoy's default format:
/// `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS%
/// %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%"
/// "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"`.
pub fn text_line(record: &RequestRecord) -> String {
    let mut line = String::with_capacity(256);
    let upstream_host = record.upstream_host.map(|h| h.to_string());
    let service_time = record.upstream_service_time.map(|t| t.as_millis().to_string());
    let _ = writeln!(
        line,
        "[{}] \"{} {} {}\" {} {} {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"",
        record.start.map(rfc3339_millis).unwrap_or_else(|| "-".into()),
        or_dash(Some(record.method())),
        or_dash(Some(record.path())),
        record.protocol,
        record.response_code,
        record.response_flags.text(),
        record.bytes_received,
        record.bytes_sent,
        record.duration.as_millis(),
        or_dash(service_time.as_deref()),
        or_dash(record.x_forwarded_for()),
        or_dash(record.user_agent()),
        or_dash(record.request_id()),
        or_dash(Some(record.authority())),
        or_dash(upstream_host.as_deref()),
    );
    line
}

pub fn json_line(record: &RequestRecord) -> String {
    let mut line = serde_json::json!({
        "start_time": record.start.map(rfc3339_millis),
        "method": record.method(),
        "path": record.path(),
        "protocol": record.protocol,
        "response_code": record.response_code,
        "response_flags": record.response_flags.text(),
        "bytes_received": record.bytes_received,
        "bytes_sent": record.bytes_sent,
        "duration": record.duration.as_millis() as u64,
        "upstream_service_time": record.upstream_service_time.map(|t| t.as_millis() as u64),
        "x_forwarded_for": record.x_forwarded_for(),
        "user_agent": record.user_agent(),
        "request_id": record.request_id(),
        "authority": record.authority(),
        "upstream_host": record.upstream_host.map(|h| h.to_string()),
        "upstream_local_address": record.upstream_local.map(|a| a.to_string()),
        "upstream_transport_failure_reason": record.upstream_transport_failure_reason,
        "upstream_cluster": record.upstream_cluster(),
        "route_name": record.route_name.as_ref().map(ToString::to_string),
        "downstream_remote_address": record.downstream_remote.map(|a| a.to_string()),
        "downstream_local_address": record.downstream_local.map(|a| a.to_string()),
        "requested_server_name": record.server_name.as_deref(),
        "downstream_peer_uri_san": record.source_principal.as_ref().map(|principal| principal.as_str()),
        "response_code_details": record.response_code_details,
    });
    if let Some(engine) = record.relay_engine {
        line["relay_engine"] = engine.into();
    }
    let mut line = line.to_string();
    line.push('\n');
    line
}

/// `2026-11-24T06:01:02.345Z`, as Envoy writes `%START_TIME%`.
pub fn rfc3339_millis(time: SystemTime) -> String {
    let mut out = String::with_capacity(24);
    write_rfc3339_millis(time, &mut out);
    out
}

/// `time` as `YYYY-MM-DDTHH:MM:SS.mmmZ`, written into `out` digit by digit (an access-log line's first field:
/// formatting machinery per line cost more than the rest of the timestamp).
pub fn write_rfc3339_millis(time: SystemTime, out: &mut String) {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = crate::telemetry::access_log::format::civil_date(days);
    let digits = |out: &mut String, value: u64, width: u32| {
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (value / 10u64.pow(place) % 10) as u8));
        }
    };
    digits(out, year.clamp(0, 9999) as u64, 4);
    out.push('-');
    digits(out, month as u64, 2);
    out.push('-');
    digits(out, day as u64, 2);
    out.push('T');
    digits(out, rest / 3600, 2);
    out.push(':');
    digits(out, rest % 3600 / 60, 2);
    out.push(':');
    digits(out, rest % 60, 2);
    out.push('.');
    digits(out, u64::from(since.subsec_millis()), 3);
    out.push('Z');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_log_queue_is_bounded_by_bytes_as_well_as_lines() {
        let (queue, mut reader) = LineQueue::new(10, 100);
        assert!(queue.offer("a".repeat(40)));
        assert!(queue.offer("b".repeat(40)));
        assert!(!queue.offer("c".repeat(40)), "120 bytes would pass the bound of 100");
        assert!(queue.offer("d".repeat(20)), "100 bytes do not");
        assert_eq!(reader.try_next().map(|line| line.len()), Some(40));
        assert!(queue.offer("e".repeat(40)), "a line taken frees its bytes");
        assert!(!queue.offer("f".to_owned()), "the queue is full to the byte");

        let (queue, _reader) = LineQueue::new(2, 1 << 20);
        assert!(queue.offer("1".into()) && queue.offer("2".into()));
        assert!(!queue.offer("3".into()), "and by lines");
        assert_eq!(queue.queued.load(Ordering::Relaxed), 2, "a refused line holds no bytes");
    }
}
