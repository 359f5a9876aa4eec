//! Room events from the shared state, whichever instance caused them, applied to this
//! instance's seats in the room's order: encoded once, sent to every local recipient.

use super::*;

impl Hub {
    /// A room event from the shared state (this instance's or another's), in order.
    pub fn on_event(&self, ev: RoomEvent) {
        let mut local = self.lock();
        for p in local.pending.values_mut().filter(|p| p.room == ev.room) {
            p.events.push(ev.clone());
        }
        self.apply(&mut local, &ev, None);
    }

    /// Applies an event to the local seats of its room (or to `only` that one).
    pub(super) fn apply(&self, local: &mut Local, ev: &RoomEvent, only: Option<u64>) {
        let room = &ev.room;
        let targets = match only {
            Some(id) => vec![id],
            None => local.in_room(room),
        };
        match &ev.kind {
            EventKind::Joined(s) | EventKind::Updated(s) => {
                let joined = matches!(ev.kind, EventKind::Joined(_));
                let msg = if joined {
                    ServerMessage::ParticipantJoined {
                        participant: s.seat.info(),
                    }
                } else {
                    ServerMessage::ParticipantUpdated {
                        participant: s.seat.info(),
                    }
                };
                let except = joined.then_some(s.seat.id);
                self.deliver(local, &targets, ev.seq, except, &msg);
            }
            EventKind::Left { seat, reason } => {
                let id = seat.seat.id;
                // Our seat, removed by someone else (a newer join of the identity).
                if seat.instance == self.instance && targets.contains(&id) {
                    if let Some(s) = local.take(id) {
                        s.send(&ServerMessage::Left {
                            reason: reason.clone(),
                        });
                        if let Some(sess) = &s.session {
                            sess.close(4000, "replaced by a newer join");
                        }
                        self.nodes
                            .send(&s.seat.node, ToNode::RemoveParticipant { participant: id });
                        self.nodes.seat_removed(&s.seat.node);
                    }
                }
                let msg = ServerMessage::ParticipantLeft {
                    sid: id.to_string(),
                    identity: seat.seat.identity.clone(),
                    reason: reason.clone(),
                };
                self.deliver(local, &targets, ev.seq, None, &msg);
            }
            EventKind::Moved(s) => {
                if s.instance != self.instance && targets.contains(&s.seat.id) {
                    if let Some(gone) = local.take(s.seat.id) {
                        info!(participant = s.seat.id, to = %s.instance, "seat resumed on another instance");
                        if let Some(sess) = &gone.session {
                            sess.close(4001, "resumed elsewhere");
                        }
                        self.nodes.seat_removed(&gone.seat.node);
                    }
                }
            }
            EventKind::Chat { .. } | EventKind::ChatDeleted { .. } => {
                if only.is_none() {
                    self.deliver_chat(local, &targets, &ev.kind);
                }
            }
            EventKind::Settings(settings) => {
                if settings.enhanced_audio == Some(false) {
                    for id in targets {
                        let Some(s) = local.seats.get_mut(&id).filter(|s| s.seat.enhanced) else {
                            continue;
                        };
                        s.seat.enhanced = false;
                        s.dirty = true;
                        self.nodes.send(
                            &s.seat.node,
                            ToNode::SetEnhanced {
                                participant: id,
                                enabled: false,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Sends a seat change to every target that has not seen it, encoded once.
    pub(super) fn deliver(
        &self,
        local: &mut Local,
        targets: &[u64],
        seq: u64,
        except: Option<u64>,
        msg: &ServerMessage,
    ) {
        let mut text = None;
        for id in targets {
            let Some(s) = local.seats.get_mut(id) else {
                continue;
            };
            if seq <= s.seen_seq {
                continue;
            }
            s.seen_seq = seq;
            if Some(*id) == except {
                continue;
            }
            if let Some(sess) = &s.session {
                let t = text.get_or_insert_with(|| encode(msg));
                sess.send(*id, t.clone());
            }
        }
    }

    /// Chat events go over the nodes' data channels to the seats whose chat is open.
    pub(super) fn deliver_chat(&self, local: &mut Local, targets: &[u64], kind: &EventKind) {
        let frame = match kind {
            EventKind::Chat { message, .. } => ChatServerFrame::Message {
                message: message.clone(),
                reference: None,
            },
            EventKind::ChatDeleted { id } => ChatServerFrame::Deleted { id: *id },
            _ => return,
        };
        let sender = match kind {
            EventKind::Chat { sender, .. } => Some(*sender),
            _ => None,
        };
        let mut by_node: HashMap<String, Vec<u64>> = HashMap::new();
        for id in targets {
            if Some(*id) == sender {
                continue; // it gets its own copy, with its ref, from its instance
            }
            let Some(s) = local.seats.get_mut(id) else {
                continue;
            };
            match &mut s.chat {
                ChatChannel::Closed => {}
                ChatChannel::Opening(wait) => wait.push(kind.clone()),
                ChatChannel::Ready => by_node.entry(s.seat.node.clone()).or_default().push(*id),
            }
        }
        if by_node.is_empty() {
            return;
        }
        let data = frame.to_json();
        for (node, participants) in by_node {
            self.nodes.send(
                &node,
                ToNode::ChatTo {
                    participants,
                    data: data.clone(),
                },
            );
        }
    }
}
