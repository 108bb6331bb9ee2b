//! Certificates and keys the proxy presents or trusts: PEM files the configuration names (`serverCertificate`,
//! `caCertificates`, …), and credentials named by `credentialName` — the Kubernetes Secrets of the gateway's
//! namespace with `--kube`, else directories of `--credentials-dir` laid out as Istio reads a Secret's keys.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::config::secrets::{KnownSecrets, SecretData};

/// Every certificate in the PEM file at `path`, in order (a chain: the leaf first).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))?;
    parse_certificates(&bytes).map_err(|error| format!("{}: {error}", path.display()))
}

/// The private key in the PEM file at `path` (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| format!("{}: {error}", path.display()))
}

/// The certificates of the PEM file `path` names, if it names one (`caCertificates`).
pub fn optional_file(path: Option<&str>) -> Result<Option<Vec<CertificateDer<'static>>>, String> {
    path.map(|path| certificates(Path::new(path))).transpose()
}

/// A trust store of `certificates`, read from `what` (named in errors).
pub fn roots(certificates: Vec<CertificateDer<'static>>, what: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate).map_err(|error| format!("{what}: {error}"))?;
    }
    Ok(roots)
}

fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|error| error.to_string())?;
    if certificates.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certificates)
}

/// What a `credentialName` holds: a certificate chain and its key, and the CAs to check peers against.
#[derive(Debug)]
pub struct Credential {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// `ca.crt` (or `cacert`), else the companion credential `<name>-cacert`'s.
    pub ca: Option<Vec<CertificateDer<'static>>>,
}

/// Where `credentialName`s are read from: with `--kube`, the Secrets of the gateway's namespace; else a directory
/// with one subdirectory per name, holding the files a Secret's keys would be (`tls.crt`, `tls.key`, `ca.crt`; or
/// a generic Secret's `cert`, `key`, `cacert`).
#[derive(Clone, Debug, Default)]
pub struct CredentialSource {
    pub dir: Option<PathBuf>,
    /// The Secrets of the gateway's namespace, watched (with `--kube`): read before `dir`.
    pub secrets: Option<Arc<KnownSecrets>>,
    /// The workload certificate Istio mounts for file-based gateways (`cert-chain.pem`, `key.pem`,
    /// `root-cert.pem`), which `ISTIO_MUTUAL` servers present and check clients against.
    pub istio_certs: Option<PathBuf>,
}

/// A Secret's keys for its certificate chain, its key and its CA: `kubernetes.io/tls`'s, then a generic Secret's
/// as Istio reads them.
const CHAIN: [&str; 2] = ["tls.crt", "cert"];
const KEY: [&str; 2] = ["tls.key", "key"];
const CA: [&str; 2] = ["ca.crt", "cacert"];

impl CredentialSource {
    pub fn new(dir: Option<PathBuf>) -> CredentialSource {
        CredentialSource { dir, ..CredentialSource::default() }
    }

    /// The mesh's workload certificate, its key and the mesh root, as Istio mounts them.
    pub fn istio(&self) -> Result<Credential, String> {
        let Some(dir) = &self.istio_certs else {
            return Err("ISTIO_MUTUAL: no workload certificate is read here (give --istio-certs-dir)".into());
        };
        let root = dir.join("root-cert.pem");
        Ok(Credential {
            chain: certificates(&dir.join("cert-chain.pem"))?,
            key: private_key(&dir.join("key.pem"))?,
            ca: if root.is_file() { Some(certificates(&root)?) } else { None },
        })
    }

    /// The credential `name` (Istio also accepts it written `kubernetes://name`).
    pub fn load(&self, name: &str) -> Result<Credential, String> {
        let name = secret_name(name)?;
        if let Some(secret) = self.secrets.as_ref().and_then(|secrets| secrets.get(name)) {
            let what = |key: &str| format!("Secret {name} key {key}");
            let (chain_key, chain) =
                first_key(&secret, CHAIN).ok_or_else(|| format!("Secret {name}: no tls.crt (or cert) in it"))?;
            let (key_key, key) =
                first_key(&secret, KEY).ok_or_else(|| format!("Secret {name}: no tls.key (or key) in it"))?;
            let chain = parse_certificates(chain).map_err(|error| format!("{}: {error}", what(chain_key)))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|error| format!("{}: {error}", what(key_key)))?;
            return Ok(Credential { chain, key, ca: self.secret_ca(name)? });
        }
        let Some(dir) = &self.dir else {
            let place = if self.secrets.is_some() {
                "no such Secret in the gateway's namespace"
            } else {
                "no credentials are read here (give --credentials-dir, or run with --kube)"
            };
            return Err(format!("credentialName {name:?}: {place}"));
        };
        let base = dir.join(name);
        let first =
            |base: &Path, names: [&str; 2]| names.iter().map(|file| base.join(file)).find(|path| path.is_file());
        let chain = first(&base, CHAIN).ok_or_else(|| format!("{}: no tls.crt (or cert) in it", base.display()))?;
        let key = first(&base, KEY).ok_or_else(|| format!("{}: no tls.key (or key) in it", base.display()))?;
        let ca = first(&base, CA).or_else(|| first(&dir.join(format!("{name}-cacert")), CA));
        let ca = ca.map(|path| certificates(&path)).transpose()?;
        Ok(Credential { chain: certificates(&chain)?, key: private_key(&key)?, ca })
    }

    /// Only the CA of the credential `name` (a CA-only Secret, for checking a peer): its `ca.crt` or the
    /// companion `<name>-cacert`'s.
    pub fn ca(&self, name: &str) -> Result<Vec<CertificateDer<'static>>, String> {
        let name = secret_name(name)?;
        if let Some(ca) = self.secret_ca(name)? {
            return Ok(ca);
        }
        let Some(dir) = &self.dir else {
            return Err(format!("credentialName {name:?}: no CA (ca.crt) in a Secret or --credentials-dir"));
        };
        let path = [dir.join(name), dir.join(format!("{name}-cacert"))]
            .iter()
            .flat_map(|base| CA.iter().map(move |file| base.join(file)))
            .find(|path| path.is_file())
            .ok_or_else(|| format!("{}: no ca.crt (or cacert) in it", dir.join(name).display()))?;
        certificates(&path)
    }

    /// The CA in the Secret `name` or its companion `<name>-cacert`, when Secrets are read and one holds it.
    fn secret_ca(&self, name: &str) -> Result<Option<Vec<CertificateDer<'static>>>, String> {
        let Some(secrets) = &self.secrets else { return Ok(None) };
        for secret_name in [name.to_owned(), format!("{name}-cacert")] {
            if let Some((key, pem)) = secrets.get(&secret_name).as_deref().and_then(|secret| first_key(secret, CA)) {
                let certificates =
                    parse_certificates(pem).map_err(|error| format!("Secret {secret_name} key {key}: {error}"))?;
                return Ok(Some(certificates));
            }
        }
        Ok(None)
    }
}

/// The first of `keys` the Secret holds, with its bytes.
fn first_key<'a>(secret: &'a SecretData, keys: [&'static str; 2]) -> Option<(&'static str, &'a [u8])> {
    keys.iter().find_map(|key| secret.get(*key).map(|bytes| (*key, bytes.as_slice())))
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
