//! Tracks: the media a participant publishes (microphone, camera, screen, screen audio),
//! as clients, signaling and SFU nodes describe them. See `docs/protocol.md`, "Tracks".

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackKind {
    Audio,
    Video,
}

/// Where a track comes from. Each source has one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackSource {
    Microphone,
    Camera,
    Screen,
    ScreenAudio,
}

impl TrackSource {
    pub const ALL: [TrackSource; 4] = [
        TrackSource::Microphone,
        TrackSource::Camera,
        TrackSource::Screen,
        TrackSource::ScreenAudio,
    ];

    pub fn kind(self) -> TrackKind {
        match self {
            TrackSource::Microphone | TrackSource::ScreenAudio => TrackKind::Audio,
            TrackSource::Camera | TrackSource::Screen => TrackKind::Video,
        }
    }

    /// The source a sending m-section of this kind is taken for when the client does not
    /// say (protocol 1 clients, which publish one microphone).
    pub fn default_for(kind: TrackKind) -> TrackSource {
        match kind {
            TrackKind::Audio => TrackSource::Microphone,
            TrackKind::Video => TrackSource::Camera,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TrackSource::Microphone => "microphone",
            TrackSource::Camera => "camera",
            TrackSource::Screen => "screen",
            TrackSource::ScreenAudio => "screen_audio",
        }
    }

    fn bit(self) -> u8 {
        match self {
            TrackSource::Microphone => 1,
            TrackSource::Camera => 2,
            TrackSource::Screen => 4,
            TrackSource::ScreenAudio => 8,
        }
    }
}

impl fmt::Display for TrackSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of sources (a token's `can_publish_sources`). On the wire: an array of source
/// names, e.g. `["microphone"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceSet(u8);

impl SourceSet {
    pub fn all() -> Self {
        SourceSet(0x0f)
    }

    pub fn contains(self, s: TrackSource) -> bool {
        self.0 & s.bit() != 0
    }

    pub fn insert(&mut self, s: TrackSource) {
        self.0 |= s.bit();
    }

    pub fn iter(self) -> impl Iterator<Item = TrackSource> {
        TrackSource::ALL
            .into_iter()
            .filter(move |s| self.contains(*s))
    }
}

impl FromIterator<TrackSource> for SourceSet {
    fn from_iter<I: IntoIterator<Item = TrackSource>>(iter: I) -> Self {
        let mut set = SourceSet::default();
        for s in iter {
            set.insert(s);
        }
        set
    }
}

impl Serialize for SourceSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for SourceSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Vec<TrackSource> = Vec::deserialize(d)?;
        Ok(v.into_iter().collect())
    }
}

/// Which simulcast layer a subscriber may receive at most (`max_quality`), or which it
/// receives now. `low`/`medium`/`high` are the rids `q`/`h`/`f`; `off` is no video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    Off,
    Low,
    Medium,
    High,
}

impl Quality {
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Off => "off",
            Quality::Low => "low",
            Quality::Medium => "medium",
            Quality::High => "high",
        }
    }

    /// The quality a simulcast rid stands for (`q`, `h`, `f`, as browsers and LiveKit
    /// name them). Unknown rids are `None`.
    pub fn from_rid(rid: &str) -> Option<Quality> {
        match rid {
            "q" => Some(Quality::Low),
            "h" => Some(Quality::Medium),
            "f" => Some(Quality::High),
            _ => None,
        }
    }

    pub fn rid(self) -> Option<&'static str> {
        match self {
            Quality::Off => None,
            Quality::Low => Some("q"),
            Quality::Medium => Some("h"),
            Quality::High => Some("f"),
        }
    }
}

/// A published track, as every participant sees it in `ParticipantInfo::tracks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    /// Unique within the room while the publisher holds its seat; also the `msid` track
    /// id of this track's m-section in every subscriber's SDP.
    pub sid: String,
    pub kind: TrackKind,
    pub source: TrackSource,
    /// Microphone: the participant is muted. Other sources: always false (turning a
    /// camera off unpublishes it).
    #[serde(default)]
    pub muted: bool,
    /// Negotiated codec, lower case (`opus`, `vp8`, `h264`, `vp9`, `av1`); empty until
    /// the first packet tells.
    #[serde(default)]
    pub codec: String,
    /// Simulcast layers the publisher announced, lowest first (`["low","medium","high"]`);
    /// empty for a single-layer track.
    #[serde(default)]
    pub layers: Vec<Quality>,
}

/// Why a subscriber receives less of a video track than its `max_quality` allows
/// (`track_quality.reason`). Absent when it receives what it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QualityReason {
    /// The subscriber's downlink cannot carry more: the stream allocator lowered the
    /// layer, or paused the track (`quality: off`) until probing shows room.
    Bandwidth,
    /// Adaptive stream: the client said the track's tile is hidden (or its tab is in the
    /// background), so nothing is sent; or the tile is small, so a lower layer is.
    View,
    /// The publisher is not sending the layer (its uplink shed it, or it has not started).
    Publisher,
}

/// How one subscriber receives one video track, for operators (admin API, metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackReceive {
    pub track: String,
    /// The layer forwarded now (`off`: nothing).
    pub quality: Quality,
    /// The layer the allocator grants (`off`: paused).
    pub allocated: Quality,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<QualityReason>,
}

/// One subscriber's downlink as the node sees it (sent every few seconds while the
/// subscriber receives video).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveStats {
    /// Bandwidth estimate from transport-wide congestion feedback, bits per second.
    pub estimate_bps: u64,
    /// What the allocator granted video (sum of the chosen layers' bitrates).
    pub allocated_bps: u64,
    /// What was forwarded (audio and video) over the last second.
    pub actual_bps: u64,
    /// Whether the estimator is probing for more room (the subscriber wants more).
    #[serde(default)]
    pub probing: bool,
    pub tracks: Vec<TrackReceive>,
}

/// What a client says about one m-section of its offer: which source it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackDecl {
    pub mid: String,
    pub source: TrackSource,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_set_is_an_array_of_names() {
        let s: SourceSet = [TrackSource::Microphone, TrackSource::Screen]
            .into_iter()
            .collect();
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"["microphone","screen"]"#
        );
        let back: SourceSet = serde_json::from_str(r#"["screen","microphone"]"#).unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<SourceSet>(r#"["webcam"]"#).is_err());
        assert!(SourceSet::all().contains(TrackSource::ScreenAudio));
    }

    #[test]
    fn qualities_order_and_map_to_rids() {
        assert!(Quality::Off < Quality::Low && Quality::Low < Quality::High);
        for q in [Quality::Low, Quality::Medium, Quality::High] {
            assert_eq!(Quality::from_rid(q.rid().unwrap()), Some(q));
        }
        assert_eq!(Quality::from_rid("x"), None);
        assert_eq!(
            serde_json::to_string(&Quality::Medium).unwrap(),
            "\"medium\""
        );
    }
}
