//! What a run reports: the per-run summary (JSON with `--report`, text on stderr), the
//! consistency problems `--check` fails on, and the two-run reports (Chorus vs Janus,
//! audio-only vs with cameras).

use std::collections::HashMap;

use anyhow::Context;
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

/// Video consistency: every subscriber gets complete frames from every other camera of
/// its room (and none from elsewhere), on the top layer, and the descriptors the SFU
/// rewrote are continuous.
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
        for (c, l) in &r.video.not_high {
            errors.push(format!(
                "{} in {} receives camera {c} on layer {}, not the top layer",
                r.identity,
                r.room,
                video::RIDS[usize::from(*l)]
            ));
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
        let (c, j) = (&self.chorus, &self.janus);
        let f = |v: Option<f64>, prec: usize| {
            v.map(|x| format!("{x:.prec$}"))
                .unwrap_or_else(|| "n/a".into())
        };
        // One figure of each run per row; Chorus-only figures say n/a for Janus.
        let both = |pick: fn(&Report) -> Option<f64>, prec| (f(pick(c), prec), f(pick(j), prec));
        let rows = [
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
        eprintln!(
            "── Janus comparison: {} ({} participants, {} speakers; {:.1} s / {:.1} s measured)",
            c.scenario, c.participants, c.speakers, c.measured_secs, j.measured_secs
        );
        for (what, (a, b)) in rows {
            eprintln!("  {what:<34} {a:>14} {b:>14}");
        }
        eprintln!(
            "  Janus / Chorus CPU per packet: {} (kernel part: {})",
            f(self.janus_over_chorus_cpu_per_packet, 2),
            f(self.janus_over_chorus_sys_per_packet, 2)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
