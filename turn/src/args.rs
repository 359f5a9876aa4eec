//! Command-line / environment configuration (`chorus turn ...`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// TURN relay options. Every flag can also be set through the environment
/// variable shown in `--help`.
#[derive(clap::Args, Clone, Debug)]
pub struct TurnArgs {
    /// Address for the plain STUN/TURN listener; UDP and TCP are both served on it.
    /// Use port 0 to pick a free port.
    #[arg(long, env = "CHORUS_TURN_LISTEN", default_value = "127.0.0.1:3478")]
    pub listen: SocketAddr,

    /// Address for TURN over TLS (usually port 443 or 5349). Needs --cert and --key.
    #[arg(long, env = "CHORUS_TURN_TLS_LISTEN", requires_all = ["cert", "key"])]
    pub tls_listen: Option<SocketAddr>,

    /// PEM file with the TLS certificate chain for --tls-listen.
    #[arg(long, env = "CHORUS_TURN_CERT")]
    pub cert: Option<PathBuf>,

    /// PEM file with the TLS private key for --tls-listen.
    #[arg(long, env = "CHORUS_TURN_KEY")]
    pub key: Option<PathBuf>,

    /// Authentication realm sent to clients; part of every long-term key.
    #[arg(long, env = "CHORUS_TURN_REALM", default_value = "chorus")]
    pub realm: String,

    /// Shared secret for TURN REST API credentials (must equal signaling's).
    /// Usernames are "<unix-expiry>:<user>", passwords base64(HMAC-SHA1(secret, username)).
    #[arg(long, env = "CHORUS_TURN_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,

    /// IP address relay sockets are bound to and advertised as XOR-RELAYED-ADDRESS.
    /// Must be reachable by peers (the SFU) and by clients' peers.
    #[arg(long, env = "CHORUS_TURN_RELAY_IP", default_value = "127.0.0.1")]
    pub relay_ip: IpAddr,

    /// Address told to clients as XOR-RELAYED-ADDRESS when --relay-ip is a private
    /// address behind 1:1 NAT (cloud VMs with a public IP that is not on the
    /// interface): relay sockets bind to --relay-ip, clients and their peers are told
    /// this one. Same address family as --relay-ip. Default: --relay-ip.
    #[arg(long, env = "CHORUS_TURN_EXTERNAL_IP")]
    pub external_ip: Option<IpAddr>,

    /// Lowest UDP port used for relay allocations.
    #[arg(long, env = "CHORUS_TURN_MIN_PORT", default_value_t = 49152)]
    pub min_port: u16,

    /// Highest UDP port used for relay allocations.
    #[arg(long, env = "CHORUS_TURN_MAX_PORT", default_value_t = 65535)]
    pub max_port: u16,

    /// Allow relaying to loopback peers (127.0.0.0/8, ::1). Needed when the SFU runs on
    /// the same host, e.g. in dev mode. Private, link-local and CGNAT ranges stay denied.
    #[arg(long, env = "CHORUS_TURN_ALLOW_LOOPBACK_PEERS")]
    pub allow_loopback_peers: bool,

    /// Static user as name:password (repeatable; comma-separated in the env var).
    #[arg(
        long = "user",
        env = "CHORUS_TURN_USER",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub users: Vec<String>,

    /// Maximum concurrent allocations per user (486 when exceeded).
    #[arg(long, env = "CHORUS_TURN_USER_QUOTA")]
    pub user_quota: Option<usize>,

    /// Maximum concurrent allocations on this server (486 when exceeded).
    #[arg(long, env = "CHORUS_TURN_TOTAL_QUOTA")]
    pub total_quota: Option<usize>,

    /// Per-allocation bandwidth cap in bits per second, both directions combined;
    /// excess packets are dropped.
    #[arg(long, env = "CHORUS_TURN_MAX_BPS")]
    pub max_bps: Option<u64>,

    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "CHORUS_TURN_METRICS")]
    pub metrics: Option<SocketAddr>,

    /// Maximum concurrent TCP and TLS client connections; further connections are
    /// closed at once (counted in chorus_turn_stream_rejected_total). Each holds a file
    /// descriptor, as does each allocation's relay socket.
    #[arg(long, env = "CHORUS_TURN_MAX_CONNECTIONS", default_value_t = 1000)]
    pub max_connections: usize,

    /// A TCP/TLS client connection is closed after this long without a complete
    /// STUN/TURN frame from the client (a live allocation is refreshed well within its
    /// lifetime), and its first frame must arrive within 10 s or this, whichever is
    /// shorter: idle and half-open connections cannot pile up.
    #[arg(long, env = "CHORUS_TURN_IDLE_TIMEOUT", default_value = "10m",
          value_parser = humantime::parse_duration)]
    pub idle_timeout: std::time::Duration,
}

impl TurnArgs {
    /// Defaults as if no flags were given (handy for dev mode and tests).
    pub fn new() -> Self {
        TurnArgs {
            listen: ([127, 0, 0, 1], 3478).into(),
            tls_listen: None,
            cert: None,
            key: None,
            realm: "chorus".into(),
            auth_secret: None,
            relay_ip: [127, 0, 0, 1].into(),
            external_ip: None,
            min_port: 49152,
            max_port: 65535,
            allow_loopback_peers: false,
            users: Vec::new(),
            user_quota: None,
            total_quota: None,
            max_bps: None,
            metrics: None,
            max_connections: 1000,
            idle_timeout: std::time::Duration::from_secs(600),
        }
    }
}

impl Default for TurnArgs {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        turn: TurnArgs,
    }

    #[test]
    fn defaults_match_new_and_flags_parse() {
        let c = Cli::parse_from(["x"]);
        let d = TurnArgs::new();
        assert_eq!(c.turn.listen, d.listen);
        assert_eq!(c.turn.realm, d.realm);
        assert_eq!(c.turn.min_port, d.min_port);
        assert_eq!(c.turn.max_port, d.max_port);
        assert_eq!(c.turn.max_connections, d.max_connections);
        assert_eq!(c.turn.idle_timeout, d.idle_timeout);
        let c = Cli::parse_from([
            "x",
            "--user",
            "a:b",
            "--user",
            "c:d",
            "--allow-loopback-peers",
            "--max-bps",
            "64000",
            "--relay-ip",
            "::1",
        ]);
        assert_eq!(c.turn.users, vec!["a:b", "c:d"]);
        assert!(c.turn.allow_loopback_peers);
        assert_eq!(c.turn.max_bps, Some(64000));
        assert!(Cli::try_parse_from(["x", "--tls-listen", "127.0.0.1:5349"]).is_err());
    }
}
