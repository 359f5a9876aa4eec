//! Audio levels as RFC 6464 carries them: `0` is 0 dBov (loudest), `127` is -127 dBov
//! (silence). Lower numbers are louder.

/// Level of a block of 16-bit PCM samples in RFC 6464 units (0 loudest … 127 silent),
/// computed from the RMS relative to a full-scale sine... strictly, relative to the
/// largest representable value (dBov), as RFC 6464 §3 defines it.
pub fn dbov_level(samples: &[i16]) -> u8 {
    if samples.is_empty() {
        return 127;
    }
    let sum: f64 = samples.iter().map(|&s| (s as f64) * (s as f64)).sum();
    let rms = (sum / samples.len() as f64).sqrt() / 32768.0;
    if rms <= 0.0 {
        return 127;
    }
    let db = 20.0 * rms.log10();
    (-db).round().clamp(0.0, 127.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_127_and_full_scale_square_is_0() {
        assert_eq!(dbov_level(&[0; 960]), 127);
        assert_eq!(dbov_level(&[]), 127);
        let square: Vec<i16> = (0..960)
            .map(|i| if i % 2 == 0 { 32767 } else { -32768 })
            .collect();
        assert_eq!(dbov_level(&square), 0);
    }

    #[test]
    fn half_amplitude_is_about_6_db_down() {
        let square: Vec<i16> = (0..960)
            .map(|i| if i % 2 == 0 { 16384 } else { -16384 })
            .collect();
        assert_eq!(dbov_level(&square), 6);
    }
}
