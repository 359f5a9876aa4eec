//! The control-plane listener: SFU nodes dial in over QUIC, prove they hold the node
//! secret (challenge/response, the secret never crosses the wire), and then exchange
//! length-prefixed JSON frames on one bidirectional stream. See `docs/control-protocol.md`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chorus_protocol::control::{auth_message, FromNode, ToNode};
use chorus_protocol::framing::{encode, FrameDecoder};
use chorus_protocol::{CONTROL_ALPN, CONTROL_VERSION};
use hmac::{Hmac, Mac};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Sha256;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::hub::Hub;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The certificate and key the control listener presents. Nodes pin the certificate.
pub struct ControlIdentity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl ControlIdentity {
    /// A fresh self-signed certificate for the names nodes will use to reach us.
    pub fn self_signed() -> anyhow::Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec![
            "chorus-control".to_string(),
            "localhost".to_string(),
        ])?;
        Ok(ControlIdentity {
            cert: ck.cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        })
    }

    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_file(cert)
            .with_context(|| format!("reading control certificate {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading control key {}", key.display()))?;
        Ok(ControlIdentity { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.cert.as_ref());
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out
    }
}

pub fn endpoint(addr: SocketAddr, identity: &ControlIdentity) -> anyhow::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(15).try_into()?));
    server.transport_config(Arc::new(transport));
    quinn::Endpoint::server(server, addr)
        .with_context(|| format!("binding control listener on {addr}"))
}

pub async fn serve(endpoint: quinn::Endpoint, hub: Arc<Hub>, node_secret: Arc<String>) {
    while let Some(incoming) = endpoint.accept().await {
        let hub = hub.clone();
        let secret = node_secret.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    if let Err(e) = node_session(conn, hub, &secret).await {
                        warn!(%remote, "control session ended: {e:#}");
                    }
                }
                Err(e) => warn!(%remote, "control handshake failed: {e}"),
            }
        });
    }
}

async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> anyhow::Result<Option<T>> {
    loop {
        if let Some(m) = dec.next_frame::<T>()? {
            return Ok(Some(m));
        }
        match recv.read(buf).await? {
            Some(n) => dec.push(&buf[..n]),
            None => return Ok(None),
        }
    }
}

async fn node_session(conn: quinn::Connection, hub: Arc<Hub>, secret: &str) -> anyhow::Result<()> {
    let remote = conn.remote_address();
    let (mut send, mut recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .context("node opened no stream")??;
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];

    let hello = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_frame::<FromNode>(&mut recv, &mut dec, &mut buf),
    )
    .await
    .context("no hello")??;
    let (node_id, media_addrs) = match hello {
        Some(FromNode::Hello {
            node_id,
            version,
            media_addrs,
        }) if version == CONTROL_VERSION && !node_id.is_empty() && node_id.len() <= 128 => {
            (node_id, media_addrs)
        }
        other => {
            let reason = format!("expected hello with version {CONTROL_VERSION}, got {other:?}");
            let _ = send
                .write_all(&encode(&ToNode::Rejected {
                    reason: reason.clone(),
                }))
                .await;
            anyhow::bail!(reason);
        }
    };

    let nonce = hex::encode(rand::random::<[u8; 32]>());
    send.write_all(&encode(&ToNode::Challenge {
        nonce: nonce.clone(),
        version: CONTROL_VERSION,
    }))
    .await?;
    let auth = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_frame::<FromNode>(&mut recv, &mut dec, &mut buf),
    )
    .await
    .context("no auth")??;
    let ok = match auth {
        Some(FromNode::Auth { mac }) => verify_mac(secret, &nonce, &node_id, &mac),
        _ => false,
    };
    if !ok {
        let _ = send
            .write_all(&encode(&ToNode::Rejected {
                reason: "authentication failed: wrong node secret".into(),
            }))
            .await;
        let _ = send.finish();
        // Give the frame a moment to leave before the connection is torn down.
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.close(1u32.into(), b"auth failed");
        anyhow::bail!("node {node_id:?} from {remote} failed authentication");
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<ToNode>();
    if let Err(reason) = hub.register_node(&node_id, tx) {
        let _ = send
            .write_all(&encode(&ToNode::Rejected {
                reason: reason.clone(),
            }))
            .await;
        conn.close(2u32.into(), b"duplicate node");
        anyhow::bail!(reason);
    }
    info!(node = %node_id, %remote, ?media_addrs, "node authenticated");
    send.write_all(&encode(&ToNode::Welcome {
        node_id: node_id.clone(),
    }))
    .await?;

    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if send.write_all(&encode(&m)).await.is_err() {
                break;
            }
        }
    });

    let result = loop {
        match read_frame::<FromNode>(&mut recv, &mut dec, &mut buf).await {
            Ok(Some(ev)) => hub.node_event(&node_id, ev).await,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    hub.node_gone(&node_id).await;
    writer.abort();
    result
}

fn verify_mac(secret: &str, nonce: &str, node_id: &str, mac_hex: &str) -> bool {
    let Ok(given) = hex::decode(mac_hex) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(auth_message(nonce, node_id).as_bytes());
    // verify_slice compares in constant time.
    mac.verify_slice(&given).is_ok()
}
