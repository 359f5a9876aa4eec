//! Access tokens: HS256 JWTs whose `iss` names an API key. Minting lives here too so the
//! `chorus token` command, the dev endpoint and tests share one definition of the claims.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_protocol::client::{ErrorCode, Grants};
use jsonwebtoken::{
    decode, encode, errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub room: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub grants: Grants,
}

impl Claims {
    pub fn display_name(&self) -> &str {
        self.name
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.sub)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    pub code: ErrorCode,
    pub message: String,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Builds claims for a participant token valid from now for `ttl`.
pub fn participant_claims(
    api_key: &str,
    room: &str,
    identity: &str,
    name: Option<&str>,
    ttl: Duration,
    grants: Grants,
) -> Claims {
    let now = now_unix();
    Claims {
        iss: api_key.to_string(),
        sub: identity.to_string(),
        name: name.map(str::to_string),
        room: room.to_string(),
        exp: now + ttl.as_secs().max(1),
        nbf: Some(now.saturating_sub(1)),
        grants,
    }
}

/// Signs claims with an API secret.
pub fn mint(claims: &Claims, api_secret: &str) -> anyhow::Result<String> {
    Ok(encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(api_secret.as_bytes()),
    )?)
}

/// Verifies tokens against the configured API key → secret pairs.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: HashMap<String, String>,
}

impl TokenVerifier {
    pub fn new(keys: HashMap<String, String>) -> Self {
        TokenVerifier { keys }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let invalid = |m: &str| TokenError {
            code: ErrorCode::InvalidToken,
            message: m.to_string(),
        };
        if token.is_empty() {
            return Err(invalid("no token given"));
        }
        if token.len() > 8192 {
            return Err(invalid("token is too long"));
        }
        let mut last = invalid("token was not signed by any known API key");
        for (key, secret) in &self.keys {
            let mut v = Validation::new(Algorithm::HS256);
            v.leeway = LEEWAY_SECS;
            v.validate_nbf = true;
            v.set_issuer(&[key.as_str()]);
            v.set_required_spec_claims(&["exp", "iss", "sub"]);
            match decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &v) {
                Ok(data) => {
                    if data.claims.room.is_empty() {
                        return Err(invalid("token has an empty room"));
                    }
                    if data.claims.sub.is_empty() {
                        return Err(invalid("token has an empty identity (sub)"));
                    }
                    return Ok(data.claims);
                }
                Err(e) => match e.kind() {
                    ErrorKind::ExpiredSignature => {
                        return Err(TokenError {
                            code: ErrorCode::TokenExpired,
                            message: "token expired".into(),
                        })
                    }
                    ErrorKind::ImmatureSignature => {
                        return Err(TokenError {
                            code: ErrorCode::TokenExpired,
                            message: "token is not valid yet (nbf)".into(),
                        })
                    }
                    ErrorKind::InvalidSignature | ErrorKind::InvalidIssuer => {}
                    ErrorKind::InvalidToken
                    | ErrorKind::Base64(_)
                    | ErrorKind::Json(_)
                    | ErrorKind::Utf8(_) => {
                        return Err(invalid("token is malformed"));
                    }
                    ErrorKind::MissingRequiredClaim(c) => {
                        return Err(invalid(&format!("token lacks the `{c}` claim")));
                    }
                    ErrorKind::InvalidAlgorithm => {
                        return Err(invalid("token must be signed with HS256"))
                    }
                    other => last = invalid(&format!("token rejected: {other:?}")),
                },
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(HashMap::from([
            ("devkey".to_string(), "devsecret".to_string()),
            ("other".to_string(), "othersecret".to_string()),
        ]))
    }

    fn claims(exp_offset: i64) -> Claims {
        let now = now_unix() as i64;
        Claims {
            iss: "devkey".into(),
            sub: "ana".into(),
            name: Some("Ana".into()),
            room: "lobby".into(),
            exp: (now + exp_offset) as u64,
            nbf: None,
            grants: Grants::default_participant(),
        }
    }

    #[test]
    fn valid_token_round_trips() {
        let t = mint(&claims(60), "devsecret").unwrap();
        let c = verifier().verify(&t).unwrap();
        assert_eq!(c, claims(60));
        assert_eq!(c.display_name(), "Ana");
    }

    #[test]
    fn second_key_works() {
        let mut c = claims(60);
        c.iss = "other".into();
        let t = mint(&c, "othersecret").unwrap();
        assert_eq!(verifier().verify(&t).unwrap().iss, "other");
    }

    #[test]
    fn expired_token_is_token_expired() {
        let t = mint(&claims(-60), "devsecret").unwrap();
        assert_eq!(
            verifier().verify(&t).unwrap_err().code,
            ErrorCode::TokenExpired
        );
    }

    #[test]
    fn not_yet_valid_token_is_rejected() {
        let mut c = claims(600);
        c.nbf = Some(now_unix() + 300);
        let t = mint(&c, "devsecret").unwrap();
        assert_eq!(
            verifier().verify(&t).unwrap_err().code,
            ErrorCode::TokenExpired
        );
    }

    #[test]
    fn wrong_secret_and_unknown_key_are_invalid() {
        let t = mint(&claims(60), "not-the-secret").unwrap();
        assert_eq!(
            verifier().verify(&t).unwrap_err().code,
            ErrorCode::InvalidToken
        );
        let mut c = claims(60);
        c.iss = "nobody".into();
        let t = mint(&c, "devsecret").unwrap();
        assert_eq!(
            verifier().verify(&t).unwrap_err().code,
            ErrorCode::InvalidToken
        );
    }

    #[test]
    fn garbage_is_invalid() {
        for t in ["", "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30.sig"] {
            assert_eq!(
                verifier().verify(t).unwrap_err().code,
                ErrorCode::InvalidToken,
                "{t}"
            );
        }
        assert_eq!(
            verifier().verify(&"x".repeat(10_000)).unwrap_err().code,
            ErrorCode::InvalidToken
        );
    }

    #[test]
    fn other_algorithms_are_refused() {
        let t = encode(
            &Header::new(Algorithm::HS512),
            &claims(60),
            &EncodingKey::from_secret(b"devsecret"),
        )
        .unwrap();
        assert_eq!(
            verifier().verify(&t).unwrap_err().code,
            ErrorCode::InvalidToken
        );
    }

    #[test]
    fn missing_grants_default_to_false() {
        #[derive(Serialize)]
        struct Bare {
            iss: &'static str,
            sub: &'static str,
            room: &'static str,
            exp: u64,
        }
        let t = encode(
            &Header::new(Algorithm::HS256),
            &Bare {
                iss: "devkey",
                sub: "x",
                room: "r",
                exp: now_unix() + 60,
            },
            &EncodingKey::from_secret(b"devsecret"),
        )
        .unwrap();
        let c = verifier().verify(&t).unwrap();
        assert_eq!(c.grants, Grants::default());
    }
}
