//! Video in the worker: publishing tracks, routing a publisher's packets to its tracks
//! and layers, fanning video out through each subscriber's forwarder, keyframe requests
//! (subscribers' PLI/FIR, layer switches, first subscription) and `max_quality`.

use str0m::format::{detect_av1_keyframe, detect_h264_keyframe, detect_vp9_keyframe};
use str0m::media::KeyframeRequestKind;
use str0m::rtp::Vp8Descriptor;

use super::adapt::vp8_keyframe_dims;
use super::*;
use crate::forwarder::{
    cap_layer, layer_quality, select_layer_at, startup_layer, VideoIn, Vp8Fields,
};
use crate::receiver::KeyframeRequest;
use crate::track::matching_pt;

/// Most SSRCs remembered per publisher (3 layers per video track, RTX is unwrapped by
/// str0m); past it the cache starts over, so a peer cycling SSRCs cannot grow it.
const MAX_SSRCS: usize = 32;

/// Records a newly published m-section as a track, with the source the client declared
/// for its mid (or the kind's default). False if it is already known or over the limit.
pub(super) fn publish_track(
    p: &mut Participant,
    mid: Mid,
    kind: MediaKind,
    rids: Vec<str0m::media::Rid>,
) -> bool {
    if p.tracks.iter().any(|t| t.mid == mid) {
        return false;
    }
    if p.tracks.len() >= MAX_TRACKS {
        warn!(
            participant = p.id,
            "track limit reached; m-section {mid} not published"
        );
        return false;
    }
    let kind = match kind {
        MediaKind::Audio => TrackKind::Audio,
        MediaKind::Video => TrackKind::Video,
    };
    let source = p
        .decls
        .iter()
        .find(|d| d.mid == *mid)
        .map(|d| d.source)
        .filter(|s| s.kind() == kind)
        .unwrap_or(TrackSource::default_for(kind));
    let index = p.tracks.len() as u8;
    info!(participant = p.id, %mid, ?source, layers = rids.len(), "track published");
    p.tracks
        .push(PubTrack::new(p.id, index, mid, kind, source, rids));
    true
}

/// The 15-bit form of a VP8 picture id is flagged by the top bit of its first byte,
/// which follows the required and extension bytes when a picture id is present.
fn vp8_pid_is_15_bit(payload: &[u8]) -> bool {
    payload.len() > 2 && payload[0] & 0x80 != 0 && payload[1] & 0x80 != 0 && payload[2] & 0x80 != 0
}

/// Each video down track's send buffer for answering NACKs: at most this many packets
/// and this old.
const RTX_PACKETS: usize = 1000;
const RTX_AGE: Duration = Duration::from_secs(1);

/// Resends are dropped while they are more than this share of what a down track sent in
/// the last second: video is forwarded unpaced, so this is what keeps NACKs on a full link
/// from snowballing (with no cap, the resends of a 400 kbit/s link's losses were lost in
/// turn and asked for again until 60-80% of everything was lost for seconds). Low enough
/// that three low layers and their resends fit that link; str0m's default (0.15) threw
/// away every resend of a 1.3 s gap (the sim test `nacks_are_answered_…` caught it).
const RTX_RATIO_CAP: f32 = 0.35;

/// A video down track's send buffer, empty: when it is set up, and at each layer switch.
/// Why at a switch: what was sent of the old layer is of no use once the new layer's
/// keyframe is on its way, and after a downlink collapsed, answering the subscriber's
/// NACKs for the old (larger) layer filled the link again, so the new layer's keyframe
/// was lost too and the tile stayed frozen for 2 more seconds, until the browser gave up
/// and asked for another.
///
/// The resend share starts afresh too (str0m keeps its byte counts across a new buffer
/// unless the cap is switched off in between): counted over the last second, the old
/// layer's resends kept it over the cap after a collapse, so the NACKs for the new
/// keyframe's lost packets went unanswered as well.
pub(super) fn fresh_send_buffer(tx: &mut str0m::rtp::StreamTx) {
    tx.set_rtx_cache(RTX_PACKETS, RTX_AGE, None);
    tx.set_rtx_cache(RTX_PACKETS, RTX_AGE, Some(RTX_RATIO_CAP));
}

impl Worker {
    /// Which of `from`'s tracks (index into its `tracks`) and layer a packet on `ssrc`
    /// belongs to.
    pub(super) fn track_of(&mut self, from: u64, ssrc: u32) -> Option<(usize, u8)> {
        let p = self.participants.get_mut(&from)?;
        if let Some(&(_, pos, layer)) = p.ssrcs.iter().find(|e| e.0 == ssrc) {
            return Some((pos, layer));
        }
        let (mid, rid) = {
            let mut api = p.rtc.direct_api();
            let rx = api.stream_rx(&ssrc.into())?;
            (rx.mid(), rx.rid())
        };
        let pos = p.tracks.iter().position(|t| t.mid == mid)?;
        let t = &p.tracks[pos];
        let layer = t.layer_of(rid);
        // A simulcast stream whose rid str0m has not learned yet is not cached: its
        // layer is not known for sure.
        if rid.is_some() || !t.simulcast() {
            if p.ssrcs.len() >= MAX_SSRCS {
                p.ssrcs.clear();
            }
            p.ssrcs.push((ssrc, pos, layer));
        }
        Some((pos, layer))
    }

    /// Screen-share audio: forwarded as it comes (no speaker detection or selection;
    /// the microphone's mute does not apply).
    pub(super) fn forward_screen_audio(
        &mut self,
        from: u64,
        pos: usize,
        pkt: &RtpPacket,
        now: Instant,
    ) {
        let Some(p) = self.participants.get(&from) else {
            return;
        };
        let Some(t) = p.tracks.get(pos) else {
            return;
        };
        if !p.publish || !t.active {
            return;
        }
        let index = t.index;
        let Some(members) = self.rooms.get(p.room.as_str()) else {
            return;
        };
        let mut targets = std::mem::take(&mut self.scratch);
        targets.clear();
        targets.extend(members.iter().copied().filter(|m| *m != from));
        for &sid in &targets {
            let Some(s) = self.participants.get_mut(&sid) else {
                continue;
            };
            let Some(pt) = s.opus_pt.map(|p| p.pt()) else {
                continue;
            };
            let Some(dt) = s.downtracks.get_mut(&(from, index)) else {
                continue;
            };
            if !dt.ready {
                continue;
            }
            let Some(rw) = dt.rewriter.rewrite(
                *pkt.header.ssrc,
                pkt.header.sequence_number,
                pkt.header.timestamp,
                now,
            ) else {
                continue;
            };
            let write = RtpWrite::new(pt, rw.seq.into(), rw.ts, pkt.timestamp, pkt.payload.clone())
                .marker(pkt.header.marker);
            self.write_down(sid, (from, index), write, pkt.payload.len(), false);
        }
        self.scratch = targets;
    }

    /// Writes one packet (`len` payload bytes) on a subscriber's down track and marks
    /// the subscriber for polling.
    /// `switched`: the first packet of a new layer (a keyframe): the down track's send
    /// buffer starts afresh (see [`fresh_send_buffer`]).
    pub(super) fn write_down(
        &mut self,
        sid: u64,
        key: TrackKey,
        write: RtpWrite,
        len: usize,
        switched: bool,
    ) {
        let Some(s) = self.participants.get_mut(&sid) else {
            return;
        };
        let Some((mid, kind)) = s.downtracks.get(&key).map(|d| (d.mid, d.kind)) else {
            return;
        };
        if let Some(dl) = s.downlink.as_mut() {
            let bytes = len as u64 + crate::receiver::PACKET_OVERHEAD;
            match kind {
                TrackKind::Audio => dl.audio_bytes += bytes,
                TrackKind::Video => dl.video_bytes += bytes,
            }
        }
        let wrote = catch_unwind(AssertUnwindSafe(|| {
            let mut api = s.rtc.direct_api();
            match api.stream_tx_by_mid(mid, None) {
                Some(tx) => {
                    if switched {
                        fresh_send_buffer(tx);
                    }
                    tx.write_rtp(write);
                    true
                }
                None => false,
            }
        }));
        match wrote {
            Ok(true) => {
                self.stats.packets_forwarded += 1;
                if !s.dirty {
                    s.dirty = true;
                    self.dirty.push(sid);
                }
            }
            Ok(false) => {}
            Err(_) => self.fail(sid, "internal error forwarding media"),
        }
    }

    /// One video packet of `from`'s track at `pos`, on `layer`: through every
    /// subscriber's forwarder.
    pub(super) fn forward_video(
        &mut self,
        from: u64,
        pos: usize,
        layer: u8,
        pkt: &RtpPacket,
        now: Instant,
    ) {
        let ssrc = *pkt.header.ssrc;
        let pt = pkt.header.payload_type;
        let Some(p) = self.participants.get_mut(&from) else {
            return;
        };
        if !p.publish {
            return;
        }
        let Some(t) = p.tracks.get_mut(pos) else {
            return;
        };
        if !t.active {
            return;
        }
        let mut codec_learned = false;
        if t.codec.map(|c| c.pt()) != Some(pt) {
            match p.rtc.codec_config().iter().find(|c| c.pt() == pt) {
                Some(c) => {
                    codec_learned = t.codec.map(|o| o.spec().codec) != Some(c.spec().codec);
                    t.codec = Some(*c);
                }
                None => return,
            }
        }
        let Some(params) = t.codec else {
            return;
        };
        let payload: &[u8] = &pkt.payload;
        let mut vp8: Option<(Vp8Descriptor, Vp8Fields)> = None;
        let keyframe = match params.spec().codec {
            Codec::Vp8 => match Vp8Descriptor::parse(payload) {
                Ok(d) => {
                    vp8 = Some((
                        d,
                        Vp8Fields {
                            picture_id: d.picture_id().map(|v| (v, vp8_pid_is_15_bit(payload))),
                            tl0_pic_idx: d.tl0_pic_idx(),
                            key_idx: d.key_idx(),
                        },
                    ));
                    d.starts_keyframe(payload)
                }
                // A payload that is not VP8 would break every subscriber's decoder.
                Err(_) => return,
            },
            Codec::H264 => detect_h264_keyframe(payload),
            Codec::Vp9 => detect_vp9_keyframe(payload),
            Codec::Av1 => detect_av1_keyframe(payload),
            _ => false,
        };
        let restarted = t.receiver.ssrc_changed(layer, ssrc);
        let mut deferred = None;
        t.receiver
            .on_packet(layer, ssrc, payload.len(), now, &mut deferred);
        if keyframe && params.spec().codec == Codec::Vp8 {
            if let Some(d) = vp8_keyframe_dims(payload) {
                t.receiver.set_dims(layer, d);
            }
        }
        let live = t.receiver.live(now);
        let requestable = t.receiver.requestable(now);
        let simulcast = t.simulcast();
        let index = t.index;
        let fb = (params.fb_pli(), params.fb_fir());
        if let Some(req) = deferred {
            self.send_keyframe_request(from, req, fb);
        }
        if codec_learned {
            self.report_tracks(from);
        }
        let Some(p) = self.participants.get(&from) else {
            return;
        };
        let Some(members) = self.rooms.get(p.room.as_str()) else {
            return;
        };
        let mut targets = std::mem::take(&mut self.scratch);
        targets.clear();
        targets.extend(members.iter().copied().filter(|m| *m != from));
        let mut qualities = std::mem::take(&mut self.quality_scratch);
        qualities.clear();
        let mut want: u8 = 0;
        let input = VideoIn {
            layer,
            ssrc,
            seq: pkt.header.sequence_number,
            ts: pkt.header.timestamp,
            keyframe,
            vp8: vp8.map(|(_, f)| f),
            now,
        };
        for &sid in &targets {
            let Some(s) = self.participants.get_mut(&sid) else {
                continue;
            };
            let Some(dt) = s.downtracks.get_mut(&(from, index)) else {
                continue;
            };
            if !dt.ready {
                continue;
            }
            let sub_pt = match dt.pt_map {
                Some((a, b)) if a == pt => b,
                _ => {
                    let b = matching_pt(&params, s.rtc.codec_config());
                    if b.is_none() {
                        debug!(
                            participant = sid,
                            "subscriber did not negotiate the codec of this track"
                        );
                    }
                    dt.pt_map = Some((pt, b));
                    b
                }
            };
            let Some(sub_pt) = sub_pt else {
                continue;
            };
            let wanted = select_layer_at(live, dt.limit);
            let target = match (dt.video.current_layer(), dt.video.target()) {
                // Showing something: follow the cap (switching at the next keyframe).
                (Some(_), _) => wanted,
                // Waiting for a first keyframe on a layer chosen before: keep waiting
                // for it rather than hopping between layers.
                (None, Some(w)) if wanted.is_some_and(|t| w <= t) && live & (1 << w) != 0 => {
                    Some(w)
                }
                (None, _) => startup_layer(wanted, requestable),
            };
            if dt.video.target() != target {
                dt.video.set_target(target);
            }
            if restarted && dt.video.current_layer() == Some(layer) {
                dt.video.restart();
            }
            let before = dt.video.current_layer();
            let out = dt.video.forward(&input);
            let switched = before.is_some() && dt.video.current_layer() != before;
            if let Some(l) = dt.video.wants_keyframe() {
                want |= 1 << l;
            }
            let q = dt
                .video
                .current_layer()
                .map_or(Quality::Off, |l| layer_quality(l, simulcast));
            // Less than the allocation because the publisher does not send the layer.
            let publisher_short = target.is_some() && target < dt.limit;
            let reason = dt
                .limit_reason
                .or(publisher_short.then_some(QualityReason::Publisher));
            if dt.reported != Some((q, reason)) {
                dt.reported = Some((q, reason));
                qualities.push((sid, q, reason));
            }
            let Some(out) = out else {
                continue;
            };
            let mut write = RtpWrite::new(
                sub_pt,
                out.seq.into(),
                out.ts,
                pkt.timestamp,
                pkt.payload.clone(),
            )
            .marker(pkt.header.marker)
            .nackable(true);
            if let (Some(f), Some((desc, _))) = (out.vp8, vp8) {
                let mut b = desc.patch();
                if let Some((pid, _)) = f.picture_id {
                    b = b.picture_id(pid);
                }
                if let Some(x) = f.tl0_pic_idx {
                    b = b.tl0_pic_idx(x);
                }
                if let Some(k) = f.key_idx {
                    b = b.key_idx(k);
                }
                match b.build() {
                    Ok(patch) => write = write.vp8_patch(patch),
                    Err(e) => debug!("VP8 descriptor left as is: {e}"),
                }
            }
            self.write_down(sid, (from, index), write, payload.len(), switched);
        }
        self.scratch = targets;
        for l in 0..3u8 {
            if want & (1 << l) == 0 {
                continue;
            }
            let req = self
                .participants
                .get_mut(&from)
                .and_then(|p| p.tracks.get_mut(pos))
                .and_then(|t| t.receiver.request(l, now));
            if let Some(req) = req {
                self.send_keyframe_request(from, req, fb);
            }
        }
        self.report_qualities(from, pos, &mut qualities);
        self.quality_scratch = qualities;
    }

    /// Turns (subscriber, quality, reason) changes for `from`'s track at `pos` into events.
    fn report_qualities(&mut self, from: u64, pos: usize, q: &mut Vec<QualityChange>) {
        if q.is_empty() {
            return;
        }
        let Some(sid) = self
            .participants
            .get(&from)
            .and_then(|p| p.tracks.get(pos))
            .map(|t| t.sid.clone())
        else {
            return;
        };
        for (participant, quality, reason) in q.drain(..) {
            self.events.push(FromNode::TrackQuality {
                participant,
                track: sid.clone(),
                quality,
                reason,
            });
        }
    }

    /// Sends a PLI (or FIR, where the publisher negotiated only that) for a layer.
    fn send_keyframe_request(&mut self, from: u64, req: KeyframeRequest, fb: (bool, bool)) {
        let kind = if fb.0 || !fb.1 {
            KeyframeRequestKind::Pli
        } else {
            KeyframeRequestKind::Fir
        };
        let Some(p) = self.participants.get_mut(&from) else {
            return;
        };
        let sent = catch_unwind(AssertUnwindSafe(|| {
            let mut api = p.rtc.direct_api();
            match api.stream_rx(&req.ssrc.into()) {
                Some(rx) => {
                    rx.request_keyframe(kind);
                    true
                }
                None => false,
            }
        }));
        match sent {
            Ok(true) => {
                debug!(
                    participant = from,
                    layer = req.layer,
                    ?kind,
                    "keyframe requested"
                );
                if !p.dirty {
                    p.dirty = true;
                    self.dirty.push(from);
                }
            }
            Ok(false) => {}
            Err(_) => self.fail(from, "internal error requesting a keyframe"),
        }
    }

    /// A subscriber's PLI/FIR on one of its down tracks: passed (throttled) to the
    /// publisher of the layer it receives.
    pub(super) fn subscriber_keyframe_request(&mut self, id: u64, mid: Mid, now: Instant) {
        let Some(s) = self.participants.get(&id) else {
            return;
        };
        let Some((key, layer)) = s
            .downtracks
            .iter()
            .find(|(_, d)| d.mid == mid && d.kind == TrackKind::Video)
            .and_then(|(k, d)| d.video.current_layer().map(|l| (*k, l)))
        else {
            // Not forwarding yet: the forwarder already asks for a keyframe itself.
            return;
        };
        let Some(p) = self.participants.get_mut(&key.0) else {
            return;
        };
        let Some(t) = p.tracks.iter_mut().find(|t| t.index == key.1) else {
            return;
        };
        let fb = t.codec.map_or((true, false), |c| (c.fb_pli(), c.fb_fir()));
        if let Some(req) = t.receiver.request(layer, now) {
            self.send_keyframe_request(key.0, req, fb);
        }
    }

    /// A publisher stopped these video tracks: every subscriber's forwarder waits for the
    /// stream to come back (continuing its numbering then) and shows `off`.
    pub(super) fn stop_video_forwarding(&mut self, from: u64, indices: &[u8]) {
        let Some(p) = self.participants.get(&from) else {
            return;
        };
        let members = self.rooms.get(&p.room).cloned().unwrap_or_default();
        for &index in indices {
            let Some(pos) = self
                .participants
                .get(&from)
                .and_then(|p| p.tracks.iter().position(|t| t.index == index))
            else {
                continue;
            };
            let mut q = Vec::new();
            for &m in &members {
                if let Some(dt) = self
                    .participants
                    .get_mut(&m)
                    .and_then(|s| s.downtracks.get_mut(&(from, index)))
                {
                    dt.video.restart();
                    if dt.reported.is_some_and(|r| r != (Quality::Off, None)) {
                        dt.reported = Some((Quality::Off, None));
                        q.push((m, Quality::Off, None));
                    }
                }
            }
            self.report_qualities(from, pos, &mut q);
        }
    }

    /// A subscriber's `update_subscription` for one track: `max_quality` and the
    /// adaptive-stream view; what is left out stays as it was.
    pub(super) fn set_subscription(
        &mut self,
        id: u64,
        track: &str,
        cap: Option<Quality>,
        visible: Option<bool>,
        size: Option<(u32, u32)>,
    ) {
        let Some(room) = self.participants.get(&id).map(|p| p.room.clone()) else {
            return self.unknown(id);
        };
        let found = self.rooms.get(&room).and_then(|ms| {
            ms.iter().filter(|m| **m != id).find_map(|m| {
                let p = self.participants.get(m)?;
                let t = p.tracks.iter().find(|t| t.sid == track)?;
                Some((*m, t.index))
            })
        });
        let Some((pubid, index)) = found else {
            return self.events.push(FromNode::Error {
                participant: id,
                code: NodeErrorCode::UnknownTrack,
                message: format!("no track {track} is published in this room"),
            });
        };
        let key = (pubid, index);
        let Some(s) = self.participants.get_mut(&id) else {
            return;
        };
        if let Some(cap) = cap {
            match s.caps.iter_mut().find(|(k, _)| *k == key) {
                Some(c) => c.1 = cap,
                None => s.caps.push((key, cap)),
            }
        }
        let Some(dt) = s.downtracks.get_mut(&key) else {
            return;
        };
        if let Some(cap) = cap {
            dt.cap = cap;
        }
        if let Some(v) = visible {
            dt.visible = v;
        }
        if size.is_some() {
            dt.size = size.filter(|(w, h)| *w > 0 && *h > 0);
        }
        if dt.kind != TrackKind::Video {
            return;
        }
        // Lowering takes effect on the next packet; the allocator (next tick) decides
        // what to raise to.
        let client = cap_layer(dt.cap);
        if !dt.visible || client < dt.limit {
            dt.limit = if dt.visible { client } else { None };
        }
        debug!(
            participant = id,
            track,
            ?cap,
            ?visible,
            ?size,
            "subscription set"
        );
        if let Some(dl) = s.downlink.as_mut() {
            dl.dirty = true;
        }
    }
}

/// A change of what one subscriber receives of a track: (subscriber, quality, reason).
pub(super) type QualityChange = (u64, Quality, Option<QualityReason>);
