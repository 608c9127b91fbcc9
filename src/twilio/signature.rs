//! The `X-Twilio-Signature` algorithm (TWILIO.md section 7).
//!
//! Twilio signs the exact URL it requested, followed by the POST parameters
//! sorted by name (values of a repeated name sorted, duplicates dropped),
//! each name then value with no separator, with HMAC-SHA1 keyed by the
//! account's auth token, base64-encoded. JSON bodies are signed through a
//! `bodySHA256` query parameter instead. The SDKs accept the URL both with and
//! without an explicit default port, so [`validate`] does too.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

type HmacSha1 = Hmac<Sha1>;

/// Computes the base64 signature Twilio would send for `url` and form
/// `params` (the pairs in any order; repeated names allowed).
pub fn compute(token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut mac = new_mac(token);
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn new_mac(token: &str) -> HmacSha1 {
    // HMAC takes keys of any length; this cannot fail.
    match HmacSha1::new_from_slice(token.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable_mac(),
    }
}

#[cold]
fn unreachable_mac() -> HmacSha1 {
    // HMAC accepts every key length; keep the code panic-free anyway.
    <HmacSha1 as KeyInit>::new(&Default::default())
}

/// Checks `signature` against `url` + `params` in constant time, trying the
/// URL as given, without its default port, and with it (the SDKs do the
/// same, because proxies differ in what they forward).
pub fn validate(token: &str, url: &str, params: &[(String, String)], signature: &str) -> bool {
    url_variants(url)
        .iter()
        .any(|u| constant_time_eq(compute(token, u, params).as_bytes(), signature.as_bytes()))
}

/// Checks a JSON-bodied webhook: the URL carries `bodySHA256=<hex>`, which
/// must match the body, and the signature covers the URL with no params.
pub fn validate_json_body(token: &str, url: &str, body: &[u8], signature: &str) -> bool {
    let want = hex::encode(Sha256::digest(body));
    let carried = url
        .split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "bodySHA256")
                .map(|(_, v)| v.to_ascii_lowercase())
        })
        .unwrap_or_default();
    let body_ok = carried.is_some_and(|c| constant_time_eq(c.as_bytes(), want.as_bytes()));
    body_ok & validate(token, url, &[], signature)
}

/// The URL as given plus its form with the default port added or removed.
fn url_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_string()];
    let Some((scheme, rest)) = url.split_once("://") else {
        return out;
    };
    let default_port = match scheme {
        "https" | "wss" => "443",
        "http" | "ws" => "80",
        _ => return out,
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    // An IPv6 literal keeps its colons inside brackets.
    let port_sep = if hostport.starts_with('[') {
        hostport.find("]:").map(|i| i + 1)
    } else {
        hostport.rfind(':')
    };
    match port_sep {
        Some(i) if &hostport[i + 1..] == default_port => {
            out.push(format!("{scheme}://{userinfo}{}{tail}", &hostport[..i]));
        }
        Some(_) => {}
        None => out.push(format!(
            "{scheme}://{userinfo}{hostport}:{default_port}{tail}"
        )),
    }
    out
}

/// Compares two byte strings without an early exit on the first mismatch.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "12345";
    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn docs_params() -> Vec<(String, String)> {
        p(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ])
    }

    fn sdk_params() -> Vec<(String, String)> {
        p(&[
            ("To", "+18005551212"),
            ("From", "+14158675309"),
            ("Digits", "1234"),
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
        ])
    }

    #[test]
    fn vector_form_docs_example() {
        assert_eq!(
            compute(TOKEN, URL, &docs_params()),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
        assert!(validate(
            TOKEN,
            URL,
            &docs_params(),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
    }

    #[test]
    fn vector_form_sdk_test() {
        assert_eq!(
            compute(TOKEN, URL, &sdk_params()),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert!(validate(
            TOKEN,
            URL,
            &sdk_params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    #[test]
    fn vector_with_port_443() {
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        assert_eq!(
            compute(TOKEN, with_port, &sdk_params()),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        );
        // Signed with the port, checked on the URL without it, and back.
        assert!(validate(
            TOKEN,
            URL,
            &sdk_params(),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        ));
        assert!(validate(
            TOKEN,
            with_port,
            &sdk_params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    #[test]
    fn vector_multi_valued() {
        let params = p(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]);
        assert_eq!(compute(TOKEN, URL, &params), "IK+Dwps556ElfBT0I3Rgjkr1wJU=");
    }

    #[test]
    fn vector_json_body() {
        let body = br#"{"property": "value", "boolean": true}"#;
        let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(hex::encode(Sha256::digest(body)), hash);
        let url = format!("{URL}&bodySHA256={hash}");
        assert_eq!(compute(TOKEN, &url, &[]), "a9nBmqA0ju/hNViExpshrM61xv4=");
        assert!(validate_json_body(
            TOKEN,
            &url,
            body,
            "a9nBmqA0ju/hNViExpshrM61xv4="
        ));
        assert!(!validate_json_body(
            TOKEN,
            &url,
            b"{}",
            "a9nBmqA0ju/hNViExpshrM61xv4="
        ));
    }

    #[test]
    fn rejects_wrong_token_url_or_params() {
        let good = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
        assert!(!validate("54321", URL, &sdk_params(), good));
        assert!(!validate(
            TOKEN,
            "https://mycompany.com/other",
            &sdk_params(),
            good
        ));
        assert!(!validate(TOKEN, URL, &docs_params(), good));
        assert!(!validate(TOKEN, URL, &sdk_params(), ""));
    }

    #[test]
    fn port_variants() {
        assert_eq!(
            url_variants("wss://h:443/ws"),
            vec!["wss://h:443/ws".to_string(), "wss://h/ws".to_string()]
        );
        assert_eq!(
            url_variants("http://h?x=1"),
            vec!["http://h?x=1".to_string(), "http://h:80?x=1".to_string()]
        );
        assert_eq!(
            url_variants("http://h:8080/"),
            vec!["http://h:8080/".to_string()]
        );
    }
}
