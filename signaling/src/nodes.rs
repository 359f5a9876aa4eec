//! The SFU nodes this instance has a control connection to, their load, and which of
//! them a new room should go to. The placement itself is taken in the shared state
//! ([`crate::state::SharedState::join`]), atomically across instances.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use chorus_protocol::control::ToNode;
use tokio::sync::mpsc;
use tracing::info;

struct Link {
    tx: mpsc::UnboundedSender<ToNode>,
    /// Seats this instance placed on the node.
    seats: usize,
    /// Participants the node says it has (from every instance).
    reported: u32,
}

#[derive(Default)]
pub struct Nodes {
    links: Mutex<HashMap<String, Link>>,
}

impl Nodes {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Link>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, node_id: &str, tx: mpsc::UnboundedSender<ToNode>) -> Result<(), String> {
        let mut links = self.lock();
        if links.contains_key(node_id) {
            return Err(format!("a node with id {node_id:?} is already connected"));
        }
        links.insert(
            node_id.to_string(),
            Link {
                tx,
                seats: 0,
                reported: 0,
            },
        );
        info!(node = node_id, "media node registered");
        Ok(())
    }

    /// Forgets a node; false if it was not connected.
    pub fn remove(&self, node_id: &str) -> bool {
        self.lock().remove(node_id).is_some()
    }

    /// Sends a command; false when the node is not connected.
    pub fn send(&self, node_id: &str, msg: ToNode) -> bool {
        self.lock()
            .get(node_id)
            .is_some_and(|n| n.tx.send(msg).is_ok())
    }

    pub fn is_connected(&self, node_id: &str) -> bool {
        self.lock().contains_key(node_id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn set_reported(&self, node_id: &str, participants: u32) {
        if let Some(n) = self.lock().get_mut(node_id) {
            n.reported = participants;
        }
    }

    pub fn seat_added(&self, node_id: &str) {
        if let Some(n) = self.lock().get_mut(node_id) {
            n.seats += 1;
        }
    }

    pub fn seat_removed(&self, node_id: &str) {
        if let Some(n) = self.lock().get_mut(node_id) {
            n.seats = n.seats.saturating_sub(1);
        }
    }

    /// Connected nodes, the one a new room should go to first: fewest seats placed by
    /// this instance (it knows those at once), then fewest reported by the node.
    pub fn ranked(&self) -> Vec<String> {
        let links = self.lock();
        let mut ids: Vec<(&String, &Link)> = links.iter().collect();
        ids.sort_by_key(|(id, n)| (n.seats, n.reported, (*id).clone()));
        ids.into_iter().map(|(id, _)| id.clone()).collect()
    }
}
