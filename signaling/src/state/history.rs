//! Chat history stores for the in-memory state ([`super::memory::MemoryState`]): SQLite
//! on disk by default (it survives restarts and needs nothing installed), or memory.
//! With Redis the history is a stream per room instead ([`super::redis`]).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use chorus_protocol::chat::{ChatMessage, Sender};

/// Where chat history is kept.
pub trait ChatStore: Send + Sync {
    /// Appends a message and returns it with its id (strictly increasing per room).
    fn append(&self, room: &str, from: &Sender, text: &str, ts: u64)
        -> anyhow::Result<ChatMessage>;
    /// The last `limit` messages of a room, oldest first.
    fn recent(&self, room: &str, limit: usize) -> anyhow::Result<Vec<ChatMessage>>;
    /// The identity that wrote message `id` in `room`, if it exists.
    fn author(&self, room: &str, id: u64) -> anyhow::Result<Option<String>>;
    /// Deletes a message; false if it did not exist.
    fn delete(&self, room: &str, id: u64) -> anyhow::Result<bool>;
    /// Drops the history of rooms not in `active` whose newest message is older than
    /// `cutoff_ms`. Returns how many messages went.
    fn purge_idle(&self, cutoff_ms: u64, active: &HashSet<String>) -> anyhow::Result<usize>;
}

/// History in memory only: lost on restart. Keeps at most `cap` messages per room.
pub struct MemoryStore {
    cap: usize,
    inner: Mutex<(u64, HashMap<String, Vec<ChatMessage>>)>,
}

impl MemoryStore {
    pub fn new(cap: usize) -> Self {
        MemoryStore {
            cap: cap.max(1),
            inner: Mutex::new((0, HashMap::new())),
        }
    }
}

impl ChatStore for MemoryStore {
    fn append(
        &self,
        room: &str,
        from: &Sender,
        text: &str,
        ts: u64,
    ) -> anyhow::Result<ChatMessage> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        let msg = ChatMessage {
            id: g.0,
            from: from.clone(),
            text: text.to_string(),
            ts,
        };
        let list = g.1.entry(room.to_string()).or_default();
        list.push(msg.clone());
        if list.len() > self.cap {
            let extra = list.len() - self.cap;
            list.drain(..extra);
        }
        Ok(msg)
    }

    fn recent(&self, room: &str, limit: usize) -> anyhow::Result<Vec<ChatMessage>> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let list = g.1.get(room).map(Vec::as_slice).unwrap_or_default();
        Ok(list[list.len().saturating_sub(limit)..].to_vec())
    }

    fn author(&self, room: &str, id: u64) -> anyhow::Result<Option<String>> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Ok(g.1
            .get(room)
            .and_then(|l| l.iter().find(|m| m.id == id))
            .map(|m| m.from.identity.clone()))
    }

    fn delete(&self, room: &str, id: u64) -> anyhow::Result<bool> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = g.1.get_mut(room) else {
            return Ok(false);
        };
        let before = list.len();
        list.retain(|m| m.id != id);
        Ok(list.len() != before)
    }

    fn purge_idle(&self, cutoff_ms: u64, active: &HashSet<String>) -> anyhow::Result<usize> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut gone = 0;
        g.1.retain(|room, list| {
            let idle = !active.contains(room) && list.last().is_none_or(|m| m.ts < cutoff_ms);
            if idle {
                gone += list.len();
            }
            !idle
        });
        Ok(gone)
    }
}

/// History in a SQLite file. The same file keeps room settings
/// (see [`super::settings_store`]) in a table of their own.
pub struct SqliteStore {
    conn: Mutex<rusqlite::Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = rusqlite::Connection::open(path)
            .with_context(|| format!("opening chat store {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS chat_messages (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 room TEXT NOT NULL,
                 identity TEXT NOT NULL,
                 name TEXT NOT NULL,
                 text TEXT NOT NULL,
                 ts INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS chat_messages_room ON chat_messages(room, id);",
        )
        .context("initialising the chat store schema")?;
        conn.execute_batch(super::settings_store::SCHEMA)
            .context("initialising the room settings schema")?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ChatStore for SqliteStore {
    fn append(
        &self,
        room: &str,
        from: &Sender,
        text: &str,
        ts: u64,
    ) -> anyhow::Result<ChatMessage> {
        let c = self.conn();
        c.execute(
            "INSERT INTO chat_messages (room, identity, name, text, ts) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![room, from.identity, from.name, text, ts as i64],
        )?;
        Ok(ChatMessage {
            id: c.last_insert_rowid() as u64,
            from: from.clone(),
            text: text.to_string(),
            ts,
        })
    }

    fn recent(&self, room: &str, limit: usize) -> anyhow::Result<Vec<ChatMessage>> {
        let c = self.conn();
        let mut st = c.prepare_cached(
            "SELECT id, identity, name, text, ts FROM chat_messages WHERE room = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let mut out: Vec<ChatMessage> = st
            .query_map(rusqlite::params![room, limit as i64], |r| {
                Ok(ChatMessage {
                    id: r.get::<_, i64>(0)? as u64,
                    from: Sender {
                        identity: r.get(1)?,
                        name: r.get(2)?,
                    },
                    text: r.get(3)?,
                    ts: r.get::<_, i64>(4)? as u64,
                })
            })?
            .collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    fn author(&self, room: &str, id: u64) -> anyhow::Result<Option<String>> {
        let c = self.conn();
        let mut st =
            c.prepare_cached("SELECT identity FROM chat_messages WHERE room = ?1 AND id = ?2")?;
        let mut rows = st.query(rusqlite::params![room, id as i64])?;
        Ok(match rows.next()? {
            Some(r) => Some(r.get(0)?),
            None => None,
        })
    }

    fn delete(&self, room: &str, id: u64) -> anyhow::Result<bool> {
        let n = self.conn().execute(
            "DELETE FROM chat_messages WHERE room = ?1 AND id = ?2",
            rusqlite::params![room, id as i64],
        )?;
        Ok(n > 0)
    }

    fn purge_idle(&self, cutoff_ms: u64, active: &HashSet<String>) -> anyhow::Result<usize> {
        let c = self.conn();
        let idle: Vec<String> = {
            let mut st =
                c.prepare("SELECT room FROM chat_messages GROUP BY room HAVING MAX(ts) < ?1")?;
            let rows = st.query_map(rusqlite::params![cutoff_ms as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut gone = 0;
        for room in idle.iter().filter(|r| !active.contains(*r)) {
            gone += c.execute(
                "DELETE FROM chat_messages WHERE room = ?1",
                rusqlite::params![room],
            )?;
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ana() -> Sender {
        Sender {
            identity: "ana".into(),
            name: "Ana".into(),
        }
    }

    fn exercise(store: &dyn ChatStore) {
        let a = store.append("r1", &ana(), "one", 10).unwrap();
        let b = store.append("r2", &ana(), "other room", 11).unwrap();
        let c = store.append("r1", &ana(), "two", 12).unwrap();
        assert!(a.id < b.id && b.id < c.id, "ids strictly increase");
        let r1 = store.recent("r1", 10).unwrap();
        assert_eq!(
            r1.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(store.recent("r1", 1).unwrap()[0].text, "two");
        assert_eq!(store.author("r1", a.id).unwrap().as_deref(), Some("ana"));
        assert_eq!(
            store.author("r2", a.id).unwrap(),
            None,
            "ids are scoped to their room"
        );
        assert!(store.delete("r1", a.id).unwrap());
        assert!(!store.delete("r1", a.id).unwrap());
        assert_eq!(store.recent("r1", 10).unwrap().len(), 1);
        // r2 is idle (newest 11 < cutoff 12) and empty of people; r1 is active.
        let active = HashSet::from(["r1".to_string()]);
        assert_eq!(store.purge_idle(12, &active).unwrap(), 1);
        assert!(store.recent("r2", 10).unwrap().is_empty());
        assert_eq!(store.recent("r1", 10).unwrap().len(), 1);
    }

    #[test]
    fn memory_store_follows_the_rules() {
        exercise(&MemoryStore::new(100));
    }

    #[test]
    fn sqlite_store_follows_the_rules_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("chorus-chat-test-{}", std::process::id()));
        let path = dir.join("chat.sqlite3");
        let _ = std::fs::remove_file(&path);
        {
            let s = SqliteStore::open(&path).unwrap();
            exercise(&s);
            s.append("r3", &ana(), "persisted ✓ <b>", 20).unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let r3 = s.recent("r3", 10).unwrap();
        assert_eq!(r3.len(), 1);
        assert_eq!(r3[0].text, "persisted ✓ <b>");
        let next = s.append("r3", &ana(), "after restart", 21).unwrap();
        assert!(next.id > r3[0].id, "ids keep increasing across restarts");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn memory_store_caps_each_room() {
        let s = MemoryStore::new(3);
        for i in 0..5 {
            s.append("r", &ana(), &i.to_string(), i).unwrap();
        }
        let r = s.recent("r", 10).unwrap();
        assert_eq!(
            r.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["2", "3", "4"]
        );
    }
}
