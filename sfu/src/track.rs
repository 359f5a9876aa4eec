//! A published track as the worker keeps it: id, kind, source, the publisher's m-section
//! and codec, its simulcast layers and (for video) its [`Receiver`].

use chorus_protocol::track::{Quality, TrackInfo, TrackKind, TrackSource};
use str0m::format::{Codec, CodecConfig, PayloadParams};
use str0m::media::Pt;
use str0m::media::{Mid, Rid};

use crate::forwarder::{layer_quality, MAX_LAYERS};
use crate::receiver::Receiver;

/// Most tracks one participant may publish (signaling enforces the same limit on
/// offers; this bounds the worker whatever arrives).
pub const MAX_TRACKS: usize = 8;

#[derive(Debug)]
pub struct PubTrack {
    /// Index within the publisher (never reused while the seat lasts).
    pub index: u8,
    /// `t<participant>_<index>`: the track sid clients see, and the msid track id.
    pub sid: String,
    pub mid: Mid,
    pub kind: TrackKind,
    pub source: TrackSource,
    /// The publisher sends on it now (direction includes receiving, from our side).
    pub active: bool,
    /// Simulcast rids the publisher announced, as sent in the SDP.
    pub rids: Vec<Rid>,
    /// The publisher's payload parameters, from its first packet.
    pub codec: Option<PayloadParams>,
    pub receiver: Receiver,
    /// Dynacast: the layers the publisher was last told to send (bit mask), and when
    /// each layer was last needed by a subscriber.
    pub sending: u8,
    pub needed_at: [Option<std::time::Instant>; MAX_LAYERS],
    /// When dynacast last asked for each layer again after stopping it: until the
    /// publisher's encoder is back, the layer still counts as on offer.
    pub resumed_at: [Option<std::time::Instant>; MAX_LAYERS],
}

impl PubTrack {
    pub fn new(
        participant: u64,
        index: u8,
        mid: Mid,
        kind: TrackKind,
        source: TrackSource,
        rids: Vec<Rid>,
    ) -> Self {
        let mut rids = rids;
        rids.truncate(MAX_LAYERS);
        PubTrack {
            index,
            sid: format!("t{participant}_{index}"),
            mid,
            kind,
            source,
            active: true,
            rids,
            codec: None,
            receiver: Receiver::new(),
            sending: 0,
            needed_at: [None; MAX_LAYERS],
            resumed_at: [None; MAX_LAYERS],
        }
        .with_all_layers_sending()
    }

    fn with_all_layers_sending(mut self) -> Self {
        self.sending = self.declared_layers();
        self
    }

    /// Bit mask of the layers the track has: what the publisher announced (layer 0 only
    /// for a single-layer track).
    pub fn declared_layers(&self) -> u8 {
        if !self.simulcast() {
            return 1;
        }
        self.rids
            .iter()
            .fold(0, |m, r| m | 1 << self.layer_of(Some(*r)))
    }

    pub fn simulcast(&self) -> bool {
        self.rids.len() > 1
    }

    /// The layer index (0 low, 1 medium, 2 high) a packet's rid stands for. Known rids
    /// (`q`, `h`, `f`) map by name, so a cap of `medium` means `h` whichever layers are
    /// announced; others by their position in the SDP.
    pub fn layer_of(&self, rid: Option<Rid>) -> u8 {
        let Some(rid) = rid else {
            return 0;
        };
        match Quality::from_rid(&rid) {
            Some(Quality::Low) => 0,
            Some(Quality::Medium) => 1,
            Some(Quality::High) => 2,
            _ => self
                .rids
                .iter()
                .position(|r| *r == rid)
                .map_or(0, |p| p.min(MAX_LAYERS - 1) as u8),
        }
    }

    pub fn info(&self, muted: bool) -> TrackInfo {
        let mut layers: Vec<Quality> = if self.simulcast() {
            self.rids
                .iter()
                .map(|r| layer_quality(self.layer_of(Some(*r)), true))
                .collect()
        } else {
            Vec::new()
        };
        layers.sort();
        layers.dedup();
        TrackInfo {
            sid: self.sid.clone(),
            kind: self.kind,
            source: self.source,
            muted: muted && self.source == TrackSource::Microphone,
            codec: self
                .codec
                .map(|c| codec_name(c.spec().codec).to_string())
                .unwrap_or_default(),
            layers,
        }
    }
}

pub fn codec_name(c: Codec) -> &'static str {
    match c {
        Codec::Opus => "opus",
        Codec::Vp8 => "vp8",
        Codec::Vp9 => "vp9",
        Codec::H264 => "h264",
        Codec::Av1 => "av1",
        Codec::H265 => "h265",
        _ => "other",
    }
}

/// The payload type a subscriber's session uses for the publisher's codec, if it
/// negotiated it. H264 must also agree on packetization mode and profile (the level may
/// differ: `level-asymmetry-allowed`).
pub fn matching_pt(publisher: &PayloadParams, subscriber: &CodecConfig) -> Option<Pt> {
    let want = publisher.spec();
    subscriber
        .iter()
        .find(|p| {
            let have = p.spec();
            if have.codec != want.codec || have.clock_rate != want.clock_rate {
                return false;
            }
            if want.codec != Codec::H264 {
                return true;
            }
            let (a, b) = (have.format, want.format);
            a.packetization_mode.unwrap_or(0) == b.packetization_mode.unwrap_or(0)
                && a.profile_level_id.map(|x| x >> 8) == b.profile_level_id.map(|x| x >> 8)
        })
        .map(|p| p.pt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_map_by_rid_name_then_position() {
        let mid = Mid::from("1");
        let t = PubTrack::new(
            7,
            1,
            mid,
            TrackKind::Video,
            TrackSource::Camera,
            vec![Rid::from("q"), Rid::from("h"), Rid::from("f")],
        );
        assert_eq!(t.sid, "t7_1");
        assert_eq!(t.layer_of(Some(Rid::from("f"))), 2);
        assert_eq!(t.layer_of(Some(Rid::from("q"))), 0);
        assert_eq!(t.layer_of(None), 0);
        let info = t.info(true);
        assert_eq!(
            info.layers,
            vec![Quality::Low, Quality::Medium, Quality::High]
        );
        assert!(!info.muted, "only a microphone is ever muted");
        let u = PubTrack::new(
            7,
            2,
            mid,
            TrackKind::Video,
            TrackSource::Camera,
            vec![Rid::from("a"), Rid::from("b")],
        );
        assert_eq!(u.layer_of(Some(Rid::from("b"))), 1);
        let single = PubTrack::new(7, 3, mid, TrackKind::Video, TrackSource::Screen, vec![]);
        assert!(single.info(false).layers.is_empty());
    }
}
