//! The proxy's door: how many client connections may be open, per listener and in all, and
//! which one gives way when the cap is reached.
//!
//! The caps follow the agent's descriptor limit (`RLIMIT_NOFILE`, read at each new
//! connection, so `prlimit` on a running agent is honoured at once): proxied connections may use half of it
//! (each can hold an upstream connection too), leaving the rest to the admin socket, the
//! supervised processes' logs and the state files. At the cap, the oldest connection that
//! is idle (no request being forwarded or answered: a keep-alive between requests, a
//! client still sending its head or body) is closed to admit the new one, so idle and slow
//! clients cannot lock out the others; when every connection is busy, the new one is
//! closed at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The most connections in all, whatever the descriptor limit.
const MOST: usize = 4096;
/// Descriptors kept for everything but proxied connections, before halving the rest.
const RESERVED: usize = 64;

/// One open connection as the gate sees it.
struct Open {
    listen: String,
    /// Requests being forwarded or answered on it.
    busy: Arc<AtomicUsize>,
    /// Told to close when it gives way.
    close: Arc<Notify>,
}

/// The caps and the open connections of every listener.
pub(crate) struct Gate {
    open: Mutex<BTreeMap<u64, Open>>,
    next: AtomicUsize,
}

/// A connection let in: counted until dropped.
pub(crate) struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    /// Requests being forwarded or answered on this connection.
    pub(crate) busy: Arc<AtomicUsize>,
    /// Notified when the connection must give way.
    pub(crate) close: Arc<Notify>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.open.lock().expect("gate lock").remove(&self.id);
    }
}

/// Marks a connection busy while a request is forwarded and its answer sent.
pub(crate) struct Busy(Arc<AtomicUsize>);

impl Busy {
    pub(crate) fn new(busy: &Arc<AtomicUsize>) -> Busy {
        busy.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(busy))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The descriptor limit of this process, from `/proc/self/limits`.
fn descriptor_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Gate {
    pub(crate) fn new() -> Arc<Gate> {
        Arc::new(Gate { open: Mutex::new(BTreeMap::new()), next: AtomicUsize::new(0) })
    }

    /// The cap in all, from the descriptor limit (a read of `/proc/self/limits`: tens of
    /// microseconds, once per new connection, so `prlimit` on a running agent counts at once).
    fn total_cap() -> usize {
        let limit = descriptor_limit().unwrap_or(1024);
        (limit.saturating_sub(RESERVED) / 2).clamp(8, MOST)
    }

    /// Lets a connection to `listen` in, closing the oldest idle one when a cap is reached;
    /// `None` when every connection is busy (the caller closes the new one).
    pub(crate) fn admit(self: &Arc<Gate>, listen: &str) -> Option<Ticket> {
        let total = Gate::total_cap();
        // One listener may take three quarters, so a flood on one leaves room for others.
        let per_listener = (total * 3 / 4).max(4);
        let mut open = self.open.lock().expect("gate lock");
        let on_listener = open.values().filter(|o| o.listen == listen).count();
        if open.len() >= total || on_listener >= per_listener {
            let full_listener = on_listener >= per_listener;
            let victim = open
                .iter()
                .find(|(_, o)| o.busy.load(Ordering::SeqCst) == 0 && (!full_listener || o.listen == listen))
                .map(|(id, _)| *id)?;
            if let Some(evicted) = open.remove(&victim) {
                evicted.close.notify_one();
            }
        }
        let id = u64::try_from(self.next.fetch_add(1, Ordering::SeqCst)).unwrap_or(u64::MAX);
        let busy = Arc::new(AtomicUsize::new(0));
        let close = Arc::new(Notify::new());
        open.insert(id, Open { listen: listen.to_owned(), busy: Arc::clone(&busy), close: Arc::clone(&close) });
        Some(Ticket { gate: Arc::clone(self), id, busy, close })
    }

    /// Connections open now.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.open.lock().expect("gate lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_idle_connection_gives_way() {
        let gate = Gate::new();
        let cap = Gate::total_cap();
        let mut tickets: Vec<Ticket> = (0..cap).map(|i| gate.admit(&format!("l{}", i % 2)).unwrap()).collect();
        assert_eq!(gate.count(), cap);
        // Every one busy: a new one is refused.
        let guards: Vec<Busy> = tickets.iter().map(|t| Busy::new(&t.busy)).collect();
        assert!(gate.admit("l0").is_none());
        drop(guards);
        // All idle: the oldest is told to close and the new one is in.
        let newest = gate.admit("l0").unwrap();
        assert_eq!(gate.count(), cap);
        let first = tickets.remove(0);
        assert!(!gate.open.lock().unwrap().contains_key(&first.id), "the oldest gave way");
        drop(first);
        drop(newest);
        assert_eq!(gate.count(), cap - 1);
    }
}
