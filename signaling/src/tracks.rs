//! What a client's SDP offer publishes. Signaling never negotiates media (the node does),
//! but it must know which tracks an offer would publish before the offer reaches a node,
//! to hold the token's grants: a small scanner of the offer's m-sections, and the rules
//! that combine them with the client's `tracks` declarations into the list the node gets
//! in `client_offer.tracks` (`docs/protocol.md`, "Tracks and video").

use std::collections::HashSet;

use chorus_protocol::client::{ErrorCode, Grants};
use chorus_protocol::track::{TrackDecl, TrackKind, TrackSource};

/// At most this many sending audio/video m-sections in one offer: every published track
/// costs a receiver and a forwarder per subscriber on the node.
pub const MAX_PUBLISHED_TRACKS: usize = 8;

/// The media type of an m-section (`m=<media> …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    Audio,
    Video,
    /// Data channels (SCTP): chat, which has its own grant; never a track.
    Application,
    /// Anything else (`text`, `message`, garbage): never a track.
    Other,
}

impl SectionKind {
    fn of(media: &str) -> Self {
        match media {
            "audio" => SectionKind::Audio,
            "video" => SectionKind::Video,
            "application" => SectionKind::Application,
            _ => SectionKind::Other,
        }
    }

    /// The track kind of a media section; `None` for data and unknown sections.
    pub fn track_kind(self) -> Option<TrackKind> {
        match self {
            SectionKind::Audio => Some(TrackKind::Audio),
            SectionKind::Video => Some(TrackKind::Video),
            SectionKind::Application | SectionKind::Other => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            SectionKind::Audio => "audio",
            SectionKind::Video => "video",
            SectionKind::Application => "application",
            SectionKind::Other => "unknown",
        }
    }
}

/// One m-section of an SDP, as far as publishing is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSection<'a> {
    /// Position in the SDP, from 0 (the `sdpMLineIndex`).
    pub index: usize,
    pub kind: SectionKind,
    /// The `a=mid:` value, if the section has one.
    pub mid: Option<&'a str>,
    /// Whether the sender would send media on it.
    pub sends: bool,
}

/// Scans an SDP's m-sections. Never fails: lines it does not understand are skipped, and
/// where a reading is ambiguous it takes the one that *sends*, so that a parser
/// difference between us and the node can make us refuse an offer, never let an
/// unchecked track through. A section sends unless
/// - its port is `0` and its mid is not in a `BUNDLE` group (a rejected or stopped
///   section; in a bundle, port 0 only means "bundle-only" and the section is live,
///   RFC 8843 §7.3, which is also how str0m reads it), or
/// - it has a direction attribute and none of its direction attributes is `sendonly` or
///   `sendrecv` (no attribute means `sendrecv`, RFC 3264 §5.1).
///
/// A session-level direction attribute is ignored: str0m reads directions per section
/// only, so honouring a session-level `a=recvonly` could hide a section it sends on.
pub fn media_sections(sdp: &str) -> Vec<MediaSection<'_>> {
    struct Raw<'a> {
        kind: SectionKind,
        port_zero: bool,
        mid: Option<&'a str>,
        saw_direction: bool,
        sending_direction: bool,
    }
    let mut bundled: HashSet<&str> = HashSet::new();
    let mut raw: Vec<Raw<'_>> = Vec::new();
    for line in sdp.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("m=") {
            let mut parts = m.split_whitespace();
            let kind = SectionKind::of(parts.next().unwrap_or(""));
            // Exactly "0", as str0m compares it; "00" or "0/2" count as live (sending).
            let port_zero = parts.next() == Some("0");
            raw.push(Raw {
                kind,
                port_zero,
                mid: None,
                saw_direction: false,
                sending_direction: false,
            });
            continue;
        }
        let Some(attr) = line.strip_prefix("a=") else {
            continue;
        };
        match raw.last_mut() {
            None => {
                if let Some(group) = attr.strip_prefix("group:BUNDLE") {
                    bundled.extend(group.split_whitespace());
                }
            }
            Some(section) => match attr {
                "sendonly" | "sendrecv" => {
                    section.saw_direction = true;
                    section.sending_direction = true;
                }
                "recvonly" | "inactive" => section.saw_direction = true,
                _ => {
                    if let Some(mid) = attr.strip_prefix("mid:") {
                        // A second a=mid makes the SDP invalid for the node; the first
                        // is as good as any for our purposes.
                        section.mid.get_or_insert(mid.trim());
                    }
                }
            },
        }
    }
    raw.into_iter()
        .enumerate()
        .map(|(index, r)| {
            let stopped = r.port_zero && !r.mid.is_some_and(|m| bundled.contains(m));
            let sends = !stopped && (!r.saw_direction || r.sending_direction);
            MediaSection {
                index,
                kind: r.kind,
                mid: r.mid,
                sends,
            }
        })
        .collect()
}

/// Why an offer is refused before it reaches the node. Each maps to a documented client
/// error code ([`OfferError::code`]); the message is the error's `message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    #[error("this token does not grant publishing; offer recvonly media")]
    NoPublishGrant,
    #[error("this token may not publish {0}")]
    SourceNotGranted(TrackSource),
    // (Not `source`: thiserror takes a field of that name for the error's cause.)
    #[error("tracks: mid {mid:?} is {} m-section, but {declared} is {} source", a(*section), a(declared.kind()))]
    WrongKind {
        mid: String,
        section: TrackKind,
        declared: TrackSource,
    },
    #[error("tracks: mid {0:?} is not a sending audio or video m-section of this offer")]
    NotSending(String),
    #[error("tracks: mid {0:?} is listed more than once")]
    DeclaredTwice(String),
    #[error("the offer sends {0} tracks; at most {MAX_PUBLISHED_TRACKS} can be published at once")]
    TooManyTracks(usize),
    #[error("m-section {index} ({kind}) sends media but has no a=mid")]
    MissingMid { index: usize, kind: &'static str },
    #[error("mid {0:?} is used by more than one m-section")]
    DuplicateMid(String),
}

impl OfferError {
    pub fn code(&self) -> ErrorCode {
        match self {
            OfferError::NoPublishGrant | OfferError::SourceNotGranted(_) => ErrorCode::Forbidden,
            OfferError::WrongKind { .. }
            | OfferError::NotSending(_)
            | OfferError::DeclaredTwice(_)
            | OfferError::TooManyTracks(_) => ErrorCode::BadRequest,
            // Faults of the SDP itself: the node would refuse them as invalid_sdp too.
            OfferError::MissingMid { .. } | OfferError::DuplicateMid(_) => ErrorCode::InvalidSdp,
        }
    }
}

/// "an audio" / "a video", for messages.
fn a(kind: TrackKind) -> &'static str {
    match kind {
        TrackKind::Audio => "an audio",
        TrackKind::Video => "a video",
    }
}

/// The tracks an offer publishes, in m-section order: every sending audio/video section
/// with the source the client declared for its mid, or the default for its kind
/// ([`TrackSource::default_for`]: what protocol 1 clients, which declare nothing, mean).
/// Refuses offers that declare nonsense, send too much, or publish a source `grants`
/// does not allow.
pub fn resolve_offer(
    sdp: &str,
    declared: &[TrackDecl],
    grants: &Grants,
) -> Result<Vec<TrackDecl>, OfferError> {
    let sections = media_sections(sdp);
    let sending: Vec<(&MediaSection<'_>, TrackKind)> = sections
        .iter()
        .filter(|s| s.sends)
        .filter_map(|s| s.kind.track_kind().map(|k| (s, k)))
        .collect();

    // Structure first, so a client learns about a broken offer whatever its grants.
    let mut mids = HashSet::new();
    for s in &sections {
        if let Some(mid) = s.mid {
            if !mids.insert(mid) {
                return Err(OfferError::DuplicateMid(mid.to_string()));
            }
        }
    }
    if let Some((s, _)) = sending.iter().find(|(s, _)| s.mid.is_none()) {
        return Err(OfferError::MissingMid {
            index: s.index,
            kind: s.kind.as_str(),
        });
    }
    if sending.len() > MAX_PUBLISHED_TRACKS {
        return Err(OfferError::TooManyTracks(sending.len()));
    }
    // Every declaration names one distinct sending section, so past this loop there are
    // at most MAX_PUBLISHED_TRACKS of them and the lookups below stay small.
    let mut seen = HashSet::new();
    for d in declared {
        if !seen.insert(d.mid.as_str()) {
            return Err(OfferError::DeclaredTwice(d.mid.clone()));
        }
        let Some((_, kind)) = sending.iter().find(|(s, _)| s.mid == Some(d.mid.as_str())) else {
            return Err(OfferError::NotSending(d.mid.clone()));
        };
        if d.source.kind() != *kind {
            return Err(OfferError::WrongKind {
                mid: d.mid.clone(),
                section: *kind,
                declared: d.source,
            });
        }
    }

    let tracks: Vec<TrackDecl> = sending
        .iter()
        .filter_map(|(s, kind)| {
            let mid = s.mid?;
            let source = declared
                .iter()
                .find(|d| d.mid == mid)
                .map_or(TrackSource::default_for(*kind), |d| d.source);
            Some(TrackDecl {
                mid: mid.to_string(),
                source,
            })
        })
        .collect();

    if !tracks.is_empty() && !grants.publish {
        return Err(OfferError::NoPublishGrant);
    }
    if let Some(t) = tracks.iter().find(|t| !grants.may_publish(t.source)) {
        return Err(OfferError::SourceNotGranted(t.source));
    }
    Ok(tracks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_protocol::track::SourceSet;

    /// Session part of a Chromium offer (trimmed: ICE and DTLS lines are not read).
    fn session(bundle: &str) -> String {
        format!(
            "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
             a=group:BUNDLE {bundle}\r\na=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n"
        )
    }

    fn audio(mid: &str, port: u16, dir: &str) -> String {
        format!(
            "m=audio {port} UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\r\n\
             c=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\na=ice-ufrag:Vq5b\r\n\
             a=ice-pwd:0P6u1nCgL3x2VaQ1kK1yBq3F\r\na=ice-options:trickle\r\n\
             a=setup:actpass\r\na=mid:{mid}\r\n\
             a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n\
             a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n{dir}\
             a=msid:- 7a4d2c8e-6f1b-4b5e-9d0a-1c2b3d4e5f60\r\na=rtcp-mux\r\n\
             a=rtpmap:111 opus/48000/2\r\na=rtcp-fb:111 transport-cc\r\n\
             a=fmtp:111 minptime=10;useinbandfec=1\r\n\
             a=ssrc:2231627014 cname:4TOk42mSjXCkVIa6\r\n"
        )
    }

    /// A Chromium camera section sending three simulcast layers.
    fn simulcast_video(mid: &str, dir: &str) -> String {
        format!(
            "m=video 9 UDP/TLS/RTP/SAVPF 96 97 98 99\r\nc=IN IP4 0.0.0.0\r\n\
             a=rtcp:9 IN IP4 0.0.0.0\r\na=setup:actpass\r\na=mid:{mid}\r\n\
             a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
             a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n\
             a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id\r\n{dir}\
             a=msid:- 3f1c9a2b-0d4e-4c6f-8a7b-9e0d1c2b3a4f\r\na=rtcp-mux\r\na=rtcp-rsize\r\n\
             a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 goog-remb\r\na=rtcp-fb:96 nack\r\n\
             a=rtcp-fb:96 nack pli\r\na=rtcp-fb:96 ccm fir\r\n\
             a=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
             a=rtpmap:98 H264/90000\r\n\
             a=fmtp:98 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
             a=rtpmap:99 rtx/90000\r\na=fmtp:99 apt=98\r\n\
             a=rid:q send\r\na=rid:h send\r\na=rid:f send\r\na=simulcast:send q;h;f\r\n"
        )
    }

    fn video(mid: &str, port: u16, dir: &str) -> String {
        format!(
            "m=video {port} UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0\r\na=mid:{mid}\r\n{dir}\
             a=rtcp-mux\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n"
        )
    }

    fn data(mid: &str) -> String {
        format!(
            "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n\
             a=setup:actpass\r\na=mid:{mid}\r\na=sctp-port:5000\r\na=max-message-size:262144\r\n"
        )
    }

    const SENDONLY: &str = "a=sendonly\r\n";
    const RECVONLY: &str = "a=recvonly\r\n";
    const INACTIVE: &str = "a=inactive\r\n";

    fn decl(mid: &str, source: TrackSource) -> TrackDecl {
        TrackDecl {
            mid: mid.into(),
            source,
        }
    }

    fn only(sources: &[TrackSource]) -> Grants {
        Grants {
            can_publish_sources: Some(sources.iter().copied().collect::<SourceSet>()),
            ..Grants::default_participant()
        }
    }

    /// Microphone, simulcast camera, screen, data channels, and a stopped transceiver
    /// (port 0, left out of the bundle), as Chromium offers them after a camera and a
    /// screen share were added and an earlier screen share was stopped.
    fn chromium_offer() -> String {
        session("0 1 2 3")
            + &audio("0", 9, SENDONLY)
            + &simulcast_video("1", SENDONLY)
            + &video("2", 9, SENDONLY)
            + &data("3")
            + &video("4", 0, INACTIVE)
    }

    #[test]
    fn scans_kind_mid_and_whether_each_section_sends() {
        let sdp = chromium_offer();
        let s = media_sections(&sdp);
        let summary: Vec<_> = s
            .iter()
            .map(|m| (m.index, m.kind, m.mid, m.sends))
            .collect();
        assert_eq!(
            summary,
            [
                (0, SectionKind::Audio, Some("0"), true),
                (1, SectionKind::Video, Some("1"), true),
                (2, SectionKind::Video, Some("2"), true),
                (3, SectionKind::Application, Some("3"), true),
                (4, SectionKind::Video, Some("4"), false),
            ]
        );
    }

    #[test]
    fn directions_ports_and_bundle_decide_sending() {
        let cases: [(String, bool); 9] = [
            (session("0") + &audio("0", 9, SENDONLY), true),
            (session("0") + &audio("0", 9, "a=sendrecv\r\n"), true),
            (session("0") + &audio("0", 9, RECVONLY), false),
            (session("0") + &audio("0", 9, INACTIVE), false),
            // No direction: sendrecv (RFC 3264).
            (session("0") + &audio("0", 9, ""), true),
            // Port 0 outside the bundle: stopped, whatever the direction says.
            (session("1") + &audio("0", 0, SENDONLY), false),
            // Port 0 inside the bundle: bundle-only, live (RFC 8843, and str0m).
            (
                session("0") + &audio("0", 0, "a=bundle-only\r\na=sendonly\r\n"),
                true,
            ),
            // Two directions (invalid): the reading that sends wins.
            (
                session("0") + &audio("0", 9, "a=recvonly\r\na=sendonly\r\n"),
                true,
            ),
            // A session-level recvonly does not hide a section without its own.
            (session("0") + "a=recvonly\r\n" + &audio("0", 9, ""), true),
        ];
        for (sdp, sends) in cases {
            let s = media_sections(&sdp);
            assert_eq!(s.len(), 1, "{sdp}");
            assert_eq!(s[0].sends, sends, "{sdp}");
        }
    }

    #[test]
    fn garbage_and_odd_lines_never_panic() {
        for sdp in [
            "",
            "hello",
            "m=",
            "m=video",
            "a=mid:\r\nm=audio 9",
            "m=audio 9 X 111\na=mid: 7 \n",
            "\u{0}\u{ffff}m=video 0\r\na=mid:x",
        ] {
            let _ = media_sections(sdp);
            let _ = resolve_offer(sdp, &[], &Grants::default_participant());
        }
        // Bare \n line ends and padded mids are read like Chromium's.
        let s = media_sections("v=0\nm=audio 9 X 111\na=mid: 7 \n");
        assert_eq!(s[0].mid, Some("7"));
        assert!(s[0].sends);
        // A port-less m-line is taken as live.
        assert!(media_sections("m=video\r\na=mid:v\r\n")[0].sends);
    }

    #[test]
    fn resolves_declared_sources_and_defaults_in_section_order() {
        let sdp = chromium_offer();
        let tracks = resolve_offer(
            &sdp,
            &[decl("2", TrackSource::Screen)],
            &Grants::default_participant(),
        )
        .unwrap();
        assert_eq!(
            tracks,
            [
                decl("0", TrackSource::Microphone),
                decl("1", TrackSource::Camera),
                decl("2", TrackSource::Screen),
            ]
        );
        // A protocol 1 offer: one microphone, recvonly video it is offered, data.
        let p1 =
            session("0 1 2") + &audio("0", 9, SENDONLY) + &data("1") + &video("2", 9, RECVONLY);
        assert_eq!(
            resolve_offer(&p1, &[], &Grants::default_participant()).unwrap(),
            [decl("0", TrackSource::Microphone)]
        );
        // Screen audio is declared on an audio section.
        let sa = session("0 1") + &audio("0", 9, SENDONLY) + &audio("1", 9, SENDONLY);
        assert_eq!(
            resolve_offer(
                &sa,
                &[decl("1", TrackSource::ScreenAudio)],
                &Grants::default_participant()
            )
            .unwrap(),
            [
                decl("0", TrackSource::Microphone),
                decl("1", TrackSource::ScreenAudio)
            ]
        );
    }

    #[test]
    fn bad_declarations_are_bad_requests() {
        let sdp = chromium_offer();
        let all = Grants::default_participant();
        let cases = [
            // A video section declared as a microphone.
            (
                vec![decl("1", TrackSource::Microphone)],
                "is a video m-section",
            ),
            // An audio section declared as a camera.
            (
                vec![decl("0", TrackSource::Camera)],
                "is an audio m-section",
            ),
            // The stopped section, the data channel section, a mid that is not there.
            (vec![decl("4", TrackSource::Screen)], "not a sending"),
            (vec![decl("3", TrackSource::Camera)], "not a sending"),
            (vec![decl("9", TrackSource::Camera)], "not a sending"),
            (
                vec![
                    decl("2", TrackSource::Screen),
                    decl("2", TrackSource::Camera),
                ],
                "more than once",
            ),
        ];
        for (declared, says) in cases {
            let e = resolve_offer(&sdp, &declared, &all).unwrap_err();
            assert_eq!(e.code(), ErrorCode::BadRequest, "{declared:?}");
            assert!(e.to_string().contains(says), "{declared:?}: {e}");
        }
        // An inactive (camera turned off) section cannot be declared either.
        let off = session("0 1") + &audio("0", 9, SENDONLY) + &video("1", 9, INACTIVE);
        let e = resolve_offer(&off, &[decl("1", TrackSource::Camera)], &all).unwrap_err();
        assert_eq!(e, OfferError::NotSending("1".into()));
    }

    #[test]
    fn at_most_eight_tracks() {
        let mut sdp = session("a0 a1 a2 a3 v0 v1 v2 v3 v4");
        for i in 0..4 {
            sdp += &audio(&format!("a{i}"), 9, SENDONLY);
        }
        for i in 0..4 {
            sdp += &video(&format!("v{i}"), 9, SENDONLY);
        }
        let all = Grants::default_participant();
        assert_eq!(resolve_offer(&sdp, &[], &all).unwrap().len(), 8);
        // A ninth that does not send is fine; a ninth that sends is not.
        let nine_quiet = sdp.clone() + &video("v4", 9, RECVONLY);
        assert_eq!(resolve_offer(&nine_quiet, &[], &all).unwrap().len(), 8);
        let nine = sdp + &video("v4", 9, SENDONLY);
        let e = resolve_offer(&nine, &[], &all).unwrap_err();
        assert_eq!(e, OfferError::TooManyTracks(9));
        assert_eq!(e.code(), ErrorCode::BadRequest);
    }

    #[test]
    fn grants_limit_sources() {
        let sdp = chromium_offer();
        let mic_only = only(&[TrackSource::Microphone]);
        let e = resolve_offer(&sdp, &[decl("2", TrackSource::Screen)], &mic_only).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Forbidden);
        // The first refused track in SDP order: the undeclared camera.
        assert_eq!(e.to_string(), "this token may not publish camera");

        let no_screen = only(&[TrackSource::Microphone, TrackSource::Camera]);
        let e = resolve_offer(&sdp, &[decl("2", TrackSource::Screen)], &no_screen).unwrap_err();
        assert_eq!(e.to_string(), "this token may not publish screen");

        // A mic-only token publishing its microphone, receiving video: fine.
        let p1 = session("0 1") + &audio("0", 9, SENDONLY) + &video("1", 9, RECVONLY);
        assert_eq!(resolve_offer(&p1, &[], &mic_only).unwrap().len(), 1);

        // No publish grant at all: today's message, and any sending section is refused.
        let listen = Grants {
            publish: false,
            ..Grants::default_participant()
        };
        let e = resolve_offer(&p1, &[], &listen).unwrap_err();
        assert_eq!(e, OfferError::NoPublishGrant);
        assert_eq!(e.code(), ErrorCode::Forbidden);
        assert!(e.to_string().contains("does not grant publishing"));
        // ... but a receive-only offer with data channels is not.
        let recv = session("0 1") + &audio("0", 9, RECVONLY) + &data("1");
        assert!(resolve_offer(&recv, &[], &listen).unwrap().is_empty());
    }

    #[test]
    fn sdp_faults_are_invalid_sdp() {
        let all = Grants::default_participant();
        let no_mid = session("") + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendonly\r\n";
        let e = resolve_offer(&no_mid, &[], &all).unwrap_err();
        assert_eq!(
            e,
            OfferError::MissingMid {
                index: 0,
                kind: "audio"
            }
        );
        assert_eq!(e.code(), ErrorCode::InvalidSdp);
        let twice = session("0") + &audio("0", 9, SENDONLY) + &video("0", 9, RECVONLY);
        let e = resolve_offer(&twice, &[], &all).unwrap_err();
        assert_eq!(e, OfferError::DuplicateMid("0".into()));
        assert_eq!(e.code(), ErrorCode::InvalidSdp);
        // A receive-only section without a mid is the node's business.
        let quiet = session("") + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\n";
        assert!(resolve_offer(&quiet, &[], &all).unwrap().is_empty());
    }
}
