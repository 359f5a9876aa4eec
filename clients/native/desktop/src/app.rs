//! The window: a join form, then the channel (participants, controls, chat).
//!
//! All state lives here on the UI thread; the session runs on its own thread
//! ([`crate::client`]) and the sound card on cpal's threads ([`crate::audio`]). Every
//! frame the app drains the session's updates, so what is drawn is always the latest
//! known state.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_native::session::{AudioSink, AudioSource, Command, Event, Silence};
use chorus_protocol::chat::{ChatMessage, ChatServerFrame, MAX_CHAT_CHARS};
use chorus_protocol::client::ParticipantInfo;
use eframe::egui::{self, Color32, RichText};

use crate::audio::{self, DeviceList, LevelMeter, OpenStream, SilentSource};
use crate::client::{JoinRequest, Login, SessionHandle, Update};
use crate::dsp::FLOOR_DBFS;
use crate::settings::{self, GateMode, Settings};

const GREEN: Color32 = Color32::from_rgb(67, 181, 129);
const AMBER: Color32 = Color32::from_rgb(240, 178, 50);
const RED: Color32 = Color32::from_rgb(237, 66, 69);
const MUTED_TEXT: Color32 = Color32::from_rgb(150, 152, 160);

/// How the app was started (from the command line).
#[derive(Debug, Clone, Default)]
pub struct Startup {
    pub settings: Settings,
    pub settings_path: Option<PathBuf>,
    pub settings_warning: Option<String>,
    pub token: Option<String>,
    pub auto_join: bool,
    pub no_audio: bool,
    pub screenshot: Option<(PathBuf, Duration)>,
    /// A chat message to send once chat is connected (automation).
    pub say: Option<String>,
}

/// Where the join form is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoginMode {
    Dev,
    Token,
}

/// The media/signaling state for the status line.
#[derive(Debug, Clone, PartialEq)]
enum Link {
    /// Dev login and the signaling join.
    Joining,
    /// Joined; ICE/DTLS not up yet.
    Negotiating,
    Connected,
    Reconnecting(u32),
}

/// One open channel.
struct Channel {
    session: SessionHandle,
    /// The devices run as long as these live; dropped on leave.
    input_stream: Option<OpenStream>,
    output_stream: Option<OpenStream>,
    input_status: DeviceStatus,
    output_status: DeviceStatus,
    link: Link,
    room: String,
    me: Option<ParticipantInfo>,
    /// Others, in the order they joined.
    others: Vec<ParticipantInfo>,
    chat: Vec<ChatMessage>,
    chat_ready: bool,
    chat_notice: Option<String>,
    typing: BTreeMap<String, (String, Instant)>,
    draft: String,
    sent_typing: bool,
    transmitting: bool,
    muted: bool,
    deafened: bool,
    ptt_down: bool,
    leaving: bool,
    notice: Option<String>,
}

/// What the UI says about a sound device.
#[derive(Debug, Clone)]
struct DeviceStatus {
    ok: bool,
    text: String,
    detail: Option<String>,
}

/// The `--screenshot` sequence: wait, ask the renderer for the pixels, then leave and
/// close the window.
enum Shot {
    Waiting,
    Requested {
        at: Instant,
        result: Arc<Mutex<Option<Result<(), String>>>>,
    },
    Closing(Instant),
}

struct Automation {
    path: PathBuf,
    after: Duration,
    started: Instant,
    shot: Shot,
}

pub struct ChorusApp {
    settings: Settings,
    settings_path: Option<PathBuf>,
    settings_dirty: Option<Instant>,
    /// Problems worth a line in the form (settings file, saving).
    warning: Option<String>,
    devices: DeviceList,
    no_audio: bool,
    mode: LoginMode,
    token: String,
    join_error: Option<String>,
    channel: Option<Channel>,
    meter: LevelMeter,
    capturing_key: bool,
    automation: Option<Automation>,
    say: Option<String>,
    exit_code: Arc<AtomicI32>,
}

impl ChorusApp {
    pub fn new(
        cc: &eframe::CreationContext<'_>,
        startup: Startup,
        exit_code: Arc<AtomicI32>,
    ) -> Self {
        style(&cc.egui_ctx);
        let devices = if startup.no_audio {
            DeviceList::default()
        } else {
            audio::list_devices()
        };
        let mut app = ChorusApp {
            mode: if startup.token.is_some() {
                LoginMode::Token
            } else {
                LoginMode::Dev
            },
            token: startup.token.clone().unwrap_or_default(),
            settings: startup.settings,
            settings_path: startup.settings_path,
            settings_dirty: None,
            warning: startup.settings_warning,
            devices,
            no_audio: startup.no_audio,
            join_error: None,
            channel: None,
            meter: LevelMeter::default(),
            capturing_key: false,
            automation: startup.screenshot.map(|(path, after)| Automation {
                path,
                after,
                started: Instant::now(),
                shot: Shot::Waiting,
            }),
            say: startup.say,
            exit_code,
        };
        if startup.auto_join {
            app.join(&cc.egui_ctx);
        }
        app
    }

    fn save_settings(&mut self) {
        self.settings_dirty = None;
        let Some(path) = &self.settings_path else {
            return;
        };
        if let Err(e) = self.settings.save(path) {
            self.warning = Some(format!("settings not saved: {e:#}"));
        }
    }

    /// Saved a second after the last change, so dragging a slider writes once.
    fn settings_changed(&mut self) {
        self.settings_dirty = Some(Instant::now());
    }

    fn join(&mut self, ctx: &egui::Context) {
        self.join_error = None;
        let url = self.settings.server_url.trim().to_string();
        let login = match self.mode {
            LoginMode::Dev => {
                let name = self.settings.name.trim().to_string();
                let room = self.settings.room.trim().to_string();
                if name.is_empty() || room.is_empty() {
                    self.join_error = Some("Enter a name and a room for dev login.".into());
                    return;
                }
                Login::Dev { name, room }
            }
            LoginMode::Token => {
                let t = self.token.trim().to_string();
                if t.is_empty() {
                    self.join_error = Some("Paste an access token.".into());
                    return;
                }
                Login::Token(t)
            }
        };
        if url.is_empty() {
            self.join_error = Some("Enter the server URL, e.g. http://127.0.0.1:7880.".into());
            return;
        }
        self.save_settings();

        // Devices: fall back to silence rather than refusing to join, so a machine
        // without a sound card can still listen to the chat or be a silent seat.
        let (input, input_status, source): (
            Option<OpenStream>,
            DeviceStatus,
            Box<dyn AudioSource>,
        ) = if self.no_audio {
            (
                None,
                DeviceStatus::off("audio devices off (--no-audio)"),
                Box::new(SilentSource(self.meter.clone())),
            )
        } else {
            match audio::open_input(self.settings.input_device.as_deref(), self.meter.clone()) {
                Ok(Some((stream, source))) => {
                    let s = DeviceStatus::on(&stream.description);
                    (Some(stream), s, Box::new(source))
                }
                Ok(None) => (
                    None,
                    DeviceStatus::off("no input device"),
                    Box::new(SilentSource(self.meter.clone())),
                ),
                Err(e) => {
                    tracing::warn!("input device: {e:#}");
                    (
                        None,
                        DeviceStatus::failed("no input device", e),
                        Box::new(SilentSource(self.meter.clone())),
                    )
                }
            }
        };
        let (output, output_status, sink): (Option<OpenStream>, DeviceStatus, Box<dyn AudioSink>) =
            if self.no_audio {
                (
                    None,
                    DeviceStatus::off("audio devices off (--no-audio)"),
                    Box::new(Silence),
                )
            } else {
                match audio::open_output(self.settings.output_device.as_deref()) {
                    Ok(Some((stream, sink))) => {
                        let s = DeviceStatus::on(&stream.description);
                        (Some(stream), s, Box::new(sink))
                    }
                    Ok(None) => (
                        None,
                        DeviceStatus::off("no output device"),
                        Box::new(Silence),
                    ),
                    Err(e) => {
                        tracing::warn!("output device: {e:#}");
                        (
                            None,
                            DeviceStatus::failed("no output device", e),
                            Box::new(Silence),
                        )
                    }
                }
            };

        let request = JoinRequest {
            url: url.clone(),
            login,
            denoise: self.settings.denoise,
            gate: self.settings.gate.gate(),
            muted: false,
        };
        match SessionHandle::start(request, source, sink, ctx.clone()) {
            Ok(session) => {
                self.channel = Some(Channel::new(
                    session,
                    (input, input_status),
                    (output, output_status),
                    self.settings.room.clone(),
                ));
            }
            Err(e) => self.join_error = Some(format!("Could not start the session thread: {e}")),
        }
    }

    /// Drains the session's updates into the UI state.
    fn poll_session(&mut self) {
        let Some(ch) = &mut self.channel else {
            return;
        };
        let mut ended: Option<Option<String>> = None;
        while let Some(u) = ch.session.try_recv() {
            match u {
                Update::Event(ev) => {
                    for newly in ch.apply(ev) {
                        // Someone arrived: give them the volume we remember for them.
                        let v = self.settings.volume(&newly.identity);
                        if (v - 1.0).abs() > f32::EPSILON {
                            ch.session.send(Command::SetVolume {
                                sid: newly.sid,
                                volume: v,
                            });
                        }
                    }
                }
                Update::Failed(message) => ended = Some(Some(message)),
                Update::Finished => {
                    if ended.is_none() {
                        ended = Some(ch.notice.take().filter(|_| !ch.leaving));
                    }
                }
            }
        }
        if ch.chat_ready {
            if let Some(text) = self.say.take() {
                ch.session.send(Command::SendChat(text));
            }
        }
        if ended.is_none() && ch.session.is_finished() {
            ended = Some(None);
        }
        if let Some(error) = ended {
            self.join_error = error;
            self.channel = None;
            self.meter.set(FLOOR_DBFS);
        }
    }

    fn leave(&mut self) {
        if let Some(ch) = &mut self.channel {
            ch.leaving = true;
            ch.session.send(Command::Leave);
        }
    }

    /// Push-to-talk: the key counts while this window has keyboard focus. (No global
    /// hotkey: that needs a per-platform hook.)
    fn push_to_talk(&mut self, ctx: &egui::Context) {
        let Some(ch) = &mut self.channel else {
            return;
        };
        let mut down = false;
        if self.settings.gate == GateMode::PushToTalk && !self.capturing_key {
            if let Some(key) = settings::egui_key(&self.settings.ptt_key) {
                let typing = ctx.egui_wants_keyboard_input() && !is_function_key(key);
                down = !typing && ctx.input(|i| i.focused && i.key_down(key));
            }
        }
        if down != ch.ptt_down {
            ch.ptt_down = down;
            ch.session.send(Command::PushToTalk(down));
        }
    }

    fn automate(&mut self, ctx: &egui::Context) {
        let Some(auto) = &mut self.automation else {
            return;
        };
        match &auto.shot {
            Shot::Waiting => {
                if auto.started.elapsed() < auto.after {
                    return;
                }
                // The participants as the list shows them, for scripts to assert on.
                let names: Vec<String> = match &self.channel {
                    Some(ch) => ch.everyone().map(|p| p.name.clone()).collect(),
                    None => Vec::new(),
                };
                let status = match &self.channel {
                    Some(ch) => ch.status_text(),
                    None => match &self.join_error {
                        Some(e) => format!("not joined: {}", e.replace('\n', " / ")),
                        None => "not joined".into(),
                    },
                };
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "status: {status}");
                let _ = writeln!(out, "participants: {}", names.join(", "));
                if let Some(ch) = &self.channel {
                    for m in &ch.chat {
                        let _ =
                            writeln!(out, "chat: {}: {}", m.from.name, m.text.replace('\n', " "));
                    }
                }
                let _ = out.flush();
                let result = Arc::new(Mutex::new(None));
                let slot = result.clone();
                let path = auto.path.clone();
                let repaint = ctx.clone();
                ctx.request_screenshot(move |image| {
                    let r = save_png(&path, &image).map_err(|e| format!("{e:#}"));
                    if let Ok(mut g) = slot.lock() {
                        *g = Some(r);
                    }
                    repaint.request_repaint();
                });
                auto.shot = Shot::Requested {
                    at: Instant::now(),
                    result,
                };
            }
            Shot::Requested { at, result } => {
                let done = result.lock().ok().and_then(|mut g| g.take());
                let outcome = match done {
                    Some(r) => r,
                    None if at.elapsed() > Duration::from_secs(15) => {
                        Err("the window never delivered a screenshot".into())
                    }
                    None => return,
                };
                match outcome {
                    Ok(()) => {
                        println!("screenshot: {}", auto.path.display());
                        self.exit_code.store(0, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("chorus-desktop: screenshot failed: {e}");
                        self.exit_code.store(1, Ordering::SeqCst);
                    }
                }
                auto.shot = Shot::Closing(Instant::now());
                self.leave();
            }
            Shot::Closing(at) => {
                // Close once the session has said goodbye (or gave up trying).
                if self.channel.is_none() || at.elapsed() > Duration::from_secs(4) {
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            }
        }
    }

    fn join_form(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical()
                .auto_shrink([false, false])
                .show(ui, |ui| {
                    ui.vertical_centered(|ui| {
                        ui.add_space(28.0);
                        ui.label(RichText::new("Chorus").size(30.0).strong());
                        ui.label(RichText::new("Join a voice channel").color(MUTED_TEXT));
                        ui.add_space(14.0);
                        let width = 440.0_f32.min(ui.available_width() - 40.0);
                        egui::Frame::group(ui.style())
                            .inner_margin(18)
                            .corner_radius(8)
                            .show(ui, |ui| {
                                ui.set_width(width);
                                // Fields read left to right inside the centred card.
                                ui.with_layout(egui::Layout::top_down(egui::Align::Min), |ui| {
                                    self.form_fields(ui, &ctx);
                                });
                            });
                        ui.add_space(20.0);
                    });
                });
        });
    }

    fn form_fields(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        let field = |ui: &mut egui::Ui,
                     label: &str,
                     value: &mut String,
                     hint: &str,
                     secret: bool|
         -> egui::Response {
            ui.label(label);
            ui.add(
                egui::TextEdit::singleline(value)
                    .hint_text(hint)
                    .password(secret)
                    .desired_width(f32::INFINITY),
            )
        };
        let mut enter = false;
        let r = field(
            ui,
            "Server",
            &mut self.settings.server_url,
            "http://127.0.0.1:7880",
            false,
        );
        enter |= r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            ui.selectable_value(&mut self.mode, LoginMode::Dev, "Dev login");
            ui.selectable_value(&mut self.mode, LoginMode::Token, "Access token");
        });
        ui.add_space(4.0);
        match self.mode {
            LoginMode::Dev => {
                let r = field(
                    ui,
                    "Name",
                    &mut self.settings.name,
                    "how others see you",
                    false,
                );
                enter |= r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                let r = field(ui, "Room", &mut self.settings.room, "lobby", false);
                enter |= r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                ui.label(
                    RichText::new("Dev login works with servers started by `chorus dev`.")
                        .small()
                        .color(MUTED_TEXT),
                );
            }
            LoginMode::Token => {
                let r = field(
                    ui,
                    "Token",
                    &mut self.token,
                    "from `chorus token` or the admin API",
                    true,
                );
                enter |= r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            }
        }
        ui.add_space(8.0);
        ui.separator();
        self.device_pickers(ui);
        ui.add_space(10.0);
        let joining = self.channel.is_some();
        let button =
            egui::Button::new(RichText::new(if joining { "Joining…" } else { "Join" }).strong())
                .min_size(egui::vec2(ui.available_width(), 32.0))
                .fill(Color32::from_rgb(88, 101, 242));
        if ui.add_enabled(!joining, button).clicked() || (enter && !joining) {
            self.join(ctx);
        }
        if let Some(e) = &self.join_error {
            ui.add_space(8.0);
            let mut lines = e.lines();
            if let Some(first) = lines.next() {
                ui.label(RichText::new(first).color(RED).strong());
            }
            for l in lines {
                ui.label(RichText::new(l).small().color(MUTED_TEXT));
            }
        }
        if let Some(w) = &self.warning {
            ui.add_space(4.0);
            ui.label(RichText::new(w).small().color(AMBER));
        }
    }

    fn device_pickers(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.label(RichText::new("Audio devices").strong());
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if ui.small_button("Refresh").clicked() && !self.no_audio {
                    self.devices = audio::list_devices();
                }
            });
        });
        let mut changed = false;
        egui::Grid::new("devices")
            .num_columns(2)
            .spacing([8.0, 6.0])
            .show(ui, |ui| {
                ui.label("Microphone");
                changed |= device_combo(
                    ui,
                    "input",
                    &mut self.settings.input_device,
                    &self.devices.inputs,
                    self.devices.default_input.as_deref(),
                    "no input device",
                );
                ui.end_row();
                ui.label("Speakers");
                changed |= device_combo(
                    ui,
                    "output",
                    &mut self.settings.output_device,
                    &self.devices.outputs,
                    self.devices.default_output.as_deref(),
                    "no output device",
                );
                ui.end_row();
            });
        if changed {
            self.settings_changed();
        }
    }

    fn channel_view(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        let Some(ch) = &mut self.channel else {
            return;
        };
        let mut leave = false;
        egui::Panel::top("header")
            .frame(
                egui::Frame::side_top_panel(ui.style())
                    .inner_margin(egui::Margin::symmetric(12, 8)),
            )
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    ui.label(RichText::new(format!("🔊 {}", ch.room)).size(18.0).strong());
                    ui.add_space(12.0);
                    let (color, text) = ch.status();
                    status_dot(ui, color);
                    ui.label(RichText::new(text).color(color));
                    ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                        let b = egui::Button::new(RichText::new("Leave").color(Color32::WHITE))
                            .fill(RED);
                        if ui.add_enabled(!ch.leaving, b).clicked() {
                            leave = true;
                        }
                    });
                });
                if let Some(n) = &ch.notice {
                    ui.label(RichText::new(n).small().color(AMBER));
                }
            });

        let mut volume_changes: Vec<(String, String, f32)> = Vec::new();
        egui::Panel::left("participants")
            .resizable(true)
            .default_size(270.0)
            .min_size(210.0)
            .frame(egui::Frame::side_top_panel(ui.style()).inner_margin(12))
            .show(ui, |ui| {
                let n = ch.everyone().count();
                ui.label(
                    RichText::new(format!("IN CHANNEL — {n}"))
                        .small()
                        .strong()
                        .color(MUTED_TEXT),
                );
                ui.add_space(6.0);
                egui::ScrollArea::vertical()
                    .auto_shrink([false, false])
                    .show(ui, |ui| {
                        let me_sid = ch.me.as_ref().map(|m| m.sid.clone());
                        let people: Vec<ParticipantInfo> = ch.everyone().cloned().collect();
                        for p in &people {
                            let is_me = me_sid.as_deref() == Some(p.sid.as_str());
                            participant_row(ui, p, is_me, is_me && ch.deafened);
                            if !is_me {
                                let mut v = self.settings.volume(&p.identity);
                                let percent = format!("{:.0}%", v * 100.0);
                                ui.horizontal(|ui| {
                                    // Under the name, past the avatar.
                                    ui.add_space(40.0);
                                    ui.label(RichText::new("🔉").color(MUTED_TEXT));
                                    ui.spacing_mut().slider_width =
                                        (ui.available_width() - 56.0).clamp(60.0, 150.0);
                                    let r = ui
                                        .add(egui::Slider::new(&mut v, 0.0..=4.0).show_value(false))
                                        .on_hover_text(format!(
                                            "How loud you hear {} (double-click: 100%)",
                                            p.name
                                        ));
                                    ui.label(RichText::new(percent).small().color(MUTED_TEXT));
                                    if r.changed() {
                                        volume_changes.push((p.sid.clone(), p.identity.clone(), v));
                                    }
                                    if r.double_clicked() {
                                        volume_changes.push((
                                            p.sid.clone(),
                                            p.identity.clone(),
                                            1.0,
                                        ));
                                    }
                                });
                            }
                            ui.add_space(6.0);
                        }
                    });
            });
        for (sid, identity, v) in volume_changes {
            ch.session.send(Command::SetVolume { sid, volume: v });
            self.settings.volumes.insert(identity, v);
            self.settings_dirty = Some(Instant::now());
        }

        let mut settings_changed = false;
        let mut capture_key = false;
        egui::Panel::bottom("controls")
            .frame(
                egui::Frame::side_top_panel(ui.style())
                    .inner_margin(egui::Margin::symmetric(12, 10)),
            )
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    let mute_text = if ch.muted { "🔇 Unmute" } else { "🎤 Mute" };
                    if ui.add(toggle_button(mute_text, ch.muted)).clicked() {
                        ch.muted = !ch.muted;
                        ch.session.send(Command::SetMuted(ch.muted));
                    }
                    let deaf_text = if ch.deafened {
                        "Undeafen"
                    } else {
                        "🎧 Deafen"
                    };
                    if ui.add(toggle_button(deaf_text, ch.deafened)).clicked() {
                        ch.deafened = !ch.deafened;
                        ch.session.send(Command::SetDeafened(ch.deafened));
                        if !ch.deafened {
                            // Undeafening restores the mute button's own state.
                            ch.session.send(Command::SetMuted(ch.muted));
                        }
                    }
                    ui.separator();
                    let before = self.settings.gate;
                    egui::ComboBox::from_id_salt("gate")
                        .selected_text(self.settings.gate.label())
                        .show_ui(ui, |ui| {
                            for g in [GateMode::Voice, GateMode::PushToTalk, GateMode::Open] {
                                ui.selectable_value(&mut self.settings.gate, g, g.label());
                            }
                        });
                    if self.settings.gate != before {
                        ch.session.send(Command::SetGate(self.settings.gate.gate()));
                        settings_changed = true;
                    }
                    if self.settings.gate == GateMode::PushToTalk {
                        let label = if self.capturing_key {
                            "Press a key…".to_string()
                        } else {
                            format!("Key: {}", self.settings.ptt_key)
                        };
                        if ui
                            .button(label)
                            .on_hover_text("Hold this key while the Chorus window is focused")
                            .clicked()
                        {
                            capture_key = true;
                        }
                    }
                    if ui
                        .checkbox(&mut self.settings.denoise, "Noise suppression")
                        .changed()
                    {
                        ch.session.send(Command::SetDenoise(self.settings.denoise));
                        settings_changed = true;
                    }
                });
                ui.add_space(6.0);
                ui.horizontal(|ui| {
                    let level = self.meter.get();
                    ui.label(RichText::new("Input").small().color(MUTED_TEXT));
                    level_meter(ui, level, ch.transmitting);
                    ui.label(
                        RichText::new(format!("{level:>4.0} dBFS"))
                            .monospace()
                            .small()
                            .color(MUTED_TEXT),
                    );
                    let (c, t) = if ch.transmitting {
                        (GREEN, "transmitting".to_string())
                    } else if ch.muted || ch.deafened {
                        (RED, "muted".to_string())
                    } else if self.settings.gate == GateMode::PushToTalk {
                        (
                            MUTED_TEXT,
                            format!("hold {} to talk", self.settings.ptt_key),
                        )
                    } else {
                        (MUTED_TEXT, "not transmitting".to_string())
                    };
                    ui.label(RichText::new(t).small().color(c));
                });
                ui.horizontal(|ui| {
                    device_line(ui, "🎤", &ch.input_status, ch.input_stream.as_ref());
                    ui.add_space(12.0);
                    device_line(ui, "🔈", &ch.output_status, ch.output_stream.as_ref());
                });
            });

        egui::CentralPanel::default().show(ui, |ui| {
            chat_panel(ui, ch);
        });

        if capture_key {
            self.capturing_key = true;
        }
        if settings_changed {
            self.settings_changed();
        }
        if leave {
            self.leave();
        }
        if self.capturing_key {
            self.capture_key(&ctx);
        }
    }

    fn capture_key(&mut self, ctx: &egui::Context) {
        let pressed = ctx.input(|i| {
            i.events.iter().find_map(|e| match e {
                egui::Event::Key {
                    key,
                    pressed: true,
                    repeat: false,
                    ..
                } => Some(*key),
                _ => None,
            })
        });
        if let Some(key) = pressed {
            self.capturing_key = false;
            if key != egui::Key::Escape {
                self.settings.ptt_key = key.name().to_string();
                self.settings_changed();
            }
        }
    }
}

impl eframe::App for ChorusApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.poll_session();
        self.push_to_talk(ctx);
        self.automate(ctx);
        if let Some(t) = self.settings_dirty {
            if t.elapsed() > Duration::from_secs(1) {
                self.save_settings();
            }
        }
        // In a channel the meter, speaking rings and typing timeouts move without input
        // events; the session thread also wakes us for each of its updates.
        if self.channel.is_some() {
            ctx.request_repaint_after(Duration::from_millis(50));
        } else if self.automation.is_some() || self.settings_dirty.is_some() {
            ctx.request_repaint_after(Duration::from_millis(100));
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        if self
            .channel
            .as_ref()
            .is_some_and(|c| c.me.is_some() || c.link != Link::Joining)
        {
            self.channel_view(ui);
        } else {
            self.join_form(ui);
        }
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        if self.settings_dirty.is_some() {
            self.save_settings();
        }
        // Dropping the channel leaves the room (bounded wait, see SessionHandle).
        self.channel = None;
    }
}

impl Channel {
    fn new(
        session: SessionHandle,
        input: (Option<OpenStream>, DeviceStatus),
        output: (Option<OpenStream>, DeviceStatus),
        room: String,
    ) -> Self {
        Channel {
            session,
            input_stream: input.0,
            output_stream: output.0,
            input_status: input.1,
            output_status: output.1,
            link: Link::Joining,
            room,
            me: None,
            others: Vec::new(),
            chat: Vec::new(),
            chat_ready: false,
            chat_notice: None,
            typing: BTreeMap::new(),
            draft: String::new(),
            sent_typing: false,
            transmitting: false,
            muted: false,
            deafened: false,
            ptt_down: false,
            leaving: false,
            notice: None,
        }
    }

    /// Applies one session event; returns the participants that just arrived.
    fn apply(&mut self, ev: Event) -> Vec<ParticipantInfo> {
        match ev {
            Event::Joined {
                room,
                me,
                participants,
            } => {
                self.room = room;
                self.me = Some(me);
                self.others = participants.clone();
                if self.link == Link::Joining {
                    self.link = Link::Negotiating;
                }
                // Everyone present gets their remembered volume.
                return participants;
            }
            Event::ParticipantJoined(p) => {
                self.others.retain(|o| o.sid != p.sid);
                self.others.push(p.clone());
                return vec![p];
            }
            Event::ParticipantUpdated(p) => {
                if self.me.as_ref().is_some_and(|m| m.sid == p.sid) {
                    self.me = Some(p);
                } else if let Some(o) = self.others.iter_mut().find(|o| o.sid == p.sid) {
                    *o = p;
                }
            }
            Event::ParticipantLeft { sid, .. } => {
                self.others.retain(|o| o.sid != sid);
            }
            Event::MediaConnected { .. } => self.link = Link::Connected,
            Event::Reconnecting { attempt } => self.link = Link::Reconnecting(attempt),
            Event::Reconnected { resumed } => {
                self.link = if resumed {
                    Link::Connected
                } else {
                    Link::Negotiating
                };
            }
            Event::Transmitting(t) => self.transmitting = t,
            Event::ChatReady => self.chat_ready = true,
            Event::Chat(frame) => self.apply_chat(frame),
            Event::Typing { from, typing } => {
                if typing {
                    self.typing
                        .insert(from.identity, (from.name, Instant::now()));
                } else {
                    self.typing.remove(&from.identity);
                }
            }
            Event::ServerError { code, message } => {
                self.notice = Some(format!("Server: {message} ({code})"));
            }
            Event::Ended { reason } => {
                if reason != "left" {
                    self.notice = Some(format!("Disconnected: {reason}"));
                }
            }
            Event::DominantSpeaker(_) | Event::FirstAudio { .. } => {}
        }
        Vec::new()
    }

    fn apply_chat(&mut self, frame: ChatServerFrame) {
        match frame {
            ChatServerFrame::History { messages } => {
                self.chat = messages;
            }
            ChatServerFrame::Message { message, .. } => {
                if !self.chat.iter().any(|m| m.id == message.id) {
                    self.chat.push(message);
                }
                // Keep memory bounded in a long session.
                if self.chat.len() > 1000 {
                    self.chat.drain(..self.chat.len() - 1000);
                }
            }
            ChatServerFrame::Deleted { id } => self.chat.retain(|m| m.id != id),
            ChatServerFrame::Error { message, .. } => {
                self.chat_notice = Some(message);
            }
        }
    }

    /// Self first, then the others in join order.
    fn everyone(&self) -> impl Iterator<Item = &ParticipantInfo> {
        self.me.iter().chain(self.others.iter())
    }

    fn status(&self) -> (Color32, String) {
        match &self.link {
            _ if self.leaving => (MUTED_TEXT, "Leaving…".into()),
            Link::Joining => (AMBER, "Connecting…".into()),
            Link::Negotiating => (AMBER, "Connecting audio…".into()),
            Link::Connected => (GREEN, "Voice connected".into()),
            Link::Reconnecting(n) => (AMBER, format!("Reconnecting (attempt {n})…")),
        }
    }

    fn status_text(&self) -> String {
        self.status().1
    }
}

impl DeviceStatus {
    fn on(description: &str) -> Self {
        DeviceStatus {
            ok: true,
            text: description.to_string(),
            detail: None,
        }
    }

    fn off(text: &str) -> Self {
        DeviceStatus {
            ok: false,
            text: text.to_string(),
            detail: None,
        }
    }

    fn failed(text: &str, e: anyhow::Error) -> Self {
        DeviceStatus {
            ok: false,
            text: text.to_string(),
            detail: Some(format!("{e:#}")),
        }
    }
}

fn is_function_key(key: egui::Key) -> bool {
    let name = key.name();
    name.len() >= 2 && name.starts_with('F') && name[1..].bytes().all(|b| b.is_ascii_digit())
}

fn style(ctx: &egui::Context) {
    ctx.set_visuals(egui::Visuals::dark());
    ctx.all_styles_mut(|s| {
        s.spacing.item_spacing = egui::vec2(8.0, 6.0);
        s.spacing.button_padding = egui::vec2(10.0, 5.0);
        s.spacing.interact_size.y = 24.0;
    });
}

fn toggle_button(text: &str, active: bool) -> egui::Button<'static> {
    let b = egui::Button::new(RichText::new(text.to_string()).color(if active {
        Color32::WHITE
    } else {
        Color32::LIGHT_GRAY
    }));
    if active {
        b.fill(RED)
    } else {
        b
    }
}

fn device_combo(
    ui: &mut egui::Ui,
    id: &str,
    chosen: &mut Option<String>,
    names: &[String],
    default: Option<&str>,
    none_text: &str,
) -> bool {
    if names.is_empty() && default.is_none() {
        ui.label(RichText::new(none_text).color(AMBER));
        return false;
    }
    let default_label = match default {
        Some(d) => format!("System default ({d})"),
        None => "System default".into(),
    };
    let before = chosen.clone();
    let selected = chosen.clone().unwrap_or_else(|| default_label.clone());
    egui::ComboBox::from_id_salt(id)
        .width(ui.available_width())
        .selected_text(truncate(&selected, 48))
        .show_ui(ui, |ui| {
            ui.selectable_value(chosen, None, default_label);
            for n in names {
                ui.selectable_value(chosen, Some(n.clone()), n.as_str());
            }
        });
    *chosen != before
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// A stable colour per identity for the avatar.
fn avatar_color(identity: &str) -> Color32 {
    let h = identity.bytes().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    });
    let palette = [
        Color32::from_rgb(88, 101, 242),
        Color32::from_rgb(235, 69, 158),
        Color32::from_rgb(59, 165, 92),
        Color32::from_rgb(250, 166, 26),
        Color32::from_rgb(0, 153, 204),
        Color32::from_rgb(155, 89, 182),
    ];
    palette[(h as usize) % palette.len()]
}

fn participant_row(ui: &mut egui::Ui, p: &ParticipantInfo, is_me: bool, deafened: bool) {
    ui.horizontal(|ui| {
        let size = 34.0;
        let (rect, _) = ui.allocate_exact_size(egui::vec2(size, size), egui::Sense::hover());
        let painter = ui.painter_at(rect.expand(2.0));
        let c = rect.center();
        painter.circle_filled(c, size / 2.0 - 3.0, avatar_color(&p.identity));
        let initial: String = p
            .name
            .chars()
            .next()
            .map(|c| c.to_uppercase().collect())
            .unwrap_or_default();
        painter.text(
            c,
            egui::Align2::CENTER_CENTER,
            initial,
            egui::FontId::proportional(15.0),
            Color32::WHITE,
        );
        if p.speaking {
            // The speaking ring, as voice apps draw it.
            painter.circle_stroke(c, size / 2.0 - 0.5, egui::Stroke::new(2.5, GREEN));
        }
        ui.vertical(|ui| {
            ui.horizontal(|ui| {
                let name = RichText::new(&p.name).strong();
                ui.label(if p.speaking {
                    name.color(Color32::WHITE)
                } else {
                    name
                });
                if is_me {
                    ui.label(RichText::new("(you)").small().color(MUTED_TEXT));
                }
                if p.muted {
                    ui.label(RichText::new("🔇").color(RED))
                        .on_hover_text("muted");
                }
                if deafened {
                    ui.label(RichText::new("🎧").color(RED))
                        .on_hover_text("deafened");
                }
            });
            let state = if p.speaking {
                RichText::new("speaking").small().color(GREEN)
            } else if p.muted {
                RichText::new("muted").small().color(MUTED_TEXT)
            } else {
                RichText::new(if p.publishing {
                    "connected"
                } else {
                    "listening"
                })
                .small()
                .color(MUTED_TEXT)
            };
            ui.label(state);
        });
    });
}

fn status_dot(ui: &mut egui::Ui, color: Color32) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
    ui.painter().circle_filled(rect.center(), 4.5, color);
}

/// A horizontal bar from -60 to 0 dBFS.
fn level_meter(ui: &mut egui::Ui, dbfs: f32, transmitting: bool) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(220.0, 10.0), egui::Sense::hover());
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 3.0, Color32::from_gray(45));
    let frac = ((dbfs + 60.0) / 60.0).clamp(0.0, 1.0);
    if frac > 0.0 {
        let mut fill = rect;
        fill.set_width(rect.width() * frac);
        let color = if dbfs > -6.0 {
            RED
        } else if transmitting {
            GREEN
        } else {
            Color32::from_gray(120)
        };
        painter.rect_filled(fill, 3.0, color);
    }
}

fn device_line(ui: &mut egui::Ui, icon: &str, status: &DeviceStatus, stream: Option<&OpenStream>) {
    let fault = stream.and_then(|s| s.fault.get());
    let (color, text) = match (&fault, status.ok) {
        (Some(_), _) => (AMBER, format!("{} (stopped)", status.text)),
        (None, true) => (MUTED_TEXT, status.text.clone()),
        (None, false) => (AMBER, status.text.clone()),
    };
    let r = ui.label(
        RichText::new(format!("{icon} {}", truncate(&text, 44)))
            .small()
            .color(color),
    );
    if let Some(d) = fault.or_else(|| status.detail.clone()) {
        r.on_hover_text(d);
    } else if text.chars().count() > 44 {
        r.on_hover_text(text);
    }
}

fn chat_panel(ui: &mut egui::Ui, ch: &mut Channel) {
    ui.label(
        RichText::new("TEXT CHAT")
            .small()
            .strong()
            .color(MUTED_TEXT),
    );
    ui.add_space(4.0);
    // Typing indicators fade after a few seconds without a refresh.
    ch.typing
        .retain(|_, (_, at)| at.elapsed() < Duration::from_secs(6));
    let input_height = 64.0;
    egui::ScrollArea::vertical()
        .auto_shrink([false, false])
        .stick_to_bottom(true)
        .max_height((ui.available_height() - input_height).max(60.0))
        .show(ui, |ui| {
            if ch.chat.is_empty() {
                ui.label(RichText::new("No messages yet.").color(MUTED_TEXT));
            }
            for m in &ch.chat {
                ui.horizontal(|ui| {
                    ui.label(
                        RichText::new(&m.from.name)
                            .strong()
                            .color(avatar_color(&m.from.identity)),
                    );
                });
                // Plain text, never interpreted.
                ui.add(egui::Label::new(m.text.as_str()).wrap());
                ui.add_space(4.0);
            }
        });
    let typing: Vec<&str> = ch.typing.values().map(|(n, _)| n.as_str()).collect();
    let line = match typing.len() {
        0 => String::new(),
        1 => format!("{} is typing…", typing[0]),
        _ => format!("{} are typing…", typing.join(", ")),
    };
    ui.label(RichText::new(line).small().color(MUTED_TEXT));
    if let Some(n) = &ch.chat_notice {
        ui.label(RichText::new(n).small().color(AMBER));
    }
    ui.horizontal(|ui| {
        let hint = if ch.chat_ready {
            "Message the channel"
        } else {
            "Chat connects with audio…"
        };
        let edit = egui::TextEdit::singleline(&mut ch.draft)
            .hint_text(hint)
            .char_limit(MAX_CHAT_CHARS)
            .desired_width(ui.available_width() - 70.0);
        let r = ui.add_enabled(ch.chat_ready, edit);
        let typing_now = !ch.draft.trim().is_empty();
        if typing_now != ch.sent_typing {
            ch.sent_typing = typing_now;
            ch.session.send(Command::SetTyping(typing_now));
        }
        let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        let send = ui
            .add_enabled(ch.chat_ready && typing_now, egui::Button::new("Send"))
            .clicked();
        if (enter || send) && typing_now {
            let text = ch.draft.trim().to_string();
            ch.draft.clear();
            ch.chat_notice = None;
            ch.session.send(Command::SendChat(text));
            ch.sent_typing = false;
            ch.session.send(Command::SetTyping(false));
            r.request_focus();
        }
    });
}

/// Writes an egui screenshot as an RGBA PNG.
fn save_png(path: &std::path::Path, image: &egui::ColorImage) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let [w, h] = image.size;
    let mut rgba = Vec::with_capacity(w * h * 4);
    for p in &image.pixels {
        rgba.extend_from_slice(&p.to_srgba_unmultiplied());
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&rgba)?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_protocol::chat::Sender;

    fn person(sid: &str, name: &str) -> ParticipantInfo {
        ParticipantInfo {
            sid: sid.into(),
            identity: name.to_lowercase(),
            name: name.into(),
            muted: false,
            speaking: false,
            publishing: true,
            tracks: vec![],
        }
    }

    fn message(id: u64, text: &str) -> ChatMessage {
        ChatMessage {
            id,
            from: Sender {
                identity: "ana".into(),
                name: "Ana".into(),
            },
            text: text.into(),
            ts: 0,
        }
    }

    fn channel() -> Channel {
        Channel::new(
            SessionHandle::detached(),
            (None, DeviceStatus::off("no input device")),
            (None, DeviceStatus::off("no output device")),
            "lobby".into(),
        )
    }

    #[test]
    fn the_list_follows_the_session() {
        let mut ch = channel();
        let arrived = ch.apply(Event::Joined {
            room: "lobby".into(),
            me: person("1", "Me"),
            participants: vec![person("2", "Ana")],
        });
        assert_eq!(arrived, vec![person("2", "Ana")]);
        assert_eq!(ch.link, Link::Negotiating);
        assert_eq!(
            ch.apply(Event::ParticipantJoined(person("3", "Bob"))).len(),
            1
        );
        let names: Vec<&str> = ch.everyone().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["Me", "Ana", "Bob"]);

        let mut ana = person("2", "Ana");
        ana.speaking = true;
        ana.muted = true;
        ch.apply(Event::ParticipantUpdated(ana));
        assert!(ch.others[0].speaking && ch.others[0].muted);
        ch.apply(Event::ParticipantLeft {
            sid: "2".into(),
            identity: "ana".into(),
            reason: "left".into(),
        });
        let names: Vec<&str> = ch.everyone().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["Me", "Bob"]);

        ch.apply(Event::MediaConnected {
            after: Duration::from_millis(5),
        });
        assert_eq!(ch.status().1, "Voice connected");
        ch.apply(Event::Reconnecting { attempt: 2 });
        assert_eq!(ch.status().1, "Reconnecting (attempt 2)…");
        ch.apply(Event::Reconnected { resumed: true });
        assert_eq!(ch.link, Link::Connected);
    }

    #[test]
    fn chat_history_messages_and_deletions() {
        let mut ch = channel();
        ch.apply(Event::Chat(ChatServerFrame::History {
            messages: vec![message(1, "a"), message(2, "b")],
        }));
        let again = ChatServerFrame::Message {
            message: message(2, "b"),
            reference: None,
        };
        ch.apply(Event::Chat(again));
        ch.apply(Event::Chat(ChatServerFrame::Message {
            message: message(3, "<b>not bold</b>"),
            reference: None,
        }));
        ch.apply(Event::Chat(ChatServerFrame::Deleted { id: 1 }));
        let texts: Vec<&str> = ch.chat.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["b", "<b>not bold</b>"]);
    }

    #[test]
    fn function_keys_are_recognised() {
        assert!(is_function_key(egui::Key::F8));
        assert!(is_function_key(egui::Key::F12));
        assert!(!is_function_key(egui::Key::F));
        assert!(!is_function_key(egui::Key::Space));
    }
}
