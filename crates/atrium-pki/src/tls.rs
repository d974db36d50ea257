//! rustls configurations for the device link (mutual TLS), the HTTPS endpoints and clients,
//! all built with [`crate::crypto_provider()`].
//!
//! Revocation is not checked here: the server looks the device up after the handshake
//! ([`peer_device`]) and drops connections of rejected or decommissioned devices, whose
//! certificates are short-lived anyway.

use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, ConfigBuilder, InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;

use crate::ca::{DEVICE_URI_PREFIX, ServerIdentity};
use crate::key::DeviceKey;
use crate::x509util::serial_hex;
use crate::{PkiError, crypto_provider};

/// Server config for the device link: client certificates chaining to `client_roots` required; ALPN http/1.1.
pub fn server_config_client_auth(
    identity: &ServerIdentity,
    client_roots: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, PkiError> {
    let roots = root_store(client_roots)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
        .build()
        .map_err(|e| PkiError::BadCertificate(format!("client CA roots: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain_der.clone(), identity.key_der.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Server config without client authentication (REST API, enrollment, dashboard); ALPN h2, http/1.1.
pub fn server_config(identity: &ServerIdentity) -> Result<Arc<ServerConfig>, PkiError> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(identity.chain_der.clone(), identity.key_der.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client config trusting only `roots`, optionally authenticating with a certificate chain and device key.
///
/// No ALPN is offered; clone the config and set `alpn_protocols` if a protocol needs it.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    client_auth: Option<(Vec<CertificateDer<'static>>, Arc<dyn DeviceKey>)>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let builder: ConfigBuilder<ClientConfig, WantsClientCert> =
        ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(root_store(roots)?);
    let config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            if chain.is_empty() {
                return Err(PkiError::BadCertificate(
                    "empty client certificate chain".into(),
                ));
            }
            let certified = CertifiedKey::new(chain, key.rustls_signing_key()?);
            match certified.keys_match() {
                Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
                Err(rustls::Error::InconsistentKeys(_)) => return Err(PkiError::KeyMismatch),
                Err(e) => return Err(e.into()),
            }
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
    };
    Ok(Arc::new(config))
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, PkiError> {
    if roots.is_empty() {
        return Err(PkiError::BadCertificate(
            "no trusted root certificate given".into(),
        ));
    }
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    Ok(store)
}

/// The device a verified client certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDevice {
    /// From the SAN URI `urn:atrium:device:<id>`, else the subject CN.
    pub device_id: String,
    /// Certificate serial, lowercase hex without leading zeros (as in [`crate::IssuedCert`]).
    pub serial_hex: String,
    /// End of validity, Unix seconds.
    pub not_after_unix: i64,
}

/// Reads device id, serial and expiry from the client certificate a peer presented.
///
/// Only meaningful after the TLS handshake verified the certificate against our CA.
pub fn peer_device(cert: &CertificateDer<'_>) -> Result<PeerDevice, PkiError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let from_san = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(uri) => {
                    uri.strip_prefix(DEVICE_URI_PREFIX).map(str::to_owned)
                }
                _ => None,
            })
        });
    let device_id = from_san
        .or_else(|| {
            x509.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
        })
        .filter(|id| !id.is_empty())
        .ok_or(PkiError::NoDeviceId)?;
    Ok(PeerDevice {
        device_id,
        serial_hex: serial_hex(x509.raw_serial()),
        not_after_unix: x509.validity().not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;
    use crate::key::{FileKey, p256_signing_key};
    use crate::verify_csr;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    struct Pki {
        _dir: tempfile::TempDir,
        ca: CertificateAuthority,
        server: ServerIdentity,
    }

    fn pki(org: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::load_or_create(dir.path(), org).expect("ca");
        let server = ca
            .issue_server_cert(
                &["localhost".into(), "127.0.0.1".into()],
                Duration::from_secs(86400),
            )
            .expect("server cert");
        Pki {
            _dir: dir,
            ca,
            server,
        }
    }

    fn device(ca: &CertificateAuthority, id: &str) -> (Vec<CertificateDer<'static>>, Arc<FileKey>) {
        let key = Arc::new(FileKey::generate().expect("key"));
        let csr = verify_csr(&key.csr_der(id).expect("csr")).expect("csr verifies");
        let issued = ca
            .issue_device_cert(&csr, id, Duration::from_secs(3600))
            .expect("issue");
        (issued.chain_der, key)
    }

    /// Runs one TLS session over loopback TCP: client sends "hello", server answers "ok".
    /// Returns the server's view (peer device or error) and what the client read.
    fn session(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (Result<Option<PeerDevice>, String>, Result<String, String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_thread = std::thread::spawn(move || -> Result<Option<PeerDevice>, String> {
            let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let conn = rustls::ServerConnection::new(server).map_err(|e| e.to_string())?;
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
            let peer = match tls.conn.peer_certificates().and_then(|c| c.first()) {
                Some(cert) => Some(peer_device(cert).map_err(|e| e.to_string())?),
                None => None,
            };
            tls.write_all(b"ok").map_err(|e| e.to_string())?;
            tls.conn.send_close_notify();
            tls.flush().map_err(|e| e.to_string())?;
            Ok(peer)
        });
        let client_result = (|| -> Result<String, String> {
            let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let name =
                rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
            let conn = rustls::ClientConnection::new(client, name).map_err(|e| e.to_string())?;
            let mut tls = rustls::StreamOwned::new(conn, sock);
            tls.write_all(b"hello").map_err(|e| e.to_string())?;
            let mut reply = String::new();
            tls.read_to_string(&mut reply).map_err(|e| e.to_string())?;
            Ok(reply)
        })();
        let server_result = server_thread.join().expect("server thread");
        (server_result, client_result)
    }

    #[test]
    fn mutual_tls_accepts_our_device_and_reads_its_id() {
        let p = pki("Acme");
        let (chain, key) = device(&p.ca, "gw-0001");
        let server = server_config_client_auth(&p.server, &[p.ca.root_der()]).expect("server");
        let client = client_config(&[p.ca.root_der()], Some((chain, key))).expect("client");
        let (srv, cli) = session(server, client);
        let peer = srv.expect("server accepts").expect("client cert presented");
        assert_eq!(peer.device_id, "gw-0001");
        assert_eq!(cli.expect("client reads reply"), "ok");
    }

    #[test]
    fn mutual_tls_refuses_device_of_another_ca() {
        let p = pki("Acme");
        let rogue = pki("Acme");
        let (chain, key) = device(&rogue.ca, "gw-evil");
        let server = server_config_client_auth(&p.server, &[p.ca.root_der()]).expect("server");
        // The rogue device trusts the real server, so only client authentication can fail.
        let client = client_config(&[p.ca.root_der()], Some((chain, key))).expect("client");
        let (srv, cli) = session(server, client);
        let err = srv.expect_err("server must refuse");
        // Same CA name, different key: webpki reports the signature, else the unknown issuer.
        assert!(
            err.contains("BadSignature") || err.contains("UnknownIssuer"),
            "{err}"
        );
        assert_ne!(cli.ok().as_deref(), Some("ok"));
    }

    #[test]
    fn mutual_tls_refuses_client_without_certificate() {
        let p = pki("Acme");
        let server = server_config_client_auth(&p.server, &[p.ca.root_der()]).expect("server");
        let client = client_config(&[p.ca.root_der()], None).expect("client");
        let (srv, cli) = session(server, client);
        assert!(srv.is_err());
        assert_ne!(cli.ok().as_deref(), Some("ok"));
    }

    #[test]
    fn client_refuses_server_of_another_ca() {
        let p = pki("Acme");
        let rogue = pki("Acme");
        let server = server_config(&rogue.server).expect("server");
        let client = client_config(&[p.ca.root_der()], None).expect("client");
        let (srv, cli) = session(server, client);
        let err = cli.expect_err("client must refuse");
        assert!(
            err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
            "{err}"
        );
        assert!(srv.is_err());
    }

    #[test]
    fn server_auth_only_config_works_and_offers_h2() {
        let p = pki("Acme");
        let server = server_config(&p.server).expect("server");
        assert_eq!(
            server.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let client = client_config(&[p.ca.root_der()], None).expect("client");
        let (srv, cli) = session(server, client);
        assert_eq!(srv.expect("server ok"), None);
        assert_eq!(cli.expect("client ok"), "ok");
    }

    /// A key that signs only through `DeviceKey::sign`, as a PKCS#11 token would.
    struct TokenKey(Arc<FileKey>);

    impl DeviceKey for TokenKey {
        fn public_key_der(&self) -> Vec<u8> {
            self.0.public_key_der()
        }
        fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, PkiError> {
            self.0.sign(msg)
        }
        fn csr_der(&self, common_name: &str) -> Result<Vec<u8>, PkiError> {
            self.0.csr_der(common_name)
        }
        fn rustls_signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, PkiError> {
            p256_signing_key(Arc::new(TokenKey(self.0.clone())))
        }
    }

    #[test]
    fn mutual_tls_with_delegating_signer() {
        let p = pki("Acme");
        let (chain, key) = device(&p.ca, "gw-token");
        let server = server_config_client_auth(&p.server, &[p.ca.root_der()]).expect("server");
        let client = client_config(&[p.ca.root_der()], Some((chain, Arc::new(TokenKey(key)))))
            .expect("client");
        let (srv, cli) = session(server, client);
        assert_eq!(srv.expect("accepted").expect("cert").device_id, "gw-token");
        assert_eq!(cli.expect("reply"), "ok");
    }

    #[test]
    fn client_config_detects_certificate_key_mismatch() {
        let p = pki("Acme");
        let (chain, _) = device(&p.ca, "gw-a");
        let other: Arc<dyn DeviceKey> = Arc::new(FileKey::generate().expect("key"));
        assert!(matches!(
            client_config(&[p.ca.root_der()], Some((chain, other))),
            Err(PkiError::KeyMismatch)
        ));
        assert!(client_config(&[], None).is_err());
    }

    #[test]
    fn peer_device_falls_back_to_cn_and_rejects_garbage() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gw-cn-only");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(peer_device(cert.der()).expect("cn").device_id, "gw-cn-only");
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).expect("cert");
        assert!(matches!(peer_device(cert.der()), Err(PkiError::NoDeviceId)));
        assert!(peer_device(&CertificateDer::from(&b"junk"[..])).is_err());
    }
}
