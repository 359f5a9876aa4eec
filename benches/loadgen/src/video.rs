//! A simulated camera: three-layer VP8 simulcast (rids `q`, `h`, `f`) sent from
//! pre-encoded IVF files (`benches/video/*.ivf`, made by `benches/video/make-clip.sh`).
//!
//! str0m's frame-mode VP8 packetizer writes no picture id, and the SFU's layer switching
//! and the subscribers' continuity checks need one, so cameras run str0m in RTP mode
//! and packetize here (RFC 7741): every packet has X=1 with I (15-bit picture id), L
//! (TL0PICIDX) and T/K (TID 0, Y, KEYIDX); S=1 and PID=0 mark a frame's first packet;
//! frames are cut at [`MAX_CHUNK`] bytes and the marker bit ends each frame. Each packet
//! ends with the 12-byte stamp (`CLV` + layer, camera index, frame counter); the SFU
//! only reads the descriptor at the start, and nobody decodes the pictures.
//!
//! The clip loops (frame 0 is a keyframe). A keyframe request for a layer makes the
//! next frame of that layer the clip's next keyframe, as a real encoder answers PLI.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use str0m::change::SdpApi;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt, Rid, Simulcast, SimulcastLayer};
use str0m::rtp::RtpWrite;
use str0m::Rtc;

use crate::stats::Shared;

/// Simulcast rids, lowest layer first, and the clip file of each.
pub const RIDS: [&str; 3] = ["q", "h", "f"];
/// Most VP8 bytes per packet (plus a 6-byte descriptor and the 12-byte stamp: well
/// under any MTU).
pub const MAX_CHUNK: usize = 1100;
/// A frame every 1/30 s.
pub const FRAME_INTERVAL: Duration = Duration::from_micros(33_333);
pub const VIDEO_MAGIC: [u8; 3] = *b"CLV";
const DESCRIPTOR_LEN: usize = 6;

/// One encoded VP8 frame.
pub struct Frame {
    pub data: Vec<u8>,
    pub key: bool,
}

/// The three layers' frames, and where each layer's keyframes are.
pub struct VideoClip {
    pub layers: [Vec<Frame>; 3],
    keyframes: [Vec<usize>; 3],
}

/// A VP8 frame is a keyframe when bit 0 (the inverse key-frame flag) of its first
/// byte is 0 (RFC 6386, section 9.1).
fn is_keyframe(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 1 == 0)
}

/// Frames of an IVF file: a 32-byte file header ("DKIF", version, header length, the
/// fourcc, ...) and per frame a 12-byte header (4-byte LE size, 8-byte timestamp).
pub fn parse_ivf(bytes: &[u8]) -> anyhow::Result<Vec<Frame>> {
    if bytes.len() < 32 || &bytes[..4] != b"DKIF" {
        bail!("not an IVF file");
    }
    if &bytes[8..12] != b"VP80" {
        bail!(
            "not VP8 (fourcc {:?})",
            String::from_utf8_lossy(&bytes[8..12])
        );
    }
    let header_len = usize::from(u16::from_le_bytes([bytes[6], bytes[7]])).max(32);
    let mut at = header_len;
    let mut frames = Vec::new();
    while at < bytes.len() {
        let Some(h) = bytes.get(at..at + 12) else {
            bail!("truncated frame header at byte {at}");
        };
        let size = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let Some(data) = bytes.get(at + 12..at + 12 + size) else {
            bail!("frame at byte {at} says {size} bytes; the file ends first");
        };
        if data.is_empty() {
            bail!("empty frame at byte {at}");
        }
        frames.push(Frame {
            key: is_keyframe(data),
            data: data.to_vec(),
        });
        at += 12 + size;
    }
    if !frames.first().is_some_and(|f| f.key) {
        bail!("the first frame is not a keyframe (the clip could not loop)");
    }
    Ok(frames)
}

impl VideoClip {
    /// Loads `q.ivf`, `h.ivf` and `f.ivf` from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<VideoClip> {
        let mut layers: [Vec<Frame>; 3] = Default::default();
        for (i, rid) in RIDS.iter().enumerate() {
            let path = dir.join(format!("{rid}.ivf"));
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "reading the camera clip {} (make it with benches/video/make-clip.sh, \
                     or pass --video-dir)",
                    path.display()
                )
            })?;
            layers[i] = parse_ivf(&bytes).with_context(|| format!("{}", path.display()))?;
        }
        Ok(Self::from_layers(layers))
    }

    pub fn from_layers(layers: [Vec<Frame>; 3]) -> VideoClip {
        let keyframes = [0, 1, 2].map(|l| {
            layers[l]
                .iter()
                .enumerate()
                .filter(|(_, f)| f.key)
                .map(|(i, _)| i)
                .collect()
        });
        VideoClip { layers, keyframes }
    }

    /// The first keyframe at or after `pos` (wrapping to frame 0).
    fn next_keyframe(&self, layer: usize, pos: usize) -> usize {
        self.keyframes[layer]
            .iter()
            .copied()
            .find(|&k| k >= pos)
            .unwrap_or(0)
    }
}

/// Where the camera clip is: `--video-dir`, else `benches/video` under the current
/// directory (the repository root, where the commands in benches/README.md run), else
/// next to this crate's source.
pub fn clip_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(d) = flag {
        return d.to_path_buf();
    }
    let cwd = Path::new("benches/video");
    if cwd.join("f.ivf").exists() {
        return cwd.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../video")
}

/// Adds the simulcast camera m-section (send only, rids q/h/f) to an offer.
pub fn add_camera(api: &mut SdpApi) -> Mid {
    let mut sim = Simulcast::new();
    for r in RIDS {
        sim.add_send_layer(SimulcastLayer::new(r));
    }
    api.add_media(MediaKind::Video, Direction::SendOnly, None, None, Some(sim))
}

struct Layer {
    /// Next clip frame to send.
    pos: usize,
    seq: u64,
    picture_id: u16,
    tl0: u8,
    key_idx: u8,
    key_due: bool,
}

/// The sending side of one camera.
pub struct VideoSender {
    camera: u32,
    mid: Mid,
    pt: Option<Pt>,
    layers: [Layer; 3],
    start: Instant,
    ts_base: [u32; 3],
    frame_no: u32,
    payload: Vec<u8>,
}

impl VideoSender {
    pub fn new(index: usize, camera: u32, mid: Mid) -> VideoSender {
        // Different starting points per camera and layer, as independent encoders
        // would have; the SFU must rewrite them into one continuous down track.
        let k = index as u32 + 1;
        let layer = |l: u32| Layer {
            pos: 0,
            seq: u64::from(k.wrapping_mul(7919).wrapping_add(l * 20_000) % 60_000),
            picture_id: (k.wrapping_mul(4099).wrapping_add(l * 9_000) % 32_768) as u16,
            tl0: (k * 31 + l * 50) as u8,
            key_idx: (k + l) as u8 & 0x1f,
            // The clip starts at frame 0, a keyframe, anyway.
            key_due: false,
        };
        VideoSender {
            camera,
            mid,
            pt: None,
            layers: [layer(0), layer(1), layer(2)],
            start: Instant::now(),
            ts_base: [0, 1, 2].map(|l: u32| 0x0765_4321u32.wrapping_mul(k + l)),
            frame_no: 0,
            payload: Vec::with_capacity(MAX_CHUNK + 32),
        }
    }

    /// The SFU asked for a keyframe of `rid` (all layers when it names none).
    pub fn request_keyframe(&mut self, rid: Option<Rid>, shared: &Shared) {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            if rid.is_none_or(|r| *r == *RIDS[l]) {
                layer.key_due = true;
                shared.video.keyframe_requests[l].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// One frame on every layer the session can send yet.
    pub fn tick(&mut self, rtc: &mut Rtc, clip: &VideoClip, shared: &Shared) {
        if self.pt.is_none() {
            self.pt = rtc
                .codec_config()
                .iter()
                .find(|p| p.spec().codec == Codec::Vp8)
                .map(|p| p.pt());
        }
        let Some(pt) = self.pt else { return };
        let now = Instant::now();
        self.frame_no = self.frame_no.wrapping_add(1);
        let counter = self.frame_no;
        shared
            .video
            .sent
            .stamp(self.camera, counter, shared.elapsed_ns(now));
        // RTP time follows the wall clock (90 kHz), so a late tick is a longer frame,
        // not a drift.
        let elapsed = now.saturating_duration_since(self.start);
        let ticks = (elapsed.as_micros() * 9 / 100) as u32;
        let mut api = rtc.direct_api();
        for (l, rid) in RIDS.iter().enumerate() {
            let Some(tx) = api.stream_tx_by_mid(self.mid, Some(Rid::from(*rid))) else {
                continue;
            };
            let layer = &mut self.layers[l];
            let frames = &clip.layers[l];
            if layer.key_due {
                layer.key_due = false;
                if !frames[layer.pos % frames.len()].key {
                    layer.pos = clip.next_keyframe(l, layer.pos);
                }
            }
            let frame = &frames[layer.pos % frames.len()];
            layer.pos = (layer.pos + 1) % frames.len();
            if frame.key {
                layer.key_idx = (layer.key_idx + 1) & 0x1f;
            }
            let ts = self.ts_base[l].wrapping_add(ticks);
            let chunks = frame.data.len().div_ceil(MAX_CHUNK);
            for (i, chunk) in frame.data.chunks(MAX_CHUNK).enumerate() {
                self.payload.clear();
                // X=1, S on the first packet, PID 0 | I, L, T, K | M=1 + 15-bit picture
                // id | TL0PICIDX | TID 0, Y=1, KEYIDX.
                self.payload.extend_from_slice(&[
                    0x80 | if i == 0 { 0x10 } else { 0 },
                    0xf0,
                    0x80 | (layer.picture_id >> 8) as u8,
                    layer.picture_id as u8,
                    layer.tl0,
                    0x20 | layer.key_idx,
                ]);
                debug_assert_eq!(self.payload.len(), DESCRIPTOR_LEN);
                self.payload.extend_from_slice(chunk);
                self.payload.extend_from_slice(&VIDEO_MAGIC);
                self.payload.push(l as u8);
                self.payload.extend_from_slice(&self.camera.to_be_bytes());
                self.payload.extend_from_slice(&counter.to_be_bytes());
                tx.write_rtp(
                    RtpWrite::new(pt, layer.seq.into(), ts, now, self.payload.as_slice())
                        .marker(i + 1 == chunks)
                        .nackable(true),
                );
                layer.seq += 1;
            }
            layer.picture_id = (layer.picture_id + 1) & 0x7fff;
            layer.tl0 = layer.tl0.wrapping_add(1);
            shared
                .tx_packets
                .fetch_add(chunks as u64, Ordering::Relaxed);
            shared
                .video
                .c
                .tx_packets
                .fetch_add(chunks as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ivf(frames: &[&[u8]]) -> Vec<u8> {
        let mut v = b"DKIF".to_vec();
        v.extend_from_slice(&0u16.to_le_bytes());
        v.extend_from_slice(&32u16.to_le_bytes());
        v.extend_from_slice(b"VP80");
        v.resize(32, 0);
        for f in frames {
            v.extend_from_slice(&(f.len() as u32).to_le_bytes());
            v.extend_from_slice(&[0; 8]);
            v.extend_from_slice(f);
        }
        v
    }

    #[test]
    fn ivf_frames_and_keyframe_bits() {
        let f = parse_ivf(&ivf(&[&[0x10, 1, 2], &[0x11, 9], &[0x30]])).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(f[1].data, vec![0x11, 9]);
        assert_eq!(
            f.iter().map(|f| f.key).collect::<Vec<_>>(),
            [true, false, true]
        );
    }

    #[test]
    fn bad_ivf_is_an_error_not_a_panic() {
        assert!(parse_ivf(b"nope").is_err());
        // Starts with a delta frame: cannot loop.
        assert!(parse_ivf(&ivf(&[&[0x11], &[0x10]])).is_err());
        // A frame size past the end.
        let mut v = ivf(&[&[0x10, 1]]);
        v[32] = 200;
        assert!(parse_ivf(&v).is_err());
        let mut v = ivf(&[&[0x10]]);
        v[8..12].copy_from_slice(b"VP90");
        assert!(parse_ivf(&v).is_err());
    }

    #[test]
    fn keyframe_request_jumps_to_the_next_keyframe() {
        let layer = || {
            (0..30)
                .map(|i| Frame {
                    data: vec![if i % 15 == 0 { 0 } else { 1 }],
                    key: i % 15 == 0,
                })
                .collect::<Vec<_>>()
        };
        let clip = VideoClip::from_layers([layer(), layer(), layer()]);
        assert_eq!(clip.next_keyframe(0, 3), 15);
        assert_eq!(clip.next_keyframe(0, 15), 15);
        assert_eq!(clip.next_keyframe(0, 16), 0);
    }

    #[test]
    fn the_committed_clip_has_three_layers_with_keyframes_every_15_frames() {
        let clip = VideoClip::load(&clip_dir(None)).unwrap();
        for l in 0..3 {
            assert!(clip.layers[l].len() >= 15);
            assert_eq!(clip.keyframes[l][0], 0);
        }
        // Higher layers are bigger.
        let bytes = |l: usize| clip.layers[l].iter().map(|f| f.data.len()).sum::<usize>();
        assert!(bytes(0) < bytes(1) && bytes(1) < bytes(2));
    }
}
