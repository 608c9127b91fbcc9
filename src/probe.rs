//! Health probes: `GET health_path` on a worker's socket, and the
//! verdict on whether the answer proves the expected build.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::endpoint::Endpoint;

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No HTTP answer (refused, reset, closed).
    NoAnswer(String),
    /// No answer within the time the probe had.
    TimedOut(Duration),
    /// `batond` could not make the probe at all: it is out of file
    /// descriptors or memory for a socket. That says nothing about the
    /// worker, so it counts neither for nor against it.
    Unable(String),
    /// An HTTP answer.
    Answer {
        /// The status code.
        status: StatusCode,
        /// The signature header, if present and readable.
        signature: Option<String>,
    },
}

/// The verdict on a probe against the expected signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 200 with the right signature.
    Proven,
    /// Not yet: keep probing until the start timeout (no answer, 5xx, 429).
    NotYet(String),
    /// Definitely not this build: reject now (any other status than 200,
    /// a wrong or missing signature).
    Wrong(String),
}

/// Probes the worker at `endpoint` once, bounded by `timeout`.
pub async fn probe(
    endpoint: &Endpoint,
    path: &str,
    header: &HeaderName,
    timeout: Duration,
) -> Probe {
    match tokio::time::timeout(timeout, probe_inner(endpoint, path, header)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => Probe::NoAnswer(e),
        Err(_) => Probe::TimedOut(timeout),
    }
}

async fn probe_inner(
    endpoint: &Endpoint,
    path: &str,
    header: &HeaderName,
) -> Result<Probe, String> {
    let stream = match endpoint.connect().await {
        Ok(s) => s,
        Err(e) if crate::process::short_of_resources(&e) => {
            return Ok(Probe::Unable(e.to_string()));
        }
        Err(e) => return Err(e.to_string()),
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path)
        .header(http::header::HOST, endpoint.authority())
        .header(http::header::USER_AGENT, "batond-probe")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let signature = resp
        .headers()
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string());
    Ok(Probe::Answer {
        status: resp.status(),
        signature,
    })
}

/// Judges a probe: a 200 must carry exactly `want`.
pub fn judge(p: &Probe, want: &str) -> Verdict {
    match p {
        Probe::NoAnswer(e) => Verdict::NotYet(format!("no answer: {e}")),
        Probe::TimedOut(t) => {
            Verdict::NotYet(format!("no answer: no answer within {} ms", t.as_millis()))
        }
        Probe::Unable(e) => Verdict::NotYet(format!("batond could not probe: {e}")),
        Probe::Answer { status, signature } => {
            if *status != StatusCode::OK {
                // Busy (5xx, 429) may pass while the worker warms up; any
                // other answer (a 404, a redirect, a 204) is the worker's
                // final word on this path.
                let reason = format!("healthz {}", status.as_u16());
                if status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS {
                    Verdict::NotYet(reason)
                } else {
                    Verdict::Wrong(reason)
                }
            } else {
                match signature {
                    Some(got) if got.eq_ignore_ascii_case(want) => Verdict::Proven,
                    Some(got) => Verdict::Wrong(format!(
                        "signature mismatch: want {} got {}",
                        short(want),
                        short(got)
                    )),
                    None => Verdict::Wrong(format!(
                        "signature mismatch: want {} got nothing (header missing)",
                        short(want)
                    )),
                }
            }
        }
    }
}

/// The first 12 hex digits, enough to tell builds apart in a message.
pub fn short(sig: &str) -> String {
    let s: String = sig.chars().take(12).collect();
    if sig.chars().count() > 12 {
        format!("{s}..")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: u16, sig: Option<&str>) -> Probe {
        Probe::Answer {
            status: StatusCode::from_u16(code).expect("status"),
            signature: sig.map(str::to_string),
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(judge(&answer(200, Some("ABC")), "abc"), Verdict::Proven);
        assert_eq!(
            judge(&answer(404, None), "abc"),
            Verdict::Wrong("healthz 404".into())
        );
        assert_eq!(
            judge(&answer(503, None), "abc"),
            Verdict::NotYet("healthz 503".into())
        );
        assert_eq!(
            judge(&answer(429, None), "abc"),
            Verdict::NotYet("healthz 429".into())
        );
        for code in [301, 302, 308, 204, 201] {
            assert_eq!(
                judge(&answer(code, Some("abc")), "abc"),
                Verdict::Wrong(format!("healthz {code}"))
            );
        }
        assert!(matches!(judge(&answer(200, Some("9f3c")), "ab12"),
            Verdict::Wrong(r) if r == "signature mismatch: want ab12 got 9f3c"));
        assert!(matches!(
            judge(&answer(200, None), "ab12"),
            Verdict::Wrong(_)
        ));
        assert!(matches!(
            judge(&Probe::NoAnswer("refused".into()), "x"),
            Verdict::NotYet(_)
        ));
        assert_eq!(
            judge(&Probe::TimedOut(Duration::from_secs(2)), "x"),
            Verdict::NotYet("no answer: no answer within 2000 ms".into())
        );
    }
}
