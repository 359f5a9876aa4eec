//! Chorus TURN relay (RFC 8656 with RFC 6156 IPv6): lets voice/video clients behind
//! restrictive NATs and firewalls reach the SFU over UDP, TCP or TLS, using the
//! short-lived TURN REST API credentials that signaling mints.
//!
//! The protocol logic is a sans-IO state machine ([`core::Server`]); [`run`] is the
//! thin tokio shell that owns the sockets.

pub mod args;
pub mod auth;
pub mod core;
pub mod policy;
mod shell;
pub mod stun;

pub use args::TurnArgs;
pub use auth::rest_credentials;
pub use shell::{config_from_args, render_metrics, run, run_with_config, RunningTurn};
