//! The agent's event log: every event of this agent's life, kept in order, so a CLI command
//! that connects late (or reconnects) still sees every stage from the start.

use std::sync::Mutex;

use tokio::sync::watch;

use crate::protocol::Event;

/// An append-only log of events with change notification.
#[derive(Debug)]
pub struct EventLog {
    events: Mutex<Vec<Event>>,
    len: watch::Sender<usize>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            events: Mutex::new(Vec::new()),
            len: watch::Sender::new(0),
        }
    }
}

impl EventLog {
    /// Appends an event and wakes every waiting reader.
    pub fn push(&self, event: Event) {
        tracing::info!(?event, "event");
        let len = {
            let mut events = self.events.lock().expect("event log lock");
            events.push(event);
            events.len()
        };
        self.len.send_replace(len);
    }

    /// Every event from index `from` on, waiting for at least one if there is none yet.
    /// Returns an empty list only when the log will never grow again (the agent is ending).
    pub async fn next_from(&self, from: usize) -> Vec<Event> {
        let mut rx = self.len.subscribe();
        loop {
            {
                let events = self.events.lock().expect("event log lock");
                if events.len() > from {
                    return events[from..].to_vec();
                }
            }
            if rx.changed().await.is_err() {
                return Vec::new();
            }
        }
    }

    /// A copy of the whole log.
    pub fn snapshot(&self) -> Vec<Event> {
        self.events.lock().expect("event log lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn late_readers_see_everything() {
        let log = Arc::new(EventLog::default());
        log.push(Event::Ready);
        assert_eq!(log.next_from(0).await, vec![Event::Ready]);

        let waiter = {
            let log = log.clone();
            tokio::spawn(async move { log.next_from(1).await })
        };
        tokio::task::yield_now().await;
        log.push(Event::Note {
            message: "x".into(),
        });
        let got = waiter.await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(log.snapshot().len(), 2);
    }
}
