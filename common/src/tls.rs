//! TLS with rustls and the `ring` provider (feature `tls`).
//!
//! Outgoing connections (the edge's upstreams, JWKS URLs and OTLP collector, the aggregator's
//! alert webhook) trust Mozilla's root store (`webpki-roots`) plus the certificates of a
//! configured CA file (a private CA: `edge.tls_ca_file`, `slo.webhook_ca_file`). Certificates
//! are verified with the target's host name; there is no switch to turn verification off.
//! The edge's HTTPS listener uses [`server_config`].

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
pub use rustls::{ClientConfig, ServerConfig};

/// The certificates of a PEM file (at least one).
pub fn read_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}

/// A client configuration trusting the web PKI and `extra_roots`.
pub fn client_config(extra_roots: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificates of the CA file at `path`, checked to be usable as roots; errors name the
/// file as `shown` (the path as configured) and what is wrong with it.
pub fn read_ca_file(path: &std::path::Path, shown: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    let certs = read_pem_certs(&pem).map_err(|e| format!("`{shown}`: {e}"))?;
    client_config(&certs).map_err(|e| format!("`{shown}`: {e}"))?;
    Ok(certs)
}

/// A server configuration (TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`) with the certificate
/// chain of the PEM file at `cert` and the private key (PKCS#8, PKCS#1 or SEC1 PEM) at `key`,
/// checked to belong together. Errors: (which file, as `cert_shown` or `key_shown`, and what
/// is wrong with it): 0 for the certificate file, 1 for the key file.
pub fn server_config(
    (cert, cert_shown): (&std::path::Path, &str),
    (key, key_shown): (&std::path::Path, &str),
) -> Result<Arc<ServerConfig>, (usize, String)> {
    use rustls::pki_types::PrivateKeyDer;
    let pem = std::fs::read(cert).map_err(|e| (0, format!("cannot read `{cert_shown}`: {e}")))?;
    let chain = read_pem_certs(&pem).map_err(|e| (0, format!("`{cert_shown}`: {e}")))?;
    let pem = std::fs::read(key).map_err(|e| (1, format!("cannot read `{key_shown}`: {e}")))?;
    let private = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| (1, format!("`{key_shown}`: no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signer = provider
        .key_provider
        .load_private_key(private.clone_key())
        .map_err(|e| (1, format!("`{key_shown}`: unusable private key: {e}")))?;
    // The key must be the certificate's (rustls would only find out in a handshake).
    rustls::sign::CertifiedKey::new(chain.clone(), signer)
        .keys_match()
        .map_err(|e| (1, format!("`{key_shown}` is not the key of the certificate in `{cert_shown}`: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| (0, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| (0, format!("`{cert_shown}` with `{key_shown}`: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
