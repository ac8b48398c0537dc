//! Pushing images to the local cluster's registries the way a registry client does: blob
//! uploads (POST, then PUT with the digest) and a manifest PUT, spoken with curl so the test
//! exercises the registry's own HTTP API rather than a library's view of it. Layers are built
//! with the `tar` crate (root-owned, sorted, mtime 0, as BuildKit writes them) and gzip'd with
//! `flate2`; digests with `sha2`. Used by the image tests (tests/tests/images.rs,
//! tests/tests/image_layouts.rs) and anything else that needs an image of its own shape.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{unique_name, workspace_root, Cluster};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// A fresh scratch directory under target/it/registry-tmp.
fn scratch(what: &str) -> PathBuf {
    let dir = workspace_root()
        .join("target/it/registry-tmp")
        .join(unique_name(what));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tar layer of `files` (path in the image, content): regular files mode 0644 owned by
/// root, their parent directories before them, sorted by path, mtime 0. gzip-compressed when
/// `gzip`. Returns (layer bytes, diff_id: the sha256 of the uncompressed tar).
pub fn tar_layer(files: &[(&str, &[u8])], gzip: bool) -> (Vec<u8>, String) {
    let mut entries: Vec<(String, &[u8])> = files
        .iter()
        .map(|(path, content)| (path.trim_start_matches('/').to_string(), *content))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, content) in &entries {
        let mut parent = Path::new(path).parent();
        let mut missing = Vec::new();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            if dirs.insert(dir.to_path_buf()) {
                missing.push(dir.to_path_buf());
            }
            parent = dir.parent();
        }
        for dir in missing.iter().rev() {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            header.set_mtime(0);
            builder
                .append_data(&mut header, dir, std::io::empty())
                .unwrap();
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(content.len() as u64);
        header.set_mtime(0);
        builder.append_data(&mut header, path, *content).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let diff_id = sha256(&tar);
    if !gzip {
        return (tar, diff_id);
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&tar).unwrap();
    (encoder.finish().unwrap(), diff_id)
}

/// A registry spoken to with curl: plain http, or https trusting `cacert`, with basic auth.
pub struct Registry {
    pub host: String,
    pub user: Option<String>,
    pub cacert: Option<String>,
}

impl Registry {
    /// The local cluster's plain-http registry ($REGISTRY).
    pub fn plain() -> Registry {
        Registry {
            host: Cluster::get().var("REGISTRY").into(),
            user: None,
            cacert: None,
        }
    }

    /// The local cluster's TLS registry with htpasswd auth ($SECURE_REGISTRY).
    pub fn secure() -> Registry {
        let c = Cluster::get();
        Registry {
            host: c.var("SECURE_REGISTRY").into(),
            user: Some(format!(
                "{}:{}",
                c.var("SECURE_REGISTRY_USER"),
                c.var("SECURE_REGISTRY_PASSWORD")
            )),
            cacert: Some(c.var("SECURE_REGISTRY_CA").into()),
        }
    }

    fn base(&self, repo: &str) -> String {
        let scheme = if self.cacert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/v2/{repo}", self.host)
    }

    /// `host/repo:tag`, the reference a pod names.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.host)
    }

    /// One request; returns (status, headers, body). Panics when nothing answers.
    pub fn request(&self, method: &str, url: &str, extra: &[&str]) -> (u16, String, String) {
        let dir = scratch("curl");
        let (headers, body) = (dir.join("headers"), dir.join("body"));
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--connect-timeout", "10"])
            .args(["--request", method, "--write-out", "%{http_code}"])
            .arg("--dump-header")
            .arg(&headers)
            .arg("--output")
            .arg(&body);
        if let Some(user) = &self.user {
            cmd.args(["--user", user]);
        }
        if let Some(ca) = &self.cacert {
            cmd.args(["--cacert", ca]);
        }
        let out = cmd.args(extra).arg(url).output().expect("curl runs");
        let status = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let result = (status, read(&headers), read(&body));
        let _ = std::fs::remove_dir_all(&dir);
        assert_ne!(
            status,
            0,
            "{method} {url}: no response: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        result
    }

    /// GET `/v2/<repo>/<what>` (`manifests/<tag>` with `accept`, or `blobs/<digest>`); the body,
    /// asserting a 200.
    pub fn fetch(&self, repo: &str, what: &str, accept: Option<&str>) -> String {
        let accept = accept.map(|a| format!("Accept: {a}"));
        let extra: Vec<&str> = accept
            .iter()
            .flat_map(|a| ["--header", a.as_str()])
            .collect();
        let url = format!("{}/{what}", self.base(repo));
        let (status, _, body) = self.request("GET", &url, &extra);
        assert_eq!(status, 200, "GET {url}: {body}");
        body
    }

    /// Uploads `bytes` as a blob of `repo` (POST, then PUT with the digest); its descriptor.
    pub fn push_blob(&self, repo: &str, media_type: &str, bytes: &[u8]) -> Value {
        let digest = sha256(bytes);
        let (status, headers, body) = self.request(
            "POST",
            &format!("{}/blobs/uploads/", self.base(repo)),
            &["--header", "Content-Length: 0"],
        );
        assert_eq!(status, 202, "starting a blob upload: {body}");
        let location = headers
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                    .map(|(_, v)| v.trim().to_string())
            })
            .expect("a Location header");
        let location = if location.starts_with('/') {
            let origin = self.base(repo);
            format!("{}{location}", origin.split("/v2/").next().unwrap())
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let dir = scratch("blob");
        let file = dir.join("blob");
        std::fs::write(&file, bytes).unwrap();
        let data = format!("@{}", file.display());
        let (status, _, body) = self.request(
            "PUT",
            &format!("{location}{sep}digest={digest}"),
            &[
                "--header",
                "Content-Type: application/octet-stream",
                "--data-binary",
                &data,
            ],
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(status, 201, "uploading blob {digest}: {body}");
        json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
    }

    /// PUTs `manifest` (of `media_type`) as `repo:tag` (or by digest); its descriptor.
    pub fn push_manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        manifest: &Value,
    ) -> Value {
        let body = manifest.to_string();
        let (status, _, answer) = self.request(
            "PUT",
            &format!("{}/manifests/{tag}", self.base(repo)),
            &[
                "--header",
                &format!("Content-Type: {media_type}"),
                "--data-binary",
                &body,
            ],
        );
        assert_eq!(status, 201, "putting manifest {repo}:{tag}: {answer}");
        json!({"mediaType": media_type, "digest": sha256(body.as_bytes()), "size": body.len()})
    }

    /// Pushes an image: the config and layers as blobs, then the manifest; `host/repo:tag`.
    pub fn push_image(
        &self,
        repo: &str,
        tag: &str,
        manifest_type: &str,
        config_type: &str,
        config: &Value,
        layers: &[(&str, Vec<u8>)],
    ) -> String {
        let config = self.push_blob(repo, config_type, config.to_string().as_bytes());
        let layers: Vec<Value> = layers
            .iter()
            .map(|(media_type, bytes)| self.push_blob(repo, media_type, bytes))
            .collect();
        let manifest = json!({"schemaVersion": 2, "mediaType": manifest_type,
            "config": config, "layers": layers});
        self.push_manifest(repo, tag, manifest_type, &manifest);
        self.reference(repo, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_lists_parents_first_and_its_diff_id_is_the_plain_tar() {
        let (gz, diff_id) = tar_layer(&[("/b/c/x.wasm", b"xx"), ("/a.txt", b"a")], true);
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut plain).unwrap();
        assert_eq!(sha256(&plain), diff_id);
        let mut archive = tar::Archive::new(&plain[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.txt", "b", "b/c", "b/c/x.wasm"]);
        assert_eq!(tar_layer(&[("/a.txt", b"a")], false).0.len() % 512, 0);
    }
}
