//! A request's tries: the wait for a slot in the cluster's pool, how long each try may take, which outcomes are
//! tried again, and the backoff between tries — as Envoy's router does them.

use std::{future::Future, time::Duration};

use tokio::{sync::OwnedSemaphorePermit, time::Instant};

use crate::{
    policy::{
        clusters::{Admission, Cluster, RetryPlace},
        routes::RetryPolicy,
    },
    proxy::{connect_failure::ConnectFailure, failure::Failure, upstreams::SendError},
    telemetry::response_flags::ResponseFlag,
};

/// The deadlines a request's tries run under.
#[derive(Clone, Copy, Debug)]
pub(super) struct TryClock {
    /// The route's timeout, from when the request was routed: no wait for a slot, try or backoff outlasts it.
    overall: Option<Instant>,
    per_try: Option<Duration>,
    /// Bounds the wait for an answer when the route has no timeout of its own (Envoy's `stream_idle_timeout`).
    stream_idle: Duration,
}

/// When a try must have its answer, and why then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TryDeadline {
    pub at: Instant,
    /// The route set no timeout: the bound is the stream idle timeout, whose expiry is not retried.
    pub idle_bound: bool,
}

impl TryClock {
    /// Starts now. A timeout too long to reach (a configuration may say 1000000h) is no timeout, not an overflow.
    pub(super) fn start(route_timeout: Option<Duration>, per_try: Option<Duration>, stream_idle: Duration) -> TryClock {
        TryClock {
            overall: route_timeout.and_then(|timeout| Instant::now().checked_add(timeout)),
            per_try,
            stream_idle,
        }
    }

    /// The deadline of a try starting now: the earlier of the route's and the per-try timeout's, else the stream
    /// idle timeout.
    pub(super) fn try_deadline(&self) -> TryDeadline {
        let per_try = self.per_try.and_then(|timeout| Instant::now().checked_add(timeout));
        let deadline = match (self.overall, per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match deadline {
            Some(at) => TryDeadline { at, idle_bound: false },
            None => TryDeadline { at: Instant::now() + self.stream_idle, idle_bound: true },
        }
    }

    /// Whether the route's timeout has not passed.
    pub(super) fn time_left(&self) -> bool {
        self.overall.is_none_or(|overall| Instant::now() < overall)
    }

    /// A slot in `cluster`'s connection pool: at once, after a wait within its pending limit (bounded by the
    /// route's timeout: 504 UT), or none when the pending requests are at their limit (503 UO). `None` inside:
    /// the cluster sets no limit.
    pub(super) async fn admit(&self, cluster: Option<&Cluster>) -> Result<Option<OwnedSemaphorePermit>, Failure> {
        let Some(cluster) = cluster else { return Ok(None) };
        match cluster.state.admit() {
            Admission::Now(permit) => Ok(permit),
            Admission::Overflow => Err(Failure::Overflow),
            Admission::Wait(slots) => {
                let acquire = slots.acquire_owned();
                let waited = cluster
                    .state
                    .waiting(async {
                        match self.overall {
                            Some(deadline) => tokio::time::timeout_at(deadline, acquire).await.ok()?.ok(),
                            None => acquire.await.ok(),
                        }
                    })
                    .await;
                waited.map(Some).ok_or(Failure::UpstreamTimeout)
            }
        }
    }
}

/// How long to wait before retry `retry` (the first is 1): Envoy's fully jittered exponential backoff, a random
/// time below 25 ms, then below 50, 100, 200, and 250 ms from then on.
pub(super) fn backoff(retry: u32) -> Duration {
    Duration::from_millis(fastrand::u64(0..backoff_ceiling_ms(retry)))
}

fn backoff_ceiling_ms(retry: u32) -> u64 {
    (25u64 << retry.saturating_sub(1).min(4)).min(250)
}

/// A place for a retry in `cluster`'s budget: `Some(None)` where it sets none, `None` where it is spent.
fn budget(cluster: Option<&Cluster>) -> Option<Option<RetryPlace>> {
    match cluster.and_then(|cluster| Some((cluster, cluster.policy.max_retries()?))) {
        Some((cluster, max)) => cluster.state.retry(max).map(Some),
        None => Some(None),
    }
}

/// What follows a try, as the router reads its outcome.
#[derive(Debug)]
pub(super) enum Tried<R> {
    /// The answer to pass on: a response not to retry on, or the last one there will be.
    Answered(R),
    /// Tried again: the outcome is one to retry on, and the policy and the time allow another try.
    Retry,
    /// The request fails with this (and why no connection could be made, when none could).
    Failed(Failure, Option<ConnectFailure>),
}

/// Reads a try's `result` (`None`: its deadline passed) under `retries`; `status` reads a response's status,
/// `may_retry` says whether another try may be made (retries left, a body that can be sent again, time, a place in
/// the cluster's retry budget), asked only of an outcome the policy retries on.
pub(super) fn judge<R>(
    result: Option<Result<R, SendError>>,
    status: impl Fn(&R) -> u16,
    retries: &RetryPolicy,
    deadline: TryDeadline,
    may_retry: impl FnOnce() -> bool,
) -> Tried<R> {
    // The outcome as it stands, and whether the policy retries on it.
    let (outcome, retriable) = match result {
        Some(Ok(response)) => {
            let retriable = retries.on.status(status(&response));
            (Tried::Answered(response), retriable)
        }
        Some(Err(SendError::Connect(why))) => {
            (Tried::Failed(Failure::UpstreamConnect, Some(why)), retries.on.connect_failure)
        }
        Some(Err(SendError::Request(_))) => {
            (Tried::Failed(Failure::UpstreamReset, None), retries.on.reset_or_timeout())
        }
        Some(Err(SendError::LocalDestination(_))) => (Tried::Failed(Failure::LocalDestination, None), false),
        Some(Err(SendError::Refused(_))) => (Tried::Failed(Failure::UpstreamReset, None), retries.on.refused()),
        Some(Err(SendError::Protocol(_))) => {
            (Tried::Failed(Failure::UpstreamProtocolError, None), retries.on.reset_or_timeout())
        }
        None if deadline.idle_bound => (Tried::Failed(Failure::UpstreamIdle, None), false),
        None => (Tried::Failed(Failure::UpstreamTimeout, None), retries.on.reset_or_timeout()),
    };
    if retriable && may_retry() {
        Tried::Retry
    } else {
        outcome
    }
}

/// Runs `send` (given the try's number, from 0, and its deadline; it applies the deadline) until a try answers
/// or fails for good (with why no connection could be made, when that failed it); waits `backoff` between tries,
/// never past the route's timeout. `replayable`: the request's body can be sent again. `cluster`: whose retry
/// budget (`maxRetries`) a retry takes a place in, for as long as its try lasts. An answer the policy would have
/// retried comes with Envoy's flag for why it was not: `URX` (no retries left), `UO` (the budget spent); so does a
/// failure the policy would have retried.
pub(super) async fn with_retries<R, F, Fut>(
    clock: &TryClock,
    retries: &RetryPolicy,
    (replayable, cluster): (bool, Option<&Cluster>),
    status: impl Fn(&R) -> u16,
    mut send: F,
) -> Result<(R, ResponseFlag), (Failure, Option<ConnectFailure>, ResponseFlag)>
where
    F: FnMut(u32, TryDeadline) -> Result<Fut, Failure>,
    Fut: Future<Output = Option<Result<R, SendError>>>,
{
    let mut attempt = 0u32;
    // The place the retry under way holds in the cluster's budget, given back when its try ends.
    let mut retrying: Option<RetryPlace> = None;
    loop {
        let deadline = clock.try_deadline();
        let result = send(attempt, deadline).map_err(|failure| (failure, None, ResponseFlag::None))?.await;
        drop(retrying.take());
        // A retry needs a place in the budget too: without one, the try's outcome is the answer.
        let (mut reserved, mut not_retried) = (None, ResponseFlag::None);
        let may_retry = || {
            if !(replayable && clock.time_left()) {
                return false;
            }
            if attempt >= retries.attempts {
                // A policy that retries (Istio's default does) ran out of retries.
                if retries.attempts > 0 {
                    not_retried = ResponseFlag::UpstreamRetryLimitExceeded;
                }
                return false;
            }
            reserved = budget(cluster);
            if reserved.is_none() {
                not_retried = ResponseFlag::UpstreamOverflow;
            }
            reserved.is_some()
        };
        match judge(result, &status, retries, deadline, may_retry) {
            Tried::Answered(response) => return Ok((response, not_retried)),
            Tried::Failed(failure, why) => return Err((failure, why, not_retried)),
            Tried::Retry => retrying = reserved.flatten(),
        }
        attempt += 1;
        let wake = Instant::now() + backoff(attempt);
        tokio::time::sleep_until(clock.overall.map_or(wake, |overall| wake.min(overall))).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::policy::{
        clusters::{ClusterPolicy, ClusterState, ConnectionSettings},
        routes::RetryOn,
    };

    const IDLE: Duration = Duration::from_secs(300);

    fn retries(attempts: u32, per_try: Option<Duration>, on: &str) -> RetryPolicy {
        RetryPolicy { attempts, per_try_timeout: per_try, on: RetryOn::parse(on) }
    }

    /// Tries made: when each started (from the test's start) and its deadline (from then).
    type Log = Arc<Mutex<Vec<(Duration, Duration)>>>;

    /// A `send` whose tries answer as `answers` says, in turn: a status, or `None` for an upstream that never
    /// answers (the try's deadline ends it).
    /// One try of the test's upstream.
    type Try = std::pin::Pin<Box<dyn Future<Output = Option<Result<u16, SendError>>>>>;

    fn upstream(answers: &'static [Option<u16>], log: Log) -> impl FnMut(u32, TryDeadline) -> Result<Try, Failure> {
        let start = Instant::now();
        move |attempt, deadline| {
            let now = Instant::now();
            log.lock().unwrap().push((now - start, deadline.at - now));
            let answer = answers[attempt as usize];
            Ok(Box::pin(async move {
                match answer {
                    Some(status) => Some(Ok(status)),
                    None => tokio::time::timeout_at(deadline.at, std::future::pending()).await.ok(),
                }
            }))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_try_has_its_per_try_timeout_and_all_of_them_the_routes() {
        let log = Log::default();
        let clock = TryClock::start(Some(Duration::from_millis(1000)), Some(Duration::from_millis(300)), IDLE);
        let policy = retries(5, Some(Duration::from_millis(300)), "gateway-error");
        let started = Instant::now();
        let outcome = with_retries(&clock, &policy, (true, None), |s| *s, upstream(&[None; 6], log.clone())).await;
        // Ended by the route's timeout, not for want of a retry: no `URX`.
        assert!(matches!(outcome, Err((Failure::UpstreamTimeout, None, ResponseFlag::None))), "{outcome:?}");
        assert_eq!(started.elapsed(), Duration::from_millis(1000), "the route's timeout ends the request");
        let tries = log.lock().unwrap().clone();
        assert!(tries.len() >= 3, "per-try timeouts are retried: {tries:?}");
        assert_eq!(tries[0], (Duration::ZERO, Duration::from_millis(300)), "the first try: its own 300 ms");
        for pair in tries.windows(2) {
            let gap = pair[1].0 - (pair[0].0 + pair[0].1);
            assert!(gap < Duration::from_millis(250), "backoff between tries below 250 ms: {tries:?}");
        }
        let (last_start, last_deadline) = *tries.last().unwrap();
        assert!(last_start + last_deadline <= Duration::from_millis(1000), "no try outlasts the route: {tries:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_to_retry_on_is_retried_then_answered_as_is_when_retries_run_out() {
        let log = Log::default();
        let clock = TryClock::start(None, None, IDLE);
        let policy = retries(2, None, "503");
        let outcome = with_retries(
            &clock,
            &policy,
            (true, None),
            |s| *s,
            upstream(&[Some(503), Some(503), Some(503)], log.clone()),
        );
        assert_eq!(
            outcome.await.unwrap(),
            (503, ResponseFlag::UpstreamRetryLimitExceeded),
            "the last 503 is the answer"
        );
        assert_eq!(log.lock().unwrap().len(), 3, "one try and two retries");

        let log = Log::default();
        let outcome =
            with_retries(&clock, &policy, (true, None), |s| *s, upstream(&[Some(503), Some(200)], log.clone()));
        assert_eq!(outcome.await.unwrap(), (200, ResponseFlag::None));
        let policy = retries(2, None, "connect-failure");
        let outcome = with_retries(&clock, &policy, (true, None), |s| *s, upstream(&[Some(503)], Log::default()));
        assert_eq!(outcome.await.unwrap(), (503, ResponseFlag::None), "a status not in retryOn is answered at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_retried_until_no_retry_is_left_carries_urx_beside_its_own_flag() {
        let log = Log::default();
        let clock = TryClock::start(None, Some(Duration::from_millis(100)), IDLE);
        let policy = retries(2, Some(Duration::from_millis(100)), "gateway-error");
        let outcome = with_retries(&clock, &policy, (true, None), |s| *s, upstream(&[None; 3], log.clone())).await;
        let Err((failure, None, not_retried)) = outcome else { panic!("{outcome:?}") };
        assert_eq!((failure, not_retried), (Failure::UpstreamTimeout, ResponseFlag::UpstreamRetryLimitExceeded));
        assert_eq!(failure.flag().not_retried(not_retried).text(), "UT,URX", "as Envoy's log writes it");
        assert_eq!(log.lock().unwrap().len(), 3, "one try and two retries");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_cannot_be_sent_again_is_tried_once() {
        let log = Log::default();
        let clock = TryClock::start(None, None, IDLE);
        let policy = retries(3, None, "503");
        let outcome = with_retries(&clock, &policy, (false, None), |s| *s, upstream(&[Some(503)], log.clone())).await;
        assert_eq!(outcome.unwrap(), (503, ResponseFlag::None), "not a retry left unmade: none could be");
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_route_timeout_an_upstream_that_never_answers_is_ended_by_the_stream_idle_timeout() {
        let clock = TryClock::start(None, None, IDLE);
        let started = Instant::now();
        let policy = retries(2, None, "5xx");
        let outcome = with_retries(&clock, &policy, (true, None), |s| *s, upstream(&[None; 3], Log::default())).await;
        assert!(
            matches!(outcome, Err((Failure::UpstreamIdle, None, ResponseFlag::None))),
            "not retried: idle is final"
        );
        assert_eq!(started.elapsed(), IDLE);
    }

    #[test]
    fn outcomes_are_judged_as_envoys_router_judges_them() {
        let deadline = TryDeadline { at: Instant::now(), idle_bound: false };
        let judge_with = |on: &str, result: Option<Result<u16, SendError>>, may_retry: bool| {
            judge(result, |s| *s, &retries(2, None, on), deadline, || may_retry)
        };
        let connect = || Some(Err(SendError::Connect(ConnectFailure::Socket("delayed connect error: 111".into()))));
        assert!(matches!(judge_with("connect-failure", connect(), true), Tried::Retry));
        // The last try's reason is kept for the log.
        let failed = judge_with("connect-failure", connect(), false);
        assert!(matches!(failed, Tried::Failed(Failure::UpstreamConnect, Some(ConnectFailure::Socket(_)))));
        assert!(matches!(judge_with("5xx", connect(), true), Tried::Failed(Failure::UpstreamConnect, Some(_))));
        let reset = || Some(Err(SendError::Request("reset".into())));
        assert!(matches!(judge_with("reset", reset(), true), Tried::Retry));
        assert!(matches!(judge_with("connect-failure", reset(), true), Tried::Failed(Failure::UpstreamReset, None)));
        let refused = || Some(Err(SendError::Refused("refused stream".into())));
        assert!(matches!(judge_with("refused-stream", refused(), true), Tried::Retry));
        let local = Some(Err(SendError::LocalDestination("node".into())));
        let local = judge_with("5xx,connect-failure", local, true);
        assert!(matches!(local, Tried::Failed(Failure::LocalDestination, None)));
        assert!(matches!(judge_with("gateway-error", None, true), Tried::Retry), "a per-try timeout");
        assert!(matches!(judge_with("connect-failure", None, true), Tried::Failed(Failure::UpstreamTimeout, None)));
        assert!(matches!(judge_with("retriable-4xx", Some(Ok(409)), true), Tried::Retry));
        assert!(matches!(judge_with("retriable-4xx", Some(Ok(409)), false), Tried::Answered(409)));
    }

    #[test]
    fn backoff_is_fully_jittered_below_25_ms_doubling_to_250() {
        for (retry, ceiling) in [(1, 25), (2, 50), (3, 100), (4, 200), (5, 250), (9, 250), (u32::MAX, 250)] {
            assert_eq!(backoff_ceiling_ms(retry), ceiling, "retry {retry}");
            let waits: Vec<Duration> = (0..500).map(|_| backoff(retry)).collect();
            assert!(waits.iter().all(|wait| *wait < Duration::from_millis(ceiling)), "retry {retry}");
            assert!(waits.iter().any(|wait| *wait < Duration::from_millis(ceiling / 2)), "jittered from zero");
        }
    }

    fn limited(in_flight: usize, pending: usize) -> Cluster {
        let policy = ClusterPolicy { limits: Some((in_flight, pending)), ..Default::default() };
        let state = Arc::new(ClusterState::new(policy.limits));
        Cluster::new((80, None), Vec::new(), Arc::new(policy), state)
    }

    #[tokio::test(start_paused = true)]
    async fn pool_admission_waits_within_the_pending_limit_until_the_routes_timeout() {
        let cluster = limited(1, 1);
        let clock = TryClock::start(Some(Duration::from_secs(2)), None, IDLE);
        let held = clock.admit(Some(&cluster)).await.unwrap().expect("the one slot");
        let started = Instant::now();
        let waiting = clock.admit(Some(&cluster));
        tokio::pin!(waiting);
        assert!(futures_util::poll!(&mut waiting).is_pending(), "the second waits");
        assert!(matches!(clock.admit(Some(&cluster)).await, Err(Failure::Overflow)), "the third overflows: UO");
        assert!(matches!(waiting.await, Err(Failure::UpstreamTimeout)), "no slot within the route's timeout: UT");
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        let clock = TryClock::start(Some(Duration::from_secs(2)), None, IDLE);
        let waiting = tokio::spawn({
            let state = cluster.state.clone();
            let mut cluster = limited(1, 1);
            cluster.state = state;
            async move { clock.admit(Some(&cluster)).await.map(|permit| permit.is_some()) }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(held);
        assert!(waiting.await.unwrap().unwrap(), "a slot freed in time is taken");
        assert!(clock.admit(None).await.unwrap().is_none(), "a cluster without limits admits at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_takes_a_place_in_the_clusters_budget_and_none_is_made_without_one() {
        let connections = ConnectionSettings { max_retries: Some(1), ..Default::default() };
        let policy = ClusterPolicy { connections: Some(Box::new(connections)), ..Default::default() };
        let cluster = Cluster::new((80, None), Vec::new(), Arc::new(policy), Arc::new(ClusterState::new(None)));
        let clock = TryClock::start(None, None, IDLE);
        let policy = retries(2, None, "503");
        // Another request's retry holds the one place: this request's 503 is its answer, after one try.
        let held = cluster.state.retry(1).expect("the budget's one place");
        assert!(cluster.state.retry(1).is_none(), "one place only");
        let log = Log::default();
        let outcome =
            with_retries(&clock, &policy, (true, Some(&cluster)), |s| *s, upstream(&[Some(503); 3], log.clone()));
        assert_eq!(outcome.await.unwrap(), (503, ResponseFlag::UpstreamOverflow), "answered as it came, flagged UO");
        assert_eq!(log.lock().unwrap().len(), 1, "not retried: the budget is spent");
        // Given back, the place lets this request's retries through (one at a time), and is free again after.
        drop(held);
        let log = Log::default();
        let answers = &[Some(503), Some(503), Some(200)];
        let outcome = with_retries(&clock, &policy, (true, Some(&cluster)), |s| *s, upstream(answers, log.clone()));
        assert_eq!(outcome.await.unwrap(), (200, ResponseFlag::None));
        assert_eq!(log.lock().unwrap().len(), 3, "one try and two retries, each holding the place in turn");
        assert!(cluster.state.retry(1).is_some(), "the place is given back when the request ends");
    }
}
