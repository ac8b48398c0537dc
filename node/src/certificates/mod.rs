//! The node's certificates from the cluster's signers, as the kubelet gets them: TLS bootstrap
//! of the client certificate (`--bootstrap-kubeconfig`), its rotation without a restart
//! (`--rotate-certificates`), and the kubelet API's serving certificate by CSR
//! (`--rotate-server-certificates`, KubeletConfiguration `serverTLSBootstrap`).
//!
//! Start at [`client::connect`]: it makes sure `--kubeconfig` holds usable credentials
//! (bootstrapping them with [`csr::request`] when not), builds the agent's one `kube::Client`,
//! and starts the rotation tasks. Certificates live in `--cert-dir` in the kubelet's layout
//! ([`Store`]): `kubelet-client-<time>.pem` (certificate and key in one file) and a
//! `kubelet-client-current.pem` symlink to the newest, the same for `kubelet-server`.
//!
//! Who owns what: the client rotation task is the only writer of the client store and of the
//! `watch` channel that holds the current inner client ([`client::ClientRotation`]); the serving
//! rotation task is the only writer of the server store, which the kubelet API's TLS resolver
//! (`server::tls`) reads at each handshake.

pub mod client;
pub mod csr;
pub mod serving;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors of getting, storing and rotating certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// A kubeconfig (the node's or the bootstrap one) cannot be read or used. Not retryable.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    /// A file in --cert-dir (or the kubeconfig being written) cannot be read or written. Not
    /// retryable.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// A certificate or key cannot be parsed. Not retryable for that file.
    #[error("{what}: {reason}")]
    Parse { what: String, reason: String },
    /// Making the key or the certificate request failed. Not retryable.
    #[error("making a certificate request: {0}")]
    Generate(String),
    /// The API server refused or failed a call (creating or watching the CSR). Retryable.
    #[error("certificate signing request: {0}")]
    Api(String),
    /// The CSR was denied or failed. Not retryable with the same request.
    #[error("certificate signing request {name} was {verdict}: {reason}")]
    Refused {
        name: String,
        verdict: &'static str,
        reason: String,
    },
    /// Nobody approved or signed the CSR in time. Retryable with a new request.
    #[error("certificate signing request {name} was not issued within {waited:?}{hint}")]
    TimedOut {
        name: String,
        waited: Duration,
        hint: String,
    },
}

/// What a certificate says about its lifetime and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The serial number in hex.
    pub serial: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

impl Leaf {
    /// Reads the serial and validity out of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Leaf, crate::x509::X509Error> {
        let fields = crate::x509::read(der)?;
        Ok(Leaf {
            serial: fields.serial,
            not_before: fields.not_before,
            not_after: fields.not_after,
        })
    }

    /// Whether the certificate is valid at `now`.
    pub fn valid_at(&self, now: Timestamp) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// When to ask for the next certificate: at a random point between 70 % and 90 % of the
    /// lifetime, as the kubelet's certificate manager does (the jitter spreads a fleet's
    /// renewals out; the margin leaves time to retry before the old one expires).
    pub fn rotation_deadline(&self, random_fraction: f64) -> Timestamp {
        let lifetime = self.not_after.as_millisecond() - self.not_before.as_millisecond();
        let fraction = 0.7 + 0.2 * random_fraction.clamp(0.0, 1.0);
        let offset = (lifetime as f64 * fraction).round() as i64;
        Timestamp::from_millisecond(self.not_before.as_millisecond() + offset)
            .unwrap_or(self.not_after)
    }
}

/// A uniformly random number in [0, 1) from the standard library's per-process random keys (no
/// cryptographic use: only the jitter of the rotation deadline).
pub fn random_fraction() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(Timestamp::now().as_nanosecond() as u64);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// How long until `at`, zero when it has passed.
pub fn until(at: Timestamp) -> Duration {
    let millis = at.as_millisecond() - Timestamp::now().as_millisecond();
    Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// A certificate and its key as the store keeps them: one PEM file holding both.
#[derive(Debug)]
pub struct Pair {
    /// The dated file (not the `-current` symlink), so a reader gets exactly this pair.
    pub path: PathBuf,
    pub pem: Vec<u8>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub leaf: Leaf,
}

impl Pair {
    /// Parses a PEM holding a certificate chain and a private key (in any order).
    pub fn parse(path: PathBuf, pem: Vec<u8>) -> Result<Pair, CertificateError> {
        let what = || path.display().to_string();
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertificateError::Parse {
                what: what(),
                reason: e.to_string(),
            })?;
        let first = chain.first().ok_or_else(|| CertificateError::Parse {
            what: what(),
            reason: "no PEM certificate in it".into(),
        })?;
        let leaf = Leaf::from_der(first).map_err(|e| CertificateError::Parse {
            what: what(),
            reason: e.to_string(),
        })?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| CertificateError::Parse {
            what: what(),
            reason: format!("private key: {e}"),
        })?;
        Ok(Pair {
            path,
            pem,
            chain,
            key,
            leaf,
        })
    }
}

/// Certificates of one kind in `--cert-dir`, in the kubelet's layout: `<prefix>-<time>.pem`
/// files and a `<prefix>-current.pem` symlink to the newest.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    prefix: &'static str,
}

impl Store {
    /// The client certificate store (`kubelet-client-*.pem`).
    pub fn client(cert_dir: &Path) -> Store {
        Store {
            dir: cert_dir.to_path_buf(),
            prefix: "kubelet-client",
        }
    }

    /// The serving certificate store (`kubelet-server-*.pem`).
    pub fn server(cert_dir: &Path) -> Store {
        Store {
            dir: cert_dir.to_path_buf(),
            prefix: "kubelet-server",
        }
    }

    /// `<cert-dir>/<prefix>-current.pem`, the path a kubeconfig names.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join(format!("{}-current.pem", self.prefix))
    }

    /// The current pair; `None` when there is none yet.
    pub fn load(&self) -> Result<Option<Pair>, CertificateError> {
        let link = self.current_path();
        let target = match std::fs::canonicalize(&link) {
            Ok(target) => target,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(CertificateError::File {
                    path: link,
                    reason: e.to_string(),
                })
            }
        };
        let pem = std::fs::read(&target).map_err(|e| CertificateError::File {
            path: target.clone(),
            reason: e.to_string(),
        })?;
        Pair::parse(target, pem).map(Some)
    }

    /// The current pair if it is valid now; a broken or expired one is `None` (and logged).
    pub fn load_valid(&self) -> Option<Pair> {
        match self.load() {
            Ok(Some(pair)) if pair.leaf.valid_at(Timestamp::now()) => Some(pair),
            Ok(Some(pair)) => {
                tracing::info!(path = %pair.path.display(), not_after = %pair.leaf.not_after, "the stored certificate is not valid now");
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable stored certificate");
                None
            }
        }
    }

    /// Writes a new pair as `<prefix>-<time>.pem` (mode 0600) and points the `-current`
    /// symlink at it atomically (a new link renamed over the old).
    pub fn save(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<Pair, CertificateError> {
        let file_err = |path: &Path, e: std::io::Error| CertificateError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| file_err(&self.dir, e))?;
        let mut pem = cert_pem.to_vec();
        if !pem.ends_with(b"\n") {
            pem.push(b'\n');
        }
        pem.extend_from_slice(key_pem);
        // The kubelet's name format (Go's "2006-01-02-15-04-05"), in UTC.
        let stamp = Timestamp::now().strftime("%Y-%m-%d-%H-%M-%S").to_string();
        let path = self.dir.join(format!("{}-{stamp}.pem", self.prefix));
        let pair = Pair::parse(path.clone(), pem)?;
        write_private(&path, &pair.pem)?;
        let link = self.current_path();
        let tmp = self.dir.join(format!(".{}-current.pem.tmp", self.prefix));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(path.file_name().unwrap_or(path.as_os_str()), &tmp)
            .map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, &link).map_err(|e| file_err(&link, e))?;
        Ok(pair)
    }
}

/// Writes `bytes` to `path` readable by the owner only, replacing it atomically.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CertificateError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |p: &Path, e: std::io::Error| CertificateError::File {
        path: p.to_path_buf(),
        reason: e.to_string(),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0xab, 0xcd]));
        let key = rcgen::KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn validity_and_serial_are_read_from_utc_and_generalized_times() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on.
        let (cert, key) = signed((2026, 1, 2), (2051, 3, 4));
        let pair = Pair::parse("x.pem".into(), format!("{cert}{key}").into_bytes()).unwrap();
        assert_eq!(pair.leaf.serial, "01abcd");
        assert_eq!(
            pair.leaf.not_before,
            "2026-01-02T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            pair.leaf.not_after,
            "2051-03-04T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert!(pair.leaf.valid_at("2030-01-01T00:00:00Z".parse().unwrap()));
        assert!(!pair.leaf.valid_at("2052-01-01T00:00:00Z".parse().unwrap()));
    }

    #[test]
    fn rotation_deadline_is_between_70_and_90_percent_of_the_lifetime() {
        let leaf = Leaf {
            serial: "1".into(),
            not_before: "2026-01-01T00:00:00Z".parse().unwrap(),
            not_after: "2026-01-01T00:10:00Z".parse().unwrap(),
        };
        assert_eq!(
            leaf.rotation_deadline(0.0),
            "2026-01-01T00:07:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            leaf.rotation_deadline(1.0),
            "2026-01-01T00:09:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            leaf.rotation_deadline(0.5),
            "2026-01-01T00:08:00Z".parse::<Timestamp>().unwrap()
        );
        let r = random_fraction();
        assert!((0.0..1.0).contains(&r), "{r}");
    }

    #[test]
    fn store_writes_dated_files_and_moves_the_current_link() {
        let dir =
            std::env::temp_dir().join(format!("wasm-kubelet-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::client(&dir);
        assert!(store.load().unwrap().is_none());
        let (cert, key) = signed((2026, 1, 2), (2027, 1, 2));
        let first = store.save(cert.as_bytes(), key.as_bytes()).unwrap();
        let name = first
            .path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with("kubelet-client-20") && name.ends_with(".pem"),
            "{name}"
        );
        assert_eq!(
            std::fs::read_link(store.current_path()).unwrap(),
            Path::new(&name)
        );
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(loaded.leaf, first.leaf);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&first.path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            store.save(b"not a certificate", key.as_bytes()).is_err(),
            "garbage is refused before it is stored"
        );
        assert_eq!(
            store.load().unwrap().unwrap().leaf,
            first.leaf,
            "the current link still names the good pair"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
