//! Offers and answers: the client's offers (its first, and each that publishes or
//! unpublishes a track), the node's offers that add and stop subscribers' down tracks,
//! and glare between the two (the client's offer wins; ours is made again after).

use super::*;
use video::fresh_send_buffer;

impl Worker {
    pub(super) fn client_offer(&mut self, now: Instant, id: u64, sdp: &str, decls: Vec<TrackDecl>) {
        let Some(p) = self.participants.get_mut(&id) else {
            return self.unknown(id);
        };
        let offer = match SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(e) => {
                return self.events.push(FromNode::Error {
                    participant: id,
                    code: NodeErrorCode::InvalidSdp,
                    message: format!("offer is not valid SDP: {e}"),
                })
            }
        };
        // A client offer while ours is outstanding (glare): theirs wins. str0m drops our
        // pending changes, so the down tracks that offer added never came to be: forget
        // them, and put back the stops it carried, so the next offer makes both again.
        if p.pending_offer.take().is_some() {
            p.downtracks.retain(|_, d| d.ready);
            let back = std::mem::take(&mut p.stale_in_flight);
            p.stale.extend(back);
        }
        let previous_decls = std::mem::replace(&mut p.decls, decls);
        let result = catch_unwind(AssertUnwindSafe(|| p.rtc.sdp_api().accept_offer(offer)));
        match result {
            Ok(Ok(answer)) => {
                p.initial_done = true;
                p.opus_pt = opus_params(&p.rtc);
                self.events.push(FromNode::Answer {
                    participant: id,
                    sdp: answer.to_sdp_string(),
                });
            }
            Ok(Err(e)) => {
                p.decls = previous_decls;
                return self.events.push(FromNode::Error {
                    participant: id,
                    code: NodeErrorCode::InvalidSdp,
                    message: format!("offer could not be negotiated: {e}"),
                });
            }
            Err(_) => return self.fail(id, "internal error negotiating the offer"),
        }
        self.drive(id, now);
        self.subscribe_all(id, now);
    }

    pub(super) fn client_answer(&mut self, now: Instant, id: u64, sdp: &str) {
        let Some(p) = self.participants.get_mut(&id) else {
            return self.unknown(id);
        };
        let Some(pending) = p.pending_offer.take() else {
            return self.events.push(FromNode::Error {
                participant: id,
                code: NodeErrorCode::InvalidSdp,
                message: "an answer arrived but no offer is outstanding".into(),
            });
        };
        let answer = match SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => a,
            Err(e) => {
                // Keep the offer outstanding so a corrected answer can still complete it.
                p.pending_offer = Some(pending);
                return self.events.push(FromNode::Error {
                    participant: id,
                    code: NodeErrorCode::InvalidSdp,
                    message: format!("answer is not valid SDP: {e}"),
                });
            }
        };
        match catch_unwind(AssertUnwindSafe(|| {
            p.rtc.sdp_api().accept_answer(pending, answer)
        })) {
            Ok(Ok(())) => {
                debug!(participant = id, "client answer applied");
                p.opus_pt = opus_params(&p.rtc).or(p.opus_pt);
                p.stale_in_flight.clear();
                for dt in p.downtracks.values_mut() {
                    if !dt.ready && dt.kind == TrackKind::Video {
                        // A retransmission later than this is useless to a real-time
                        // decoder (it has asked for a keyframe by then), and the bound
                        // keeps each video down track's send buffer small.
                        if let Some(tx) = p.rtc.direct_api().stream_tx_by_mid(dt.mid, None) {
                            fresh_send_buffer(tx);
                            // Forwarded as it arrives (the publisher's own pacer spaced
                            // it), not held to str0m's pacer: that pacer sends at 1.1x
                            // the estimate and queues the rest for up to 2 s, so when a
                            // downlink collapsed the lowest layers the allocator switched
                            // to waited behind seconds of stale higher layers (tiles froze
                            // for 2-6 s on a 400 kbit/s link). The estimate still steers
                            // what is forwarded; probes still go through the pacer.
                            tx.set_unpaced(true);
                        }
                    }
                    dt.ready = true;
                }
                if let Some(dl) = p.downlink.as_mut() {
                    dl.dirty = true;
                }
            }
            Ok(Err(e)) => {
                self.events.push(FromNode::Error {
                    participant: id,
                    code: NodeErrorCode::InvalidSdp,
                    message: format!("answer could not be applied: {e}"),
                });
                // Our offer was discarded; tracks it added must be offered again, and
                // tracks it stopped stopped again.
                p.downtracks.retain(|_, d| d.ready);
                let back = std::mem::take(&mut p.stale_in_flight);
                p.stale.extend(back);
            }
            Err(_) => return self.fail(id, "internal error applying the answer"),
        }
        self.drive(id, now);
        self.maybe_offer(id, now);
        self.drive(id, now);
    }

    /// Makes sure subscriber `id` gets every publisher in its room, and every other
    /// subscriber gets `id`'s tracks.
    pub(super) fn subscribe_all(&mut self, id: u64, now: Instant) {
        let Some(room) = self.participants.get(&id).map(|p| p.room.clone()) else {
            return;
        };
        let members = self.rooms.get(&room).cloned().unwrap_or_default();
        for m in members {
            self.maybe_offer(m, now);
            self.drive(m, now);
        }
    }

    /// Sends subscriber `id` an offer if its set of tracks is out of date and no
    /// negotiation is in flight.
    pub(super) fn maybe_offer(&mut self, id: u64, _now: Instant) {
        // (publisher, track index, kind, track sid) to add.
        let mut add: Vec<(u64, u8, TrackKind, String)> = Vec::new();
        match self.participants.get(&id) {
            Some(p) if p.initial_done && p.pending_offer.is_none() => {
                if p.subscribe {
                    for m in self.rooms.get(&p.room).into_iter().flatten() {
                        if *m == id {
                            continue;
                        }
                        let Some(o) = self.participants.get(m) else {
                            continue;
                        };
                        if !o.publish {
                            continue;
                        }
                        for t in o.tracks.iter().filter(|t| t.active) {
                            if t.kind == TrackKind::Video && !p.video {
                                continue;
                            }
                            if !p.downtracks.contains_key(&(*m, t.index)) {
                                add.push((*m, t.index, t.kind, t.sid.clone()));
                            }
                        }
                    }
                }
            }
            _ => return,
        }
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if add.is_empty() && p.stale.is_empty() {
            return;
        }
        let stale = std::mem::take(&mut p.stale);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut api = p.rtc.sdp_api();
            for mid in &stale {
                api.stop_media(*mid);
            }
            let mids: Vec<Mid> = add
                .iter()
                .map(|(pubid, _, kind, sid)| {
                    let kind = match kind {
                        TrackKind::Audio => MediaKind::Audio,
                        TrackKind::Video => MediaKind::Video,
                    };
                    // Every track of a participant shares one media stream id, so a
                    // browser plays a camera in sync with its microphone; the track id
                    // is the track sid, which is how clients tell the tracks apart.
                    api.add_media(
                        kind,
                        Direction::SendOnly,
                        Some(format!("p{pubid}")),
                        Some(sid.clone()),
                        None,
                    )
                })
                .collect();
            (api.apply(), mids)
        }));
        match result {
            Ok((applied, mids)) => {
                for ((pubid, index, kind, _), mid) in add.iter().zip(mids) {
                    let key = (*pubid, *index);
                    let cap = p
                        .caps
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map_or(Quality::High, |(_, q)| *q);
                    p.downtracks.insert(key, DownTrack::new(mid, *kind, cap));
                }
                if let Some((offer, pending)) = applied {
                    debug!(
                        participant = id,
                        added = add.len(),
                        stale = stale.len(),
                        "offering track changes"
                    );
                    p.pending_offer = Some(pending);
                    p.stale_in_flight = stale;
                    self.events.push(FromNode::Offer {
                        participant: id,
                        sdp: offer.to_sdp_string(),
                    });
                }
            }
            Err(_) => self.fail(id, "internal error creating an offer"),
        }
    }
}
