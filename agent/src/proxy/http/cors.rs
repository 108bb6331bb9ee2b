//! CORS as a route's `corsPolicy` says: preflights answered, response headers for allowed origins.

use super::*;

/// The answer to a CORS preflight from an allowed origin.
pub(super) fn preflight_headers(cors: &Cors, origin: &str, headers: &mut HeaderMap) {
    if let Ok(origin) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_METHODS, &cors.allow_methods),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, &cors.allow_headers),
        (header::ACCESS_CONTROL_MAX_AGE, &cors.max_age),
    ] {
        if let Some(value) = value {
            headers.insert(name, value.clone());
        }
    }
    if cors.allow_credentials {
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
}

/// The CORS headers of an actual response to an allowed origin.
pub(super) fn response_cors_headers(cors: &Cors, origin: &str, headers: &mut HeaderMap) {
    if let Ok(origin) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    if let Some(expose) = &cors.expose_headers {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
    }
    if cors.allow_credentials {
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
}
