//! Certificates and keys the proxy presents or trusts: PEM files the configuration names (`serverCertificate`,
//! `caCertificates`, …), and credentials named by `credentialName` — Kubernetes Secrets in Istio, directories of
//! `--credentials-dir` here, laid out as Istio reads a Secret's keys.

use std::path::{Path, PathBuf};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// Every certificate in the PEM file at `path`, in order (a chain: the leaf first).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("{}: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certificates)
}

/// The private key in the PEM file at `path` (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| format!("{}: {error}", path.display()))
}

/// A trust store of the certificates in `path`.
pub fn roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates(path)? {
        roots.add(certificate).map_err(|error| format!("{}: {error}", path.display()))?;
    }
    Ok(roots)
}

/// What a `credentialName` holds: a certificate chain and its key, and the CAs to check peers against.
#[derive(Debug)]
pub struct Credential {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// `ca.crt` (or `cacert`), else the companion credential `<name>-cacert`'s.
    pub ca: Option<PathBuf>,
}

/// Where `credentialName`s are read from: a directory with one subdirectory per name, holding the files a
/// Secret's keys would be (`tls.crt`, `tls.key`, `ca.crt`; or a generic Secret's `cert`, `key`, `cacert`).
#[derive(Clone, Debug, Default)]
pub struct CredentialSource {
    pub dir: Option<PathBuf>,
    /// The workload certificate Istio mounts for file-based gateways (`cert-chain.pem`, `key.pem`,
    /// `root-cert.pem`), which `ISTIO_MUTUAL` servers present and check clients against.
    pub istio_certs: Option<PathBuf>,
}

/// A Secret's file names for its certificate chain, its key and its CA: `kubernetes.io/tls`'s, then a generic
/// Secret's as Istio reads them.
const CHAIN: [&str; 2] = ["tls.crt", "cert"];
const KEY: [&str; 2] = ["tls.key", "key"];
const CA: [&str; 2] = ["ca.crt", "cacert"];

impl CredentialSource {
    pub fn new(dir: Option<PathBuf>) -> CredentialSource {
        CredentialSource { dir, istio_certs: None }
    }

    /// The mesh's workload certificate, its key and the mesh root, as Istio mounts them.
    pub fn istio(&self) -> Result<Credential, String> {
        let Some(dir) = &self.istio_certs else {
            return Err("ISTIO_MUTUAL: no workload certificate is read here (give --istio-certs-dir)".into());
        };
        Ok(Credential {
            chain: certificates(&dir.join("cert-chain.pem"))?,
            key: private_key(&dir.join("key.pem"))?,
            ca: Some(dir.join("root-cert.pem")).filter(|path| path.is_file()),
        })
    }

    /// The credential `name` (Istio also accepts it written `kubernetes://name`).
    pub fn load(&self, name: &str) -> Result<Credential, String> {
        let name = secret_name(name)?;
        let Some(dir) = &self.dir else {
            return Err(format!(
                "credentialName {name:?}: no credentials are read here (give --credentials-dir DIR with DIR/{name}/tls.crt, tls.key)"
            ));
        };
        let base = dir.join(name);
        let first =
            |base: &Path, names: [&str; 2]| names.iter().map(|file| base.join(file)).find(|path| path.is_file());
        let chain = first(&base, CHAIN).ok_or_else(|| format!("{}: no tls.crt (or cert) in it", base.display()))?;
        let key = first(&base, KEY).ok_or_else(|| format!("{}: no tls.key (or key) in it", base.display()))?;
        let ca = first(&base, CA).or_else(|| first(&dir.join(format!("{name}-cacert")), CA));
        Ok(Credential { chain: certificates(&chain)?, key: private_key(&key)?, ca })
    }

    /// Only the CA of the credential `name` (a CA-only Secret, for checking a peer): its `ca.crt` or the
    /// companion `<name>-cacert`'s.
    pub fn ca(&self, name: &str) -> Result<PathBuf, String> {
        let name = secret_name(name)?;
        let Some(dir) = &self.dir else {
            return Err(format!("credentialName {name:?}: no credentials are read here (give --credentials-dir)"));
        };
        [dir.join(name), dir.join(format!("{name}-cacert"))]
            .iter()
            .flat_map(|base| CA.iter().map(move |file| base.join(file)))
            .find(|path| path.is_file())
            .ok_or_else(|| format!("{}: no ca.crt (or cacert) in it", dir.join(name).display()))
    }
}

/// `name` without Istio's `kubernetes://` prefix, checked to be a Secret's name: never a path out of the
/// directory.
fn secret_name(name: &str) -> Result<&str, String> {
    let name = name.strip_prefix("kubernetes://").unwrap_or(name);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with('.');
    if valid {
        Ok(name)
    } else {
        Err(format!("credentialName {name:?} is not a Secret's name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names_are_secret_names_never_paths() {
        let source = CredentialSource::new(Some(PathBuf::from("/nonexistent")));
        for name in ["../etc", "a/b", "", ".hidden", "UPPER"] {
            let error = source.load(name).unwrap_err();
            assert!(error.contains("is not a Secret's name"), "{name}: {error}");
        }
        let error = source.load("kubernetes://api-cert").unwrap_err();
        assert!(error.contains("/nonexistent/api-cert: no tls.crt"), "{error}");
        let error = CredentialSource::default().load("api-cert").unwrap_err();
        assert!(error.contains("--credentials-dir"), "{error}");
    }
}
