//! RTP sequence-number and timestamp rewriting for one outgoing stream (one forwarder per
//! subscriber and track).
//!
//! A subscriber sees one continuous stream even when the publisher's source changes
//! underneath it (a new SSRC after the publisher reconnects or renegotiates, or packets
//! the SFU chose not to forward): sequence numbers continue without a jump and
//! timestamps advance by the wall-clock time that passed, so the receiver's jitter
//! buffer neither stalls nor sees a huge gap.

use std::time::Instant;

/// Unwraps 16-bit sequence numbers into a monotonic 64-bit space, picking the candidate
/// closest to the last one seen (handles wrap-around and mild reordering).
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqUnwrapper {
    last: Option<u64>,
}

impl SeqUnwrapper {
    pub fn unwrap(&mut self, seq: u16) -> u64 {
        let Some(last) = self.last else {
            // Start one cycle up so that early reordering below zero stays representable.
            let v = (1u64 << 16) + seq as u64;
            self.last = Some(v);
            return v;
        };
        let base = last & !0xffff;
        let candidates = [
            base.wrapping_sub(1 << 16) | seq as u64,
            base | seq as u64,
            (base + (1 << 16)) | seq as u64,
        ];
        let v = candidates
            .into_iter()
            .min_by_key(|c| c.abs_diff(last))
            .unwrap_or(base | seq as u64);
        if v > last {
            self.last = Some(v);
        }
        v
    }
}

/// Where the current source's numbering maps into the output numbering.
#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    seq: SeqUnwrapper,
    /// Output extended seq = input extended seq + seq_offset.
    seq_offset: i64,
    /// Output timestamp = input timestamp + ts_offset (mod 2^32).
    ts_offset: u32,
    /// First output seq of this source; older input maps below it and is dropped.
    first_out: u64,
}

/// Rewrites (SSRC, seq, ts) of incoming packets into one continuous outgoing stream.
#[derive(Debug, Clone)]
pub struct RtpRewriter {
    clock_rate: u32,
    source: Option<Source>,
    /// The source before the current one: its late packets are dropped rather than
    /// switching back and forth.
    previous_ssrc: Option<u32>,
    /// Highest output extended sequence number emitted so far.
    max_out_seq: u64,
    last_out_ts: u32,
    last_out_at: Option<Instant>,
}

/// A rewritten packet's new numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Extended (64-bit) output sequence number; the wire value is the low 16 bits.
    pub seq: u64,
    pub ts: u32,
}

impl RtpRewriter {
    /// `clock_rate` is the RTP clock of the codec (48000 for Opus).
    pub fn new(clock_rate: u32) -> Self {
        RtpRewriter {
            clock_rate,
            source: None,
            previous_ssrc: None,
            // Output numbering starts at 1; 0 is avoided because some stacks treat it
            // as "unset".
            max_out_seq: 0,
            last_out_ts: 0,
            last_out_at: None,
        }
    }

    /// Maps one incoming packet. `None` means drop it: it belongs to a source we already
    /// switched away from or predates the current source's first forwarded packet.
    pub fn rewrite(&mut self, ssrc: u32, seq: u16, ts: u32, now: Instant) -> Option<Rewritten> {
        let current = self.source.map(|s| s.ssrc);
        if current != Some(ssrc) {
            if self.previous_ssrc == Some(ssrc) && current.is_some() {
                return None;
            }
            self.previous_ssrc = current.or(self.previous_ssrc);
            self.switch_to(ssrc, seq, ts, now);
        }
        let src = self.source.as_mut()?;
        let in_ext = src.seq.unwrap(seq) as i64;
        let out = in_ext + src.seq_offset;
        if out < src.first_out as i64 {
            return None;
        }
        let out = out as u64;
        let out_ts = ts.wrapping_add(src.ts_offset);
        if out > self.max_out_seq {
            self.max_out_seq = out;
            self.last_out_ts = out_ts;
            self.last_out_at = Some(now);
        }
        Some(Rewritten {
            seq: out,
            ts: out_ts,
        })
    }

    /// Tells the rewriter the source's packets from here on continue a new run, as if the
    /// source had changed: used after deliberately not forwarding a stretch of packets
    /// (speaker selection), so the subscriber sees no sequence gap.
    pub fn resync(&mut self) {
        self.source = None;
    }

    fn switch_to(&mut self, ssrc: u32, seq: u16, ts: u32, now: Instant) {
        let mut unwrapper = SeqUnwrapper::default();
        let in_ext = unwrapper.unwrap(seq) as i64;
        let first_out = self.max_out_seq + 1;
        let out_ts = match self.last_out_at {
            None => ts,
            Some(at) => {
                // Advance by elapsed wall-clock time (at least one sample) so the
                // receiver's playout does not see time going backwards.
                let elapsed = now.saturating_duration_since(at);
                let samples =
                    (elapsed.as_micros() as u64 * self.clock_rate as u64 / 1_000_000).max(1);
                self.last_out_ts.wrapping_add(samples as u32)
            }
        };
        self.source = Some(Source {
            ssrc,
            seq: unwrapper,
            seq_offset: first_out as i64 - in_ext,
            ts_offset: out_ts.wrapping_sub(ts),
            first_out,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unwrapper_handles_wrap_and_reorder() {
        let mut u = SeqUnwrapper::default();
        let a = u.unwrap(65534);
        assert_eq!(u.unwrap(65535), a + 1);
        assert_eq!(u.unwrap(0), a + 2);
        assert_eq!(u.unwrap(65535), a + 1, "late packet maps back, not forward");
        assert_eq!(u.unwrap(1), a + 3);
    }

    #[test]
    fn one_source_passes_through_shifted() {
        let t = Instant::now();
        let mut r = RtpRewriter::new(48000);
        let a = r.rewrite(10, 500, 1000, t).unwrap();
        let b = r
            .rewrite(10, 501, 1960, t + Duration::from_millis(20))
            .unwrap();
        assert_eq!(a, Rewritten { seq: 1, ts: 1000 });
        assert_eq!(b, Rewritten { seq: 2, ts: 1960 });
        // Reordered packet keeps its place.
        let c = r
            .rewrite(10, 503, 3880, t + Duration::from_millis(60))
            .unwrap();
        let d = r
            .rewrite(10, 502, 2920, t + Duration::from_millis(61))
            .unwrap();
        assert_eq!((c.seq, d.seq), (4, 3));
    }

    #[test]
    fn source_restart_continues_numbering_and_time() {
        let t = Instant::now();
        let mut r = RtpRewriter::new(48000);
        for i in 0..5u16 {
            r.rewrite(
                1,
                100 + i,
                9000 + i as u32 * 960,
                t + Duration::from_millis(i as u64 * 20),
            );
        }
        // Last out: seq 5, ts 9000+4*960 = 12840 at t+80ms. New SSRC 100 ms later with
        // wildly different numbering.
        let at = t + Duration::from_millis(180);
        let n = r.rewrite(2, 40000, 7, at).unwrap();
        assert_eq!(n.seq, 6);
        assert_eq!(n.ts, 12840 + 4800);
        let n2 = r
            .rewrite(2, 40001, 7 + 960, at + Duration::from_millis(20))
            .unwrap();
        assert_eq!(
            n2,
            Rewritten {
                seq: 7,
                ts: 12840 + 4800 + 960
            }
        );
        // A straggler from the old source is dropped, not sent with a colliding seq.
        assert_eq!(r.rewrite(1, 105, 13800, at), None);
    }

    #[test]
    fn resync_closes_gaps_from_skipped_packets() {
        let t = Instant::now();
        let mut r = RtpRewriter::new(48000);
        r.rewrite(1, 10, 0, t);
        r.rewrite(1, 11, 960, t + Duration::from_millis(20));
        // Packets 12..=61 are not forwarded (one second of silence), then resume.
        r.resync();
        let n = r
            .rewrite(1, 62, 50 * 960 + 960, t + Duration::from_millis(1040))
            .unwrap();
        assert_eq!(n.seq, 3, "no sequence gap after skipped packets");
        assert_eq!(
            n.ts,
            960 + 48960,
            "time advances by the 1020 ms that passed"
        );
    }

    #[test]
    fn timestamps_wrap() {
        let t = Instant::now();
        let mut r = RtpRewriter::new(48000);
        let a = r.rewrite(1, 1, u32::MAX - 100, t).unwrap();
        let b = r
            .rewrite(1, 2, (u32::MAX - 100).wrapping_add(960), t)
            .unwrap();
        assert_eq!(b.ts, a.ts.wrapping_add(960));
    }
}
