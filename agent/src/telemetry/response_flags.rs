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
}

/// Each flag's text, in the enum's order.
static TEXTS: [&str; 17] =
    ["-", "DPE", "NR", "NC", "UH", "DF", "UO", "UF", "UR", "UT", "DI", "FI", "SI", "OM", "UPE", "DT", "URX"];

impl ResponseFlag {
    /// As Envoy writes it (`-` for none).
    pub fn text(self) -> &'static str {
        TEXTS[self as usize]
    }

    /// The `response_flags` label's value.
    pub fn label(self) -> LabelText {
        LabelText::Static(&TEXTS[self as usize])
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
        ];
        assert_eq!(flags.len(), TEXTS.len(), "every flag is listed here");
        for (flag, text) in flags {
            assert_eq!((flag.text(), flag.label().as_str()), (text, text), "{flag:?}");
            assert!(matches!(flag.label(), LabelText::Static(_)), "a flag's label is never copied");
        }
    }
}
