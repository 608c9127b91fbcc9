//! Log output that never holds up traffic or a call.
//!
//! Both daemons log to stderr, which under systemd is a stream to journald
//! and elsewhere is often a pipe. When the reader stalls (journald busy or
//! rate-limiting, a pipe nobody reads), a plain `write` to stderr blocks,
//! and with it the thread that logged: in `batond` the one thread that
//! proxies every request and call, which then stops serving altogether.
//! So lines are formatted where they are logged and handed to a thread of
//! their own ([`WRITER_THREAD`]) through a bounded queue; a line that finds
//! the queue full is dropped and counted ([`dropped_lines`]) instead of
//! waiting. The queue holds [`QUEUE_LINES`] lines, so the memory it can take
//! is bounded too.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// The name of the thread that writes log lines to stderr. It blocks on
/// stderr and moves no traffic: [`crate::sched`] leaves it at normal
/// scheduling.
pub const WRITER_THREAD: &str = "log-writer";

/// Lines the queue to the writer thread holds (a few hundred KiB at most).
pub const QUEUE_LINES: usize = 2048;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// A writer for `tracing_subscriber`'s `with_writer` that queues lines for
/// the writer thread, and the guard that flushes the queue when dropped
/// (keep it until the process ends).
pub fn stderr() -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name(WRITER_THREAD)
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    wait_for_name();
    (writer, guard)
}

/// Waits (briefly, bounded) until the writer thread carries its name: a new
/// thread names itself once it runs, and until then it looks like the one
/// that started it, which [`crate::sched`] would take for a thread that
/// moves traffic.
fn wait_for_name() {
    for _ in 0..1000 {
        let named = std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| {
            tasks.filter_map(Result::ok).any(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|n| n.trim_end() == WRITER_THREAD)
            })
        });
        if named {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Log lines dropped so far because stderr did not take them in time.
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}

/// Whether to colour text logs: only on a terminal, and not when
/// `NO_COLOR` is set (a journal or a file gets plain text).
pub fn ansi() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Every `period` until `token` is cancelled: a warning with the lines
/// dropped since the last one (itself a log line, so it gets through once
/// stderr takes lines again).
pub async fn report_dropped(
    period: std::time::Duration,
    token: tokio_util::sync::CancellationToken,
) {
    let mut seen = 0;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = token.cancelled() => return,
        }
        let now = dropped_lines();
        if now > seen {
            tracing::warn!(
                dropped = now - seen,
                total = now,
                "stderr did not take {} log lines in time; they were dropped so that traffic \
                 did not wait (a stalled journal, or a pipe nobody reads)",
                now - seen
            );
            seen = now;
        }
    }
}

/// An error and its causes on one line, `a: b: c`, each cause said once:
/// the messages of this crate already carry their source (`cannot reach
/// batond at X: no such file`), which `{:#}` would print a second time.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[test]
    fn error_text_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(crate::control::client::ClientError::Connect {
            path: "/run/baton/control.sock".into(),
            source: io,
        })
        .context("status");
        assert_eq!(
            error_text(&e),
            "status: cannot reach batond at /run/baton/control.sock: no such file"
        );
    }
}
