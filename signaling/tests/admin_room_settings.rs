//! The admin API's room settings against a real signaling with a data dir: a write that
//! the database refuses is a clear 500 and changes nothing.

use std::collections::HashMap;
use std::time::Duration;

use chorus_protocol::client::Grants;
use chorus_signaling::token::{mint, participant_claims};
use chorus_signaling::{Signaling, SignalingConfig};

async fn signaling_on(db: &std::path::Path) -> Signaling {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Signaling::start(SignalingConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        api_keys: HashMap::from([("devkey".into(), "devsecret".into())]),
        node_secret: "test-node-secret".into(),
        control_cert: None,
        https: None,
        dev_key: None,
        reconnect_grace: Duration::from_secs(15),
        ice_servers: vec![],
        turn: None,
        chat_db: Some(db.to_path_buf()),
        redis: None,
        chat: Default::default(),
        allow_enhanced_audio: true,
    })
    .await
    .unwrap()
}

fn admin_token() -> String {
    let grants = Grants {
        admin: true,
        ..Grants::default_participant()
    };
    let claims = participant_claims("devkey", "*", "ops", None, Duration::from_secs(600), grants);
    mint(&claims, "devsecret").unwrap()
}

/// A minimal HTTP/1.1 exchange: (status, body).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        admin_token(),
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn a_failed_settings_write_is_a_500_and_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("chorus-admin-settings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = dir.join("chat.sqlite3");
    let sig = signaling_on(&db).await;
    let addr = sig.http_addr;

    let (st, body) = http(
        addr,
        "PATCH",
        "/admin/rooms/quiet",
        Some(r#"{"enhanced_audio":false}"#),
    )
    .await;
    assert_eq!(st, 200, "{body}");

    // The table goes away under the running server: the next write cannot be stored.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("DROP TABLE room_settings;")
        .unwrap();
    let (st, body) = http(
        addr,
        "PATCH",
        "/admin/rooms/quiet",
        Some(r#"{"enhanced_audio":true}"#),
    )
    .await;
    assert_eq!(st, 500, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "internal");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("could not save")),
        "{body}"
    );
    // What the server enforces is still what was last stored.
    let (st, body) = http(addr, "GET", "/admin/rooms/quiet", None).await;
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["settings"]["enhanced_audio"], false, "{body}");
    drop(sig);
    let _ = std::fs::remove_dir_all(&dir);
}
