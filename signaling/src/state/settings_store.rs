//! Where per-room admin settings ([`RoomSettings`]) are kept across restarts.
//!
//! The in-memory state ([`super::memory::MemoryState`]) holds every room's settings in
//! memory. When signaling has a data dir, each change is also written through to a
//! [`RoomSettingsStore`] (the `room_settings` table of the same SQLite file that keeps
//! chat history) and every row is loaded back at startup. Without a data dir
//! (`--chat-memory`) settings last as long as the process. With Redis they live in
//! Redis instead.
//!
//! Chat retention (`--chat-retention`) only ever deletes from `chat_messages`, so it
//! never touches room settings.

use anyhow::Context;
use rusqlite::types::Value;
use tracing::warn;

use super::history::SqliteStore;
use super::RoomSettings;

/// Durable storage for room settings.
pub trait RoomSettingsStore: Send + Sync {
    /// Every stored room's settings. Rows that cannot be read (bad JSON, wrong column
    /// types, invalid room names) are logged and skipped; only a failure to read the
    /// table at all is an error.
    fn load_all(&self) -> anyhow::Result<Vec<(String, RoomSettings)>>;
    /// Stores a room's settings, replacing what was there. Settings equal to the
    /// default (nothing set) delete the room's row instead.
    fn put(&self, room: &str, settings: &RoomSettings, now_ms: u64) -> anyhow::Result<()>;
}

/// Schema of the `room_settings` table; created by [`SqliteStore::open`].
pub(crate) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS room_settings (
    room TEXT PRIMARY KEY,
    settings TEXT NOT NULL, -- RoomSettings as JSON
    updated_ms INTEGER
);";

impl RoomSettingsStore for SqliteStore {
    fn load_all(&self) -> anyhow::Result<Vec<(String, RoomSettings)>> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT room, settings FROM room_settings ORDER BY room")
            .context("reading the room_settings table")?;
        // Read raw values so a row with the wrong column types is skipped, not fatal.
        let rows: Vec<(Value, Value)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()
            .context("reading the room_settings table")?;
        let mut out = Vec::with_capacity(rows.len());
        for (room, settings) in rows {
            let (Value::Text(room), Value::Text(json)) = (&room, &settings) else {
                warn!(
                    ?room,
                    "skipping a room_settings row with a non-text room or settings column"
                );
                continue;
            };
            if !super::valid_room_name(room) {
                warn!(room = %room.escape_debug(), "skipping room_settings row: invalid room name");
                continue;
            }
            match serde_json::from_str::<RoomSettings>(json) {
                Ok(s) => out.push((room.clone(), s)),
                Err(e) => warn!(
                    room = %room,
                    "skipping room_settings row: settings are not valid JSON settings: {e}"
                ),
            }
        }
        Ok(out)
    }

    fn put(&self, room: &str, settings: &RoomSettings, now_ms: u64) -> anyhow::Result<()> {
        let c = self.conn();
        if *settings == RoomSettings::default() {
            c.execute(
                "DELETE FROM room_settings WHERE room = ?1",
                rusqlite::params![room],
            )?;
        } else {
            let json = serde_json::to_string(settings)?;
            c.execute(
                "INSERT INTO room_settings (room, settings, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(room) DO UPDATE SET settings = excluded.settings,
                                                 updated_ms = excluded.updated_ms",
                rusqlite::params![room, json, now_ms as i64],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::history::ChatStore;
    use chorus_protocol::chat::Sender;
    use std::collections::HashSet;

    fn temp_db(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "chorus-room-settings-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("chat.sqlite3");
        (dir, path)
    }

    const OFF: RoomSettings = RoomSettings {
        enhanced_audio: Some(false),
    };
    const ON: RoomSettings = RoomSettings {
        enhanced_audio: Some(true),
    };

    #[test]
    fn put_get_delete_and_survive_reopen() {
        let (dir, path) = temp_db("reopen");
        {
            let s = SqliteStore::open(&path).unwrap();
            assert!(s.load_all().unwrap().is_empty());
            s.put("quiet", &OFF, 1).unwrap();
            s.put("loud", &OFF, 2).unwrap();
            s.put("loud", &ON, 3).unwrap();
            s.put("gone", &OFF, 4).unwrap();
            s.put("gone", &RoomSettings::default(), 5).unwrap();
            // Defaulting a room that has no row is fine too.
            s.put("never", &RoomSettings::default(), 6).unwrap();
            assert_eq!(
                s.load_all().unwrap(),
                [("loud".to_string(), ON), ("quiet".to_string(), OFF)]
            );
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(
            s.load_all().unwrap(),
            [("loud".to_string(), ON), ("quiet".to_string(), OFF)],
            "settings survive reopening the file"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unreadable_rows_are_skipped_not_fatal() {
        let (dir, path) = temp_db("garbage");
        let s = SqliteStore::open(&path).unwrap();
        s.put("good", &OFF, 1).unwrap();
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            for (room, settings) in [
                ("bad-json", "{not json"),
                ("wrong-shape", "[1,2,3]"),
                ("wrong-type", r#"{"enhanced_audio":"yes"}"#),
                ("bad room/name", r#"{"enhanced_audio":false}"#),
            ] {
                c.execute(
                    "INSERT INTO room_settings (room, settings, updated_ms) VALUES (?1, ?2, 0)",
                    rusqlite::params![room, settings],
                )
                .unwrap();
            }
            // Wrong column types (SQLite lets them in).
            c.execute(
                "INSERT INTO room_settings (room, settings) VALUES (42, x'00ff')",
                [],
            )
            .unwrap();
        }
        assert_eq!(s.load_all().unwrap(), [("good".to_string(), OFF)]);
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.load_all().unwrap(), [("good".to_string(), OFF)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn chat_purge_leaves_room_settings_alone() {
        let (dir, path) = temp_db("purge");
        let s = SqliteStore::open(&path).unwrap();
        s.put("quiet", &OFF, 1).unwrap();
        let who = Sender {
            identity: "ana".into(),
            name: "Ana".into(),
        };
        s.append("quiet", &who, "hello", 10).unwrap();
        assert_eq!(s.purge_idle(1_000, &HashSet::new()).unwrap(), 1);
        assert!(s.recent("quiet", 10).unwrap().is_empty());
        assert_eq!(s.load_all().unwrap(), [("quiet".to_string(), OFF)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
