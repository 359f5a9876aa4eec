//! What a run reports: the per-run summary (JSON with `--report`, text on stderr), the
//! consistency problems `--check` fails on, and the two-run reports (Chorus vs Janus,
//! audio-only vs with cameras).

use std::collections::HashMap;

use anyhow::Context;
use chorus_protocol::track::Quality;
use serde::Serialize;

use crate::{peer, video, video_rx, ServerKind};

#[derive(Debug, Serialize)]
pub struct Report {
    pub server: ServerKind,
    pub scenario: String,
    pub rooms: usize,
    pub participants: usize,
    pub speakers: usize,
    pub measured_secs: f64,
    pub joined: u64,
    pub connected: u64,
    pub failed: u64,
    /// Packets the publishers sent and the subscribers received in the window.
    pub sent_pps: f64,
    pub received_pps: f64,
    pub loss_percent: f64,
    pub e2e_delay_ms_p50: Option<f64>,
    pub e2e_delay_ms_p99: Option<f64>,
    /// Packets that arrived more than ~10 s after they were sent (overload).
    pub delay_over_10s: u64,
    pub mean_jitter_ms: f64,
    /// From the SFU's metrics (Chorus), or what the subscribers received (Janus has
    /// no counter to read): see `forwarded_source`.
    pub forwarded_pps: Option<f64>,
    pub forwarded_source: &'static str,
    pub sfu_forward_ms_p50: Option<f64>,
    pub sfu_forward_ms_p99: Option<f64>,
    /// From /proc of the server process (whole `chorus dev`: signaling + SFU).
    pub server_cpu_percent: Option<f64>,
    pub server_cpu_us_per_forwarded_packet: Option<f64>,
    /// The kernel's share of it (system time: socket calls).
    pub server_sys_us_per_forwarded_packet: Option<f64>,
    /// The same per packet the subscribers received: one basis for every server.
    pub server_cpu_us_per_received_packet: Option<f64>,
    pub server_sys_us_per_received_packet: Option<f64>,
    pub server_rss_idle_mb: Option<f64>,
    pub server_rss_loaded_mb: Option<f64>,
    pub server_rss_kb_per_participant: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video: Option<video_rx::VideoReport>,
    pub consistency_errors: Vec<String>,
}

pub fn write_report<T: Serialize>(dest: Option<&str>, report: &T) -> anyhow::Result<()> {
    let Some(dest) = dest else { return Ok(()) };
    let json = serde_json::to_string_pretty(report)?;
    if dest == "-" {
        println!("{json}");
    } else {
        std::fs::write(dest, json).with_context(|| format!("writing {dest}"))?;
    }
    Ok(())
}

/// The layer (index into [`video::RIDS`]) a subscriber with this cap should end on:
/// the top one without a cap; none when it asked for nothing.
pub fn expected_layer(cap: Option<Quality>) -> Option<usize> {
    match cap {
        None | Some(Quality::High) => Some(2),
        Some(Quality::Medium) => Some(1),
        Some(Quality::Low) => Some(0),
        Some(Quality::Off) => None,
    }
}

/// Video consistency: every subscriber gets complete frames from every other camera of
/// its room (and none from elsewhere), on the layer it asked for (the top one unless
/// capped), and the descriptors the SFU rewrote are continuous.
pub fn video_errors(
    results: &[peer::PeerResult],
    room_cameras: &HashMap<String, Vec<u32>>,
    total: &video_rx::VideoCounts,
    errors: &mut Vec<String>,
) {
    for r in results.iter().filter(|r| r.error.is_none()) {
        let cams = room_cameras
            .get(&r.room)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for c in cams.iter().filter(|c| Some(**c) != r.camera) {
            if r.video.frames_per_camera.get(c).copied().unwrap_or(0) == 0 {
                errors.push(format!(
                    "{} in {} got no complete frame from camera {c}",
                    r.identity, r.room
                ));
            }
        }
        for c in r.video.frames_per_camera.keys() {
            if !cams.contains(c) {
                errors.push(format!(
                    "{} in {} got frames from camera {c} of another room",
                    r.identity, r.room
                ));
            }
        }
        // The layer it asked for: the top one unless capped.
        let Some(want) = expected_layer(r.video_cap) else {
            continue;
        };
        for (c, l) in &r.video.last_layers {
            if usize::from(*l) != want {
                errors.push(format!(
                    "{} in {} receives camera {c} on layer {}, not {}",
                    r.identity,
                    r.room,
                    video::RIDS[usize::from(*l)],
                    video::RIDS[want]
                ));
            }
        }
    }
    if total.pid_gaps > 0 {
        errors.push(format!(
            "{} picture-id gaps not explained by loss",
            total.pid_gaps
        ));
    }
    if total.switches_not_at_keyframe > 0 {
        errors.push(format!(
            "{} layer switches not at a keyframe",
            total.switches_not_at_keyframe
        ));
    }
    if total.descriptor_errors > 0 {
        errors.push(format!(
            "{} VP8 descriptor continuity errors (TL0PICIDX, KEYIDX or frame boundaries)",
            total.descriptor_errors
        ));
    }
    // A delta frame before any keyframe cannot be decoded; without loss that is the
    // SFU starting a down track mid-picture.
    if total.undecodable > 0 && total.lost == 0 {
        errors.push(format!(
            "{} complete frames arrived before their down track's first keyframe",
            total.undecodable
        ));
    }
}

/// The same rooms and participants without cameras and with: the server's CPU per
/// audio packet, and what the video packets added per video packet.
#[derive(Debug, Serialize)]
pub struct Split {
    /// Audio-only run: server CPU per forwarded packet.
    pub audio_us_per_forwarded_packet: Option<f64>,
    /// Video run: server CPU over all forwarded packets (audio and video).
    pub all_us_per_forwarded_packet: Option<f64>,
    /// (CPU of the video run − CPU of the audio run) / (forwarded packets/s of the
    /// video run − of the audio run).
    pub video_us_per_forwarded_packet: Option<f64>,
    /// The same split for the kernel's share.
    pub audio_sys_us_per_forwarded_packet: Option<f64>,
    pub video_sys_us_per_forwarded_packet: Option<f64>,
    pub basis: &'static str,
    pub audio_only: Report,
    pub with_video: Report,
}

impl Split {
    pub fn new(audio_only: Report, with_video: Report) -> Split {
        let secs_rate = |r: &Report, per_pkt: Option<f64>| {
            // µs per packet × packets/s = µs of CPU per second.
            per_pkt.zip(r.forwarded_pps).map(|(c, f)| c * f)
        };
        let marginal = |a: Option<f64>, v: Option<f64>| match (
            a,
            v,
            audio_only.forwarded_pps,
            with_video.forwarded_pps,
        ) {
            (Some(a), Some(v), Some(fa), Some(fv)) if fv > fa => Some((v - a) / (fv - fa)),
            _ => None,
        };
        Split {
            audio_us_per_forwarded_packet: audio_only.server_cpu_us_per_forwarded_packet,
            all_us_per_forwarded_packet: with_video.server_cpu_us_per_forwarded_packet,
            video_us_per_forwarded_packet: marginal(
                secs_rate(&audio_only, audio_only.server_cpu_us_per_forwarded_packet),
                secs_rate(&with_video, with_video.server_cpu_us_per_forwarded_packet),
            ),
            audio_sys_us_per_forwarded_packet: audio_only.server_sys_us_per_forwarded_packet,
            video_sys_us_per_forwarded_packet: marginal(
                secs_rate(&audio_only, audio_only.server_sys_us_per_forwarded_packet),
                secs_rate(&with_video, with_video.server_sys_us_per_forwarded_packet),
            ),
            basis: "server CPU (utime+stime from /proc) per packet the SFU counted as \
                    forwarded; video = the CPU the cameras added over the packets they added",
            audio_only,
            with_video,
        }
    }

    pub fn print(&self) {
        let f = |v: Option<f64>| {
            v.map(|x| format!("{x:.2} µs"))
                .unwrap_or_else(|| "n/a".into())
        };
        eprintln!(
            "── audio / video split: {} ({} participants)",
            self.with_video.scenario, self.with_video.participants
        );
        eprintln!(
            "  audio only         {} per forwarded packet ({} kernel) at {:.0} pkt/s",
            f(self.audio_us_per_forwarded_packet),
            f(self.audio_sys_us_per_forwarded_packet),
            self.audio_only.forwarded_pps.unwrap_or(0.0)
        );
        eprintln!(
            "  with cameras       {} per forwarded packet at {:.0} pkt/s",
            f(self.all_us_per_forwarded_packet),
            self.with_video.forwarded_pps.unwrap_or(0.0)
        );
        eprintln!(
            "  video (marginal)   {} per forwarded video packet ({} kernel)",
            f(self.video_us_per_forwarded_packet),
            f(self.video_sys_us_per_forwarded_packet)
        );
    }
}

pub fn print_summary(r: &Report) {
    let f = |v: Option<f64>, unit: &str| {
        v.map(|x| format!("{x:.2} {unit}"))
            .unwrap_or_else(|| "n/a".into())
    };
    eprintln!(
        "── {}{} ({} participants, {} speakers, {:.1} s measured)",
        r.scenario,
        match r.server {
            ServerKind::Chorus => "",
            ServerKind::Janus => " on Janus",
        },
        r.participants,
        r.speakers,
        r.measured_secs
    );
    eprintln!(
        "  joined {} · connected {} · failed {}",
        r.joined, r.connected, r.failed
    );
    eprintln!(
        "  forwarded          {}{}",
        f(r.forwarded_pps, "pkt/s"),
        match r.server {
            ServerKind::Chorus => "",
            ServerKind::Janus => " (= received by the subscribers; Janus has no counter)",
        }
    );
    eprintln!(
        "  server CPU         {} ({} of it in the kernel; {})",
        f(r.server_cpu_us_per_forwarded_packet, "µs/forwarded pkt"),
        f(r.server_sys_us_per_forwarded_packet, "µs"),
        f(r.server_cpu_percent, "% of a core")
    );
    if r.server == ServerKind::Chorus {
        eprintln!(
            "  SFU forwarding     p50 {} · p99 {}",
            f(r.sfu_forward_ms_p50, "ms"),
            f(r.sfu_forward_ms_p99, "ms")
        );
    }
    eprintln!(
        "  end-to-end delay   p50 {} · p99 {} · {} packets over 10 s late",
        f(r.e2e_delay_ms_p50, "ms"),
        f(r.e2e_delay_ms_p99, "ms"),
        r.delay_over_10s
    );
    eprintln!(
        "  loss {:.3}% · jitter {:.2} ms · sent {:.0} pkt/s · received {:.0} pkt/s",
        r.loss_percent, r.mean_jitter_ms, r.sent_pps, r.received_pps
    );
    eprintln!(
        "  server RSS         idle {} · loaded {} · {}",
        f(r.server_rss_idle_mb, "MB"),
        f(r.server_rss_loaded_mb, "MB"),
        f(r.server_rss_kb_per_participant, "KB/participant")
    );
    if let Some(v) = &r.video {
        v.print();
    }
    if !r.consistency_errors.is_empty() {
        eprintln!(
            "  consistency: {} problems (first: {})",
            r.consistency_errors.len(),
            r.consistency_errors[0]
        );
    }
}

/// Chorus and Janus under the same load. Both CPU figures are per packet the
/// subscribers received, the one count both runs have (Janus exposes no forwarding
/// counter); Chorus's own metric is shown beside it.
#[derive(Debug, Serialize)]
pub struct Comparison {
    /// Janus's server CPU per received packet over Chorus's.
    pub janus_over_chorus_cpu_per_packet: Option<f64>,
    /// The same for the kernel's share (system time).
    pub janus_over_chorus_sys_per_packet: Option<f64>,
    pub basis: &'static str,
    pub chorus: Report,
    pub janus: Report,
}

impl Comparison {
    pub fn new(chorus: Report, janus: Report) -> Comparison {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(j), Some(c)) if c > 0.0 => Some(j / c),
            _ => None,
        };
        Comparison {
            janus_over_chorus_cpu_per_packet: ratio(
                janus.server_cpu_us_per_received_packet,
                chorus.server_cpu_us_per_received_packet,
            ),
            janus_over_chorus_sys_per_packet: ratio(
                janus.server_sys_us_per_received_packet,
                chorus.server_sys_us_per_received_packet,
            ),
            basis: "server CPU (utime+stime from /proc) per RTP packet received by the \
                    loadgen's subscribers in the measured window",
            chorus,
            janus,
        }
    }

    pub fn print(&self) {
        print_table(&self.chorus, &self.janus);
        let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "n/a".into());
        eprintln!(
            "  Janus / Chorus CPU per packet: {} (kernel part: {})",
            f(self.janus_over_chorus_cpu_per_packet),
            f(self.janus_over_chorus_sys_per_packet)
        );
    }
}

/// Both servers' audio-only and video runs (`--audio-baseline --compare-janus`): what a
/// forwarded video packet costs each, with the mix of audio and video packets (which
/// differs: Janus forwards every speaker, Chorus only the selected ones in a big room)
/// taken out.
#[derive(Debug, Serialize)]
pub struct SplitComparison {
    /// Janus's marginal CPU per forwarded video packet over Chorus's.
    pub janus_over_chorus_video_per_packet: Option<f64>,
    /// The audio-only runs' CPU per received packet, Janus over Chorus.
    pub janus_over_chorus_audio_only_per_packet: Option<f64>,
    /// The video runs' CPU per received packet (all packets), Janus over Chorus.
    pub janus_over_chorus_all_per_packet: Option<f64>,
    pub chorus: Split,
    pub janus: Split,
}

impl SplitComparison {
    pub fn new(chorus: Split, janus: Split) -> SplitComparison {
        let ratio = |j: Option<f64>, c: Option<f64>| match (j, c) {
            (Some(j), Some(c)) if c > 0.0 => Some(j / c),
            _ => None,
        };
        SplitComparison {
            janus_over_chorus_video_per_packet: ratio(
                janus.video_us_per_forwarded_packet,
                chorus.video_us_per_forwarded_packet,
            ),
            janus_over_chorus_audio_only_per_packet: ratio(
                janus.audio_only.server_cpu_us_per_received_packet,
                chorus.audio_only.server_cpu_us_per_received_packet,
            ),
            janus_over_chorus_all_per_packet: ratio(
                janus.with_video.server_cpu_us_per_received_packet,
                chorus.with_video.server_cpu_us_per_received_packet,
            ),
            chorus,
            janus,
        }
    }

    pub fn print(&self) {
        eprint!("Chorus: ");
        self.chorus.print();
        eprint!("Janus: ");
        self.janus.print();
        print_table(&self.chorus.with_video, &self.janus.with_video);
        let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "n/a".into());
        eprintln!(
            "  Janus / Chorus CPU per packet: audio only {} · with cameras, all packets {} · \
             video (marginal per video packet) {}",
            f(self.janus_over_chorus_audio_only_per_packet),
            f(self.janus_over_chorus_all_per_packet),
            f(self.janus_over_chorus_video_per_packet)
        );
    }
}

/// Two runs side by side (Chorus, then Janus), one figure of each per row.
fn print_table(c: &Report, j: &Report) {
    let f = |v: Option<f64>, prec: usize| {
        v.map(|x| format!("{x:.prec$}"))
            .unwrap_or_else(|| "n/a".into())
    };
    // One figure of each run per row; Chorus-only figures say n/a for Janus.
    let both = |pick: fn(&Report) -> Option<f64>, prec| (f(pick(c), prec), f(pick(j), prec));
    let mut rows = vec![
        ("", ("Chorus".into(), "Janus".into())),
        (
            "server CPU µs / received pkt",
            both(|r| r.server_cpu_us_per_received_packet, 2),
        ),
        (
            "  of it kernel",
            both(|r| r.server_sys_us_per_received_packet, 2),
        ),
        (
            "server CPU µs / SFU-counted pkt",
            (f(c.server_cpu_us_per_forwarded_packet, 2), "n/a".into()),
        ),
        ("server CPU, % of a core", both(|r| r.server_cpu_percent, 1)),
        (
            "received pkt/s (= forwarded)",
            both(|r| Some(r.received_pps), 0),
        ),
        (
            "SFU-counted forwarded pkt/s",
            (f(c.forwarded_pps, 0), "n/a".into()),
        ),
        ("end-to-end delay p50 ms", both(|r| r.e2e_delay_ms_p50, 2)),
        ("end-to-end delay p99 ms", both(|r| r.e2e_delay_ms_p99, 2)),
        ("loss %", both(|r| Some(r.loss_percent), 3)),
        (
            "server RSS KB / participant",
            both(|r| r.server_rss_kb_per_participant, 0),
        ),
        ("failed participants", both(|r| Some(r.failed as f64), 0)),
    ];
    if let (Some(cv), Some(jv)) = (&c.video, &j.video) {
        let pair = |pick: &dyn Fn(&video_rx::VideoReport) -> String| (pick(cv), pick(jv));
        let layers = |v: &video_rx::VideoReport| {
            let w = &v.window;
            format!("{}/{}/{}", w.frames_low, w.frames_medium, w.frames_high)
        };
        rows.extend([
            (
                "video received pkt/s",
                pair(&|v| format!("{:.0}", v.received_pps)),
            ),
            (
                "audio received pkt/s",
                pair(&|v| format!("{:.0}", v.audio_received_pps)),
            ),
            ("frames (window) by layer q/h/f", pair(&layers)),
            (
                "video delay p50 / p99 ms",
                pair(&|v| format!("{} / {}", f(v.delay_ms_p50, 1), f(v.delay_ms_p99, 1))),
            ),
            (
                "layer switches (run)",
                pair(&|v| v.total.switches.to_string()),
            ),
            (
                "keyframe requests q/h/f",
                pair(&|v| {
                    let k = v.keyframe_requests;
                    format!("{}/{}/{}", k[0], k[1], k[2])
                }),
            ),
            (
                "incomplete frames / pid gaps",
                pair(&|v| format!("{} / {}", v.total.incomplete, v.total.pid_gaps)),
            ),
        ]);
    }
    eprintln!(
        "── Janus comparison: {} ({} participants, {} speakers; {:.1} s / {:.1} s measured)",
        c.scenario, c.participants, c.speakers, c.measured_secs, j.measured_secs
    );
    for (what, (a, b)) in rows {
        eprintln!("  {what:<34} {a:>18} {b:>18}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_subscriber_is_checked_against_its_cap() {
        assert_eq!(expected_layer(None), Some(2));
        assert_eq!(expected_layer(Some(Quality::High)), Some(2));
        assert_eq!(expected_layer(Some(Quality::Medium)), Some(1));
        assert_eq!(expected_layer(Some(Quality::Low)), Some(0));
        assert_eq!(expected_layer(Some(Quality::Off)), None);
        let peer = |cap, last: Vec<(u32, u8)>| peer::PeerResult {
            identity: "p".into(),
            room: "r".into(),
            video_cap: cap,
            video: video_rx::VideoPeerResult {
                frames_per_camera: last.iter().map(|(c, _)| (*c, 5)).collect(),
                last_layers: last,
            },
            ..Default::default()
        };
        let cameras = HashMap::from([("r".to_string(), vec![0, 1])]);
        let mut errors = Vec::new();
        let total = video_rx::VideoCounts::default();
        video_errors(
            &[
                peer(Some(Quality::Low), vec![(0, 0), (1, 0)]),
                peer(None, vec![(0, 2), (1, 2)]),
            ],
            &cameras,
            &total,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        video_errors(
            &[peer(Some(Quality::Medium), vec![(0, 1), (1, 2)])],
            &cameras,
            &total,
            &mut errors,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("camera 1 on layer f, not h"),
            "{errors:?}"
        );
    }

    #[test]
    fn comparison_ratio_is_janus_over_chorus_per_received_packet() {
        let report = |server, cpu: Option<f64>| Report {
            server,
            scenario: "t".into(),
            rooms: 1,
            participants: 2,
            speakers: 2,
            measured_secs: 1.0,
            joined: 2,
            connected: 2,
            failed: 0,
            sent_pps: 100.0,
            received_pps: 100.0,
            loss_percent: 0.0,
            e2e_delay_ms_p50: None,
            e2e_delay_ms_p99: None,
            delay_over_10s: 0,
            mean_jitter_ms: 0.0,
            forwarded_pps: None,
            forwarded_source: "x",
            sfu_forward_ms_p50: None,
            sfu_forward_ms_p99: None,
            server_cpu_percent: None,
            server_cpu_us_per_forwarded_packet: Some(1.0),
            server_sys_us_per_forwarded_packet: None,
            server_cpu_us_per_received_packet: cpu,
            server_sys_us_per_received_packet: None,
            server_rss_idle_mb: None,
            server_rss_loaded_mb: None,
            server_rss_kb_per_participant: None,
            video: None,
            consistency_errors: Vec::new(),
        };
        let c = Comparison::new(
            report(ServerKind::Chorus, Some(20.0)),
            report(ServerKind::Janus, Some(50.0)),
        );
        assert_eq!(c.janus_over_chorus_cpu_per_packet, Some(2.5));
        assert_eq!(c.janus_over_chorus_sys_per_packet, None);
        let c = Comparison::new(
            report(ServerKind::Chorus, None),
            report(ServerKind::Janus, Some(50.0)),
        );
        assert_eq!(c.janus_over_chorus_cpu_per_packet, None);
    }
}
