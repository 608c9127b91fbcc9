//! Hop-by-hop header handling for the front proxy (RFC 9110 §7.6.1).
//!
//! A proxy must not forward the headers that describe one connection: the
//! fixed list below plus every name listed in `Connection`. This one module
//! strips them in both directions so that request and response paths cannot
//! disagree.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that are always hop-by-hop (RFC 9110 §7.6.1, plus the legacy
/// `Keep-Alive` and `Proxy-Connection`).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` (any case) is always hop-by-hop: one of [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// Whether a line named `name` is for this hop only (RFC 9110 §7.6.1):
/// always hop-by-hop, or listed in one of `connection`, the values of the
/// message's `Connection` lines. `Host` is for every hop (RFC 9112 §3.2),
/// never a connection option.
pub fn for_this_hop<'a>(name: &[u8], mut connection: impl Iterator<Item = &'a [u8]>) -> bool {
    is_hop_by_hop(name)
        || (!name.eq_ignore_ascii_case(b"host") && connection.any(|options| lists(options, name)))
}

/// Readies a worker's answer head to be framed again for the client (RFC
/// 9112 §6.3): beside `Transfer-Encoding` a `Content-Length` is wrong and
/// goes, and so do the hop-by-hop headers. Returns the transfer codings
/// besides the chunked framing, which stay on the body and so must stay
/// named.
pub fn unframe_answer(headers: &mut HeaderMap) -> Option<String> {
    let mut codings = None;
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
        codings = codings_besides_chunked(headers);
    }
    strip_hop_by_hop(headers);
    codings
}

/// Removes every hop-by-hop header, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present is
    // cheaper than nine hashed removals.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // Split as bytes: a line with an obs-text byte (>= 0x80, which
    // hyper accepts) still names its other options, which must go too.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        // `Host` is for every hop (RFC 9112 §3.2: a request must carry
        // it), never a connection option (RFC 9110 §7.6.1).
        .filter(|name| name != header::HOST)
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The transfer codings a message's `Transfer-Encoding` lists besides a
/// final `chunked` (the framing, which hyper takes off on one side and
/// puts on again on the other), as one list: `None` when there are none.
/// A proxy that dropped them would pass on a body still coded (gzip, say)
/// with nothing left to say so (RFC 9112 §6.1, §7).
pub fn codings_besides_chunked(headers: &HeaderMap) -> Option<String> {
    codings_listed(
        headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .map(HeaderValue::as_bytes),
    )
}

/// [`codings_besides_chunked`] of the values of a message's
/// `Transfer-Encoding` lines, as the worker wrote them (`None` for no
/// line at all). A value with a byte that is not ASCII counts as one
/// coding, `?` (no name can be made of it).
pub fn codings_listed<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<String> {
    let mut codings: Vec<&str> = values
        .flat_map(|v| {
            v.is_ascii()
                .then(|| std::str::from_utf8(v).ok())
                .flatten()
                .unwrap_or("?")
                .split(',')
        })
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if codings
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case("chunked"))
    {
        codings.pop();
    }
    (!codings.is_empty()).then(|| codings.join(", "))
}

/// The protocol a request asks to upgrade to, when it is a valid upgrade
/// request: `Connection` lists `upgrade` and `Upgrade` is present.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| lists_token(v, "upgrade"));
    if connection_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Whether a comma-separated value (`Connection`, say) lists `token`,
/// in any case. Split as bytes: a line with an obs-text byte still names
/// its other tokens.
pub fn lists_token(value: &HeaderValue, token: &str) -> bool {
    lists(value.as_bytes(), token.as_bytes())
}

/// [`lists_token`] of a value as bytes.
pub fn lists(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether `chosen` (a 101's `Upgrade`) is one of the protocols `offered`
/// (the request's `Upgrade`, a comma-separated list; RFC 9110 §7.8).
pub fn upgrade_offered(offered: &HeaderValue, chosen: &HeaderValue) -> bool {
    let (Ok(offered), Ok(chosen)) = (offered.to_str(), chosen.to_str()) else {
        return false;
    };
    let chosen = chosen.trim();
    !chosen.is_empty()
        && offered
            .split(',')
            .any(|p| p.trim().eq_ignore_ascii_case(chosen))
}

/// Whether a `Host` value is `host[:port]` (RFC 3986 §3.2.2): a
/// registered name or IPv4 address, or an IPv6 literal in brackets, and
/// digits after a colon. No allocation: it runs for every request.
pub fn valid_host(value: &[u8]) -> bool {
    /// One byte or more, each one `ok` admits.
    fn made_of(s: &[u8], ok: impl Fn(&u8) -> bool) -> bool {
        !s.is_empty() && s.iter().all(ok)
    }
    let port = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&c| c == b']') else {
            return false;
        };
        // An IPv6 address, with a zone (`%25eth0`, RFC 6874) if any.
        let inner = &rest[..end];
        let (addr, zone) = inner.split_at(inner.iter().position(|&c| c == b'%').unwrap_or(end));
        let zone_ok = zone.is_empty()
            || zone
                .strip_prefix(b"%25")
                .is_some_and(|z| made_of(z, |c| c.is_ascii_alphanumeric() || b"-._~%".contains(c)));
        if !(zone_ok && made_of(addr, |c| c.is_ascii_hexdigit() || b":.".contains(c))) {
            return false;
        }
        &rest[end + 1..]
    } else {
        let (name, port) =
            value.split_at(value.iter().position(|&c| c == b':').unwrap_or(value.len()));
        if !made_of(name, |c| {
            c.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(c)
        }) {
            return false;
        }
        port
    };
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// Puts back the two headers an upgrade needs after stripping.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets the forwarding headers: appends the client to `X-Forwarded-For`,
/// and sets `X-Forwarded-Proto`/`X-Forwarded-Host` only when an outer proxy
/// has not (Twilio signs the public URL, which the outermost proxy saw).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    // Every line an outer proxy (or the client) sent, in order: the last
    // one is the nearest hop.
    let mut v = Vec::new();
    for prev in headers.get_all(X_FORWARDED_FOR) {
        let prev = prev.as_bytes().trim_ascii();
        if !prev.is_empty() {
            v.extend_from_slice(prev);
            v.extend_from_slice(b", ");
        }
    }
    let appended = (!v.is_empty())
        .then(|| {
            v.extend_from_slice(client.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        })
        .flatten();
    headers.insert(X_FORWARDED_FOR, appended.unwrap_or_else(|| client.clone()));
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !headers.contains_key(X_FORWARDED_HOST)
        && let Some(h) = host
    {
        headers.insert(X_FORWARDED_HOST, h.clone());
    }
}

/// Adds batond to `Via` (RFC 9110 §7.6.3: a gateway must, in every request
/// it forwards): the protocol version the client spoke and the name,
/// after any hops an outer proxy listed. The worker thus sees every hop
/// the request took; responses are left as the worker sent them (a
/// gateway may, but need not, add itself there).
pub fn add_via(headers: &mut HeaderMap, received: http::Version) {
    let hop = if received == http::Version::HTTP_10 {
        "1.0 batond"
    } else {
        "1.1 batond"
    };
    headers.append(header::VIA, HeaderValue::from_static(hop));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_and_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        // Named in `Connection`, `Host` stays all the same.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Host"));
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::HOST], "a.example");
        // An obs-text byte in the line does not hide the options it names.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, \x80").expect("obs-text"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"\xff, Upgrade").expect("obs-text"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_protocol(&h).is_some());
    }

    #[test]
    fn via_names_the_version_received_after_outer_hops() {
        let mut h = HeaderMap::new();
        add_via(&mut h, http::Version::HTTP_11);
        assert_eq!(h[header::VIA], "1.1 batond");
        let mut h = HeaderMap::new();
        h.insert(header::VIA, HeaderValue::from_static("1.1 edge"));
        add_via(&mut h, http::Version::HTTP_10);
        let all: Vec<_> = h.get_all(header::VIA).iter().collect();
        assert_eq!(all, ["1.1 edge", "1.0 batond"]);
    }

    #[test]
    fn detects_upgrade_only_with_connection_token() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_protocol(&h).is_none());
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(
            upgrade_protocol(&h).as_ref().map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
    }

    #[test]
    fn forwarded_headers_append_and_keep_outer_values() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let host = HeaderValue::from_static("inner:8080");
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            "http",
            Some(&host),
        );
        assert_eq!(h[X_FORWARDED_FOR], "203.0.113.9, 127.0.0.1");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[X_FORWARDED_HOST], "inner:8080");
        // Two lines: both kept, in order, one value.
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        set_forwarded(&mut h, &HeaderValue::from_static("::1"), "http", None);
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.1, 203.0.113.9, ::1");
    }

    #[test]
    fn host_values_are_host_and_port() {
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]:8080",
            "[::1]",
            "[fe80::1%25eth0]:80",
            "a-b.c_d~",
            "x:",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "user@example.com",
            "a b",
            "example.com:80x",
            "[::1",
            "[zz]",
            ":80",
            "a/b",
            "[::1]x",
            "[fe80::1%eth0]",
            "[fe80::1%25]",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn a_switch_must_be_to_an_offered_protocol() {
        let offered = HeaderValue::from_static("websocket, h2c");
        assert!(upgrade_offered(
            &offered,
            &HeaderValue::from_static("WebSocket")
        ));
        assert!(upgrade_offered(&offered, &HeaderValue::from_static("h2c")));
        assert!(!upgrade_offered(&offered, &HeaderValue::from_static("h2")));
        assert!(!upgrade_offered(&offered, &HeaderValue::from_static("")));
    }

    #[test]
    fn codings_besides_the_final_chunked_are_named() {
        let of = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            codings_besides_chunked(&h)
        };
        assert_eq!(of(&[]), None);
        assert_eq!(of(&["chunked"]), None);
        assert_eq!(of(&["Chunked "]), None);
        assert_eq!(of(&["gzip, chunked"]).as_deref(), Some("gzip"));
        assert_eq!(of(&["gzip", "chunked"]).as_deref(), Some("gzip"));
        assert_eq!(of(&["gzip"]).as_deref(), Some("gzip"));
        assert_eq!(of(&["chunked, chunked"]).as_deref(), Some("chunked"));
        assert_eq!(of(&["x, , deflate,chunked"]).as_deref(), Some("x, deflate"));
    }
}
