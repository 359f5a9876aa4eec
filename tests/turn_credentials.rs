//! Signaling mints TURN REST credentials on its own (it does not depend on the relay
//! crate); this checks that what it mints is exactly what the relay verifies.

use std::time::Duration;

use chorus_signaling::TurnRest;

#[test]
fn signaling_credentials_match_the_relays_rest_scheme() {
    let rest = TurnRest {
        urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
        secret: "s3cret-shared".into(),
        ttl: Duration::from_secs(3600),
    };
    let server = rest.credentials("ana-12ab");
    let username = server.username.expect("username");
    let credential = server.credential.expect("credential");
    let (expiry, user) = username.split_once(':').expect("expiry:user");
    assert_eq!(user, "ana-12ab");
    let expiry: u64 = expiry.parse().expect("unix time");
    let (u2, p2) = chorus_turn::rest_credentials(
        "s3cret-shared",
        "ana-12ab",
        Duration::from_secs(3600),
        expiry - 3600,
    );
    assert_eq!(u2, username);
    assert_eq!(p2, credential);
    assert_eq!(server.urls, rest.urls);
}
