//! Omni's etcd encryption key: an armored OpenPGP secret key with a user ID, an
//! encryption-capable subkey, no passphrase and no expiry. Checked when supplied, generated
//! (Cv25519, fast) when not.

use anyhow::{Context, Result, bail};
use sequoia_openpgp as openpgp;

use openpgp::cert::{CertBuilder, CipherSuite};
use openpgp::parse::Parse;
use openpgp::policy::StandardPolicy;
use openpgp::serialize::SerializeInto;
use openpgp::types::KeyFlags;

/// Checks a supplied key; on success returns its fingerprint (the only thing ever printed).
pub fn check(armored: &str) -> Result<String> {
    let cert = openpgp::Cert::from_bytes(armored.as_bytes())
        .context("the key is not an OpenPGP key (expected an armored secret key block)")?;
    if !cert.is_tsk() {
        bail!("the key holds no secret key material (export it with --export-secret-keys)");
    }
    let policy = StandardPolicy::new();
    let valid = cert
        .with_policy(&policy, None)
        .context("the key is not valid under the standard policy (revoked or too weak?)")?;
    if valid.userids().next().is_none() {
        bail!("the key has no user ID");
    }
    if valid.primary_key().key_expiration_time().is_some() {
        bail!("the key expires; Omni needs a key without expiry");
    }
    for key in cert.keys().secret() {
        if !key.key().has_unencrypted_secret() {
            bail!("the key is protected by a passphrase; Omni needs it without one");
        }
    }
    // Either flag qualifies: the iterator keeps keys that carry at least one of them.
    let mut encryption = valid
        .keys()
        .secret()
        .for_transport_encryption()
        .for_storage_encryption();
    if encryption.next().is_none() {
        bail!("the key has no encryption-capable subkey with its secret part");
    }
    Ok(cert.fingerprint().to_hex())
}

/// Generates a key for `userid`; returns the armored secret key and its fingerprint.
pub fn generate(userid: &str) -> Result<(String, String)> {
    let (cert, _revocation) = CertBuilder::new()
        .set_cipher_suite(CipherSuite::Cv25519)
        .set_validity_period(None)
        .add_userid(userid)
        .add_subkey(
            KeyFlags::empty()
                .set_transport_encryption()
                .set_storage_encryption(),
            None,
            None,
        )
        .generate()
        .context("generating the etcd encryption key")?;
    let armored = cert
        .as_tsk()
        .armored()
        .to_vec()
        .context("armoring the etcd encryption key")?;
    let armored = String::from_utf8(armored).context("armoring the etcd encryption key")?;
    Ok((armored, cert.fingerprint().to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_passes_the_check() {
        let (armored, fpr) = generate("Omni etcd <omni@test>").unwrap();
        assert!(armored.starts_with("-----BEGIN PGP PRIVATE KEY BLOCK-----"));
        assert_eq!(check(&armored).unwrap(), fpr);
    }

    #[test]
    fn a_key_with_a_passphrase_is_refused() {
        let (cert, _) = CertBuilder::new()
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_validity_period(None)
            .add_userid("x <x@x>")
            .add_storage_encryption_subkey()
            .set_password(Some("pass phrase".into()))
            .generate()
            .unwrap();
        let armored = String::from_utf8(cert.as_tsk().armored().to_vec().unwrap()).unwrap();
        let err = check(&armored).unwrap_err().to_string();
        assert!(err.contains("passphrase"), "{err}");
    }

    #[test]
    fn a_key_without_an_encryption_subkey_is_refused() {
        let (cert, _) = CertBuilder::new()
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_validity_period(None)
            .add_userid("x <x@x>")
            .add_signing_subkey()
            .generate()
            .unwrap();
        let armored = String::from_utf8(cert.as_tsk().armored().to_vec().unwrap()).unwrap();
        let err = check(&armored).unwrap_err().to_string();
        assert!(err.contains("encryption"), "{err}");
    }

    #[test]
    fn a_public_key_or_garbage_is_refused() {
        let (cert, _) = CertBuilder::general_purpose(Some("x <x@x>"))
            .generate()
            .unwrap();
        let public = String::from_utf8(cert.armored().to_vec().unwrap()).unwrap();
        assert!(check(&public).unwrap_err().to_string().contains("secret"));
        assert!(check("not a key").is_err());
    }
}
