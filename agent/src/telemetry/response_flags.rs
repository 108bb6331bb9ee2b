//! Envoy's response flags: one enum that the proxy's failures and faults set and that the metrics and the access
//! log show, so that no flag is spelled in more than one place.

use crate::policy::labels::LabelText;

/// Why Envoy (here, the proxy) answered or ended a request as it did; `None` when nothing went wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResponseFlag {
    #[default]
    None,
    /// `DPE`: the request could not be used (no host, a URI too long, a broken path).
    DownstreamProtocolError,
    /// `NR`: no route matched.
    NoRouteFound,
    /// `NC`: the route's cluster (a subset no rule defines) does not exist.
    NoClusterFound,
    /// `UH`: no endpoint to send to.
    NoHealthyUpstream,
    /// `DF`: the destination's name did not resolve.
    DnsResolutionFailed,
    /// `UO`: the cluster's connection-pool limits were reached.
    UpstreamOverflow,
    /// `UF`: connecting to the upstream failed.
    UpstreamConnectionFailure,
    /// `UR`: the upstream reset the connection or stream.
    UpstreamConnectionTermination,
    /// `UT`: the route's timeout passed.
    UpstreamRequestTimeout,
    /// `DI`: a fault delayed the request.
    DelayInjected,
    /// `FI`: a fault aborted the request.
    FaultInjected,
    /// `SI`: the stream was idle for the stream idle timeout.
    StreamIdleTimeout,
    /// `OM`: the proxy was overloaded (past `--max-memory`) and shed the request.
    OverloadManager,
    /// `UPE`: the upstream's response broke HTTP (a head or body framing that cannot be read one way only).
    UpstreamProtocolError,
    /// `DT`: a relayed connection lasted its DestinationRule's `maxConnectionDuration` and was closed.
    DurationTimeout,
    /// `URX`: the answer was one the route retries on, and no retry was left.
    UpstreamRetryLimitExceeded,
    // A failure the route retries on, not retried: Envoy sets the failure's flag and why it was not retried —
    // `URX` (no retry left) or `UO` (the cluster's retry budget, `maxRetries`, spent) — and writes both, in its
    // own order of flags ("503 UF,URX" is what a dead upstream behind retries looks like in Envoy's log).
    /// `UT,URX`
    UpstreamRequestTimeoutRetryLimitExceeded,
    /// `UR,URX`
    UpstreamConnectionTerminationRetryLimitExceeded,
    /// `UF,URX`
    UpstreamConnectionFailureRetryLimitExceeded,
    /// `URX,UPE`
    UpstreamProtocolErrorRetryLimitExceeded,
    /// `UT,UO`
    UpstreamRequestTimeoutOverflow,
    /// `UR,UO`
    UpstreamConnectionTerminationOverflow,
    /// `UF,UO`
    UpstreamConnectionFailureOverflow,
    /// `UO,UPE`
    UpstreamProtocolErrorOverflow,
}

/// Each flag's text, in the enum's order.
static TEXTS: [&str; 25] = [
    "-", "DPE", "NR", "NC", "UH", "DF", "UO", "UF", "UR", "UT", "DI", "FI", "SI", "OM", "UPE", "DT", "URX", "UT,URX",
    "UR,URX", "UF,URX", "URX,UPE", "UT,UO", "UR,UO", "UF,UO", "UO,UPE",
];

impl ResponseFlag {
    /// As Envoy writes it (`-` for none).
    pub fn text(self) -> &'static str {
        TEXTS[self as usize]
    }

    /// The `response_flags` label's value.
    pub fn label(self) -> LabelText {
        LabelText::Static(&TEXTS[self as usize])
    }

    /// This failure's flag together with `why_not` (`URX` or `UO`), the flag for why the route did not retry it,
    /// as Envoy sets both; this flag alone where `why_not` is none or the pair is not one a retry can make.
    pub fn not_retried(self, why_not: ResponseFlag) -> ResponseFlag {
        use ResponseFlag::*;
        match (self, why_not) {
            (UpstreamRequestTimeout, UpstreamRetryLimitExceeded) => UpstreamRequestTimeoutRetryLimitExceeded,
            (UpstreamConnectionTermination, UpstreamRetryLimitExceeded) => {
                UpstreamConnectionTerminationRetryLimitExceeded
            }
            (UpstreamConnectionFailure, UpstreamRetryLimitExceeded) => UpstreamConnectionFailureRetryLimitExceeded,
            (UpstreamProtocolError, UpstreamRetryLimitExceeded) => UpstreamProtocolErrorRetryLimitExceeded,
            (UpstreamRequestTimeout, UpstreamOverflow) => UpstreamRequestTimeoutOverflow,
            (UpstreamConnectionTermination, UpstreamOverflow) => UpstreamConnectionTerminationOverflow,
            (UpstreamConnectionFailure, UpstreamOverflow) => UpstreamConnectionFailureOverflow,
            (UpstreamProtocolError, UpstreamOverflow) => UpstreamProtocolErrorOverflow,
            _ => self,
        }
    }

    /// Whether no connection to the upstream could be made (`UF`, alone or with why it was not retried).
    pub fn connect_failed(self) -> bool {
        matches!(
            self,
            ResponseFlag::UpstreamConnectionFailure
                | ResponseFlag::UpstreamConnectionFailureRetryLimitExceeded
                | ResponseFlag::UpstreamConnectionFailureOverflow
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_flag_reads_as_envoy_writes_it() {
        let flags = [
            (ResponseFlag::None, "-"),
            (ResponseFlag::DownstreamProtocolError, "DPE"),
            (ResponseFlag::NoRouteFound, "NR"),
            (ResponseFlag::NoClusterFound, "NC"),
            (ResponseFlag::NoHealthyUpstream, "UH"),
            (ResponseFlag::DnsResolutionFailed, "DF"),
            (ResponseFlag::UpstreamOverflow, "UO"),
            (ResponseFlag::UpstreamConnectionFailure, "UF"),
            (ResponseFlag::UpstreamConnectionTermination, "UR"),
            (ResponseFlag::UpstreamRequestTimeout, "UT"),
            (ResponseFlag::DelayInjected, "DI"),
            (ResponseFlag::FaultInjected, "FI"),
            (ResponseFlag::StreamIdleTimeout, "SI"),
            (ResponseFlag::OverloadManager, "OM"),
            (ResponseFlag::UpstreamProtocolError, "UPE"),
            (ResponseFlag::DurationTimeout, "DT"),
            (ResponseFlag::UpstreamRetryLimitExceeded, "URX"),
            (ResponseFlag::UpstreamRequestTimeoutRetryLimitExceeded, "UT,URX"),
            (ResponseFlag::UpstreamConnectionTerminationRetryLimitExceeded, "UR,URX"),
            (ResponseFlag::UpstreamConnectionFailureRetryLimitExceeded, "UF,URX"),
            (ResponseFlag::UpstreamProtocolErrorRetryLimitExceeded, "URX,UPE"),
            (ResponseFlag::UpstreamRequestTimeoutOverflow, "UT,UO"),
            (ResponseFlag::UpstreamConnectionTerminationOverflow, "UR,UO"),
            (ResponseFlag::UpstreamConnectionFailureOverflow, "UF,UO"),
            (ResponseFlag::UpstreamProtocolErrorOverflow, "UO,UPE"),
        ];
        assert_eq!(flags.len(), TEXTS.len(), "every flag is listed here");
        for (flag, text) in flags {
            assert_eq!((flag.text(), flag.label().as_str()), (text, text), "{flag:?}");
            assert!(matches!(flag.label(), LabelText::Static(_)), "a flag's label is never copied");
        }
    }

    #[test]
    fn a_failure_not_retried_carries_why_beside_its_own_flag() {
        use ResponseFlag::*;
        let pairs = [
            (UpstreamConnectionFailure, UpstreamRetryLimitExceeded, "UF,URX"),
            (UpstreamConnectionFailure, UpstreamOverflow, "UF,UO"),
            (UpstreamRequestTimeout, UpstreamRetryLimitExceeded, "UT,URX"),
            (UpstreamConnectionTermination, UpstreamOverflow, "UR,UO"),
            (UpstreamProtocolError, UpstreamRetryLimitExceeded, "URX,UPE"),
            (UpstreamConnectionFailure, None, "UF"),
            // Not failures a retry follows: the flag alone.
            (NoHealthyUpstream, UpstreamRetryLimitExceeded, "UH"),
        ];
        for (failure, why_not, text) in pairs {
            assert_eq!(failure.not_retried(why_not).text(), text, "{failure:?} {why_not:?}");
        }
        assert!(UpstreamConnectionFailure.not_retried(UpstreamOverflow).connect_failed());
        assert!(!UpstreamRequestTimeout.not_retried(UpstreamRetryLimitExceeded).connect_failed());
    }
}
