//! What nodes tell the hub: media negotiation for a seat's client, presence reports
//! (speaking, tracks), chat frames from a seat's data channel, and nodes coming and going.
//! A node only ever reports on seats this instance put there (it routes per seat).

use super::*;

impl Hub {
    pub fn register_node(
        &self,
        node_id: &str,
        tx: mpsc::UnboundedSender<ToNode>,
    ) -> Result<(), String> {
        self.nodes.register(node_id, tx)
    }

    /// The node's control connection ended: its media sessions are gone, and so are
    /// the seats this instance had on it.
    pub async fn node_gone(&self, node_id: &str) {
        if !self.nodes.remove(node_id) {
            return;
        }
        warn!(
            node = node_id,
            "media node disconnected; its participants lose their seats"
        );
        let gone: Vec<LocalSeat> = {
            let mut local = self.lock();
            let ids: Vec<u64> = local
                .seats
                .values()
                .filter(|s| s.seat.node == node_id)
                .map(|s| s.seat.id)
                .collect();
            ids.into_iter().filter_map(|id| local.take(id)).collect()
        };
        for s in gone {
            s.send(&ServerMessage::Error {
                code: ErrorCode::NoMediaNode,
                message: "the media server for this room went away; rejoin".into(),
            });
            s.send(&ServerMessage::Left {
                reason: "media_failed".into(),
            });
            self.release(&s.seat.room, s.seat.id, "media_failed").await;
        }
    }

    /// Sends a message to the client of a local seat on `node_id`.
    fn to_client(&self, node_id: &str, participant: u64, msg: ServerMessage) {
        let local = self.lock();
        if let Some(s) = local
            .seats
            .get(&participant)
            .filter(|s| s.seat.node == node_id)
        {
            s.send(&msg);
        }
    }

    /// Changes a local seat on `node_id`; `f` says whether anything changed, and then
    /// the seat is written to the shared state (whose event shows it to everyone).
    async fn change_seat(
        &self,
        node_id: &str,
        participant: u64,
        f: impl FnOnce(&mut Seat) -> bool,
    ) {
        {
            let mut local = self.lock();
            let Some(s) = local
                .seats
                .get_mut(&participant)
                .filter(|s| s.seat.node == node_id)
            else {
                return;
            };
            if !f(&mut s.seat) {
                return;
            }
            s.dirty = true;
            s.announce = true;
        }
        self.write_seat(participant).await;
    }

    pub async fn node_event(&self, node_id: &str, ev: FromNode) {
        match ev {
            FromNode::Load { participants, .. } => self.nodes.set_reported(node_id, participants),
            FromNode::Answer { participant, sdp } => {
                self.to_client(node_id, participant, ServerMessage::Answer { sdp })
            }
            FromNode::Offer { participant, sdp } => {
                self.to_client(node_id, participant, ServerMessage::Offer { sdp })
            }
            FromNode::Speaking {
                participant,
                speaking,
            } => {
                self.change_seat(node_id, participant, |s| {
                    // A muted participant is never shown as speaking, whatever trickles in.
                    let v = speaking && !s.muted;
                    std::mem::replace(&mut s.speaking, v) != v
                })
                .await
            }
            FromNode::Track {
                participant,
                publishing,
            } => {
                self.change_seat(node_id, participant, |s| {
                    std::mem::replace(&mut s.publishing, publishing) != publishing
                })
                .await
            }
            FromNode::Tracks {
                participant,
                tracks,
            } => {
                self.change_seat(node_id, participant, |s| {
                    std::mem::replace(&mut s.tracks, tracks) != s.tracks
                })
                .await
            }
            FromNode::TrackQuality {
                participant,
                track,
                quality,
                reason,
            } => self.to_client(
                node_id,
                participant,
                ServerMessage::TrackQuality {
                    track_sid: track,
                    quality,
                    reason,
                },
            ),
            FromNode::PublishLayers {
                participant,
                track,
                layers,
            } => self.to_client(
                node_id,
                participant,
                ServerMessage::PublishLayers {
                    track_sid: track,
                    layers,
                },
            ),
            FromNode::ReceiveStats { participant, stats } => {
                let mut local = self.lock();
                if let Some(s) = local.seats.get_mut(&participant) {
                    if s.seat.node == node_id {
                        s.receive = Some(stats);
                    }
                }
            }
            FromNode::ParticipantGone {
                participant,
                reason,
            } => {
                let gone = {
                    let mut local = self.lock();
                    let ours = local
                        .seats
                        .get(&participant)
                        .is_some_and(|s| s.seat.node == node_id);
                    if ours {
                        local.take(participant)
                    } else {
                        None
                    }
                };
                if let Some(s) = gone {
                    warn!(participant, %reason, "media session ended by the node");
                    s.send(&ServerMessage::Error {
                        code: ErrorCode::Internal,
                        message: format!("media connection failed: {reason}"),
                    });
                    s.send(&ServerMessage::Left {
                        reason: "media_failed".into(),
                    });
                    self.nodes.seat_removed(node_id);
                    self.release(&s.seat.room, participant, "media_failed")
                        .await;
                }
            }
            FromNode::Error {
                participant,
                code,
                message,
            } => {
                let code = match code {
                    NodeErrorCode::InvalidSdp => ErrorCode::InvalidSdp,
                    NodeErrorCode::InvalidCandidate => ErrorCode::InvalidCandidate,
                    NodeErrorCode::UnknownTrack => ErrorCode::UnknownTrack,
                    NodeErrorCode::UnknownParticipant | NodeErrorCode::Internal => {
                        ErrorCode::Internal
                    }
                };
                self.to_client(node_id, participant, ServerMessage::Error { code, message })
            }
            FromNode::Dominant { room, participant } => {
                self.dominant(node_id, room, participant).await
            }
            FromNode::ChatReady { participant } => self.chat_ready(node_id, participant).await,
            FromNode::ChatIn { participant, data } => {
                self.chat_in(node_id, participant, &data).await
            }
            FromNode::Hello { .. } | FromNode::Auth { .. } => {
                warn!(
                    node = node_id,
                    "unexpected handshake message after registration"
                );
            }
        }
    }

    /// Every instance with seats of the room on the node hears this from the node
    /// itself and tells its own clients; the state keeps it for later joiners.
    async fn dominant(&self, node_id: &str, room: String, participant: Option<u64>) {
        let delivered = {
            let mut local = self.lock();
            let targets: Vec<u64> = local
                .in_room(&room)
                .into_iter()
                .filter(|id| local.seats.get(id).is_some_and(|s| s.seat.node == node_id))
                .collect();
            if !targets.is_empty() {
                let msg = ServerMessage::DominantSpeaker {
                    sid: participant.map(|p| p.to_string()),
                };
                let text = encode(&msg);
                for id in &targets {
                    if let Some(sess) = local.seats.get_mut(id).and_then(|s| s.session.as_ref()) {
                        sess.send(*id, text.clone());
                    }
                }
            }
            !targets.is_empty()
        };
        if delivered {
            if let Err(e) = self.state.set_dominant(&room, node_id, participant).await {
                debug!(%room, "dominant speaker not stored: {e}");
            }
        }
    }

    /// The seat's chat channel opened: it gets the history, then live chat. Live chat
    /// arriving while the history is read waits, and is sent after it unless the
    /// history already had it.
    async fn chat_ready(&self, node_id: &str, participant: u64) {
        let room = {
            let mut local = self.lock();
            let Some(s) = local
                .seats
                .get_mut(&participant)
                .filter(|s| s.seat.node == node_id)
            else {
                return;
            };
            s.chat = ChatChannel::Opening(Vec::new());
            s.seat.chat_ready = true;
            s.dirty = true;
            s.seat.room.clone()
        };
        let history = match self
            .state
            .chat_recent(&room, self.config.chat.history)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                warn!(%room, "chat history unavailable: {e}");
                Vec::new()
            }
        };
        let newest = history.last().map_or(0, |m| m.id);
        {
            let mut local = self.lock();
            let Some(s) = local.seats.get_mut(&participant) else {
                return;
            };
            let waited = match std::mem::replace(&mut s.chat, ChatChannel::Ready) {
                ChatChannel::Opening(w) => w,
                _ => Vec::new(),
            };
            let node = s.seat.node.clone();
            let mut frames = vec![ChatServerFrame::History { messages: history }];
            for kind in waited {
                match kind {
                    EventKind::Chat { sender, message }
                        if sender != participant && message.id > newest =>
                    {
                        frames.push(ChatServerFrame::Message {
                            message,
                            reference: None,
                        })
                    }
                    EventKind::ChatDeleted { id } => frames.push(ChatServerFrame::Deleted { id }),
                    _ => {}
                }
            }
            for f in frames {
                self.nodes.send(
                    &node,
                    ToNode::ChatTo {
                        participants: vec![participant],
                        data: f.to_json(),
                    },
                );
            }
        }
        self.write_seat(participant).await;
    }

    fn chat_to(&self, node_id: &str, participant: u64, frame: &ChatServerFrame) {
        self.nodes.send(
            node_id,
            ToNode::ChatTo {
                participants: vec![participant],
                data: frame.to_json(),
            },
        );
    }

    /// One frame from a participant's chat channel: every chat rule is applied here
    /// ([`crate::chat::check`]); the state stores and fans out what passes.
    async fn chat_in(&self, node_id: &str, participant: u64, data: &str) {
        let checked = {
            let mut local = self.lock();
            let Some(s) = local
                .seats
                .get_mut(&participant)
                .filter(|s| s.seat.node == node_id)
            else {
                return;
            };
            let may_send = s.grants.publish_data;
            check(
                data,
                may_send,
                &mut s.chat_bucket,
                &self.config.chat,
                std::time::Instant::now(),
            )
            .map(|req| (req, s.seat.clone(), s.grants.admin))
        };
        let (req, seat, admin) = match checked {
            Ok(x) => x,
            Err(frame) => return self.chat_to(node_id, participant, &frame),
        };
        match req {
            ChatRequest::Send { text, reference } => {
                let from = sender_of(&seat);
                match self
                    .state
                    .chat_append(&seat.room, participant, &from, &text, now_ms())
                    .await
                {
                    // Everyone else hears it from the event; the sender's own copy
                    // carries its ref.
                    Ok(message) => self.chat_to(
                        node_id,
                        participant,
                        &ChatServerFrame::Message { message, reference },
                    ),
                    Err(e) => {
                        self.chat_to(node_id, participant, &store_error(reference, "stored", &e))
                    }
                }
            }
            ChatRequest::Delete { id } => {
                let refused = match self.state.chat_author(&seat.room, id).await {
                    Ok(None) => Some(error_frame(
                        ChatErrorCode::ChatNotFound,
                        "no such message in this room",
                        None,
                    )),
                    Ok(Some(author)) if author != seat.identity && !admin => Some(error_frame(
                        ChatErrorCode::ChatForbidden,
                        "you can only delete your own messages",
                        None,
                    )),
                    Ok(Some(_)) => match self.state.chat_delete(&seat.room, id).await {
                        Ok(true) => None,
                        Ok(false) => Some(error_frame(
                            ChatErrorCode::ChatNotFound,
                            "no such message in this room",
                            None,
                        )),
                        Err(e) => Some(store_error(None, "deleted", &e)),
                    },
                    Err(e) => Some(store_error(None, "deleted", &e)),
                };
                if let Some(f) = refused {
                    self.chat_to(node_id, participant, &f);
                }
            }
        }
    }
}
