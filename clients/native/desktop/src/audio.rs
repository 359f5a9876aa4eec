//! Microphone and speakers through cpal, as the session's [`AudioSource`] and
//! [`AudioSink`].
//!
//! The cpal callbacks run on the sound card's clock and the session on its own 20 ms
//! clock, so each direction has a lock-free single-producer/single-consumer ring of mono
//! `f32` samples at the device's rate between them:
//!
//! ```text
//! capture:  cpal callback (any format, N channels) → downmix → ring → CpalSource::read
//!           (resample to 48 kHz, level meter) → session
//! playback: session → CpalSink::write (resample to the device rate) → ring → cpal
//!           callback (copy to every channel, any format)
//! ```
//!
//! Both rings are kept short: the reader drops the oldest samples when the backlog
//! grows (clock drift, or a stream that started before the session read from it), and
//! starts over with a small cushion after an underrun.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use chorus_native::audio::Frame;
use chorus_native::session::{AudioSink, AudioSource};
use chorus_native::wav::Resampler;
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{FromSample, SampleFormat, SizedSample, StreamConfig};
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use crate::dsp::{self, FLOOR_DBFS, PIPELINE_HZ};

/// Samples in one 20 ms pipeline frame.
const FRAME: usize = 960;

/// The devices the default host offers, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceList {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub default_input: Option<String>,
    pub default_output: Option<String>,
}

/// Lists input and output devices. Never fails: a machine without sound hardware (CI)
/// just has empty lists.
pub fn list_devices() -> DeviceList {
    let host = cpal::default_host();
    let names = |it: Result<Vec<cpal::Device>, cpal::Error>| -> Vec<String> {
        let mut v: Vec<String> = it
            .map(|d| d.iter().map(|d| d.to_string()).collect())
            .unwrap_or_default();
        v.dedup();
        v
    };
    DeviceList {
        inputs: names(host.input_devices().map(Iterator::collect)),
        outputs: names(host.output_devices().map(Iterator::collect)),
        default_input: host.default_input_device().map(|d| d.to_string()),
        default_output: host.default_output_device().map(|d| d.to_string()),
    }
}

/// The microphone level in dBFS, written by the capture side every 20 ms and read by
/// the UI every frame. An `f32` in an atomic: no lock between the two.
#[derive(Debug, Clone)]
pub struct LevelMeter(Arc<AtomicU32>);

impl Default for LevelMeter {
    fn default() -> Self {
        LevelMeter(Arc::new(AtomicU32::new(FLOOR_DBFS.to_bits())))
    }
}

impl LevelMeter {
    pub fn set(&self, dbfs: f32) {
        self.0.store(dbfs.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// The last error a device's stream reported (cpal reports them on its own thread,
/// outside the audio callback, so a mutex is fine here).
#[derive(Debug, Clone, Default)]
pub struct DeviceFault(Arc<Mutex<Option<String>>>);

impl DeviceFault {
    fn report(&self, e: String) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(e);
        }
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

/// An open device stream and what the UI shows about it. Dropping it stops the device.
pub struct OpenStream {
    /// Kept only to keep the stream running (cpal stops it on drop).
    _stream: cpal::Stream,
    /// e.g. "USB Mic (44100 Hz, 2 ch, i16)".
    pub description: String,
    pub fault: DeviceFault,
}

fn pick(
    devices: Vec<cpal::Device>,
    default: Option<cpal::Device>,
    want: Option<&str>,
) -> Option<cpal::Device> {
    match want {
        Some(name) => devices
            .into_iter()
            .find(|d| d.to_string() == name)
            // A saved device that is gone (unplugged) falls back to the default.
            .or(default),
        None => default,
    }
}

/// The formats our conversion code handles, most preferred first.
const FORMATS: [SampleFormat; 8] = [
    SampleFormat::F32,
    SampleFormat::I16,
    SampleFormat::I32,
    SampleFormat::F64,
    SampleFormat::I8,
    SampleFormat::U8,
    SampleFormat::U16,
    SampleFormat::U32,
];

/// The device's default config if we can convert its format, else a supported config
/// in one of [`FORMATS`] near 48 kHz.
fn choose_config(
    default: Result<cpal::SupportedStreamConfig, cpal::Error>,
    supported: Result<Vec<cpal::SupportedStreamConfigRange>, cpal::Error>,
) -> anyhow::Result<(StreamConfig, SampleFormat)> {
    if let Ok(c) = &default {
        if FORMATS.contains(&c.sample_format()) {
            return Ok((c.config(), c.sample_format()));
        }
    }
    let ranges = supported.map_err(|e| anyhow!("{e}"))?;
    for f in FORMATS {
        if let Some(r) = ranges.iter().find(|r| r.sample_format() == f) {
            let rate = PIPELINE_HZ.clamp(r.min_sample_rate(), r.max_sample_rate());
            let c = r.with_sample_rate(rate);
            return Ok((c.config(), f));
        }
    }
    match default {
        Ok(c) => Err(anyhow!("unsupported sample format {}", c.sample_format())),
        Err(e) => Err(anyhow!("no usable configuration: {e}")),
    }
}

fn describe(name: &str, config: &StreamConfig, format: SampleFormat) -> String {
    format!(
        "{name} ({} Hz, {} ch, {format})",
        config.sample_rate, config.channels
    )
}

/// Opens the microphone (`name`, or the system default) and returns its stream and the
/// session's source. `Ok(None)` when the machine has no input device at all.
pub fn open_input(
    name: Option<&str>,
    meter: LevelMeter,
) -> anyhow::Result<Option<(OpenStream, CpalSource)>> {
    let host = cpal::default_host();
    let devices: Vec<cpal::Device> = host
        .input_devices()
        .map(Iterator::collect)
        .unwrap_or_default();
    let Some(device) = pick(devices, host.default_input_device(), name) else {
        return Ok(None);
    };
    let dev_name = device.to_string();
    let (config, format) = choose_config(
        device.default_input_config(),
        device.supported_input_configs().map(Iterator::collect),
    )
    .with_context(|| format!("input device {dev_name}"))?;
    let rate = config.sample_rate;
    let channels = usize::from(config.channels.max(1));
    // Half a second of mono samples: far more than the reader lets pile up.
    let (prod, cons) = HeapRb::<f32>::new(rate as usize / 2 + FRAME * 4).split();
    let fault = DeviceFault::default();
    let stream = match format {
        SampleFormat::F32 => build_input::<f32>(&device, &config, channels, prod, fault.clone()),
        SampleFormat::F64 => build_input::<f64>(&device, &config, channels, prod, fault.clone()),
        SampleFormat::I8 => build_input::<i8>(&device, &config, channels, prod, fault.clone()),
        SampleFormat::I16 => build_input::<i16>(&device, &config, channels, prod, fault.clone()),
        SampleFormat::I32 => build_input::<i32>(&device, &config, channels, prod, fault.clone()),
        SampleFormat::U8 => build_input::<u8>(&device, &config, channels, prod, fault.clone()),
        SampleFormat::U16 => build_input::<u16>(&device, &config, channels, prod, fault.clone()),
        SampleFormat::U32 => build_input::<u32>(&device, &config, channels, prod, fault.clone()),
        other => Err(anyhow!("unsupported sample format {other}")),
    }
    .with_context(|| format!("opening input device {dev_name}"))?;
    stream
        .play()
        .with_context(|| format!("starting input device {dev_name}"))?;
    let source = CpalSource::new(cons, rate, meter);
    Ok(Some((
        OpenStream {
            _stream: stream,
            description: describe(&dev_name, &config, format),
            fault,
        },
        source,
    )))
}

fn build_input<T>(
    device: &cpal::Device,
    config: &StreamConfig,
    channels: usize,
    mut prod: HeapProd<f32>,
    fault: DeviceFault,
) -> anyhow::Result<cpal::Stream>
where
    T: SizedSample + Send + 'static,
    f32: FromSample<T>,
{
    let stream = device.build_input_stream::<T, _, _>(
        *config,
        move |data: &[T], _| {
            // Downmix each interleaved frame; when the ring is full (nobody reading
            // yet) the newest samples are dropped, the reader skips stale ones anyway.
            let mono = data
                .chunks(channels)
                .map(|f| dsp::downmix(f, |s| s.to_sample::<f32>()));
            prod.push_iter(mono);
        },
        move |e| {
            tracing::warn!("input stream: {e}");
            fault.report(e.to_string());
        },
        None,
    )?;
    Ok(stream)
}

/// Opens the speakers (`name`, or the system default). `Ok(None)` when the machine has
/// no output device at all.
pub fn open_output(name: Option<&str>) -> anyhow::Result<Option<(OpenStream, CpalSink)>> {
    let host = cpal::default_host();
    let devices: Vec<cpal::Device> = host
        .output_devices()
        .map(Iterator::collect)
        .unwrap_or_default();
    let Some(device) = pick(devices, host.default_output_device(), name) else {
        return Ok(None);
    };
    let dev_name = device.to_string();
    let (config, format) = choose_config(
        device.default_output_config(),
        device.supported_output_configs().map(Iterator::collect),
    )
    .with_context(|| format!("output device {dev_name}"))?;
    let rate = config.sample_rate;
    let channels = usize::from(config.channels.max(1));
    let (prod, cons) = HeapRb::<f32>::new(rate as usize / 2 + FRAME * 4).split();
    let fault = DeviceFault::default();
    let out = OutputState::new(cons, rate);
    let stream = match format {
        SampleFormat::F32 => build_output::<f32>(&device, &config, channels, out, fault.clone()),
        SampleFormat::F64 => build_output::<f64>(&device, &config, channels, out, fault.clone()),
        SampleFormat::I8 => build_output::<i8>(&device, &config, channels, out, fault.clone()),
        SampleFormat::I16 => build_output::<i16>(&device, &config, channels, out, fault.clone()),
        SampleFormat::I32 => build_output::<i32>(&device, &config, channels, out, fault.clone()),
        SampleFormat::U8 => build_output::<u8>(&device, &config, channels, out, fault.clone()),
        SampleFormat::U16 => build_output::<u16>(&device, &config, channels, out, fault.clone()),
        SampleFormat::U32 => build_output::<u32>(&device, &config, channels, out, fault.clone()),
        other => Err(anyhow!("unsupported sample format {other}")),
    }
    .with_context(|| format!("opening output device {dev_name}"))?;
    stream
        .play()
        .with_context(|| format!("starting output device {dev_name}"))?;
    Ok(Some((
        OpenStream {
            _stream: stream,
            description: describe(&dev_name, &config, format),
            fault,
        },
        CpalSink::new(prod, rate),
    )))
}

/// The playback callback's side of the ring: starts playing once a small cushion has
/// built up, and trims the backlog when the session runs ahead of the sound card.
struct OutputState {
    cons: HeapCons<f32>,
    playing: bool,
    cushion: usize,
    max_backlog: usize,
}

impl OutputState {
    fn new(cons: HeapCons<f32>, rate: u32) -> Self {
        let ms = |n: u32| (rate as usize * n as usize) / 1000;
        OutputState {
            cons,
            playing: false,
            cushion: ms(40),
            max_backlog: ms(200),
        }
    }

    fn next(&mut self) -> f32 {
        if !self.playing {
            if self.cons.occupied_len() < self.cushion {
                return 0.0;
            }
            self.playing = true;
        }
        match self.cons.try_pop() {
            Some(s) => s,
            None => {
                // Underrun: wait for the cushion again rather than crackle.
                self.playing = false;
                0.0
            }
        }
    }

    fn trim(&mut self) {
        let backlog = self.cons.occupied_len();
        if backlog > self.max_backlog {
            self.cons.skip(backlog - self.cushion);
        }
    }
}

fn build_output<T>(
    device: &cpal::Device,
    config: &StreamConfig,
    channels: usize,
    mut state: OutputState,
    fault: DeviceFault,
) -> anyhow::Result<cpal::Stream>
where
    T: SizedSample + FromSample<f32> + Send + 'static,
{
    let stream = device.build_output_stream::<T, _, _>(
        *config,
        move |data: &mut [T], _| {
            state.trim();
            for frame in data.chunks_mut(channels) {
                let s = T::from_sample(state.next());
                frame.fill(s);
            }
        },
        move |e| {
            tracing::warn!("output stream: {e}");
            fault.report(e.to_string());
        },
        None,
    )?;
    Ok(stream)
}

/// The microphone as the session sees it: 48 kHz mono frames from the capture ring.
pub struct CpalSource {
    cons: HeapCons<f32>,
    resampler: Resampler,
    /// Device samples needed for one 48 kHz frame (plus interpolation slack).
    need: usize,
    cushion: usize,
    max_backlog: usize,
    running: bool,
    scratch: [f32; FRAME],
    meter: LevelMeter,
}

impl CpalSource {
    fn new(cons: HeapCons<f32>, rate: u32, meter: LevelMeter) -> Self {
        let ms = |n: u32| (rate as usize * n as usize) / 1000;
        CpalSource {
            cons,
            resampler: Resampler::new(rate),
            need: ms(20) + 2,
            cushion: ms(20),
            max_backlog: ms(120),
            running: false,
            scratch: [0.0; FRAME],
            meter,
        }
    }
}

impl AudioSource for CpalSource {
    fn read(&mut self, frame: &mut Frame) -> bool {
        let backlog = self.cons.occupied_len();
        // Keep latency bounded: the session starts reading only once media is up, and
        // the device clock drifts against ours.
        if backlog > self.need + self.max_backlog {
            self.cons.skip(backlog - self.need - self.cushion);
        }
        let backlog = self.cons.occupied_len();
        let wanted = if self.running {
            self.need
        } else {
            self.need + self.cushion
        };
        if backlog < wanted {
            // Underrun (or still filling): a silent frame, then a fresh cushion.
            self.running = false;
            frame.fill(0);
            self.meter.set(FLOOR_DBFS);
            return true;
        }
        self.running = true;
        let cons = &mut self.cons;
        let n = self.resampler.fill(&mut self.scratch, || cons.try_pop());
        for (o, s) in frame.iter_mut().zip(self.scratch[..n].iter()) {
            *o = dsp::to_i16(*s);
        }
        frame[n..].fill(0);
        self.meter.set(dsp::dbfs(frame));
        true
    }
}

/// The speakers as the session sees it: 48 kHz mono frames into the playback ring.
pub struct CpalSink {
    prod: HeapProd<f32>,
    resampler: dsp::LinearResampler,
    scratch: [f32; FRAME],
}

impl CpalSink {
    fn new(prod: HeapProd<f32>, rate: u32) -> Self {
        CpalSink {
            prod,
            resampler: dsp::LinearResampler::new(PIPELINE_HZ, rate),
            scratch: [0.0; FRAME],
        }
    }
}

impl AudioSink for CpalSink {
    fn write(&mut self, frame: &Frame) {
        for (o, s) in self.scratch.iter_mut().zip(frame.iter()) {
            *o = dsp::from_i16(*s);
        }
        let prod = &mut self.prod;
        // A full ring means the device stalled: drop rather than block the session.
        self.resampler.process(&self.scratch, |s| {
            let _ = prod.try_push(s);
        });
    }
}

/// A silent microphone that still reports a level (the floor), for machines without
/// an input device.
pub struct SilentSource(pub LevelMeter);

impl AudioSource for SilentSource {
    fn read(&mut self, frame: &mut Frame) -> bool {
        frame.fill(0);
        self.0.set(FLOOR_DBFS);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(rate: u32) -> (HeapProd<f32>, CpalSource, LevelMeter) {
        let meter = LevelMeter::default();
        let (prod, cons) = HeapRb::<f32>::new(rate as usize).split();
        (prod, CpalSource::new(cons, rate, meter.clone()), meter)
    }

    #[test]
    fn source_waits_for_a_cushion_then_resamples() {
        let (mut prod, mut src, meter) = source(44_100);
        let mut frame = [1i16; FRAME];
        assert!(src.read(&mut frame));
        assert!(frame.iter().all(|&s| s == 0), "silence while empty");
        // 60 ms of a -6 dBFS-ish square wave at 44.1 kHz.
        for i in 0..2_646 {
            let _ = prod.try_push(if i % 100 < 50 { 0.5 } else { -0.5 });
        }
        assert!(src.read(&mut frame));
        let db = meter.get();
        assert!((-7.0..=-5.0).contains(&db), "{db}");
        // 20 ms at 44.1 kHz is 882 input samples for 960 outputs.
        let left = prod.occupied_len();
        assert!((880..=885).contains(&(2_646 - left)), "{left}");
    }

    #[test]
    fn source_drops_a_stale_backlog() {
        let (mut prod, mut src, _) = source(48_000);
        for _ in 0..48_000 / 2 {
            let _ = prod.try_push(0.1);
        }
        let mut frame = [0i16; FRAME];
        src.read(&mut frame);
        // At most the cushion is left after one read.
        assert!(prod.occupied_len() <= 960 * 2, "{}", prod.occupied_len());
    }

    #[test]
    fn sink_resamples_into_the_ring() {
        let (prod, mut cons) = HeapRb::<f32>::new(48_000).split();
        let mut sink = CpalSink::new(prod, 44_100);
        let frame = [16_384i16; FRAME];
        for _ in 0..50 {
            sink.write(&frame);
        }
        let n = cons.occupied_len();
        assert!((44_090..=44_100).contains(&n), "{n}");
        assert!((cons.try_pop().unwrap_or(0.0) - 0.5).abs() < 1e-3);
    }

    #[test]
    fn output_plays_after_the_cushion_and_rebuffers_on_underrun() {
        let (mut prod, cons) = HeapRb::<f32>::new(48_000).split();
        let mut out = OutputState::new(cons, 48_000);
        let _ = prod.try_push(0.5);
        assert_eq!(out.next(), 0.0, "not yet: below the cushion");
        for _ in 0..2_000 {
            let _ = prod.try_push(0.5);
        }
        assert_eq!(out.next(), 0.5);
        while out.cons.occupied_len() > 0 {
            out.next();
        }
        assert_eq!(out.next(), 0.0);
        assert!(!out.playing);
        for _ in 0..20_000 {
            let _ = prod.try_push(0.25);
        }
        out.trim();
        assert_eq!(out.cons.occupied_len(), out.cushion);
    }
}
