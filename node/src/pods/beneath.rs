//! Paths inside a pod's directories, resolved beneath them: the one way the agent opens,
//! creates, reads, walks and removes what a guest can write to.
//!
//! A guest owns the inside of its preopened directories (emptyDir, the termination-message
//! directory, a writable hostPath or PVC): it can make symlinks there, `..`-laden or absolute,
//! FIFOs, deep trees. The agent runs as root, so a plain `open(root.join(rel))` would follow a
//! guest's `termination-log -> ../../../../etc/shadow` with root's authority. Every function
//! here resolves a relative path with openat2(2) `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`
//! from a directory fd: the kernel refuses (EXDEV) any step, `..` or symlink, that would leave
//! the root, in the same call that opens the file, so there is no check-then-use gap. Symlinks
//! that stay inside still resolve (an atomic-writer `..data` link, a guest's own link to a
//! sibling). Reads refuse anything but regular files and never block (O_NONBLOCK: a FIFO is
//! opened, seen for what it is and closed). Walks use `RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`
//! and never cross a mount point or follow a link.
//!
//! Start at [`read_tail`] (guest-written files), [`create_dir_all`] (subPath creation) and
//! [`disk_usage`] (emptyDir and log usage).

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How every path below a root is resolved: never out of the root, never through /proc's
/// magic links (`/proc/self/fd/N` inside a hostPath of /proc would otherwise be a way out).
const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);
/// Walks follow no link at all and stay on the root's filesystem.
const WALK: ResolveFlags = BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Why a path beneath a root could not be used. Retrying does not help unless the guest
/// changes what it put there.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `rel` resolves (through `..` or a symlink) to a place outside the root.
    #[error("{rel} resolves outside {root}")]
    Escapes { root: PathBuf, rel: PathBuf },
    /// The path names something other than a regular file where one is read (a FIFO, a
    /// socket, a device, a directory).
    #[error("{rel} is not a regular file")]
    NotRegular { rel: PathBuf },
    /// The relative path is absolute or empty: a caller's bug or unchecked input.
    #[error("{rel} is not a relative path")]
    NotRelative { rel: PathBuf },
    /// Any other failure of the system call, with the path it was about.
    #[error("{rel}: {source}")]
    Io {
        rel: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the path (or a component of it) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    fn from_errno(root: &Path, rel: &Path, e: Errno) -> Self {
        match e {
            // EXDEV: a step left the root (RESOLVE_BENEATH); ELOOP: a magic link or, in a walk, a
            // symlink. Both mean "not a place this root may reach".
            Errno::XDEV | Errno::LOOP => Error::Escapes {
                root: root.to_path_buf(),
                rel: rel.to_path_buf(),
            },
            other => Error::Io {
                rel: rel.to_path_buf(),
                source: other.into(),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Opens the directory `root` itself, the anchor of what follows. `root` is a path the agent
/// made (a pod's directory, a volume's) or one the pod spec names (a hostPath): no guest can
/// write along it.
pub fn open_root(root: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::Io {
        rel: root.to_path_buf(),
        source: e.into(),
    })
}

/// `rel` must be relative and non-empty (`.` for the root itself).
fn check_relative(rel: &Path) -> Result<()> {
    if rel.as_os_str().is_empty() || rel.is_absolute() {
        return Err(Error::NotRelative {
            rel: rel.to_path_buf(),
        });
    }
    Ok(())
}

/// Opens `rel` beneath the directory `root_fd` (whose path, `root`, is for messages only).
pub fn open_at(
    root_fd: impl AsFd,
    root: &Path,
    rel: &Path,
    flags: OFlags,
    mode: u32,
) -> Result<OwnedFd> {
    check_relative(rel)?;
    rustix::fs::openat2(
        root_fd,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
        BENEATH,
    )
    .map_err(|e| Error::from_errno(root, rel, e))
}

/// Reads at most `cap` bytes of the regular file `rel` beneath `root`: the last `cap` bytes
/// when it is longer (the kubelet's `tail.ReadAtMost`). A FIFO, socket, device or directory
/// is refused without blocking; a path that leaves `root` is refused.
pub fn read_tail(root: &Path, rel: &Path, cap: usize) -> Result<Vec<u8>> {
    let root_fd = open_root(root)?;
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    // O_NOCTTY: a guest cannot make a terminal ours by planting a device node anyway, but
    // opening one must never change the agent's controlling terminal.
    let fd = open_at(
        &root_fd,
        root,
        rel,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
        0,
    )?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| Error::Io {
        rel: rel.to_path_buf(),
        source: e.into(),
    })?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(Error::NotRegular {
            rel: rel.to_path_buf(),
        });
    }
    let file = File::from(fd);
    let size = stat.st_size.max(0) as u64;
    let start = size.saturating_sub(cap as u64);
    let mut out = vec![0u8; cap.min(size as usize)];
    let mut filled = 0;
    // The file may shrink meanwhile (read less) or grow (ignored past `cap`).
    while filled < out.len() {
        match file.read_at(&mut out[filled..], start + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(Error::Io {
                    rel: rel.to_path_buf(),
                    source,
                })
            }
        }
    }
    out.truncate(filled);
    Ok(out)
}

/// Creates (or empties) the regular file `name` directly in `dir` for the agent to hand out: a
/// symlink, FIFO or anything else already there under that name is removed first, never
/// followed or opened.
pub fn create_empty_file(dir: &Path, name: &OsStr, mode: u32) -> Result<()> {
    let rel = Path::new(name);
    if rel.components().count() != 1
        || !matches!(rel.components().next(), Some(Component::Normal(_)))
    {
        return Err(Error::NotRelative {
            rel: rel.to_path_buf(),
        });
    }
    let dir_fd = open_root(dir)?;
    match rustix::fs::unlinkat(&dir_fd, rel, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(Error::from_errno(dir, rel, e)),
    }
    // O_EXCL with O_CREAT never follows a symlink, even one planted between the unlink and here.
    open_at(
        &dir_fd,
        dir,
        rel,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
        mode,
    )
    .map(drop)
}

/// Makes every missing directory of `rel` beneath `root` (mode `mode`, less the umask) and
/// returns the last one opened `O_PATH`: the kubelet's SafeMakeDir plus the open of
/// PrepareSafeSubpath. Existing components may be symlinks that stay inside `root`; one that
/// leads out is refused, and nothing is created outside `root`.
pub fn create_dir_all(root: &Path, rel: &Path, mode: u32) -> Result<OwnedFd> {
    check_relative(rel)?;
    let root_fd = open_root(root)?;
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY;
    let mut prefix = PathBuf::new();
    let mut current = open_at(&root_fd, root, Path::new("."), dir_flags, 0)?;
    for component in rel.components() {
        let name = match component {
            Component::CurDir => continue,
            Component::Normal(name) => name,
            // `..` and a root are refused by the callers' validation already; refuse here too.
            _ => {
                return Err(Error::Escapes {
                    root: root.to_path_buf(),
                    rel: rel.to_path_buf(),
                })
            }
        };
        prefix.push(name);
        // Resolve the prefix from the root each time: a symlink component is followed only
        // while it stays beneath the root.
        current = match open_at(&root_fd, root, &prefix, dir_flags, 0) {
            Ok(fd) => fd,
            Err(e) if e.is_not_found() => {
                // mkdirat in the directory just resolved, by a single name: it never follows a
                // link (a dangling one makes EEXIST, and the open below then fails).
                match rustix::fs::mkdirat(&current, name, Mode::from_raw_mode(mode)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(Error::from_errno(root, &prefix, e)),
                }
                rustix::fs::openat2(
                    &current,
                    name,
                    dir_flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                    BENEATH,
                )
                .map_err(|e| Error::from_errno(root, &prefix, e))?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(current)
}

/// Whether the fd is a directory.
pub fn is_dir(fd: impl AsFd) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory)
}

/// Bytes the files under `root` occupy (allocated blocks, as `du -x` without following links);
/// 0 when missing. Symlinks are counted, never followed; directories on another filesystem
/// (a mount point) are not entered. Iterative: a guest's deep tree cannot exhaust the stack,
/// and at most two directories are open at any time. A directory too deep to name within
/// PATH_MAX is not entered (its own entry is still counted).
///
/// Not a path-based walker such as walkdir: it opens each directory by its full path, so a guest
/// that swaps a directory the walk already holds open for a symlink (`sub` -> `/elsewhere`)
/// sends the walk through the link (`sub/deeper` is then `/elsewhere/deeper`), follow_links(false)
/// notwithstanding. Here each directory is opened from the root's fd by openat2, which refuses
/// any symlink on the way (`WALK`), whatever the guest swaps in.
pub fn disk_usage(root: &Path) -> u64 {
    let Ok(root_fd) = open_root(root) else {
        return 0;
    };
    let Ok(root_stat) = rustix::fs::fstat(&root_fd) else {
        return 0;
    };
    let mut total = root_stat.st_blocks as u64 * 512;
    let mut pending: Vec<PathBuf> = vec![PathBuf::from(".")];
    while let Some(rel) = pending.pop() {
        let Ok(fd) = rustix::fs::openat2(
            &root_fd,
            &rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            WALK,
        ) else {
            continue;
        };
        let Ok(dir) = rustix::fs::Dir::read_from(&fd) else {
            continue;
        };
        for entry in dir.flatten() {
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let Ok(stat) = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            total += stat.st_blocks as u64 * 512;
            if FileType::from_raw_mode(stat.st_mode) == FileType::Directory
                && stat.st_dev == root_stat.st_dev
            {
                pending.push(rel.join(name));
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tempdir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wk-beneath-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        std::fs::write(dir.join("outside"), "host secret").unwrap();
        dir
    }

    #[test]
    fn dot_dot_and_escaping_symlinks_are_refused() {
        let base = tempdir("escape");
        let root = base.join("root");
        std::fs::write(root.join("ok"), "inside").unwrap();
        assert_eq!(read_tail(&root, Path::new("ok"), 4096).unwrap(), b"inside");
        assert!(matches!(
            read_tail(&root, Path::new("../outside"), 4096),
            Err(Error::Escapes { .. })
        ));
        // An absolute symlink, and a relative one climbing out.
        symlink(base.join("outside"), root.join("abs")).unwrap();
        symlink("../outside", root.join("rel")).unwrap();
        symlink(
            "../../../../../../../../../../etc/hostname",
            root.join("deep"),
        )
        .unwrap();
        for link in ["abs", "rel", "deep"] {
            let e = read_tail(&root, Path::new(link), 4096).unwrap_err();
            assert!(matches!(e, Error::Escapes { .. }), "{link}: {e}");
        }
        assert!(
            read_tail(&root, Path::new("/etc/hostname"), 4096).is_err(),
            "absolute paths are not relative"
        );
        // A symlink that stays inside resolves.
        symlink("ok", root.join("alias")).unwrap();
        assert_eq!(
            read_tail(&root, Path::new("alias"), 4096).unwrap(),
            b"inside"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_symlink_loop_fails_without_hanging() {
        let base = tempdir("loop");
        let root = base.join("root");
        symlink("b", root.join("a")).unwrap();
        symlink("a", root.join("b")).unwrap();
        assert!(read_tail(&root, Path::new("a"), 10).is_err());
        assert!(create_dir_all(&root, Path::new("a/sub"), 0o755).is_err());
        assert!(
            disk_usage(&root) > 0,
            "the links themselves are counted, the loop is not walked"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let base = tempdir("fifo");
        let root = base.join("root");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(matches!(
            read_tail(&root, Path::new("fifo"), 4096),
            Err(Error::NotRegular { .. })
        ));
        std::fs::create_dir(root.join("dir")).unwrap();
        assert!(matches!(
            read_tail(&root, Path::new("dir"), 4096),
            Err(Error::NotRegular { .. })
        ));
        // The file is replaced, not opened.
        create_empty_file(&root, OsStr::new("fifo"), 0o644).unwrap();
        assert!(std::fs::symlink_metadata(root.join("fifo"))
            .unwrap()
            .is_file());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_file_larger_than_the_cap_yields_its_tail() {
        let base = tempdir("cap");
        let root = base.join("root");
        let mut content = vec![b'a'; 10_000];
        content.extend_from_slice(b"the end");
        std::fs::write(root.join("big"), &content).unwrap();
        let tail = read_tail(&root, Path::new("big"), 4096).unwrap();
        assert_eq!(tail.len(), 4096);
        assert!(tail.ends_with(b"the end"));
        assert_eq!(read_tail(&root, Path::new("big"), 0).unwrap(), b"");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn creating_a_file_removes_a_planted_symlink_instead_of_writing_through_it() {
        let base = tempdir("create");
        let root = base.join("root");
        symlink(base.join("outside"), root.join("termination-log")).unwrap();
        create_empty_file(&root, OsStr::new("termination-log"), 0o644).unwrap();
        assert_eq!(
            std::fs::read_to_string(base.join("outside")).unwrap(),
            "host secret",
            "not truncated through the link"
        );
        assert!(std::fs::symlink_metadata(root.join("termination-log"))
            .unwrap()
            .is_file());
        assert!(create_empty_file(&root, OsStr::new("../x"), 0o644).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn directories_are_made_beneath_the_root_only() {
        let base = tempdir("mkdir");
        let root = base.join("root");
        let fd = create_dir_all(&root, Path::new("a/b/c"), 0o755).unwrap();
        assert!(is_dir(&fd) && root.join("a/b/c").is_dir());
        // Through an inside symlink: fine.
        symlink("a/b", root.join("inner")).unwrap();
        create_dir_all(&root, Path::new("inner/d"), 0o755).unwrap();
        assert!(root.join("a/b/d").is_dir());
        // Through a link out (relative or absolute): refused, and nothing made outside.
        std::fs::create_dir(base.join("host")).unwrap();
        symlink("../host", root.join("out")).unwrap();
        symlink(base.join("host"), root.join("abs")).unwrap();
        for rel in ["out", "out/made", "abs/made", "../host/made"] {
            assert!(
                create_dir_all(&root, Path::new(rel), 0o755).is_err(),
                "{rel}"
            );
        }
        assert_eq!(
            std::fs::read_dir(base.join("host")).unwrap().count(),
            0,
            "nothing created outside the root"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn usage_counts_links_without_following_them() {
        let base = tempdir("du");
        let root = base.join("root");
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::write(root.join("d/e/f"), vec![1u8; 64 * 1024]).unwrap();
        let before = disk_usage(&root);
        assert!(before >= 64 * 1024, "{before}");
        // A link to / adds a link's blocks (usually none), not the host's.
        symlink("/", root.join("slash")).unwrap();
        symlink("../..", root.join("d/e/up")).unwrap();
        assert!(disk_usage(&root) < before + 64 * 1024);
        assert_eq!(disk_usage(&base.join("missing")), 0);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_deep_tree_is_walked_without_recursion() {
        let base = tempdir("deep");
        let root = base.join("root");
        // Deeper than a recursive walk with a small stack would survive, built by fd.
        let mut fd = open_root(&root).unwrap();
        for _ in 0..1500 {
            rustix::fs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
            fd = rustix::fs::openat(&fd, "d", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
                .unwrap();
        }
        let used = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || disk_usage(&root))
            .unwrap()
            .join()
            .unwrap();
        assert!(used > 0);
        // std's remove_dir_all handles the depth within the fd limit; the test cleans up.
        let _ = std::fs::remove_dir_all(&base);
    }
}
