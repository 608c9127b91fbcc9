//! `callsim webhook`: posts the Twilio webhooks the way Twilio does (form
//! bodies, optionally signed) and checks the TwiML as XML.

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::CallsimError;
use crate::twilio::signature;
use crate::worker::http::encode_form;

/// What to post.
#[derive(Debug, Clone, Default)]
pub struct WebhookOptions {
    /// Where the worker is (`http://127.0.0.1:PORT`).
    pub base: String,
    /// The public base Twilio would use (what gets signed); defaults to
    /// `base`. When given, the requests also carry `X-Forwarded-Proto` and
    /// `X-Forwarded-Host` for it, as the TLS proxy in front would send.
    pub public_url: Option<String>,
    /// Sign requests with this token.
    pub auth_token: Option<String>,
    /// The CallSid to send.
    pub call_sid: String,
    /// Accept `ws://` stream URLs (a local worker without TLS).
    pub allow_insecure_ws: bool,
}

/// The outcome.
#[derive(Debug, Clone, Serialize, Default)]
pub struct WebhookReport {
    /// Status of `POST /webhook/incoming_call`.
    pub incoming_call_status: u16,
    /// Its Content-Type.
    pub content_type: Option<String>,
    /// `X-App-Signature` of that response.
    pub app_signature: Option<String>,
    /// `<Connect action>`.
    pub connect_action: Option<String>,
    /// `<Stream url>`.
    pub stream_url: Option<String>,
    /// `<Stream statusCallback>`.
    pub status_callback: Option<String>,
    /// `<Stream statusCallbackMethod>`.
    pub status_callback_method: Option<String>,
    /// `<Parameter>` pairs.
    pub parameters: BTreeMap<String, String>,
    /// Status of `POST /webhook/stream_status`.
    pub stream_status_status: u16,
    /// Status of `POST /webhook/stream_ended`.
    pub stream_ended_status: u16,
    /// What is wrong (empty = all good).
    pub problems: Vec<String>,
}

/// Facts found in a TwiML document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwimlConnect {
    /// `<Connect action>`.
    pub action: Option<String>,
    /// `<Stream url>`.
    pub stream_url: Option<String>,
    /// `<Stream statusCallback>`.
    pub status_callback: Option<String>,
    /// `<Stream statusCallbackMethod>`.
    pub status_callback_method: Option<String>,
    /// `<Parameter name value>` pairs.
    pub parameters: BTreeMap<String, String>,
}

/// Parses `<Response><Connect><Stream>` TwiML as XML and lists problems
/// Twilio would have with it.
pub fn check_twiml(xml: &str, allow_insecure_ws: bool) -> (TwimlConnect, Vec<String>) {
    let mut out = TwimlConnect::default();
    let mut problems = Vec::new();
    let doc = match roxmltree::Document::parse(xml) {
        Ok(d) => d,
        Err(e) => return (out, vec![format!("TwiML is not XML: {e}")]),
    };
    let root = doc.root_element();
    if root.tag_name().name() != "Response" {
        problems.push(format!(
            "root element is <{}>, not <Response>",
            root.tag_name().name()
        ));
        return (out, problems);
    }
    let connects: Vec<_> = root
        .children()
        .filter(|n| n.has_tag_name("Connect"))
        .collect();
    let [connect] = connects.as_slice() else {
        problems.push(format!("{} <Connect> elements, want 1", connects.len()));
        return (out, problems);
    };
    out.action = connect.attribute("action").map(str::to_string);
    let streams: Vec<_> = connect
        .children()
        .filter(|n| n.has_tag_name("Stream"))
        .collect();
    let [stream] = streams.as_slice() else {
        problems.push(format!(
            "{} <Stream> elements in <Connect>, want 1",
            streams.len()
        ));
        return (out, problems);
    };
    out.stream_url = stream.attribute("url").map(str::to_string);
    out.status_callback = stream.attribute("statusCallback").map(str::to_string);
    out.status_callback_method = stream.attribute("statusCallbackMethod").map(str::to_string);
    for p in stream.children().filter(|n| n.has_tag_name("Parameter")) {
        match (p.attribute("name"), p.attribute("value")) {
            (Some(n), Some(v)) => {
                if n.len() + v.len() >= 500 {
                    problems.push(format!("<Parameter {n}> name+value is 500 chars or more"));
                }
                out.parameters.insert(n.to_string(), v.to_string());
            }
            _ => problems.push("<Parameter> without name or value".into()),
        }
    }
    match out.stream_url.as_deref() {
        None => problems.push("<Stream> has no url".into()),
        Some(u) => {
            let secure = u.starts_with("wss://");
            if !(secure || (allow_insecure_ws && u.starts_with("ws://"))) {
                problems.push(format!(
                    "<Stream url> {u:?} is not wss:// (Twilio error 31922)"
                ));
            }
            if u.contains('?') {
                problems.push(format!(
                    "<Stream url> {u:?} has a query string (Twilio drops it)"
                ));
            }
        }
    }
    if let Some(track) = stream.attribute("track")
        && track != "inbound_track"
    {
        problems.push(format!(
            "<Connect><Stream track={track:?}> (Twilio error 31941)"
        ));
    }
    for (what, v) in [
        ("action", &out.action),
        ("statusCallback", &out.status_callback),
    ] {
        if let Some(u) = v
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            problems.push(format!("{what} {u:?} is not an absolute http(s) URL"));
        }
    }
    if let Some(m) = out.status_callback_method.as_deref()
        && m != "POST"
        && m != "GET"
    {
        problems.push(format!("statusCallbackMethod {m:?}"));
    }
    (out, problems)
}

/// Posts the three webhooks and checks the answers.
///
/// # Errors
/// [`CallsimError::Webhook`] when a request cannot be made at all.
pub async fn run(opts: &WebhookOptions) -> Result<WebhookReport, CallsimError> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let base = opts.base.trim_end_matches('/');
    let public = opts
        .public_url
        .as_deref()
        .unwrap_or(base)
        .trim_end_matches('/');
    let mut rep = WebhookReport::default();
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let account = "AC00000000000000000000000000000000";
    let incoming = pairs(&[
        ("AccountSid", account),
        ("CallSid", &opts.call_sid),
        ("From", "+14155550100"),
        ("To", "+14155550199"),
        ("CallStatus", "ringing"),
        ("Direction", "inbound"),
        ("ApiVersion", "2010-04-01"),
    ]);
    // What the TLS proxy in front says of the public URL.
    let forwarded = opts.public_url.as_deref().and_then(|u| {
        let (scheme, rest) = u.split_once("://")?;
        let host = rest.split('/').next().filter(|h| !h.is_empty())?;
        Some((scheme.to_string(), host.to_string()))
    });
    let post = |path: &'static str, form: Vec<(String, String)>| {
        let client = client.clone();
        let url = format!("{base}{path}");
        let signed_url = format!("{public}{path}");
        let token = opts.auth_token.clone();
        let forwarded = forwarded.clone();
        async move {
            let mut req = Request::post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("user-agent", "TwilioProxy/1.1 (callsim)");
            if let Some((scheme, host)) = &forwarded {
                req = req
                    .header("x-forwarded-proto", scheme.as_str())
                    .header("x-forwarded-host", host.as_str());
            }
            if let Some(t) = token {
                req = req.header(
                    "x-twilio-signature",
                    signature::compute(&t, &signed_url, &form),
                );
            }
            let req = req
                .body(Full::new(Bytes::from(encode_form(&form))))
                .map_err(|e| CallsimError::Webhook(format!("{url}: {e}")))?;
            let resp = client
                .request(req)
                .await
                .map_err(|e| CallsimError::Webhook(format!("{url}: {e}")))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| CallsimError::Webhook(format!("{url}: {e}")))?
                .to_bytes();
            Ok::<_, CallsimError>((parts, body))
        }
    };

    let (parts, body) = post("/webhook/incoming_call", incoming).await?;
    rep.incoming_call_status = parts.status.as_u16();
    rep.content_type = header(&parts.headers, "content-type");
    rep.app_signature = header(&parts.headers, "x-app-signature");
    if rep.app_signature.is_none() {
        rep.problems.push("response without X-App-Signature".into());
    }
    if parts.status.as_u16() != 200 {
        rep.problems
            .push(format!("incoming_call answered {}", parts.status));
    } else {
        if !rep
            .content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("text/xml") || c.starts_with("application/xml"))
        {
            rep.problems
                .push(format!("TwiML content-type {:?}", rep.content_type));
        }
        let (twiml, problems) =
            check_twiml(&String::from_utf8_lossy(&body), opts.allow_insecure_ws);
        rep.problems.extend(problems);
        if twiml
            .parameters
            .get("callSid")
            .is_some_and(|c| *c != opts.call_sid)
        {
            rep.problems
                .push("<Parameter callSid> differs from the CallSid posted".into());
        }
        rep.connect_action = twiml.action;
        rep.stream_url = twiml.stream_url;
        rep.status_callback = twiml.status_callback;
        rep.status_callback_method = twiml.status_callback_method;
        rep.parameters = twiml.parameters;
    }

    let stream_sid = format!("MZ{:032x}", rand::random::<u128>());
    let status_form = pairs(&[
        ("AccountSid", account),
        ("CallSid", &opts.call_sid),
        ("StreamSid", &stream_sid),
        ("StreamName", &stream_sid),
        ("StreamEvent", "stream-started"),
        ("Timestamp", "2026-01-01T00:00:00.000Z"),
    ]);
    let (parts, _) = post("/webhook/stream_status", status_form).await?;
    rep.stream_status_status = parts.status.as_u16();
    if !parts.status.is_success() {
        rep.problems
            .push(format!("stream_status answered {}", parts.status));
    }
    let ended_form = pairs(&[
        ("AccountSid", account),
        ("CallSid", &opts.call_sid),
        ("CallStatus", "in-progress"),
    ]);
    let (parts, _) = post("/webhook/stream_ended", ended_form).await?;
    rep.stream_ended_status = parts.status.as_u16();
    if !parts.status.is_success() {
        rep.problems
            .push(format!("stream_ended answered {}", parts.status));
    }
    Ok(rep)
}

fn header(h: &hyper::HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::http::twiml_connect;

    #[test]
    fn worker_twiml_passes() {
        let (t, problems) = check_twiml(&twiml_connect("https://h.example", "CA1"), false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            t.stream_url.as_deref(),
            Some("wss://h.example/ws/twilio-media")
        );
        assert_eq!(
            t.action.as_deref(),
            Some("https://h.example/webhook/stream_ended")
        );
        assert_eq!(t.parameters.get("callSid").map(String::as_str), Some("CA1"));
    }

    #[test]
    fn bad_twiml_is_reported() {
        let (_, p) = check_twiml("<Response><Say>hi</Say>", false);
        assert!(p[0].contains("not XML"), "{p:?}");
        let (_, p) = check_twiml(
            r#"<Response><Connect><Stream url="ws://h/x?a=1" track="both_tracks"/></Connect></Response>"#,
            false,
        );
        assert_eq!(p.len(), 3, "{p:?}");
    }
}
