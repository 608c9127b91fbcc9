//! The daemon's event bus: every lifecycle step is logged once (a structured
//! tracing event) and broadcast to `GET /v1/events` subscribers.

use tokio::sync::broadcast;

use crate::control::api::{Event, timestamp};

/// Sends events to the log and to subscribers.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(1024).0,
        }
    }
}

impl Events {
    /// Logs and broadcasts one event.
    pub fn emit(&self, kind: &str, generation: Option<u64>, message: impl Into<String>) {
        let message = message.into();
        match kind {
            "build_failed" | "rejected" | "failed" | "worker_exited" | "start_limit_hit"
            | "health_failed" | "config_rejected" | "drain_timeout" => {
                tracing::warn!(event = kind, generation, "{message}");
            }
            _ => tracing::info!(event = kind, generation, "{message}"),
        }
        let _ = self.tx.send(Event {
            ts: timestamp(std::time::SystemTime::now()),
            kind: kind.to_string(),
            generation,
            message,
        });
    }

    /// A new subscription, starting with the next event.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
