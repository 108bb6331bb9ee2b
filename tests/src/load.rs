//! Steady load from a workload: flows, each sent in a loop on a thread of its own, their outcomes tallied by
//! phase (what the test was doing meanwhile: a restart, a configuration change) and failures by cause.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

/// What became of one flow in one phase.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub done: u64,
    /// Failures by cause (the error's text).
    pub failed: BTreeMap<String, u64>,
    /// When the first failures happened (`HH:MM:SS.mmm`, UTC, as the agent logs), to find them in its log.
    pub failed_at: Vec<String>,
}

/// Failure times kept per tally.
const FAILURE_TIMES: usize = 16;

impl Tally {
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// The load's flows and what became of them.
#[derive(Default)]
pub struct Load {
    stop: AtomicBool,
    phase: AtomicUsize,
    tallies: Mutex<BTreeMap<(usize, &'static str), Tally>>,
}

impl Load {
    /// Sends `attempt` in a loop (every `pause`) until `stop`, tallying each outcome under the phase it began in.
    pub fn send(&self, flow: &'static str, pause: Duration, mut attempt: impl FnMut() -> Result<(), String>) {
        while !self.stop.load(Ordering::SeqCst) {
            let phase = self.phase.load(Ordering::SeqCst);
            let outcome = attempt();
            let mut tallies = self.tallies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let tally = tallies.entry((phase, flow)).or_default();
            match outcome {
                Ok(()) => tally.done += 1,
                Err(cause) => {
                    // When, to the millisecond and in UTC as the agent logs: to find it in the agent's log.
                    let at = utc_time_of_day();
                    eprintln!("{at} {flow} failed: {cause}");
                    if tally.failed_at.len() < FAILURE_TIMES {
                        tally.failed_at.push(at);
                    }
                    *tally.failed.entry(cause).or_default() += 1;
                }
            }
            drop(tallies);
            std::thread::sleep(pause);
        }
    }

    /// Outcomes from now on are tallied under `phase`.
    pub fn enter(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// `flow`'s outcomes in `phase`.
    pub fn tally(&self, phase: usize, flow: &str) -> Tally {
        let tallies = self.tallies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tallies.iter().find(|((p, f), _)| *p == phase && *f == flow).map(|(_, tally)| tally.clone()).unwrap_or_default()
    }

    /// Every flow's outcomes, over all phases.
    pub fn totals(&self) -> BTreeMap<&'static str, Tally> {
        let tallies = self.tallies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut totals: BTreeMap<&'static str, Tally> = BTreeMap::new();
        for ((_, flow), tally) in tallies.iter() {
            let total = totals.entry(flow).or_default();
            total.done += tally.done;
            for (cause, count) in &tally.failed {
                *total.failed.entry(cause.clone()).or_default() += count;
            }
            total.failed_at.extend(tally.failed_at.iter().cloned());
        }
        totals
    }
}

/// The lines of an agent's `log` written in the second of each of `times` (`HH:MM:SS.mmm`) or the second before:
/// what the agent did around a failure.
pub fn log_around(log: &str, times: &[String]) -> String {
    let seconds: Vec<String> = times
        .iter()
        .flat_map(|time| {
            let second = time.split('.').next().unwrap_or(time).to_owned();
            let earlier = earlier_second(&second);
            [format!("T{second}."), earlier.map(|earlier| format!("T{earlier}.")).unwrap_or_default()]
        })
        .filter(|second| !second.is_empty())
        .collect();
    let lines = log.lines().filter(|line| seconds.iter().any(|second| line.contains(second.as_str())));
    // A debug log writes thousands of lines a second under load: enough to read, not to drown the failure.
    lines.take(LINES_AROUND).collect::<Vec<_>>().join("\n")
}

const LINES_AROUND: usize = 400;

/// `HH:MM:SS` one second earlier (none at midnight).
fn earlier_second(time: &str) -> Option<String> {
    let parts: Vec<u32> = time.split(':').map(|part| part.parse().ok()).collect::<Option<_>>()?;
    let [hours, minutes, seconds] = parts[..] else { return None };
    let total = (hours * 3600 + minutes * 60 + seconds).checked_sub(1)?;
    Some(format!("{:02}:{:02}:{:02}", total / 3600, total / 60 % 60, total % 60))
}

/// The time of day in UTC, `HH:MM:SS.mmm`.
fn utc_time_of_day() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (seconds, millis) = (now.as_secs() % 86_400, now.subsec_millis());
    format!("{:02}:{:02}:{:02}.{millis:03}", seconds / 3600, seconds / 60 % 60, seconds % 60)
}

/// A connection to `to`, with reads bounded (a hang is a failure).
pub fn connect(to: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// One `GET /` with `host` on the kept connection to `to` (opened if there is none); the connection is dropped
/// when the response asks, or fails.
pub fn kept_alive(kept: &mut Option<BufReader<TcpStream>>, to: SocketAddr, host: &str) -> Result<(), String> {
    if kept.is_none() {
        *kept = Some(BufReader::new(connect(to)?));
    }
    let reader = kept.as_mut().ok_or("no connection")?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let outcome = reader.get_mut().write_all(request.as_bytes()).map_err(|e| format!("write: {e}"));
    match outcome.and_then(|()| read_response(reader)) {
        Ok(false) => Ok(()),
        Ok(true) => {
            *kept = None;
            Ok(())
        }
        Err(cause) => {
            *kept = None;
            Err(cause)
        }
    }
}

/// One `GET /` with `host` on a connection of its own to `to`.
pub fn one_request(to: SocketAddr, host: &str) -> Result<(), String> {
    let mut reader = BufReader::new(connect(to)?);
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    reader.get_mut().write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
    read_response(&mut reader).map(|_| ())
}

/// Reads one response, which must be a 200 with a Content-Length body; whether it asked to close the connection.
pub fn read_response(reader: &mut BufReader<TcpStream>) -> Result<bool, String> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| format!("reading the status: {e}"))?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(format!("status line {:?}", line.trim_end()));
    }
    let (mut length, mut closes) = (0, false);
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(|e| format!("reading headers: {e}"))?;
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(value) = header.strip_prefix("content-length:") {
            length = value.trim().parse().map_err(|_| format!("bad length {header:?}"))?;
        }
        closes |= header == "connection: close";
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| format!("reading the body: {e}"))?;
    Ok(closes)
}

/// A connection to `to` that must not be established (a blackholed destination).
pub fn never_connects(to: SocketAddr) -> Result<(), String> {
    match TcpStream::connect_timeout(&to, Duration::from_millis(200)) {
        Ok(_) => Err(format!("{to} was reached")),
        Err(_) => Ok(()),
    }
}
