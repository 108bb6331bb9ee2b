//! Why a connection to an upstream could not be made, in the words Envoy's access log and local replies use:
//! `%UPSTREAM_TRANSPORT_FAILURE_REASON%` (`delayed connect error: Connection refused`,
//! `TLS_error:|CERTIFICATE_VERIFY_FAILED:…:TLS_error_end`) and the reset in `%RESPONSE_CODE_DETAILS%`
//! (`upstream_reset_before_response_started{remote_connection_failure|…}`), so that runbooks written against an
//! Envoy gateway's logs read Sluice's.

use std::io;

/// Why no connection to an upstream could be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The connect timeout passed (Envoy's `connection_timeout` reset: no transport reason).
    Timeout,
    /// The socket could not connect: `delayed connect error: Connection refused` (`immediate` when the kernel
    /// refused the connect itself, as for an unreachable network).
    Socket(Box<str>),
    /// The TLS handshake the DestinationRule originates failed: `TLS_error:|REASON:detail:TLS_error_end`, REASON
    /// as BoringSSL names the common failures (`CERTIFICATE_VERIFY_FAILED`, `WRONG_VERSION_NUMBER`, an alert's
    /// `SSLV3_ALERT_HANDSHAKE_FAILURE`…), detail as rustls tells it.
    Tls(Box<str>),
}

impl ConnectFailure {
    /// A failed TCP connect.
    pub fn from_connect(error: &io::Error) -> ConnectFailure {
        if error.kind() == io::ErrorKind::TimedOut {
            return ConnectFailure::Timeout;
        }
        let when = match error.raw_os_error() {
            Some(libc::ENETUNREACH | libc::EADDRNOTAVAIL | libc::EACCES | libc::EPERM | libc::EAFNOSUPPORT) => {
                "immediate"
            }
            _ => "delayed",
        };
        ConnectFailure::Socket(format!("{when} connect error: {}", os_text(error)).into())
    }

    /// A failed TLS handshake (tokio-rustls reports rustls's errors inside an `io::Error`).
    pub fn from_handshake(error: &io::Error) -> ConnectFailure {
        let reason = match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(tls) => format!("{}:{tls}", boringssl_reason(tls)),
            None if error.kind() == io::ErrorKind::TimedOut => return ConnectFailure::Timeout,
            None => format!("CONNECTION_CLOSED:{}", os_text(error)),
        };
        ConnectFailure::Tls(format!("TLS_error:|{reason}:TLS_error_end").into())
    }

    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%` as Envoy writes it (spaces as `_`); `None` for a timeout.
    pub fn transport_reason(&self) -> Option<String> {
        match self {
            ConnectFailure::Timeout => None,
            ConnectFailure::Socket(reason) | ConnectFailure::Tls(reason) => Some(reason.replace(' ', "_")),
        }
    }

    /// `%RESPONSE_CODE_DETAILS%` of the request it failed.
    pub fn response_code_details(&self) -> String {
        match self.transport_reason() {
            None => "upstream_reset_before_response_started{connection_timeout}".to_owned(),
            Some(reason) => format!("upstream_reset_before_response_started{{remote_connection_failure|{reason}}}"),
        }
    }

    /// The body of the 503 Envoy answers with.
    pub fn body(&self) -> String {
        const START: &str = "upstream connect error or disconnect/reset before headers. reset reason:";
        match self {
            ConnectFailure::Timeout => format!("{START} connection timeout"),
            ConnectFailure::Socket(reason) | ConnectFailure::Tls(reason) => {
                format!("{START} remote connection failure, transport failure reason: {reason}")
            }
        }
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectFailure::Timeout => f.write_str("connect timed out"),
            ConnectFailure::Socket(reason) | ConnectFailure::Tls(reason) => f.write_str(reason),
        }
    }
}

/// The system's text for an error (`Connection refused`), without Rust's ` (os error 111)`.
fn os_text(error: &io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// The reason BoringSSL (Envoy's TLS) gives for the same failure, for the ones runbooks look for.
fn boringssl_reason(error: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, Error, InvalidMessage};
    match error {
        Error::InvalidCertificate(_) | Error::InvalidCertRevocationList(_) => "CERTIFICATE_VERIFY_FAILED".into(),
        // A server that answers a ClientHello in plain text.
        Error::InvalidMessage(InvalidMessage::InvalidContentType) => "WRONG_VERSION_NUMBER".into(),
        Error::PeerIncompatible(_) => "HANDSHAKE_FAILURE_ON_CLIENT_HELLO".into(),
        Error::AlertReceived(alert) => {
            let ssl3 = matches!(
                alert,
                Alert::CloseNotify
                    | Alert::UnexpectedMessage
                    | Alert::BadRecordMac
                    | Alert::DecompressionFailure
                    | Alert::HandshakeFailure
                    | Alert::NoCertificate
                    | Alert::BadCertificate
                    | Alert::UnsupportedCertificate
                    | Alert::CertificateRevoked
                    | Alert::CertificateExpired
                    | Alert::CertificateUnknown
                    | Alert::IllegalParameter
            );
            let name = screaming_snake(&format!("{alert:?}"));
            if ssl3 {
                format!("SSLV3_ALERT_{name}")
            } else {
                format!("TLSV1_ALERT_{name}")
            }
        }
        _ => "TLS_HANDSHAKE_FAILED".into(),
    }
}

/// `HandshakeFailure` → `HANDSHAKE_FAILURE`, `UnknownCA` → `UNKNOWN_CA`.
fn screaming_snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    let mut after_lowercase = false;
    for c in camel.chars() {
        if c.is_ascii_uppercase() && after_lowercase {
            out.push('_');
        }
        after_lowercase = c.is_ascii_lowercase();
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_failures_read_as_envoys() {
        let refused = ConnectFailure::from_connect(&io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(refused.transport_reason().as_deref(), Some("delayed_connect_error:_Connection_refused"));
        assert_eq!(
            refused.response_code_details(),
            "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"
        );
        assert_eq!(
            refused.body(),
            "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, \
             transport failure reason: delayed connect error: Connection refused"
        );
        let unreachable = ConnectFailure::from_connect(&io::Error::from_raw_os_error(libc::ENETUNREACH));
        assert_eq!(unreachable.transport_reason().as_deref(), Some("immediate_connect_error:_Network_is_unreachable"));
        let timeout = ConnectFailure::from_connect(&io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        assert_eq!(
            (timeout.transport_reason(), timeout.response_code_details().as_str()),
            (None, "upstream_reset_before_response_started{connection_timeout}")
        );
    }

    #[test]
    fn tls_failures_name_the_reason_runbooks_look_for() {
        let handshake = |error: rustls::Error| {
            ConnectFailure::from_handshake(&io::Error::new(io::ErrorKind::InvalidData, error)).transport_reason()
        };
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert_eq!(
            handshake(unknown).as_deref(),
            Some("TLS_error:|CERTIFICATE_VERIFY_FAILED:invalid_peer_certificate:_UnknownIssuer:TLS_error_end")
        );
        let plain = rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
        assert!(handshake(plain).unwrap().starts_with("TLS_error:|WRONG_VERSION_NUMBER:"));
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure);
        assert!(handshake(alert).unwrap().starts_with("TLS_error:|SSLV3_ALERT_HANDSHAKE_FAILURE:"));
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA);
        assert!(handshake(alert).unwrap().starts_with("TLS_error:|TLSV1_ALERT_UNKNOWN_CA:"));
        let closed = ConnectFailure::from_handshake(&io::Error::from(io::ErrorKind::UnexpectedEof));
        assert!(closed.transport_reason().unwrap().starts_with("TLS_error:|CONNECTION_CLOSED:"), "{closed}");
    }
}
