//! How image pulls reach registries, shared by both providers: extra CA certificates
//! (`--registry-ca-file`), registries allowed over plain http (`--insecure-registries`), and
//! per-registry hosts read from a directory in containerd's `hosts.toml` layout
//! (`--registry-config-dir`, containerd's `config_path`):
//!
//! ```text
//! <dir>/docker.io/hosts.toml         hosts for images of docker.io (short names like hello:v1)
//! <dir>/registry.lan:5000/hosts.toml hosts for registry.lan:5000
//! <dir>/_default/hosts.toml          hosts for every registry without a directory of its own
//! ```
//!
//! ```toml
//! server = "https://registry-1.docker.io"   # the upstream, tried last (default: https://<registry>)
//!
//! [host."http://127.0.0.1:5000"]             # mirrors, tried first, in the file's order
//!   capabilities = ["pull", "resolve"]
//!
//! [host."https://mirror.lan"]
//!   ca = "mirror-ca.pem"                     # relative to the file's directory; or a list
//!   skip_verify = false
//! ```
//!
//! [`RegistryOptions::endpoints`] turns a reference's registry into the hosts to try, in order;
//! a provider fetches the manifest from the first that answers and the rest of the image from
//! the same host. What containerd reads and this does not (client certificates, extra headers,
//! a path other than `/v2`) is refused when the directory is read, never silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// How pulls reach registries beyond the defaults (https with the built-in web PKI roots; plain
/// http for no registry unless listed; each registry is its own only host).
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Extra CA certificates (DER) trusted for every registry's TLS (`--registry-ca-file`).
    pub extra_ca_certificates: Vec<Vec<u8>>,
    /// Registries (`host[:port]`) that may be spoken to over plain http when https fails
    /// (`--insecure-registries`). Only these: a loopback address is not trusted for being
    /// loopback (an image reference must not reach the node's own plain-http ports).
    pub insecure_registries: Vec<String>,
    /// The hosts of each registry namespace read from `--registry-config-dir` (`_default` for
    /// the rest), in the order they are tried (the server last).
    pub hosts: BTreeMap<String, Vec<Endpoint>>,
}

/// One host a pull may speak to for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]`, as it goes in an image reference.
    pub host: String,
    /// A mirror (a `[host."…"]` entry), not the registry's own server.
    pub mirror: bool,
    /// `http://`: plain http only.
    pub plain_http: bool,
    /// https first, plain http when https fails below HTTP (the host is in
    /// `--insecure-registries`).
    pub http_fallback: bool,
    /// CA certificates (DER) trusted for this host: the extra ones and the host's own `ca`.
    pub ca_certificates: Vec<Vec<u8>>,
    /// `skip_verify`: the host's certificate is not checked.
    pub skip_verify: bool,
    /// `capabilities` has `resolve`: a tag may be resolved to a manifest here.
    pub resolve: bool,
    /// `capabilities` has `pull`: content (manifests and blobs by digest) may be fetched here.
    pub pull: bool,
}

/// A registry CA file or hosts directory that cannot be used. Not retryable: the file has to
/// be fixed; the agent refuses to start (exit 2) naming it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct RegistryConfigError {
    pub path: PathBuf,
    pub reason: String,
}

/// The namespace docker.io's images are configured under (containerd's): a short name like
/// `hello:v1` is `docker.io/library/hello:v1`.
const DOCKER_HUB: &str = "docker.io";
/// The host docker.io's server is by default (containerd's).
const DOCKER_HUB_SERVER: &str = "registry-1.docker.io";
/// The directory whose hosts serve every registry without one of its own.
const DEFAULT_NAMESPACE: &str = "_default";

impl RegistryOptions {
    /// Adds every certificate of the PEM bundle `pem` (read from `source`, named in errors).
    /// A bundle without a certificate is an error: the file is surely not what was meant.
    pub fn add_ca_pem(&mut self, source: &Path, pem: &[u8]) -> Result<(), RegistryConfigError> {
        self.extra_ca_certificates
            .extend(certificates_of(source, pem)?);
        Ok(())
    }

    /// Reads the PEM bundle at `path` (see [`RegistryOptions::add_ca_pem`]).
    pub fn add_ca_file(&mut self, path: &Path) -> Result<(), RegistryConfigError> {
        let pem = std::fs::read(path).map_err(|e| RegistryConfigError {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        self.add_ca_pem(path, &pem)
    }

    /// Reads `<dir>/<namespace>/hosts.toml` for every namespace directory in `dir`. A
    /// directory without a hosts.toml is skipped; a hosts.toml that cannot be read or holds
    /// what is not supported is an error naming the file. Call after the CA file and the
    /// insecure registries are set: each host gets the extra CAs and the plain-http fallback.
    pub fn load_hosts_dir(&mut self, dir: &Path) -> Result<(), RegistryConfigError> {
        let error = |path: &Path, reason: String| RegistryConfigError {
            path: path.to_path_buf(),
            reason,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| error(dir, e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| error(dir, e.to_string()))?;
            let file = entry.path().join("hosts.toml");
            if !file.is_file() {
                continue;
            }
            let namespace = entry.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&file).map_err(|e| error(&file, e.to_string()))?;
            let hosts = self
                .parse_hosts(&namespace, &text, &entry.path())
                .map_err(|reason| error(&file, reason))?;
            self.hosts.insert(namespace, hosts);
        }
        Ok(())
    }

    /// The hosts of one namespace's hosts.toml `text` (CA paths relative to `base`).
    fn parse_hosts(
        &self,
        namespace: &str,
        text: &str,
        base: &Path,
    ) -> Result<Vec<Endpoint>, String> {
        // The server's settings sit at the top beside `server` and `host`: those two are taken
        // out and the rest read as one host's fields (serde's `flatten` would let unknown keys
        // through). `host` keeps the file's order: the order mirrors are tried.
        let mut top: toml::Table = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        let server: Option<String> = top
            .remove("server")
            .map(toml::Value::try_into)
            .transpose()
            .map_err(|e| format!("server: {}", one_line(&e.to_string())))?;
        let mirrors: indexmap::IndexMap<String, HostFields> = top
            .remove("host")
            .map(toml::Value::try_into)
            .transpose()
            .map_err(|e| format!("host: {}", one_line(&e.to_string())))?
            .unwrap_or_default();
        let server_fields: HostFields = toml::Value::Table(top)
            .try_into()
            .map_err(|e| one_line(&e.to_string()))?;
        let mut hosts = Vec::with_capacity(mirrors.len() + 1);
        for (url, fields) in &mirrors {
            let host = self
                .endpoint(url, fields, true, base)
                .map_err(|e| format!("[host.{url:?}]: {e}"))?;
            hosts.push(host);
        }
        let server = match &server {
            Some(url) => url.clone(),
            None if namespace == DOCKER_HUB => format!("https://{DOCKER_HUB_SERVER}"),
            None if namespace == DEFAULT_NAMESPACE => String::new(),
            None => format!("https://{namespace}"),
        };
        // `_default` without a server: the registry's own server, filled in per registry.
        if !server.is_empty() {
            let host = self
                .endpoint(&server, &server_fields, false, base)
                .map_err(|e| format!("server {server:?}: {e}"))?;
            hosts.push(host);
        } else if server_fields != HostFields::default() {
            return Err("settings for the server without `server`".into());
        }
        Ok(hosts)
    }

    fn endpoint(
        &self,
        url: &str,
        fields: &HostFields,
        mirror: bool,
        base: &Path,
    ) -> Result<Endpoint, String> {
        if fields.client.is_some() {
            return Err("`client` (TLS client certificates) is not supported".into());
        }
        if fields.header.is_some() {
            return Err("`header` (extra request headers) is not supported".into());
        }
        let (plain_http, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (false, rest)
        } else if url.contains("://") {
            return Err("only http:// and https:// hosts are supported".into());
        } else {
            (false, url)
        };
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        if host.is_empty() || host.contains(['@', '?', '#', ' ']) {
            return Err("not a host[:port]".into());
        }
        // The API is always at /v2 here (oci-client's), so a path is only accepted when it
        // says that.
        if !matches!(path.trim_end_matches('/'), "" | "v2") || fields.override_path {
            return Err(
                "a path other than /v2 (and override_path) is not supported: the registry API is reached at /v2".into(),
            );
        }
        let capabilities = match &fields.capabilities {
            None => vec!["pull".to_string(), "resolve".to_string()],
            Some(c) => c.clone(),
        };
        for c in &capabilities {
            if !matches!(c.as_str(), "pull" | "resolve" | "push") {
                return Err(format!(
                    "capability {c:?} is not one of pull, resolve, push"
                ));
            }
        }
        let mut ca_certificates = self.extra_ca_certificates.clone();
        for ca in fields.ca.iter().flat_map(Paths::as_slice) {
            let path = base.join(ca);
            let pem = std::fs::read(&path).map_err(|e| format!("ca {}: {e}", path.display()))?;
            ca_certificates.extend(certificates_of(&path, &pem).map_err(|e| e.to_string())?);
        }
        Ok(Endpoint {
            host: host.to_string(),
            mirror,
            plain_http,
            http_fallback: !plain_http
                && self
                    .insecure_registries
                    .iter()
                    .any(|r| r.eq_ignore_ascii_case(host)),
            ca_certificates,
            skip_verify: fields.skip_verify,
            resolve: capabilities.iter().any(|c| c == "resolve"),
            pull: capabilities.iter().any(|c| c == "pull"),
        })
    }

    /// The hosts to try, in order, for an image of `registry` (the reference's registry as
    /// written: `docker.io` for a short name): its hosts.toml's mirrors then its server, else
    /// `_default`'s, else the registry itself. A tag is resolved only on hosts that may resolve
    /// and pull; a reference by digest is fetched from any that may pull.
    pub fn endpoints(&self, registry: &str, by_digest: bool) -> Vec<Endpoint> {
        let namespace = match registry {
            "index.docker.io" | DOCKER_HUB_SERVER => DOCKER_HUB,
            other => other,
        };
        let own = || Endpoint {
            host: registry.to_string(),
            mirror: false,
            plain_http: false,
            http_fallback: self
                .insecure_registries
                .iter()
                .any(|r| r.eq_ignore_ascii_case(registry)),
            ca_certificates: self.extra_ca_certificates.clone(),
            skip_verify: false,
            resolve: true,
            pull: true,
        };
        let mut hosts = match self
            .hosts
            .get(namespace)
            .or_else(|| self.hosts.get(DEFAULT_NAMESPACE))
        {
            Some(hosts) => hosts.clone(),
            None => return vec![own()],
        };
        // `_default` without a server of its own: each registry's own server, last.
        if !hosts.iter().any(|h| !h.mirror) {
            hosts.push(own());
        }
        hosts.retain(|h| h.pull && (by_digest || h.resolve));
        hosts
    }
}

/// What both providers' oci-client pulls need of an [`Endpoint`] (feature `oci`).
#[cfg(feature = "oci")]
pub mod oci {
    use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
    use oci_client::Reference;

    use super::Endpoint;

    /// The oci-client configuration for `endpoint` with `protocol`: its CAs, its
    /// `skip_verify`.
    pub fn client_config(endpoint: &Endpoint, protocol: ClientProtocol) -> ClientConfig {
        ClientConfig {
            protocol,
            extra_root_certificates: endpoint
                .ca_certificates
                .iter()
                .map(|der| Certificate {
                    encoding: CertificateEncoding::Der,
                    data: der.clone(),
                })
                .collect(),
            accept_invalid_certificates: endpoint.skip_verify,
            ..Default::default()
        }
    }

    /// `image` as a reference on `endpoint`'s host: the same repository, tag or digest. The
    /// reference's own form when the host is its registry (oci-client knows docker.io's
    /// aliases).
    pub fn reference_on(endpoint: &Endpoint, image: &Reference) -> Reference {
        if endpoint.host == image.registry() {
            return image.clone();
        }
        let (host, repository) = (endpoint.host.clone(), image.repository().to_string());
        match image.digest() {
            Some(digest) => Reference::with_digest(host, repository, digest.to_string()),
            None => Reference::with_tag(
                host,
                repository,
                image.tag().unwrap_or("latest").to_string(),
            ),
        }
    }
}

/// The certificates (DER) of the PEM bundle `pem`; none is an error.
fn certificates_of(source: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, RegistryConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let error = |reason: String| RegistryConfigError {
        path: source.to_path_buf(),
        reason,
    };
    let mut found = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        found.push(
            cert.map_err(|e| error(format!("bad PEM: {e}")))?
                .as_ref()
                .to_vec(),
        );
    }
    if found.is_empty() {
        return Err(error("no PEM certificate in it".into()));
    }
    Ok(found)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFields {
    capabilities: Option<Vec<String>>,
    ca: Option<Paths>,
    #[serde(default)]
    skip_verify: bool,
    #[serde(default)]
    override_path: bool,
    /// Read only to be refused by name (containerd's TLS client certificates).
    client: Option<toml::Value>,
    /// Read only to be refused by name (containerd's extra headers).
    header: Option<toml::Value>,
}

/// `ca = "a.pem"` or `ca = ["a.pem", "b.pem"]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum Paths {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl Paths {
    fn as_slice(&self) -> &[PathBuf] {
        match self {
            Paths::One(p) => std::slice::from_ref(p),
            Paths::Many(p) => p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(insecure: &[&str]) -> RegistryOptions {
        RegistryOptions {
            insecure_registries: insecure.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn parse(o: &RegistryOptions, namespace: &str, text: &str) -> Result<Vec<Endpoint>, String> {
        o.parse_hosts(namespace, text, Path::new("/nonexistent"))
    }

    fn hosts(endpoints: &[Endpoint]) -> Vec<&str> {
        endpoints.iter().map(|e| e.host.as_str()).collect()
    }

    #[test]
    fn without_configuration_a_registry_is_its_own_host() {
        let o = options(&["127.0.0.1:5000"]);
        let e = o.endpoints("registry.lan", false);
        assert_eq!(hosts(&e), ["registry.lan"]);
        assert!(!e[0].http_fallback && !e[0].mirror);
        assert!(o.endpoints("127.0.0.1:5000", false)[0].http_fallback);
    }

    #[test]
    fn mirrors_come_first_in_file_order_then_the_server() {
        let mut o = options(&[]);
        let text = r#"
server = "https://registry-1.docker.io"
[host."https://zz.mirror.lan"]
[host."http://127.0.0.1:5000/v2"]
  capabilities = ["pull", "resolve"]
[host."aa.mirror.lan:8443"]
  skip_verify = true
"#;
        let docker = parse(&o, "docker.io", text).unwrap();
        assert_eq!(
            hosts(&docker),
            [
                "zz.mirror.lan",
                "127.0.0.1:5000",
                "aa.mirror.lan:8443",
                "registry-1.docker.io"
            ]
        );
        assert!(docker[1].plain_http && !docker[0].plain_http);
        assert!(docker[2].skip_verify && docker[..3].iter().all(|e| e.mirror));
        assert!(!docker[3].mirror);
        o.hosts.insert("docker.io".into(), docker);
        // A short name's registry, and docker.io's other names.
        for registry in ["docker.io", "index.docker.io"] {
            assert_eq!(o.endpoints(registry, false).len(), 4, "{registry}");
        }
        assert_eq!(hosts(&o.endpoints("quay.io", false)), ["quay.io"]);
    }

    #[test]
    fn the_server_defaults_to_the_namespace() {
        let o = options(&["registry.lan:5000"]);
        let e = parse(&o, "registry.lan:5000", "[host.\"https://m.lan\"]\n").unwrap();
        assert_eq!(hosts(&e), ["m.lan", "registry.lan:5000"]);
        assert!(
            e[1].http_fallback,
            "the insecure list still applies to the server"
        );
        let e = parse(&o, "docker.io", "").unwrap();
        assert_eq!(hosts(&e), ["registry-1.docker.io"]);
    }

    #[test]
    fn capabilities_decide_which_hosts_resolve_tags() {
        let mut o = options(&[]);
        let text = r#"
server = "https://upstream.lan"
[host."https://pull-only.lan"]
  capabilities = ["pull"]
[host."https://push-only.lan"]
  capabilities = ["push"]
"#;
        o.hosts.insert(
            "upstream.lan".into(),
            parse(&o, "upstream.lan", text).unwrap(),
        );
        assert_eq!(hosts(&o.endpoints("upstream.lan", false)), ["upstream.lan"]);
        assert_eq!(
            hosts(&o.endpoints("upstream.lan", true)),
            ["pull-only.lan", "upstream.lan"]
        );
    }

    #[test]
    fn default_namespace_serves_registries_without_their_own() {
        let mut o = options(&[]);
        o.hosts.insert(
            "_default".into(),
            parse(&o, "_default", "[host.\"https://mirror.lan\"]\n").unwrap(),
        );
        assert_eq!(
            hosts(&o.endpoints("registry.lan", false)),
            ["mirror.lan", "registry.lan"]
        );
    }

    #[test]
    fn what_is_not_supported_is_refused_by_name() {
        let o = options(&[]);
        for (text, said) in [
            ("[host.\"https://m.lan\"]\nclient = \"/c.pem\"\n", "client"),
            ("[host.\"https://m.lan\".header]\nx-a = \"b\"\n", "header"),
            ("[host.\"https://m.lan/some/path\"]\n", "/v2"),
            (
                "[host.\"https://m.lan\"]\noverride_path = true\n",
                "override_path",
            ),
            ("[host.\"ftp://m.lan\"]\n", "http"),
            (
                "[host.\"https://m.lan\"]\ncapabilities = [\"fetch\"]\n",
                "fetch",
            ),
            (
                "[host.\"https://m.lan\"]\nca = \"missing.pem\"\n",
                "missing.pem",
            ),
            ("sever = \"https://typo\"\n", "sever"),
            (
                "server = \"https://a\"\n[host.\"https://m.lan\"]\nskip_verfy = true\n",
                "skip_verfy",
            ),
        ] {
            let e = parse(&o, "registry.lan", text).unwrap_err();
            assert!(e.contains(said), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn a_directory_is_read_and_a_ca_is_relative_to_its_file() {
        let dir = std::env::temp_dir().join(format!("registries-{}", std::process::id()));
        let ns = dir.join("mirror.lan");
        std::fs::create_dir_all(&ns).unwrap();
        std::fs::create_dir_all(dir.join("no-hosts-file")).unwrap();
        std::fs::write(ns.join("ca.pem"), "not a certificate").unwrap();
        std::fs::write(ns.join("hosts.toml"), "ca = \"ca.pem\"\n").unwrap();
        let err = options(&[]).load_hosts_dir(&dir).unwrap_err();
        assert!(
            err.to_string().contains("hosts.toml") && err.to_string().contains("ca.pem"),
            "{err}"
        );
        std::fs::write(ns.join("hosts.toml"), "[host.\"http://127.0.0.1:5000\"]\n").unwrap();
        let mut o = options(&[]);
        o.load_hosts_dir(&dir).unwrap();
        assert_eq!(
            hosts(&o.endpoints("mirror.lan", false)),
            ["127.0.0.1:5000", "mirror.lan"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
