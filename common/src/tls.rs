//! TLS with rustls and the `ring` provider (feature `tls`).
//!
//! Outgoing connections (the edge's upstreams, JWKS URLs and OTLP collector, the aggregator's
//! alert webhook) trust Mozilla's root store (`webpki-roots`) plus the certificates of a
//! configured CA file (a private CA: `edge.tls_ca_file`, `slo.webhook_ca_file`). Certificates
//! are verified with the target's host name; there is no switch to turn verification off.
//! The edge's HTTPS listener uses [`server_config`] with an [`SniResolver`]: a default
//! certificate and others chosen by the name the client asks for.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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
    client_config_with(extra_roots, None)
}

/// [`client_config`] presenting `identity` (a certificate and its key) to servers that ask for
/// a client certificate (mutual TLS).
pub fn client_config_with(
    extra_roots: &[CertificateDer<'static>],
    identity: Option<Arc<CertifiedKey>>,
) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match identity {
        None => config.with_no_client_auth(),
        Some(key) => config.with_client_cert_resolver(Arc::new(ClientIdentity(key))),
    };
    Ok(Arc::new(config))
}

/// Always the same client certificate, whatever CAs the server names.
#[derive(Debug)]
struct ClientIdentity(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientIdentity {
    fn resolve(&self, _issuers: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificates of the CA file at `path`, checked to be usable as roots; errors name the
/// file as `shown` (the path as configured) and what is wrong with it.
pub fn read_ca_file(path: &std::path::Path, shown: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    let certs = read_pem_certs(&pem).map_err(|e| format!("`{shown}`: {e}"))?;
    client_config(&certs).map_err(|e| format!("`{shown}`: {e}"))?;
    Ok(certs)
}

/// A certificate chain (PEM file at `cert`) with its private key (PKCS#8, PKCS#1 or SEC1 PEM
/// at `key`), checked to belong together. Errors: (which file — 0 the certificate, 1 the key —
/// and what is wrong with it, naming the file as `cert_shown` or `key_shown`).
pub fn certified_key(
    (cert, cert_shown): (&std::path::Path, &str),
    (key, key_shown): (&std::path::Path, &str),
) -> Result<Arc<CertifiedKey>, (usize, String)> {
    use rustls::pki_types::PrivateKeyDer;
    let pem = std::fs::read(cert).map_err(|e| (0, format!("cannot read `{cert_shown}`: {e}")))?;
    let chain = read_pem_certs(&pem).map_err(|e| (0, format!("`{cert_shown}`: {e}")))?;
    let pem = std::fs::read(key).map_err(|e| (1, format!("cannot read `{key_shown}`: {e}")))?;
    let private = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| (1, format!("`{key_shown}`: no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")))?;
    let signer = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| (1, format!("`{key_shown}`: unusable private key: {e}")))?;
    let key = CertifiedKey::new(chain, signer);
    // The key must be the certificate's (rustls would only find out in a handshake).
    key.keys_match()
        .map_err(|e| (1, format!("`{key_shown}` is not the key of the certificate in `{cert_shown}`: {e}")))?;
    Ok(Arc::new(key))
}

/// Picks the certificate for the host name a client asks for in its handshake (SNI): a
/// certificate naming it exactly, else one whose wildcard (`*.example.com`, one label) covers
/// it, else the default one (also for clients that send no name, e.g. when they connect to an
/// IP address). Names compare without regard to case; among certificates naming the same host,
/// the first configured wins.
#[derive(Debug)]
pub struct SniResolver {
    default: Arc<CertifiedKey>,
    /// Lowercase DNS name → certificate.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Lowercase parent domain of a wildcard (`example.com` for `*.example.com`) → certificate.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    /// `others`: the certificates chosen by name, with how each is shown in errors. A
    /// certificate with no DNS name in its subject alternative names could never be chosen: an
    /// error (its index and the reason).
    pub fn new(default: Arc<CertifiedKey>, others: &[(Arc<CertifiedKey>, String)]) -> Result<Self, (usize, String)> {
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for (i, (key, shown)) in others.iter().enumerate() {
            let leaf = key.end_entity_cert().map_err(|e| (i, format!("`{shown}`: {e}")))?;
            let cert = webpki::EndEntityCert::try_from(leaf)
                .map_err(|e| (i, format!("`{shown}`: not a usable certificate: {e}")))?;
            let mut named = false;
            for name in cert.valid_dns_names() {
                named = true;
                let name = name.to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()).or_insert_with(|| Arc::clone(key)),
                    None => exact.entry(name).or_insert_with(|| Arc::clone(key)),
                };
            }
            if !named {
                return Err((
                    i,
                    format!("`{shown}` names no DNS host (subject alternative names), so no client could ask for it"),
                ));
            }
        }
        Ok(Self { default, exact, wildcard })
    }

    /// The certificate for `server_name` (`None`: the client sent none).
    pub fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name else { return &self.default };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        // A wildcard covers exactly one label (RFC 6125 §6.4.3).
        name.split_once('.').and_then(|(_, parent)| self.wildcard.get(parent)).unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(self.pick(client_hello.server_name())))
    }
}

/// A server configuration (TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`) serving the
/// certificates of `resolver`; with `client_roots`, mutual TLS ([`client_verifier`]).
pub fn server_config(
    resolver: SniResolver,
    client_roots: Option<&[CertificateDer<'static>]>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(certs) => builder.with_client_cert_verifier(client_verifier(certs, provider)?),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Mutual TLS: a client may present a certificate, which must then chain to one of `roots`
/// (and be valid now, for client authentication), or the handshake fails; a client without
/// one is still served (what it may call is the routes' business).
fn client_verifier(
    roots: &[CertificateDer<'static>],
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.clone()).map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod sni_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(name: &str) -> Arc<CertifiedKey> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testdata/tls");
        certified_key((&dir.join(format!("{name}.pem")), name), (&dir.join(format!("{name}.key.pem")), name)).unwrap()
    }

    #[test]
    fn the_name_asked_picks_exact_then_wildcard_then_the_default() {
        let (default, api, wild) = (key("server"), key("api"), key("wild"));
        let r = SniResolver::new(
            Arc::clone(&default),
            &[(Arc::clone(&api), "api".into()), (Arc::clone(&wild), "wild".into())],
        )
        .unwrap();
        for (asked, want) in [
            (None, &default),
            (Some("api.example.test"), &api),
            (Some("API.Example.Test."), &api),
            (Some("shop.eu.example.test"), &wild),
            (Some("SHOP.EU.example.test"), &wild),
            // A wildcard covers one label: not two, not none.
            (Some("a.b.eu.example.test"), &default),
            (Some("eu.example.test"), &default),
            (Some("localhost"), &default),
            (Some("example.test"), &default),
        ] {
            assert!(Arc::ptr_eq(r.pick(asked), want), "{asked:?}");
        }
        // The first certificate naming a host wins.
        let r = SniResolver::new(Arc::clone(&default), &[(Arc::clone(&api), "a".into()), (key("api"), "b".into())])
            .unwrap();
        assert!(Arc::ptr_eq(r.pick(Some("api.example.test")), &api));
    }

    #[test]
    fn a_certificate_without_a_dns_name_and_a_foreign_key_are_refused() {
        let err =
            SniResolver::new(key("server"), &[(key("api"), "api.pem".into()), (key("iponly"), "iponly.pem".into())])
                .unwrap_err();
        assert_eq!(err.0, 1);
        assert!(err.1.contains("iponly.pem") && err.1.contains("no DNS host"), "{}", err.1);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testdata/tls");
        let (which, msg) =
            certified_key((&dir.join("api.pem"), "api.pem"), (&dir.join("wild.key.pem"), "wild.key.pem")).unwrap_err();
        assert_eq!(which, 1);
        assert!(msg.contains("is not the key of the certificate in `api.pem`"), "{msg}");
    }
}
