//! TLS trust for a Proxmox node: the system roots, a CA file (the cluster's
//! `pve-root-ca.pem`), a pinned SHA-256 fingerprint of the node's certificate, or, only when
//! asked for by name, no verification at all.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

#[derive(Clone, Debug)]
pub enum Trust {
    SystemRoots,
    CaFile(PathBuf),
    /// The leaf certificate's SHA-256, 32 bytes.
    Fingerprint([u8; 32]),
    Insecure,
}

/// Parses `AA:BB:...` (or plain hex) as `pvenode cert info` prints it.
pub fn parse_fingerprint(text: &str) -> anyhow::Result<[u8; 32]> {
    let hex_digits: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&hex_digits).ok().filter(|b| b.len() == 32);
    let Some(bytes) = bytes else {
        bail!(
            "--fingerprint {text:?} is not a SHA-256 fingerprint: expected 32 hex bytes such as \
             the `fingerprint` of `pvenode cert info` (AA:BB:...)"
        );
    };
    let mut out = [0u8; 32];
    out.copy_from_slice(&bytes);
    Ok(out)
}

pub fn format_fingerprint(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn client_config(trust: &Trust) -> anyhow::Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?;
    let config = match trust {
        Trust::SystemRoots => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "no system CA certificates found: install `ca-certificates`, or pass \
                     --ca-file or --fingerprint"
                );
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::CaFile(path) => {
            let pem = fs_err::read(path).context("reading the CA file")?;
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> =
                rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("parsing CA file {}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                bail!(
                    "--ca-file {} holds no PEM certificate (the cluster's is \
                     /etc/pve/pve-root-ca.pem on any node)",
                    path.display()
                );
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                expected: *fp,
                provider: provider(),
            }))
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// Accepts exactly one leaf certificate, by its SHA-256. Hostname and chain are not looked
/// at: the pin is the trust, as with `pvecm`'s fingerprint checks. Handshake signatures are
/// still verified, so the peer must hold the pinned certificate's key.
#[derive(Debug)]
struct Pinned {
    expected: [u8; 32],
    provider: Arc<CryptoProvider>,
}

struct FingerprintMismatch {
    presented: String,
    expected: String,
}

impl std::fmt::Display for FingerprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "certificate fingerprint mismatch: the server presented {}, --fingerprint expects {} \
             (compare with `pvenode cert info` on the node)",
            self.presented, self.expected
        )
    }
}

// rustls shows the inner error with `Debug`: make that the readable message too.
impl std::fmt::Debug for FingerprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for FingerprintMismatch {}

/// A readable account of a certificate the client refused, if that is what `err` is.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        let rustls_err = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(cert)) = rustls_err {
            return Some(match cert {
                rustls::CertificateError::Other(other) => other.0.to_string(),
                rustls::CertificateError::UnknownIssuer => explain_unknown_issuer()?,
                other => format!(
                    "the server's certificate was refused ({other:?}): pass --ca-file or \
                     --fingerprint"
                ),
            });
        }
        // Connectors may wrap the TLS error in their own types: read the message then.
        let text = e.to_string();
        if let Some(start) = text.find("certificate fingerprint mismatch") {
            let end = text[start..]
                .find("on the node)")
                .map(|i| start + i + 12)
                .unwrap_or(text.len());
            return Some(text[start..end].to_string());
        }
        if text.contains("UnknownIssuer") {
            return explain_unknown_issuer();
        }
        cur = e.source();
    }
    None
}

fn explain_unknown_issuer() -> Option<String> {
    Some(
        "the server's certificate is not signed by a trusted CA (Proxmox signs its own by \
         default): pass --ca-file with a copy of the cluster's /etc/pve/pve-root-ca.pem, or \
         --fingerprint from `pvenode cert info`"
            .to_string(),
    )
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if presented == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    FingerprintMismatch {
                        presented: format_fingerprint(&presented),
                        expected: format_fingerprint(&self.expected),
                    },
                ))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `--insecure`: any certificate at all.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
