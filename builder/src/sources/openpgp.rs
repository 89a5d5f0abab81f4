//! OpenPGP checks with sequoia: keys pinned by fingerprint, and `InRelease` files verified
//! against exactly the keys a recipe trusts.

use std::io::Read;

use sequoia_openpgp as openpgp;

use openpgp::KeyHandle;
use openpgp::cert::{Cert, CertParser};
use openpgp::parse::Parse;
use openpgp::parse::stream::{
    GoodChecksum, MessageLayer, MessageStructure, VerificationError, VerificationHelper,
    VerifierBuilder,
};
use openpgp::policy::StandardPolicy;
use openpgp::serialize::Serialize;

/// What can be wrong with a key or a signed file. The caller adds which repository and URL.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("it holds no OpenPGP key: {0}")]
    NotAKeyring(String),
    #[error("it holds no key with the pinned fingerprint {pinned}; it holds {found}")]
    WrongFingerprint { pinned: String, found: String },
    #[error("it is not signed (no `-----BEGIN PGP SIGNED MESSAGE-----` block)")]
    Unsigned,
    #[error("its signature by {key} does not verify ({reason}): the file was altered")]
    BadSignature { key: String, reason: String },
    #[error("no signature on it was made by a trusted key ({trusted}); {seen}")]
    NoTrustedSignature { trusted: String, seen: String },
    #[error("it cannot be read as a signed message: {0}")]
    Malformed(String),
}

/// Upper-case hex without spaces, or `None` when it is not a v4 or v6 fingerprint.
pub fn normalize_fingerprint(text: &str) -> Option<String> {
    let hex: String = text
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    let hex = hex.strip_prefix("0X").unwrap_or(&hex).to_owned();
    let ok = matches!(hex.len(), 40 | 64) && hex.chars().all(|c| c.is_ascii_hexdigit());
    ok.then_some(hex)
}

/// Every certificate in a keyring, binary or armored.
pub fn read_keyring(bytes: &[u8]) -> Result<Vec<Cert>, TrustError> {
    let certs: Vec<Cert> = CertParser::from_bytes(bytes)
        .map_err(|e| TrustError::NotAKeyring(e.to_string()))?
        .collect::<openpgp::Result<_>>()
        .map_err(|e| TrustError::NotAKeyring(e.to_string()))?;
    if certs.is_empty() {
        return Err(TrustError::NotAKeyring("the file is empty".into()));
    }
    Ok(certs)
}

/// The one certificate whose primary key has the pinned fingerprint.
pub fn pinned_cert(certs: Vec<Cert>, pinned: &str) -> Result<Cert, TrustError> {
    let found: Vec<String> = certs.iter().map(|c| c.fingerprint().to_hex()).collect();
    certs
        .into_iter()
        .find(|c| c.fingerprint().to_hex() == pinned)
        .ok_or_else(|| TrustError::WrongFingerprint {
            pinned: pinned.to_owned(),
            found: found.join(", "),
        })
}

/// A keyring file holding these certificates' public parts, as apt's `signed-by` reads it.
pub fn binary_keyring(certs: &[Cert]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in certs {
        c.serialize(&mut out).expect("writing to memory");
    }
    out
}

/// A Release file whose signature checked out.
#[derive(Debug)]
pub struct Verified {
    /// The signed text (the Release file itself).
    pub text: Vec<u8>,
    /// Primary fingerprints of the keys that made good signatures.
    pub signed_by: Vec<String>,
}

/// Verifies a clearsigned `InRelease` against `trusted`: at least one signature must be a
/// good one by a trusted key, and no signature by a trusted key may be bad. Signatures by
/// keys outside `trusted` are ignored (archives often sign with a new and an old key), as apt
/// does.
pub fn verify_inrelease(inrelease: &[u8], trusted: &[Cert]) -> Result<Verified, TrustError> {
    let start = inrelease
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    if !inrelease[start..].starts_with(b"-----BEGIN PGP SIGNED MESSAGE-----") {
        return Err(TrustError::Unsigned);
    }
    let policy = StandardPolicy::new();
    let helper = Helper {
        trusted,
        signed_by: Vec::new(),
    };
    let mut verifier = VerifierBuilder::from_bytes(inrelease)
        .and_then(|b| b.with_policy(&policy, None, helper))
        .map_err(classify)?;
    let mut text = Vec::new();
    verifier.read_to_end(&mut text).map_err(|e| {
        // Errors from `check` surface here for messages larger than the verifier's buffer.
        match e.into_inner().map(|inner| inner.downcast::<TrustError>()) {
            Some(Ok(ours)) => *ours,
            Some(Err(other)) => TrustError::Malformed(other.to_string()),
            None => TrustError::Malformed("reading the signed text failed".into()),
        }
    })?;
    let helper = verifier.into_helper();
    Ok(Verified {
        text,
        signed_by: helper.signed_by,
    })
}

/// The verifier reports a failed check as an error carrying ours; unwrap it again.
fn classify(err: anyhow::Error) -> TrustError {
    match err.downcast::<TrustError>() {
        Ok(ours) => ours,
        Err(other) => TrustError::Malformed(format!("{other:#}")),
    }
}

struct Helper<'a> {
    trusted: &'a [Cert],
    signed_by: Vec<String>,
}

impl Helper<'_> {
    fn trusted_list(&self) -> String {
        self.trusted
            .iter()
            .map(|c| c.fingerprint().to_hex())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl VerificationHelper for Helper<'_> {
    fn get_certs(&mut self, _ids: &[KeyHandle]) -> openpgp::Result<Vec<Cert>> {
        Ok(self.trusted.to_vec())
    }

    fn check(&mut self, structure: MessageStructure) -> openpgp::Result<()> {
        let mut seen = Vec::new();
        for layer in structure.into_iter() {
            let MessageLayer::SignatureGroup { results } = layer else {
                continue;
            };
            for result in results {
                match result {
                    Ok(GoodChecksum { ka, .. }) => {
                        let fp = ka.cert().fingerprint().to_hex();
                        if !self.signed_by.contains(&fp) {
                            self.signed_by.push(fp);
                        }
                    }
                    Err(VerificationError::BadSignature { ka, error, .. }) => {
                        let err = TrustError::BadSignature {
                            key: ka.cert().fingerprint().to_hex(),
                            reason: error.to_string(),
                        };
                        return Err(err.into());
                    }
                    Err(VerificationError::MissingKey { sig }) => {
                        let issuers: Vec<String> = sig
                            .get_issuers()
                            .iter()
                            .map(|h| match h {
                                KeyHandle::Fingerprint(f) => f.to_hex(),
                                KeyHandle::KeyID(k) => k.to_hex(),
                            })
                            .collect();
                        seen.push(format!("one by unknown key {}", issuers.join("/")));
                    }
                    Err(other) => seen.push(format!("one that does not count ({other})")),
                }
            }
        }
        if self.signed_by.is_empty() {
            let seen = if seen.is_empty() {
                "it carries no signature at all".to_owned()
            } else {
                format!("it carries {}", seen.join(", "))
            };
            let err = TrustError::NoTrustedSignature {
                trusted: self.trusted_list(),
                seen,
            };
            return Err(err.into());
        }
        Ok(())
    }
}

/// A certificate's primary fingerprint, spelled as recipes and manifests spell it.
pub fn fingerprint_of(cert: &Cert) -> String {
    cert.fingerprint().to_hex()
}

#[cfg(test)]
pub(crate) mod testkeys {
    //! Keys and signed files made on the spot, for tests.

    use super::*;
    use openpgp::cert::{CertBuilder, CipherSuite};
    use openpgp::serialize::stream::{Message, Signer};
    use std::io::Write;

    pub fn key(name: &str) -> Cert {
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        CertBuilder::new()
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(an_hour_ago)
            .add_userid(format!("{name} <{name}@example.org>"))
            .add_signing_subkey()
            .generate()
            .expect("generating a key")
            .0
    }

    pub fn clearsign(text: &[u8], signers: &[&Cert]) -> Vec<u8> {
        let policy = StandardPolicy::new();
        let mut out = Vec::new();
        {
            let message = Message::new(&mut out);
            let mut keypairs = signers.iter().map(|cert| {
                cert.keys()
                    .secret()
                    .with_policy(&policy, None)
                    .supported()
                    .alive()
                    .revoked(false)
                    .for_signing()
                    .next()
                    .expect("a signing key")
                    .key()
                    .clone()
                    .into_keypair()
                    .expect("a key pair")
            });
            let mut signer = Signer::new(message, keypairs.next().unwrap()).unwrap();
            for k in keypairs {
                signer = signer.add_signer(k).unwrap();
            }
            let mut w = signer.cleartext().build().unwrap();
            w.write_all(text).unwrap();
            w.finalize().unwrap();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testkeys::{clearsign, key};
    use super::*;

    const RELEASE: &[u8] = b"Origin: test\nSuite: trixie\nDate: Sat, 15 Nov 2025 09:27:39 UTC\n";

    #[test]
    fn fingerprints_are_normalized() {
        let fp = "2596 a99e AAB3 3821 893C  0A79 458C A832 957F 5868";
        assert_eq!(
            normalize_fingerprint(fp).unwrap(),
            "2596A99EAAB33821893C0A79458CA832957F5868"
        );
        assert!(normalize_fingerprint("957F5868").is_none());
        assert!(normalize_fingerprint(&"Z".repeat(40)).is_none());
    }

    #[test]
    fn a_good_signature_by_the_pinned_key_verifies() {
        let k = key("archive");
        let signed = clearsign(RELEASE, &[&k]);
        let v = verify_inrelease(&signed, std::slice::from_ref(&k)).unwrap();
        assert_eq!(v.text, RELEASE);
        assert_eq!(v.signed_by, [fingerprint_of(&k)]);
    }

    #[test]
    fn signatures_by_unknown_keys_are_ignored_when_a_trusted_one_is_good() {
        let (old, new) = (key("old"), key("new"));
        let signed = clearsign(RELEASE, &[&old, &new]);
        let v = verify_inrelease(&signed, std::slice::from_ref(&new)).unwrap();
        assert_eq!(v.signed_by, [fingerprint_of(&new)]);
    }

    #[test]
    fn a_tampered_release_is_refused() {
        let k = key("archive");
        let signed = clearsign(RELEASE, &[&k]);
        let tampered = String::from_utf8(signed)
            .unwrap()
            .replace("Suite: trixie", "Suite: sid");
        let err = verify_inrelease(tampered.as_bytes(), &[k]).unwrap_err();
        assert!(matches!(err, TrustError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains("altered"), "{err}");
    }

    #[test]
    fn a_signature_by_another_key_is_refused() {
        let (k, other) = (key("archive"), key("mallory"));
        let signed = clearsign(RELEASE, &[&other]);
        let err = verify_inrelease(&signed, std::slice::from_ref(&k)).unwrap_err();
        assert!(
            matches!(err, TrustError::NoTrustedSignature { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&fingerprint_of(&k)), "{err}");
    }

    #[test]
    fn an_unsigned_release_is_refused() {
        let err = verify_inrelease(RELEASE, &[key("archive")]).unwrap_err();
        assert!(matches!(err, TrustError::Unsigned), "{err}");
    }

    #[test]
    fn the_pinned_cert_is_picked_from_a_keyring() {
        let (a, b) = (key("a"), key("b"));
        let ring = binary_keyring(&[a.clone(), b.clone()]);
        let certs = read_keyring(&ring).unwrap();
        assert_eq!(certs.len(), 2);
        let picked = pinned_cert(certs.clone(), &fingerprint_of(&b)).unwrap();
        assert_eq!(picked.fingerprint(), b.fingerprint());
        let wrong = "0".repeat(40);
        let err = pinned_cert(certs, &wrong).unwrap_err();
        assert!(err.to_string().contains(&wrong), "{err}");
        assert!(err.to_string().contains(&fingerprint_of(&a)), "{err}");
        assert!(matches!(
            read_keyring(b"not a key"),
            Err(TrustError::NotAKeyring(_))
        ));
    }

    #[test]
    fn the_debian_keyring_parses_and_trusts_no_stranger() {
        // The keyring apt uses: several certs in one binary file.
        let path = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let certs = read_keyring(&std::fs::read(path).unwrap()).unwrap();
        assert!(certs.len() > 1);
        let signed = clearsign(RELEASE, &[&key("mallory")]);
        assert!(verify_inrelease(&signed, &certs).is_err());
    }
}
