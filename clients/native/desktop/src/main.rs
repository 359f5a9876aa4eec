//! `chorus-desktop`: the Chorus desktop client. A window (egui) to join a voice channel
//! with your microphone and speakers (cpal): see who is in the channel and who speaks,
//! mute, deafen, push-to-talk or voice activation, per-person volume, noise
//! suppression, and the channel's text chat. Built on the `chorus-native` library.

mod app;
mod audio;
mod client;
mod dsp;
mod settings;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use eframe::egui;

use crate::app::{ChorusApp, Startup};
use crate::settings::Settings;

/// Chorus desktop client: join a voice channel from a window.
///
/// Flags given here fill in the join form (and are remembered once you join).
///
/// Examples:
///   chorus-desktop
///   chorus-desktop --url http://127.0.0.1:7880 --name ana --room lobby --join
///   chorus-desktop --url wss://voice.example.org/ws --token "$TOKEN" --join
///
/// Automation (used by tests/desktop/smoke.sh):
///   chorus-desktop --name Desk --room smoke --join --say hi \
///       --screenshot shot.png --screenshot-after 6s
/// prints `status: …`, `participants: Desk, bot` and one `chat: NAME: TEXT` line per
/// message when the screenshot is taken, saves the PNG, leaves the room and exits 0
/// (1 if the screenshot could not be saved).
#[derive(Debug, Parser)]
#[command(name = "chorus-desktop", version, verbatim_doc_comment)]
struct Args {
    /// Server URL: http://host:port (dev login) or ws(s)://host:port/ws.
    #[arg(long, env = "CHORUS_URL")]
    url: Option<String>,
    /// Access token (mint one with `chorus token`); without it the form offers dev
    /// login with --name and --room.
    #[arg(long, env = "CHORUS_TOKEN")]
    token: Option<String>,
    /// Dev login: display name.
    #[arg(long)]
    name: Option<String>,
    /// Dev login: room to join.
    #[arg(long)]
    room: Option<String>,
    /// Join at start instead of waiting for the Join button.
    #[arg(long)]
    join: bool,
    /// Settings file to use instead of the platform default
    /// (~/.config/chorus/desktop.toml on Linux).
    #[arg(long, env = "CHORUS_DESKTOP_SETTINGS", value_name = "FILE")]
    settings: Option<PathBuf>,
    /// Do not open sound devices: send silence and play nothing.
    #[arg(long)]
    no_audio: bool,
    /// Send this chat message once chat is connected (automation).
    #[arg(long, value_name = "TEXT")]
    say: Option<String>,
    /// Take a screenshot of the window into this PNG, then leave and exit.
    #[arg(long, value_name = "PNG")]
    screenshot: Option<PathBuf>,
    /// When to take --screenshot, counted from start (e.g. 6s, 1500ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s", requires = "screenshot")]
    screenshot_after: Duration,
}

fn main() {
    let args = Args::parse();
    chorus_native::init_logging();

    let settings_path = args.settings.clone().or_else(settings::default_path);
    let (mut settings, settings_warning) = match &settings_path {
        Some(p) => Settings::load(p),
        None => (Settings::default(), None),
    };
    if let Some(u) = args.url {
        settings.server_url = u;
    }
    if let Some(n) = args.name {
        settings.name = n;
    }
    if let Some(r) = args.room {
        settings.room = r;
    }
    let startup = Startup {
        settings,
        settings_path,
        settings_warning,
        token: args.token,
        auto_join: args.join,
        no_audio: args.no_audio,
        screenshot: args.screenshot.map(|p| (p, args.screenshot_after)),
        say: args.say,
    };

    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Chorus")
            .with_app_id("chorus-desktop")
            .with_inner_size([980.0, 640.0])
            .with_min_inner_size([640.0, 420.0]),
        ..Default::default()
    };
    let exit_code = Arc::new(AtomicI32::new(0));
    let code = exit_code.clone();
    let result = eframe::run_native(
        "Chorus",
        options,
        Box::new(move |cc| Ok(Box::new(ChorusApp::new(cc, startup, code)))),
    );
    if let Err(e) = result {
        eprintln!("chorus-desktop: could not open the window: {e}");
        std::process::exit(2);
    }
    std::process::exit(exit_code.load(Ordering::SeqCst));
}
