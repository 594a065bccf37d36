//! What a sink is told: which receiver ([`SinkKind`], its URL checked by
//! [`parse_url`]) and how to deliver there ([`SinkConfig`]).

use std::net::IpAddr;
use std::time::Duration;

use hyper::Uri;
use proto::v1;

use super::webhook::WebhookFormat;

/// Which sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    Webhook,
    Otlp,
}

impl SinkKind {
    /// Its name in metrics, logs and flags.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Otlp => "otlp",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            SinkKind::Webhook => "--webhook-url",
            SinkKind::Otlp => "--otlp-endpoint",
        }
    }
}

/// Where and how a sink delivers.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub kind: SinkKind,
    /// The URL POSTed to (for OTLP: the endpoint with `/v1/logs`).
    pub uri: Uri,
    /// Webhook only.
    pub format: WebhookFormat,
    /// Events at most in one request.
    pub batch_events: u32,
    /// The sink's queue in events.
    pub queue_capacity: u32,
    /// Bound of one attempt (connect, send, answer).
    pub timeout: Duration,
    /// Attempts at most for one batch (1: no retry).
    pub max_attempts: u32,
    /// Pause before the first retry; doubled each time up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// After the stop: time left to deliver what is queued; what is not
    /// delivered then is dropped (reason shutdown).
    pub drain: Duration,
    /// Identity written into every record.
    pub vm: v1::VmIdentity,
}

impl SinkConfig {
    /// Defaults for `url` (checked by [`parse_url`]): batches of 500
    /// events, a 16384-event queue, 5 s a try, 5 tries, 200 ms .. 5 s
    /// backoff, 5 s to drain at the stop.
    pub fn new(kind: SinkKind, url: &str, vm: v1::VmIdentity) -> Result<Self, String> {
        Ok(SinkConfig {
            kind,
            uri: parse_url(kind, url)?,
            format: WebhookFormat::JsonArray,
            batch_events: 500,
            queue_capacity: 16384,
            timeout: Duration::from_secs(5),
            max_attempts: 5,
            backoff: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            drain: Duration::from_secs(5),
            vm,
        })
    }
}

/// Checks a sink's URL: `http://` to a loopback address (`localhost`,
/// 127.0.0.0/8, `[::1]`) only, no TLS yet. For OTLP the URL is the
/// endpoint (as `OTEL_EXPORTER_OTLP_ENDPOINT`): `/v1/logs` is appended to
/// its path, and the port defaults to 4318.
pub fn parse_url(kind: SinkKind, url: &str) -> Result<Uri, String> {
    let flag = kind.flag();
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{flag} {url}: not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{flag} {url}: https is not supported yet: use http:// to a loopback address (e.g. a local collector that forwards with TLS)"
            ))
        }
        _ => {
            return Err(format!(
                "{flag} {url}: only http://HOST:PORT/PATH URLs to a loopback address are supported"
            ))
        }
    }
    let auth = uri
        .authority()
        .ok_or_else(|| format!("{flag} {url}: no host"))?;
    if auth.as_str().contains('@') {
        return Err(format!(
            "{flag} {url}: credentials in the URL are not supported"
        ));
    }
    let host = auth.host();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if !loopback {
        return Err(format!(
            "{flag} {url}: {host} is not a loopback address: only localhost, 127.0.0.0/8 and [::1] are supported (plain http, no TLS)"
        ));
    }
    let port = match (auth.port_u16(), kind) {
        (Some(p), _) => p,
        (None, SinkKind::Webhook) => 80,
        (None, SinkKind::Otlp) => 4318,
    };
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    let path = match kind {
        SinkKind::Webhook => uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string()),
        SinkKind::Otlp => {
            if uri.query().is_some() {
                return Err(format!("{flag} {url}: a query is not supported"));
            }
            format!("{}/v1/logs", uri.path().trim_end_matches('/'))
        }
    };
    format!("http://{host}:{port}{path}")
        .parse()
        .map_err(|e| format!("{flag} {url}: not a URL ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_to_loopback_only() {
        let ok = |k, u: &str| parse_url(k, u).unwrap().to_string();
        assert_eq!(
            ok(SinkKind::Webhook, "http://127.0.0.1:8080/a?b=c"),
            "http://127.0.0.1:8080/a?b=c"
        );
        assert_eq!(
            ok(SinkKind::Webhook, "http://localhost/"),
            "http://127.0.0.1:80/"
        );
        assert_eq!(
            ok(SinkKind::Webhook, "http://[::1]:9/x"),
            "http://[::1]:9/x"
        );
        assert_eq!(
            ok(SinkKind::Otlp, "http://127.0.0.1"),
            "http://127.0.0.1:4318/v1/logs"
        );
        assert_eq!(
            ok(SinkKind::Otlp, "http://127.0.0.2:4000/otlp/"),
            "http://127.0.0.2:4000/otlp/v1/logs"
        );
        let err = |k, u: &str| parse_url(k, u).unwrap_err();
        assert!(err(SinkKind::Webhook, "https://127.0.0.1/").contains("https is not supported"));
        assert!(err(SinkKind::Webhook, "http://10.0.0.1/").contains("not a loopback address"));
        assert!(err(SinkKind::Webhook, "http://example.com/").contains("not a loopback address"));
        assert!(err(SinkKind::Webhook, "http://u:p@127.0.0.1/").contains("credentials"));
        assert!(err(SinkKind::Otlp, "127.0.0.1:4318").starts_with("--otlp-endpoint 127.0.0.1:4318"));
    }
}
