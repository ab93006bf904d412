//! TLS for outgoing connections (the edge's upstreams, JWKS URLs and OTLP collector, the
//! aggregator's alert webhook): rustls with the `ring` provider, trusting Mozilla's root store
//! (`webpki-roots`) plus the certificates of a configured CA file (a private CA:
//! `edge.tls_ca_file`, `slo.webhook_ca_file`). Certificates are verified with the target's
//! host name; there is no switch to turn verification off. (Feature `tls`.)

use std::sync::Arc;

pub use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

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
