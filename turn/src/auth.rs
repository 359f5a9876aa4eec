//! Long-term credentials: TURN REST API shared-secret usernames and static users.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};

/// Mints TURN REST API credentials (the scheme coturn's `use-auth-secret` speaks):
/// username `"<expiry unix time>:<user>"` (or just the expiry if `user` is empty),
/// password `base64(HMAC-SHA1(secret, username))`.
pub fn rest_credentials(
    secret: &str,
    user: &str,
    ttl: Duration,
    now_unix: u64,
) -> (String, String) {
    let expiry = now_unix.saturating_add(ttl.as_secs());
    let username = if user.is_empty() {
        expiry.to_string()
    } else {
        format!("{expiry}:{user}")
    };
    let password = rest_password(secret.as_bytes(), &username);
    (username, password)
}

fn rest_password(secret: &[u8], username: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The long-term key `MD5(username ":" realm ":" password)` (RFC 8489 §9.2.2).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub realm: String,
    pub auth_secret: Option<String>,
    pub static_users: HashMap<String, String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum KeyError {
    /// No such user, malformed REST username, or no secret configured.
    Unknown,
    /// REST username whose expiry timestamp has passed.
    Expired,
}

impl Credentials {
    /// Looks up the long-term key for `username` at `now_unix`.
    /// Static users win over the REST scheme so operators can pin accounts.
    pub fn key_for(&self, username: &str, now_unix: u64) -> Result<[u8; 16], KeyError> {
        if let Some(pw) = self.static_users.get(username) {
            return Ok(long_term_key(username, &self.realm, pw));
        }
        let secret = self.auth_secret.as_deref().ok_or(KeyError::Unknown)?;
        let ts = username.split(':').next().unwrap_or("");
        let expiry: u64 = ts.parse().map_err(|_| KeyError::Unknown)?;
        if expiry <= now_unix {
            return Err(KeyError::Expired);
        }
        let pw = rest_password(secret.as_bytes(), username);
        Ok(long_term_key(username, &self.realm, &pw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_roundtrip_and_expiry() {
        let creds = Credentials {
            realm: "chorus".into(),
            auth_secret: Some("s3cret".into()),
            static_users: HashMap::new(),
        };
        let (u, p) = rest_credentials("s3cret", "alice", Duration::from_secs(60), 1000);
        assert_eq!(u, "1060:alice");
        assert_eq!(creds.key_for(&u, 1000), Ok(long_term_key(&u, "chorus", &p)));
        assert_eq!(creds.key_for(&u, 1060), Err(KeyError::Expired));
        assert_eq!(creds.key_for("nonsense", 1000), Err(KeyError::Unknown));
        let (u2, _) = rest_credentials("s3cret", "", Duration::from_secs(5), 10);
        assert_eq!(u2, "15");
        assert!(creds.key_for(&u2, 10).is_ok());
    }

    #[test]
    fn rest_password_matches_coturn_formula() {
        // base64(HMAC-SHA1("secret", "1234:user")) computed independently with openssl.
        let (_, p) = rest_credentials("secret", "user", Duration::from_secs(1234), 0);
        assert_eq!(p, "TOULffkZMvfceQnPB56NGjcf9ls=");
    }

    #[test]
    fn static_users() {
        let mut users = HashMap::new();
        users.insert("bob".to_string(), "pw".to_string());
        let creds = Credentials {
            realm: "r".into(),
            auth_secret: None,
            static_users: users,
        };
        assert_eq!(creds.key_for("bob", 0), Ok(long_term_key("bob", "r", "pw")));
        assert_eq!(creds.key_for("9999:bob2", 0), Err(KeyError::Unknown));
    }
}
