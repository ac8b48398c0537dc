//! TLS for the kubelet API: the serving certificate (given, or self-signed into `--cert-dir`
//! and reused), the client-certificate verifier for `--client-ca-file`, and the user (CN) and
//! groups (O) of a verified client certificate (read by [`crate::x509`]).
//!
//! Without `--tls-cert-file`, the certificate is chosen at each handshake by
//! [`ServingResolver`]: the valid `kubelet-server-current.pem` in `--cert-dir` (issued by the
//! cluster through a CSR, `--rotate-server-certificates`, see `certificates::serving`) when there
//! is one, else the self-signed one. So a newly issued certificate serves from the next
//! connection on, without a restart.
//!
//! Start at [`server_config`]. rustls is used with the ring provider, as kube's client is.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::auth::User;
use super::ServerError;

/// What the TLS layer needs from the configuration.
pub struct TlsSettings<'a> {
    pub node_name: &'a str,
    pub node_ip: Option<IpAddr>,
    pub cert_dir: &'a Path,
    pub tls_cert_file: Option<&'a Path>,
    pub tls_private_key_file: Option<&'a Path>,
    pub client_ca_file: Option<&'a Path>,
}

/// The rustls server configuration: HTTP/1.1 only (the API server's kubelet client streams logs
/// and upgrades exec/attach/port-forward connections over HTTP/1.1), client certificates
/// verified against the client CA when one is given but never required, so bearer-token and
/// anonymous clients can connect too.
pub fn server_config(settings: &TlsSettings<'_>) -> Result<rustls::ServerConfig, ServerError> {
    let (given, (cert_path, key_path)) =
        match (settings.tls_cert_file, settings.tls_private_key_file) {
            (Some(cert), Some(key)) => (true, (cert.to_path_buf(), key.to_path_buf())),
            _ => (false, self_signed(settings)?),
        };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cert_error(&cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error(&cert_path, "no PEM certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| cert_error(&key_path, e.to_string()))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let builder = match settings.client_ca_file {
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(ca_path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| cert_error(ca_path, e.to_string()))?;
            for ca in cas {
                roots
                    .add(ca)
                    .map_err(|e| cert_error(ca_path, e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(cert_error(ca_path, "no PEM certificate in it".into()));
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| {
                        ServerError::Tls(format!("client CA {}: {e}", ca_path.display()))
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mismatch = |e: rustls::Error| {
        cert_error(
            &cert_path,
            format!("certificate and key do not go together: {e}"),
        )
    };
    let mut config = if given {
        builder.with_single_cert(certs, key).map_err(mismatch)?
    } else {
        let fallback = CertifiedKey::from_der(certs, key, &provider).map_err(mismatch)?;
        builder.with_cert_resolver(Arc::new(ServingResolver::new(
            settings.cert_dir,
            Arc::new(fallback),
            provider.clone(),
        )))
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Picks the serving certificate at each handshake: the certificate store's current one while
/// it is valid, else the self-signed fallback. The store's file is read again only when the
/// `-current` symlink leads to another file (one stat per handshake: the file's device and
/// inode, which every save changes, as it renames a new file into place).
#[derive(Debug)]
pub struct ServingResolver {
    store: crate::certificates::Store,
    fallback: Arc<CertifiedKey>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// (device, inode) of the file last read, and what it held (`None`: unusable, logged once).
    cached: RwLock<Option<((u64, u64), Loaded)>>,
}

/// A stored certificate read and usable by rustls; `None` when it could not be.
type Loaded = Option<(crate::certificates::Leaf, Arc<CertifiedKey>)>;

impl ServingResolver {
    pub fn new(
        cert_dir: &Path,
        fallback: Arc<CertifiedKey>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Self {
        Self {
            store: crate::certificates::Store::server(cert_dir),
            fallback,
            provider,
            cached: RwLock::new(None),
        }
    }

    fn current(&self) -> Arc<CertifiedKey> {
        use std::os::unix::fs::MetadataExt;
        let Ok(target) = std::fs::metadata(self.store.current_path()).map(|m| (m.dev(), m.ino()))
        else {
            return self.fallback.clone();
        };
        let usable = |entry: &Loaded| match entry {
            Some((leaf, key)) if leaf.valid_at(jiff::Timestamp::now()) => key.clone(),
            _ => self.fallback.clone(),
        };
        if let Ok(cached) = self.cached.read() {
            if let Some((_, entry)) = cached.as_ref().filter(|(file, _)| *file == target) {
                return usable(entry);
            }
        }
        let entry = match self.store.load() {
            Ok(Some(pair)) => match CertifiedKey::from_der(pair.chain, pair.key, &self.provider) {
                Ok(key) => {
                    tracing::info!(cert = %pair.path.display(), serial = %pair.leaf.serial, not_after = %pair.leaf.not_after, "the kubelet API serves the certificate issued by the cluster");
                    Some((pair.leaf, Arc::new(key)))
                }
                Err(e) => {
                    tracing::warn!(cert = %pair.path.display(), error = %e, "the stored serving certificate cannot be used; serving the self-signed one");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "the stored serving certificate cannot be read; serving the self-signed one");
                None
            }
        };
        let key = usable(&entry);
        if let Ok(mut cached) = self.cached.write() {
            *cached = Some((target, entry));
        }
        key
    }
}

impl ResolvesServerCert for ServingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn cert_error(path: &Path, reason: String) -> ServerError {
    ServerError::Certificate {
        path: path.to_path_buf(),
        reason,
    }
}

/// `<cert-dir>/kubelet.crt` and `kubelet.key`, made now if either is missing (as the kubelet
/// does without --tls-cert-file). The API server does not verify kubelet serving certificates
/// unless it is given --kubelet-certificate-authority, so a self-signed one serves.
fn self_signed(settings: &TlsSettings<'_>) -> Result<(PathBuf, PathBuf), ServerError> {
    let cert_path = settings.cert_dir.join("kubelet.crt");
    let key_path = settings.cert_dir.join("kubelet.key");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let mut names = vec![settings.node_name.to_string()];
    if let Some(ip) = settings.node_ip {
        names.push(ip.to_string());
    }
    let generate = || -> Result<(String, String), rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(names.clone())?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("{}@wasm-kubelet", settings.node_name),
        );
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (cert_pem, key_pem) = generate().map_err(|e| {
        cert_error(
            &cert_path,
            format!("generating a self-signed certificate: {e}"),
        )
    })?;
    std::fs::create_dir_all(settings.cert_dir)
        .map_err(|e| cert_error(settings.cert_dir, e.to_string()))?;
    write_private(&key_path, key_pem.as_bytes())?;
    std::fs::write(&cert_path, cert_pem).map_err(|e| cert_error(&cert_path, e.to_string()))?;
    tracing::info!(cert = %cert_path.display(), "wrote a self-signed serving certificate for the kubelet API");
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| cert_error(path, e.to_string()))?;
    file.write_all(bytes)
        .map_err(|e| cert_error(path, e.to_string()))
}

/// The user a verified client certificate names: CN is the user (the last, as Go reads a
/// Name), each O a group (as the API server reads client certificates). `None` when the
/// subject has no CN or the certificate does not parse.
pub fn user_from_certificate(der: &[u8]) -> Option<User> {
    let fields = crate::x509::read(der).ok()?;
    let name = fields
        .common_names
        .into_iter()
        .last()
        .filter(|n| !n.is_empty())?;
    Some(User {
        name,
        uid: String::new(),
        groups: fields.organizations,
        extra: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_groups_come_from_cn_and_o() {
        let mut params = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:n1");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let user = user_from_certificate(cert.der()).unwrap();
        assert_eq!(user.name, "system:node:n1");
        assert_eq!(user.groups, vec!["system:nodes".to_string()]);
    }

    #[test]
    fn garbage_is_no_user() {
        assert!(user_from_certificate(&[]).is_none());
        assert!(user_from_certificate(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(user_from_certificate(&[0x30, 0x03, 0x30, 0x01]).is_none());
    }

    #[test]
    fn the_resolver_serves_the_stored_certificate_while_valid_else_the_fallback() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let make = |not_after: (i32, u8, u8)| {
            let mut params = rcgen::CertificateParams::new(vec!["node-a".to_string()]).unwrap();
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
            let key = rcgen::KeyPair::generate().unwrap();
            (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
        };
        let (fallback_cert, fallback_key) = make((2090, 1, 1));
        let fallback = CertifiedKey::from_der(
            CertificateDer::pem_slice_iter(fallback_cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
            PrivateKeyDer::from_pem_slice(fallback_key.as_bytes()).unwrap(),
            &provider,
        )
        .unwrap();
        let dir =
            std::env::temp_dir().join(format!("wasm-kubelet-resolver-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let resolver = ServingResolver::new(&dir, Arc::new(fallback), provider);
        let fallback_der = resolver.fallback.cert[0].clone();
        assert_eq!(
            resolver.current().cert[0],
            fallback_der,
            "no stored certificate yet"
        );

        let store = crate::certificates::Store::server(&dir);
        let (cert, key) = make((2090, 1, 1));
        let issued = store.save(cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(
            resolver.current().cert[0],
            issued.chain[0],
            "picked up without a restart"
        );
        assert_eq!(resolver.current().cert[0], issued.chain[0], "and cached");

        let (cert, key) = make((2021, 1, 1)); // likely within the same second: the same dated name
        store.save(cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(
            resolver.current().cert[0],
            fallback_der,
            "an expired certificate is not served"
        );
        let (cert, key) = make((2090, 1, 1));
        let renewed = store.save(cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(
            resolver.current().cert[0],
            renewed.chain[0],
            "a new file under the same name is read again"
        );
        let (cert, key) = make((2021, 1, 1));
        store.save(cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(
            resolver.current().cert[0],
            fallback_der,
            "an expired certificate is not served"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_self_signed_certificate_is_made_once_and_reused() {
        let dir =
            std::env::temp_dir().join(format!("wasm-kubelet-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let settings = TlsSettings {
            node_name: "node-a",
            node_ip: Some("127.0.0.5".parse().unwrap()),
            cert_dir: &dir,
            tls_cert_file: None,
            tls_private_key_file: None,
            client_ca_file: None,
        };
        server_config(&settings).unwrap();
        let first = std::fs::read(dir.join("kubelet.crt")).unwrap();
        server_config(&settings).unwrap();
        assert_eq!(
            std::fs::read(dir.join("kubelet.crt")).unwrap(),
            first,
            "reused on restart"
        );
        let bad = TlsSettings {
            client_ca_file: Some(Path::new("/nonexistent/ca.crt")),
            ..settings
        };
        assert!(matches!(
            server_config(&bad),
            Err(ServerError::Certificate { .. })
        ));
    }
}
