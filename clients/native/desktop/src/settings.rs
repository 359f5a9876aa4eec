//! What the app remembers between runs, as a TOML file in the platform's config
//! directory (`~/.config/chorus/desktop.toml` on Linux). Access tokens are not stored:
//! they are credentials and expire anyway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// When the microphone is sent, as stored (the library's `Gate` is not serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateMode {
    /// Voice activation.
    #[default]
    Voice,
    PushToTalk,
    /// Always on.
    Open,
}

impl GateMode {
    pub fn gate(self) -> chorus_native::audio::Gate {
        use chorus_native::audio::Gate;
        match self {
            GateMode::Voice => Gate::Voice,
            GateMode::PushToTalk => Gate::PushToTalk,
            GateMode::Open => Gate::Open,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            GateMode::Voice => "Voice activity",
            GateMode::PushToTalk => "Push to talk",
            GateMode::Open => "Always on",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub server_url: String,
    pub name: String,
    pub room: String,
    /// Device names as cpal reports them; `None` is the system default.
    pub input_device: Option<String>,
    pub output_device: Option<String>,
    /// An egui key name (`egui::Key::name`), e.g. "F8" or "Backtick".
    pub ptt_key: String,
    pub gate: GateMode,
    pub denoise: bool,
    /// Linear playback volume (0–4) per participant identity.
    pub volumes: BTreeMap<String, f32>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            server_url: "http://127.0.0.1:7880".into(),
            name: String::new(),
            room: "lobby".into(),
            input_device: None,
            output_device: None,
            ptt_key: "F8".into(),
            gate: GateMode::Voice,
            denoise: true,
            volumes: BTreeMap::new(),
        }
    }
}

/// `~/.config/chorus/desktop.toml` or the platform's equivalent; `None` when the
/// platform has no home directory (then nothing is saved).
pub fn default_path() -> Option<PathBuf> {
    directories::ProjectDirs::from("org", "Chorus", "chorus")
        .map(|d| d.config_dir().join("desktop.toml"))
}

impl Settings {
    /// Reads `path`; a missing file gives the defaults, an unreadable one the defaults
    /// and the reason (the app shows it and carries on).
    pub fn load(path: &Path) -> (Settings, Option<String>) {
        match std::fs::read_to_string(path) {
            Ok(text) => match toml::from_str::<Settings>(&text) {
                Ok(s) => (s.sanitized(), None),
                Err(e) => (
                    Settings::default(),
                    Some(format!("settings in {} ignored: {e}", path.display())),
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Settings::default(), None),
            Err(e) => (
                Settings::default(),
                Some(format!("could not read {}: {e}", path.display())),
            ),
        }
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = toml::to_string_pretty(self)?;
        // Write then rename, so a crash mid-write never leaves half a file.
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Clamps what a hand-edited file may have got wrong.
    fn sanitized(mut self) -> Self {
        for v in self.volumes.values_mut() {
            *v = if v.is_finite() {
                v.clamp(0.0, 4.0)
            } else {
                1.0
            };
        }
        if egui_key(&self.ptt_key).is_none() {
            self.ptt_key = Settings::default().ptt_key;
        }
        self
    }

    pub fn volume(&self, identity: &str) -> f32 {
        self.volumes.get(identity).copied().unwrap_or(1.0)
    }
}

pub fn egui_key(name: &str) -> Option<eframe::egui::Key> {
    eframe::egui::Key::from_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_file() {
        let dir = std::env::temp_dir().join(format!("chorus-desktop-test-{}", std::process::id()));
        let path = dir.join("sub").join("desktop.toml");
        let mut s = Settings {
            name: "ana".into(),
            input_device: Some("USB Mic".into()),
            gate: GateMode::PushToTalk,
            ..Settings::default()
        };
        s.volumes.insert("bob".into(), 1.5);
        s.save(&path).unwrap();
        let (back, warning) = Settings::load(&path);
        assert_eq!(warning, None);
        assert_eq!(back, s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_and_broken_files_give_defaults() {
        let dir = std::env::temp_dir().join(format!("chorus-desktop-bad-{}", std::process::id()));
        let (s, w) = Settings::load(&dir.join("none.toml"));
        assert_eq!(s, Settings::default());
        assert!(w.is_none());
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "server_url = [").unwrap();
        let (s, w) = Settings::load(&bad);
        assert_eq!(s, Settings::default());
        assert!(w.unwrap().contains("ignored"));
        // Partial files keep their keys and default the rest; bad values are clamped.
        std::fs::write(
            &bad,
            "name = \"x\"\nptt_key = \"Nope\"\n[volumes]\nbob = 99.0\n",
        )
        .unwrap();
        let (s, _) = Settings::load(&bad);
        assert_eq!(s.name, "x");
        assert_eq!(s.ptt_key, "F8");
        assert_eq!(s.volume("bob"), 4.0);
        assert_eq!(s.volume("carol"), 1.0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
