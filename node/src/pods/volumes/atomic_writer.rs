//! The kubelet's AtomicWriter (`pkg/volume/util/atomic_writer.go`): a volume's files are
//! written into a fresh timestamped directory (`..2026_11_27_10_45_00.123456789`), and a
//! `..data` symlink pointing at it is swapped by renaming a temporary symlink over it, so a
//! reader sees the old set or the new set, never a mix. The user-visible paths are symlinks
//! `key -> ..data/key`. Nothing is written when the content (bytes and modes) is unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// The symlink naming the current timestamped directory.
const DATA_DIR: &str = "..data";
/// The symlink made beside it and renamed over it.
const DATA_DIR_TMP: &str = "..data_tmp";
/// The kubelet's limits on a projected path and one of its names.
const MAX_PATH_LENGTH: usize = 4096;
const MAX_FILE_NAME_LENGTH: usize = 255;

/// One file of a volume: its bytes and permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProjection {
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Relative path -> file, the whole content of one volume.
pub type Payload = BTreeMap<String, FileProjection>;

/// The kubelet's validatePath: relative, no `..` element, not starting with `..` (that would
/// hit `..data` or a timestamped directory), within the length limits. The message is the
/// kubelet's.
pub fn validate_path(target: &str) -> Result<(), String> {
    if target.is_empty() {
        return Err(format!("invalid path: must not be empty: {target:?}"));
    }
    if target.starts_with('/') {
        return Err(format!("invalid path: must be relative path: {target}"));
    }
    if target.len() > MAX_PATH_LENGTH {
        return Err(format!(
            "invalid path: must be less than or equal to {MAX_PATH_LENGTH} characters"
        ));
    }
    let items: Vec<&str> = target.split('/').collect();
    for item in &items {
        if *item == ".." {
            return Err(format!("invalid path: must not contain '..': {target}"));
        }
        if item.len() > MAX_FILE_NAME_LENGTH {
            return Err(format!("invalid path: filenames must be less than or equal to {MAX_FILE_NAME_LENGTH} characters"));
        }
    }
    if items[0].starts_with("..") && items[0].len() > 2 {
        return Err(format!("invalid path: must not start with '..': {target}"));
    }
    Ok(())
}

/// `a//b/./c/` -> `a/b/c` (path.Clean for a valid relative path).
fn clean(target: &str) -> String {
    target
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Writes `payload` into `dir` atomically. Returns whether anything changed.
pub fn write(dir: &Path, payload: &Payload) -> Result<bool, String> {
    let mut cleaned = Payload::new();
    for (path, file) in payload {
        validate_path(path)?;
        let path = clean(path);
        if path.is_empty() {
            return Err("invalid path: must name a file".into());
        }
        cleaned.insert(path, file.clone());
    }
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let data_link = dir.join(DATA_DIR);
    let old_ts = fs::read_link(&data_link)
        .ok()
        .filter(|t| t.components().count() == 1);
    let old_files = match &old_ts {
        Some(ts) => Some(read_tree(&dir.join(ts))?),
        None => None,
    };
    if old_files.as_ref() == Some(&cleaned) {
        return Ok(false);
    }

    let ts_name = new_timestamped_dir(dir)?;
    let ts_dir = dir.join(&ts_name);
    for (path, file) in &cleaned {
        let target = ts_dir.join(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        fs::write(&target, &file.data).map_err(|e| format!("writing {}: {e}", target.display()))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(file.mode))
            .map_err(|e| format!("setting the mode of {}: {e}", target.display()))?;
    }

    // The swap: a new symlink beside ..data, renamed over it (rename(2) is atomic).
    let tmp_link = dir.join(DATA_DIR_TMP);
    let _ = fs::remove_file(&tmp_link);
    symlink(&ts_name, &tmp_link).map_err(|e| format!("creating {}: {e}", tmp_link.display()))?;
    fs::rename(&tmp_link, &data_link).map_err(|e| {
        format!(
            "renaming {} to {}: {e}",
            tmp_link.display(),
            data_link.display()
        )
    })?;

    // User-visible paths: one symlink per top-level name, into ..data.
    let new_top = top_level(cleaned.keys());
    for name in &new_top {
        let visible = dir.join(name);
        match fs::symlink_metadata(&visible) {
            Ok(m) if m.file_type().is_symlink() => continue,
            // A plain file or directory (written before this writer existed): replace it.
            Ok(m) if m.is_dir() => fs::remove_dir_all(&visible)
                .map_err(|e| format!("removing {}: {e}", visible.display()))?,
            Ok(_) => fs::remove_file(&visible)
                .map_err(|e| format!("removing {}: {e}", visible.display()))?,
            Err(_) => {}
        }
        symlink(Path::new(DATA_DIR).join(name), &visible)
            .map_err(|e| format!("creating {}: {e}", visible.display()))?;
    }
    // Paths that are gone, then the old timestamped directory.
    if let Some(old) = &old_files {
        for name in top_level(old.keys()).difference(&new_top) {
            let _ = fs::remove_file(dir.join(name));
        }
    }
    if let Some(ts) = old_ts {
        let _ = fs::remove_dir_all(dir.join(ts));
    }
    Ok(true)
}

fn top_level<'a>(paths: impl Iterator<Item = &'a String>) -> BTreeSet<String> {
    paths
        .filter_map(|p| p.split('/').next())
        .map(str::to_string)
        .collect()
}

/// `..<UTC time>.<nanoseconds>`, unique in `dir`.
fn new_timestamped_dir(dir: &Path) -> Result<PathBuf, String> {
    let now = k8s_openapi::chrono::Utc::now();
    for n in 0..100 {
        let name = format!(
            "{}{}",
            now.format("..%Y_%m_%d_%H_%M_%S.%f"),
            if n == 0 {
                String::new()
            } else {
                format!("{n}")
            }
        );
        match fs::create_dir(dir.join(&name)) {
            Ok(()) => {
                let _ = fs::set_permissions(dir.join(&name), fs::Permissions::from_mode(0o755));
                return Ok(PathBuf::from(name));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(format!(
                    "creating a timestamped directory in {}: {e}",
                    dir.display()
                ))
            }
        }
    }
    Err(format!(
        "no free timestamped directory name in {}",
        dir.display()
    ))
}

/// Every file under `root` with its bytes and mode, keyed by relative path.
fn read_tree(root: &Path) -> Result<Payload, String> {
    let mut out = Payload::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            // A dangling ..data: treat as empty, the write replaces it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(format!("reading {}: {e}", dir.display())),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            if meta.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                let data =
                    fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    FileProjection {
                        data,
                        mode: meta.permissions().mode() & 0o7777,
                    },
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wk-atomic-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn payload(files: &[(&str, &str, u32)]) -> Payload {
        files
            .iter()
            .map(|(p, d, m)| {
                (
                    p.to_string(),
                    FileProjection {
                        data: d.as_bytes().to_vec(),
                        mode: *m,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn files_are_symlinks_into_a_timestamped_dir_behind_data() {
        let dir = tempdir("layout");
        assert!(write(
            &dir,
            &payload(&[("key", "v1", 0o644), ("sub/inner", "x", 0o400)])
        )
        .unwrap());
        let ts = fs::read_link(dir.join("..data")).unwrap();
        assert!(
            ts.to_string_lossy().starts_with("..20"),
            "timestamped: {ts:?}"
        );
        assert_eq!(
            fs::read_link(dir.join("key")).unwrap(),
            Path::new("..data/key")
        );
        assert_eq!(
            fs::read_link(dir.join("sub")).unwrap(),
            Path::new("..data/sub")
        );
        assert_eq!(fs::read_to_string(dir.join("key")).unwrap(), "v1");
        assert_eq!(
            fs::metadata(dir.join("sub/inner"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o400
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unchanged_payload_writes_nothing_and_a_change_swaps_and_cleans_up() {
        let dir = tempdir("swap");
        assert!(write(&dir, &payload(&[("a", "1", 0o644), ("b", "2", 0o644)])).unwrap());
        let first = fs::read_link(dir.join("..data")).unwrap();
        assert!(!write(&dir, &payload(&[("a", "1", 0o644), ("b", "2", 0o644)])).unwrap());
        assert_eq!(fs::read_link(dir.join("..data")).unwrap(), first);
        // A mode change alone is a change.
        assert!(write(&dir, &payload(&[("a", "1", 0o600), ("b", "2", 0o644)])).unwrap());
        assert!(write(&dir, &payload(&[("a", "new", 0o644)])).unwrap());
        let last = fs::read_link(dir.join("..data")).unwrap();
        assert_ne!(last, first);
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "new");
        assert!(
            fs::symlink_metadata(dir.join("b")).is_err(),
            "a removed key's link is gone"
        );
        let timestamped: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("..20"))
            .collect();
        assert_eq!(timestamped.len(), 1, "old timestamped dirs are removed");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn plain_files_from_an_older_layout_are_replaced_by_links() {
        let dir = tempdir("legacy");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("key"), "old").unwrap();
        write(&dir, &payload(&[("key", "new", 0o644)])).unwrap();
        assert_eq!(fs::read_to_string(dir.join("key")).unwrap(), "new");
        assert!(fs::symlink_metadata(dir.join("key"))
            .unwrap()
            .file_type()
            .is_symlink());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn escaping_and_reserved_paths_are_rejected_with_the_kubelet_messages() {
        assert_eq!(
            validate_path("../evil").unwrap_err(),
            "invalid path: must not contain '..': ../evil"
        );
        assert_eq!(
            validate_path("a/../../evil").unwrap_err(),
            "invalid path: must not contain '..': a/../../evil"
        );
        assert_eq!(
            validate_path("/etc/passwd").unwrap_err(),
            "invalid path: must be relative path: /etc/passwd"
        );
        assert_eq!(
            validate_path("..data").unwrap_err(),
            "invalid path: must not start with '..': ..data"
        );
        assert!(validate_path("").is_err());
        assert!(validate_path(&"x".repeat(256)).is_err());
        assert!(validate_path("a/..b/c").is_ok());
        let dir = tempdir("reject");
        assert!(write(&dir, &payload(&[("../evil", "x", 0o644)])).is_err());
        assert!(!dir.join("..data").exists(), "nothing written");
        let _ = fs::remove_dir_all(&dir);
    }
}
