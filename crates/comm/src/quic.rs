//! QUIC transport (quinn). TLS 1.3 with a self-signed certificate made from the node's Ed25519
//! identity key; custom verifiers on both sides accept a certificate only if its key is the
//! expected peer (or on the allow-list), so the TLS key is pinned to the node identity. The
//! referee-comm protocol (Noise handshake and all) then runs on one bidirectional stream, exactly
//! as over TCP, so identities are checked twice and the framing, rekeying and replay rules are the
//! same on every transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use zeroize::Zeroizing;

use crate::conn::{BoxRead, BoxWrite, Connection};
use crate::error::{ConnectError, HandshakeError};
use crate::handshake::Expect;
use crate::identity::{AllowList, Identity, PeerId};
use crate::node::{Addr, Event, Listener, Node, emit, spawn_responder};

/// ALPN protocol id.
pub(crate) const ALPN: &[u8] = b"referee-comm/1";
const SERVER_NAME: &str = "referee-comm";
/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410 §7): the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
/// SubjectPublicKeyInfo prefix of an Ed25519 public key (RFC 8410 §4): the 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

fn quic_err(e: impl std::fmt::Display) -> ConnectError {
    ConnectError::Quic(e.to_string())
}

/// A self-signed certificate whose key is the node's Ed25519 identity key.
fn tls_identity(id: &Identity) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), ConnectError> {
    let mut pkcs8 = Zeroizing::new(Vec::with_capacity(48));
    pkcs8.extend_from_slice(&ED25519_PKCS8_PREFIX);
    pkcs8.extend_from_slice(id.ed25519_seed().as_slice());
    let key = rcgen::KeyPair::try_from(pkcs8.as_slice()).map_err(quic_err)?;
    let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
        .and_then(|p| p.self_signed(&key))
        .map_err(quic_err)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()))))
}

/// The Ed25519 identity in a certificate's SubjectPublicKeyInfo.
fn cert_peer(cert: &CertificateDer<'_>) -> Result<PeerId, rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let spki = ee.subject_public_key_info();
    match spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..]).map(<[u8; 32]>::try_from) {
        Some(Ok(key)) => Ok(PeerId::from_bytes(key)),
        _ => Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(PinError(
            "certificate key is not an Ed25519 referee identity".into(),
        )))))),
    }
}

#[derive(Debug)]
struct PinError(String);
impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for PinError {}

/// Accepts a certificate only if its key is the pinned peer (or, with no pin, on the allow-list).
#[derive(Debug)]
struct PinVerifier {
    allow: AllowList,
    expect: Option<PeerId>,
    algs: WebPkiSupportedAlgorithms,
}

impl PinVerifier {
    fn new(allow: AllowList, expect: Option<PeerId>) -> Self {
        Self { allow, expect, algs: rustls::crypto::ring::default_provider().signature_verification_algorithms }
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let id = cert_peer(cert)?;
        let ok = match self.expect {
            Some(want) => want == id,
            None => self.allow.allows(&id),
        };
        if ok {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(PinError(
                format!("TLS key {id} is not the pinned/allowed referee identity"),
            ))))))
        }
    }

    fn tls13(&self, msg: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> TlsSig {
        rustls::crypto::verify_tls13_signature(msg, cert, dss, &self.algs)
    }
}

type TlsSig = Result<HandshakeSignatureValid, rustls::Error>;

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> TlsSig {
        Err(rustls::Error::General("TLS 1.2 is not supported by referee-comm".into()))
    }
    fn verify_tls13_signature(&self, msg: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> TlsSig {
        self.tls13(msg, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PinVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> TlsSig {
        Err(rustls::Error::General("TLS 1.2 is not supported by referee-comm".into()))
    }
    fn verify_tls13_signature(&self, msg: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> TlsSig {
        self.tls13(msg, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(node: &Node) -> Result<quinn::ServerConfig, ConnectError> {
    let (cert, key) = tls_identity(&node.inner.identity)?;
    let verifier = Arc::new(PinVerifier::new(node.inner.allow.clone(), None));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(quic_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .map_err(quic_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(quic_err)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

fn client_config(node: &Node, expect: Option<PeerId>) -> Result<quinn::ClientConfig, ConnectError> {
    let (cert, key) = tls_identity(&node.inner.identity)?;
    let verifier = Arc::new(PinVerifier::new(node.inner.allow.clone(), expect));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(quic_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .map_err(quic_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(quic_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

async fn resolve(a: &str) -> Result<SocketAddr, ConnectError> {
    let io_err = |source| ConnectError::Io { addr: format!("quic://{a}"), source };
    tokio::net::lookup_host(a)
        .await
        .map_err(io_err)?
        .next()
        .ok_or_else(|| io_err(std::io::Error::new(std::io::ErrorKind::NotFound, "host name resolved to no address")))
}

fn split_quic(j: tokio::io::Join<quinn::RecvStream, quinn::SendStream>) -> (BoxRead, BoxWrite) {
    let (r, w) = j.into_inner();
    (Box::new(r), Box::new(w))
}

pub(crate) async fn listen(node: &Node, a: &str) -> Result<Listener, ConnectError> {
    let sa = resolve(a).await?;
    let ep = quinn::Endpoint::server(server_config(node)?, sa)
        .map_err(|source| ConnectError::Bind { addr: format!("quic://{a}"), source })?;
    let local = Addr::Quic(ep.local_addr().map_err(quic_err)?.to_string());
    let weak = Arc::downgrade(&node.inner);
    let task = tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Some(inner) = weak.upgrade() else { return };
            // Under load, a client must first prove its address with a stateless Retry token
            // (QUIC's cookie challenge) before it costs a TLS handshake or a place in the pool.
            if !incoming.remote_address_validated() && incoming.may_retry() && inner.admission.under_load() {
                let _ = incoming.retry();
                continue;
            }
            tokio::spawn(async move {
                let remote = format!("quic://{}", incoming.remote_address());
                let source = incoming.remote_address().ip().to_string();
                // The TLS handshake is unauthenticated work too: it holds a place in the pool.
                let (ticket, evicted) = inner.admission.admit(&source);
                let t = inner.cfg.handshake_timeout;
                let accepted = tokio::time::timeout(t, async {
                    let conn = incoming.await.map_err(|e| e.to_string())?;
                    ticket.progressed();
                    tokio::select! {
                        r = conn.accept_bi() => r.map_err(|e| e.to_string()),
                        _ = evicted => Err(HandshakeError::Evicted.to_string()),
                    }
                })
                .await;
                drop(ticket);
                match accepted {
                    Ok(Ok((send, recv))) => {
                        spawn_responder(inner, tokio::io::join(recv, send), remote, source, split_quic);
                    }
                    Ok(Err(reason)) => emit(&inner, Event::Refused { remote, reason: format!("QUIC/TLS: {reason}") }),
                    Err(_) => emit(&inner, Event::Refused { remote, reason: "QUIC handshake timed out".into() }),
                }
            });
        }
    });
    Ok(crate::node::listener(local, task))
}

pub(crate) async fn dial(node: &Node, a: &str, addr: &Addr, expect: Expect) -> Result<Connection, ConnectError> {
    let sa = resolve(a).await?;
    let ep = {
        let mut slot = node.inner.quic.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*slot {
            Some(ep) => ep.clone(),
            None => {
                let bind: SocketAddr =
                    if sa.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
                let ep = quinn::Endpoint::client(bind)
                    .map_err(|source| ConnectError::Io { addr: addr.to_string(), source })?;
                *slot = Some(ep.clone());
                ep
            }
        }
    };
    let cfg = client_config(node, expect.peer)?;
    let t = node.inner.cfg.handshake_timeout;
    let conn = tokio::time::timeout(t, async {
        let conn = ep.connect_with(cfg, sa, SERVER_NAME).map_err(quic_err)?.await.map_err(quic_err)?;
        let (send, recv) = conn.open_bi().await.map_err(quic_err)?;
        Ok::<_, ConnectError>(tokio::io::join(recv, send))
    })
    .await
    .map_err(|_| ConnectError::Quic(format!("QUIC handshake with {addr} timed out after {t:?}")))??;
    node.initiate(conn, addr, expect, split_quic).await
}
