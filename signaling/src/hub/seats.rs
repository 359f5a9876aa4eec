//! What a client does with its seat (media relay, mute, subscriptions, leaving) and
//! how a seat changed here reaches the shared state.

use super::*;

impl Hub {
    /// Relays a client's SDP/ICE to the participant's node. Returns an error for the
    /// client when the seat is gone. An offer's `tracks` are the client's declarations
    /// on the way in; they are resolved against the SDP and checked against the grants
    /// here ([`crate::tracks::resolve_offer`]), and a refused offer never reaches the
    /// node.
    pub fn to_node(&self, participant: u64, conn: u64, mut msg: ToNode) -> Result<(), HubError> {
        let local = self.lock();
        let s = owned(&local, participant, conn)?;
        if let ToNode::ClientOffer { sdp, tracks, .. } = &mut msg {
            *tracks = crate::tracks::resolve_offer(sdp, tracks, &s.grants)
                .map_err(|e| (e.code(), e.to_string()))?;
        }
        if !self.nodes.send(&s.seat.node, msg) {
            return Err((
                ErrorCode::NoMediaNode,
                "the media server for this room went away".into(),
            ));
        }
        Ok(())
    }

    /// The most `participant` wants of another participant's track. Only tracks someone
    /// else in the room publishes now are passed on; anything else is `unknown_track`.
    pub async fn update_subscription(
        &self,
        participant: u64,
        conn: u64,
        track: String,
        view: SubscriptionUpdate,
    ) -> Result<(), HubError> {
        if view.width.is_some() != view.height.is_some() {
            return Err((
                ErrorCode::BadRequest,
                "update_subscription needs width and height together".into(),
            ));
        }
        if view
            .width
            .max(view.height)
            .is_some_and(|v| v > MAX_VIEW_PIXELS)
        {
            return Err((
                ErrorCode::BadRequest,
                format!("width and height are device pixels, at most {MAX_VIEW_PIXELS}"),
            ));
        }
        let room = owned(&self.lock(), participant, conn)?.seat.room.clone();
        let snapshot = self.state.room(&room).await.map_err(unavailable)?;
        let published = snapshot
            .seats
            .iter()
            .filter(|s| s.seat.id != participant)
            .any(|s| s.seat.tracks.iter().any(|t| t.sid == track));
        if !published {
            return Err((
                ErrorCode::UnknownTrack,
                format!("no one else in this room publishes a track {track:?}"),
            ));
        }
        let local = self.lock();
        let s = owned(&local, participant, conn)?;
        let msg = ToNode::SetSubscription {
            participant,
            track,
            max_quality: view.max_quality,
            visible: view.visible,
            width: view.width,
            height: view.height,
        };
        if !self.nodes.send(&s.seat.node, msg) {
            return Err((
                ErrorCode::NoMediaNode,
                "the media server for this room went away".into(),
            ));
        }
        Ok(())
    }

    pub async fn set_muted(
        &self,
        participant: u64,
        conn: u64,
        muted: bool,
    ) -> Result<(), HubError> {
        {
            let mut local = self.lock();
            owned(&local, participant, conn)?;
            let Some(s) = local.seats.get_mut(&participant) else {
                return Ok(());
            };
            if s.seat.muted == muted {
                return Ok(());
            }
            s.seat.muted = muted;
            if muted {
                s.seat.speaking = false;
            }
            s.dirty = true;
            s.announce = true;
            self.nodes
                .send(&s.seat.node, ToNode::SetMuted { participant, muted });
        }
        self.write_seat(participant).await;
        Ok(())
    }

    /// Server-side noise suppression for the participant's microphone.
    pub async fn set_enhanced(
        &self,
        participant: u64,
        conn: u64,
        enabled: bool,
    ) -> Result<(), HubError> {
        let room = owned(&self.lock(), participant, conn)?.seat.room.clone();
        if enabled && !self.config.allow_enhanced_audio {
            return Err((
                ErrorCode::Forbidden,
                "server-side noise suppression is disabled on this server".into(),
            ));
        }
        if enabled {
            let settings = self.state.room(&room).await.map_err(unavailable)?.settings;
            if settings.enhanced_audio == Some(false) {
                return Err((
                    ErrorCode::Forbidden,
                    "server-side noise suppression is turned off in this room".into(),
                ));
            }
        }
        {
            let mut local = self.lock();
            owned(&local, participant, conn)?;
            let Some(s) = local.seats.get_mut(&participant) else {
                return Ok(());
            };
            self.nodes.send(
                &s.seat.node,
                ToNode::SetEnhanced {
                    participant,
                    enabled,
                },
            );
            s.seat.enhanced = enabled;
            s.dirty = true;
        }
        self.write_seat(participant).await;
        Ok(())
    }

    /// Changes a room's settings; turning enhanced audio off stops it for everyone in
    /// the room at once, on every instance. Settings equal to the default forget the
    /// room's entry. A failed write (returned as the error) changes nothing.
    pub async fn update_room_settings(
        &self,
        room: &str,
        settings: RoomSettings,
    ) -> Result<RoomSettings, StateError> {
        self.state.put_settings(room, settings).await?;
        // The settings event cleared `enhanced` on the seats it turned off; store that.
        let dirty: Vec<u64> = {
            let local = self.lock();
            local
                .in_room(room)
                .into_iter()
                .filter(|id| local.seats.get(id).is_some_and(|s| s.dirty))
                .collect()
        };
        for id in dirty {
            self.write_seat(id).await;
        }
        Ok(settings)
    }

    /// The client left on purpose.
    pub async fn leave(&self, participant: u64, conn: u64) {
        let room = match owned(&self.lock(), participant, conn) {
            Ok(s) => s.seat.room.clone(),
            Err(_) => return,
        };
        self.remove_local(participant, "left");
        self.release(&room, participant, "left").await;
    }

    /// The client's socket dropped: keep the seat for the grace period.
    pub fn disconnected(self: &Arc<Self>, participant: u64, conn: u64) {
        let epoch = {
            let mut local = self.lock();
            let Some(s) = local.seats.get_mut(&participant) else {
                return;
            };
            if s.session.as_ref().map(|s| s.conn) != Some(conn) {
                return;
            }
            s.session = None;
            s.disconnect_epoch += 1;
            s.disconnect_epoch
        };
        debug!(
            participant,
            "socket dropped; keeping the seat for the grace period"
        );
        let hub = self.clone();
        let grace = self.config.reconnect_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let room = {
                let local = hub.lock();
                match local.seats.get(&participant) {
                    Some(s) if s.session.is_none() && s.disconnect_epoch == epoch => {
                        s.seat.room.clone()
                    }
                    _ => return,
                }
            };
            info!(participant, "grace period over; seat freed");
            hub.remove_local(participant, "disconnected");
            hub.release(&room, participant, "disconnected").await;
        });
    }

    /// Forgets a local seat and frees its media session.
    pub(super) fn remove_local(&self, participant: u64, reason: &str) {
        let Some(s) = self.lock().take(participant) else {
            return;
        };
        self.nodes
            .send(&s.seat.node, ToNode::RemoveParticipant { participant });
        self.nodes.seat_removed(&s.seat.node);
        info!(participant, room = %s.seat.room, reason, "left");
    }

    /// Removes a seat from the shared state; everyone (this instance included) hears
    /// `participant_left` from the event.
    pub(super) async fn release(&self, room: &str, participant: u64, reason: &str) {
        if let Err(e) = self
            .state
            .remove_seat(&self.instance, room, participant, reason)
            .await
        {
            warn!(participant, %room, "could not remove the seat from the shared state: {e}");
        }
    }

    /// Writes a local seat to the shared state until what is stored is what this
    /// instance holds. One writer per seat at a time, so writes never reorder.
    pub(super) async fn write_seat(&self, participant: u64) {
        {
            let mut local = self.lock();
            let Some(s) = local.seats.get_mut(&participant) else {
                return;
            };
            if s.writing || !s.dirty {
                return; // the writer in flight will see `dirty`
            }
            s.writing = true;
        }
        loop {
            let seat = {
                let mut local = self.lock();
                let Some(s) = local.seats.get_mut(&participant) else {
                    return;
                };
                if !s.dirty {
                    s.writing = false;
                    return;
                }
                s.dirty = false;
                (s.seat.clone(), std::mem::take(&mut s.announce))
            };
            let (seat, announce) = seat;
            match self
                .state
                .update_seat(&self.instance, &seat, announce)
                .await
            {
                Ok(true) => {}
                Ok(false) => debug!(participant, "seat update for a seat no longer ours"),
                Err(e) => warn!(participant, "seat update not stored: {e}"),
            }
        }
    }
}
