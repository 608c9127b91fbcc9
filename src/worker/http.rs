//! HTTP routes of media-worker.
//!
//! Every response, the 101 included, carries `X-App-Signature` (added in
//! [`handle`], the single exit). Webhooks and the upgrade are checked
//! against `X-Twilio-Signature` when an auth token is configured, on the
//! public URL Twilio used: the configured `public_url`, else the first
//! `X-Forwarded-Proto`/`X-Forwarded-Host` values, else `Host` and http;
//! `wss://`/`ws://` for the upgrade.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{info, warn};

use super::AppState;
use crate::twilio::signature;

/// The subprotocol Twilio may offer on the upgrade.
pub const TWILIO_SUBPROTOCOL: &str = "audio.twilio.com";
/// Largest webhook body we read.
const MAX_WEBHOOK_BODY_BYTES: usize = 64 * 1024;

type Resp = Response<Full<Bytes>>;

/// Entry point for every request: routes, then stamps `X-App-Signature`.
///
/// # Errors
/// Never; the `Result` is what hyper's service wants.
pub async fn handle(
    state: Arc<AppState>,
    peer: super::Peer,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, Infallible> {
    let mut resp = route(&state, peer, req).await;
    resp.headers_mut()
        .insert("x-app-signature", state.signature_header.clone());
    Ok(resp)
}

async fn route(
    state: &Arc<AppState>,
    peer: super::Peer,
    req: Request<hyper::body::Incoming>,
) -> Resp {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/version") => version(state),
        // Twilio's console offers GET or POST for a number's voice URL.
        (&Method::POST | &Method::GET, "/webhook/incoming_call") => {
            webhook(state, req, Hook::IncomingCall).await
        }
        (&Method::POST, "/webhook/stream_status") => webhook(state, req, Hook::StreamStatus).await,
        (&Method::POST, "/webhook/stream_ended") => webhook(state, req, Hook::StreamEnded).await,
        (&Method::GET, "/ws/twilio-media") => upgrade(state, peer, req),
        (
            _,
            "/healthz"
            | "/version"
            | "/ws/twilio-media"
            | "/webhook/incoming_call"
            | "/webhook/stream_status"
            | "/webhook/stream_ended",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn version(state: &AppState) -> Resp {
    let body = serde_json::json!({
        "name": "media-worker",
        "version": env!("CARGO_PKG_VERSION"),
        "signature": state.cfg.app_signature,
        "signature_mode": match state.cfg.signature_mode {
            super::config::SignatureMode::Artifact => "artifact",
            super::config::SignatureMode::Env => "env",
        },
        "pid": std::process::id(),
        "started_at": super::record::rfc3339(state.started_at),
        "uptime_ms": state.started.elapsed().as_millis() as u64,
        // Connected calls (a call's task, and its place under
        // `max_calls`, outlive its connection while its transcriptions
        // land in its record).
        "calls_active": state.calls_connected.load(Ordering::Relaxed),
        "max_calls": state.cfg.max_calls,
        "calls_refused": state.calls_refused.load(Ordering::Relaxed),
        "engines": state.engines.names(),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

// === public URL ===

/// The public base URL (`scheme://host[/prefix]`, http or https) for a
/// request, as described in the module doc.
pub fn public_base(cfg_public: Option<&str>, headers: &HeaderMap) -> String {
    if let Some(base) = cfg_public {
        return base.to_string();
    }
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    // Some proxies (Traefik's forwarder) name the WebSocket schemes for an
    // upgrade: `wss` is a client on TLS as `https` is.
    let proto = match first("x-forwarded-proto").map(|p| p.to_ascii_lowercase()) {
        Some(p) if p == "https" || p == "wss" => "https",
        _ => "http",
    };
    let host = first("x-forwarded-host")
        .or_else(|| first("host"))
        .unwrap_or_else(|| "localhost".into());
    format!("{proto}://{host}")
}

/// `https://` -> `wss://`, `http://` -> `ws://`.
pub fn ws_base(http_base: &str) -> String {
    if let Some(rest) = http_base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = http_base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        http_base.to_string()
    }
}

fn path_and_query<B>(req: &Request<B>) -> String {
    req.uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into())
}

fn twilio_signature_ok(
    state: &AppState,
    headers: &HeaderMap,
    url: &str,
    params: &[(String, String)],
) -> bool {
    let Some(token) = state.cfg.auth_token.as_deref() else {
        return true;
    };
    let Some(sig) = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    signature::validate(token, url, params, sig)
}

// === webhooks ===

#[derive(Debug, Clone, Copy)]
enum Hook {
    IncomingCall,
    StreamStatus,
    StreamEnded,
}

async fn webhook(state: &AppState, req: Request<hyper::body::Incoming>, hook: Hook) -> Resp {
    let base = public_base(state.cfg.public_url.as_deref(), req.headers());
    let url = format!("{base}{}", path_and_query(&req));
    let (parts, body) = req.into_parts();
    if parts.method == Method::GET {
        // A GET webhook's parameters are in its query, and Twilio signs
        // the whole URL with no body parameters.
        let params = parse_form(parts.uri.query().unwrap_or("").as_bytes());
        if !twilio_signature_ok(state, &parts.headers, &url, &[]) {
            warn!(url = %url, hook = ?hook, "webhook rejected: bad or missing X-Twilio-Signature");
            return text(StatusCode::FORBIDDEN, "invalid twilio signature");
        }
        return answer_hook(&base, hook, &params);
    }
    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    // A body that does not come (a slowloris on an exposed worker) holds
    // its connection no longer than a slow head would.
    let limit = state.cfg.header_timeout;
    let read = tokio::time::timeout(limit, Limited::new(body, MAX_WEBHOOK_BODY_BYTES).collect());
    let bytes = match read.await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            warn!(url = %url, error = %e, "webhook body unreadable or too large");
            return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Err(_) => {
            warn!(url = %url, ?limit, "webhook body not received in time");
            let mut resp = text(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
            );
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    let params = if is_form {
        parse_form(&bytes)
    } else {
        Vec::new()
    };
    let sig_ok = if is_form {
        twilio_signature_ok(state, &parts.headers, &url, &params)
    } else {
        match (
            state.cfg.auth_token.as_deref(),
            parts.headers.get("x-twilio-signature"),
        ) {
            (None, _) => true,
            (Some(token), Some(sig)) => sig
                .to_str()
                .is_ok_and(|s| signature::validate_json_body(token, &url, &bytes, s)),
            (Some(_), None) => false,
        }
    };
    if !sig_ok {
        warn!(url = %url, hook = ?hook, "webhook rejected: bad or missing X-Twilio-Signature");
        return text(StatusCode::FORBIDDEN, "invalid twilio signature");
    }
    answer_hook(&base, hook, &params)
}

/// The answer to a webhook whose signature checked out.
fn answer_hook(base: &str, hook: Hook, params: &[(String, String)]) -> Resp {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    match hook {
        Hook::IncomingCall => {
            info!(
                event = "WEBHOOK_INCOMING_CALL",
                callSid = get("CallSid"),
                from = get("From"),
                to = get("To"),
                "incoming call"
            );
            if !base.starts_with("https://") {
                // TWILIO.md: only wss works (31922 otherwise). Said once:
                // a test set-up on plain HTTP answers many calls.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    warn!(
                        base = %base,
                        "the TwiML's Stream url is not wss://, and Twilio connects to wss:// only: set public_url to the https URL Twilio reaches, or have the TLS proxy in front send X-Forwarded-Proto: https"
                    );
                });
            }
            let twiml = twiml_connect(base, get("CallSid"));
            let mut r = Response::new(Full::new(Bytes::from(twiml)));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
            r
        }
        Hook::StreamStatus => {
            info!(
                event = "WEBHOOK_STREAM_STATUS",
                callSid = get("CallSid"),
                streamSid = get("StreamSid"),
                streamEvent = get("StreamEvent"),
                streamError = get("StreamError"),
                timestamp = get("Timestamp"),
                "stream status"
            );
            empty(StatusCode::NO_CONTENT)
        }
        Hook::StreamEnded => {
            info!(
                event = "WEBHOOK_STREAM_ENDED",
                callSid = get("CallSid"),
                callStatus = get("CallStatus"),
                "connect action: stream ended"
            );
            empty(StatusCode::NO_CONTENT)
        }
    }
}

/// The TwiML that connects a call to our Media Streams endpoint.
pub fn twiml_connect(http_base: &str, call_sid: &str) -> String {
    let wss = ws_base(http_base);
    let mut out = String::with_capacity(512);
    out.push_str(r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect action=""#);
    out.push_str(&xml_escape(&format!("{http_base}/webhook/stream_ended")));
    out.push_str(r#""><Stream url=""#);
    out.push_str(&xml_escape(&format!("{wss}/ws/twilio-media")));
    out.push_str(r#"" statusCallback=""#);
    out.push_str(&xml_escape(&format!("{http_base}/webhook/stream_status")));
    out.push_str(r#"" statusCallbackMethod="POST">"#);
    if !call_sid.is_empty() {
        out.push_str(r#"<Parameter name="callSid" value=""#);
        out.push_str(&xml_escape(call_sid));
        out.push_str(r#""/>"#);
    }
    out.push_str("</Stream></Connect></Response>");
    out
}

/// Escapes the five XML special characters (attribute-safe).
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Parses `application/x-www-form-urlencoded` into pairs, keeping repeats.
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Encodes pairs as a form body (the inverse of [`parse_form`]): as
/// Twilio's and every browser's forms do, a space is `+` and all but
/// `A-Z a-z 0-9 * - . _` is percent-encoded.
pub fn encode_form(pairs: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

// === WebSocket upgrade ===

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// True when the client offered `audio.twilio.com` (case-sensitive, as
/// subprotocol names are).
pub fn offers_twilio_protocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim() == TWILIO_SUBPROTOCOL))
        })
}

fn upgrade(
    state: &Arc<AppState>,
    peer: super::Peer,
    mut req: Request<hyper::body::Incoming>,
) -> Resp {
    let headers = req.headers();
    // RFC 9110 §7.8: `Upgrade` in an HTTP/1.0 request is ignored (such a
    // connection cannot be upgraded; RFC 6455 §4.1 asks for HTTP/1.1).
    let is_ws = req.version() == hyper::Version::HTTP_11
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    if !is_ws {
        // RFC 9110 §15.5.22: a 426 names the protocol to upgrade to (and
        // §7.8: `Upgrade` goes with `Connection: upgrade`; both are
        // hop-by-hop, so a proxy in front answers for itself).
        let mut r = text(StatusCode::UPGRADE_REQUIRED, "websocket upgrade required");
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        return r;
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut r = text(StatusCode::BAD_REQUEST, "unsupported websocket version");
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "exactly one Sec-WebSocket-Key is needed",
        );
    };
    // RFC 6455 §4.2.1: base64 of 16 bytes.
    if base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .map_or(true, |k| k.len() != 16)
    {
        return text(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key is not the base64 of 16 bytes",
        );
    }
    let url = format!(
        "{}{}",
        ws_base(&public_base(state.cfg.public_url.as_deref(), headers)),
        path_and_query(&req)
    );
    if !twilio_signature_ok(state, headers, &url, &[]) {
        warn!(url = %url, peer = %peer, "upgrade rejected: bad or missing X-Twilio-Signature");
        return text(StatusCode::FORBIDDEN, "invalid twilio signature");
    }
    let Ok(slot) = Arc::clone(&state.call_slots).try_acquire_owned() else {
        let refused = state.calls_refused.fetch_add(1, Ordering::Relaxed) + 1;
        warn!(peer = %peer, max_calls = state.cfg.max_calls, refused, "call refused: max_calls calls are in progress");
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many calls in progress (max_calls)",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let accept = derive_accept_key(key.as_bytes());
    let offered = offers_twilio_protocol(headers);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let conn_id = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let st = Arc::clone(state);
    // A small read buffer: tungstenite zero-fills the free part of it before
    // every read, and a Media Streams message is a few hundred bytes.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .max_message_size(Some(state.cfg.max_message_bytes))
        .max_frame_size(Some(state.cfg.max_message_bytes));
    state.calls.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                super::call::run_call(ws, st, conn_id, peer, offered, slot).await;
            }
            Err(e) => warn!(peer = %peer, error = %e, "upgrade failed"),
        }
    });
    let mut r = empty(StatusCode::SWITCHING_PROTOCOLS);
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if offered {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(TWILIO_SUBPROTOCOL),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_round_trip_with_escapes() {
        let pairs = vec![
            ("From".to_string(), "+1 415&x=y".to_string()),
            ("Empty".to_string(), String::new()),
            ("ü".to_string(), "100%".to_string()),
        ];
        assert_eq!(parse_form(encode_form(&pairs).as_bytes()), pairs);
        assert_eq!(
            parse_form(b"a=%zz&b"),
            vec![
                ("a".to_string(), "%zz".to_string()),
                ("b".to_string(), String::new())
            ]
        );
        // A sign is no hex digit: `%+1` and `%-1` stay as they came.
        assert_eq!(
            parse_form(b"a=%+1&b=%-1&c=%2B1"),
            vec![
                ("a".to_string(), "% 1".to_string()),
                ("b".to_string(), "%-1".to_string()),
                ("c".to_string(), "+1".to_string())
            ]
        );
    }

    #[test]
    fn public_base_prefers_config_then_forwarded_then_host() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("127.0.0.1:9"));
        assert_eq!(public_base(None, &h), "http://127.0.0.1:9");
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("voice.example.com, proxy"),
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https,http"));
        assert_eq!(public_base(None, &h), "https://voice.example.com");
        assert_eq!(
            public_base(Some("https://cfg.example"), &h),
            "https://cfg.example"
        );
        assert_eq!(ws_base("https://a/b"), "wss://a/b");
        assert_eq!(ws_base("http://a"), "ws://a");
    }

    #[test]
    fn twiml_escapes_values() {
        let t = twiml_connect("https://h", "CA\"<&>");
        assert!(t.contains(r#"value="CA&quot;&lt;&amp;&gt;""#), "{t}");
        assert!(t.contains(r#"url="wss://h/ws/twilio-media""#), "{t}");
    }
}
