//! hostPath volumes, checked as the kubelet checks them (`pkg/volume/hostpath/host_path.go`,
//! checkTypeInternal): DirectoryOrCreate makes the directory (0755) when missing, FileOrCreate
//! the file (0644); Directory, File, Socket, CharDevice and BlockDevice must already be that;
//! an empty type checks nothing. The failure messages are the kubelet's.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Checks (and where asked, creates) `path` for hostPath `type`.
pub fn check_type(path: &str, kind: Option<&str>) -> Result<(), String> {
    let p = Path::new(path);
    let meta = || fs::metadata(p).ok();
    let not = |what: &str| Err(format!("hostPath type check failed: {path} is not {what}"));
    match kind.unwrap_or("") {
        "" => Ok(()),
        "DirectoryOrCreate" if meta().is_none() => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)
            .map_err(|e| format!("creating hostPath directory {path}: {e}")),
        "DirectoryOrCreate" | "Directory" => {
            if meta().is_some_and(|m| m.is_dir()) {
                Ok(())
            } else {
                not("a directory")
            }
        }
        "FileOrCreate" if meta().is_none() => fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(p)
            .map(drop)
            .map_err(|e| format!("creating hostPath file {path}: {e}")),
        "FileOrCreate" | "File" => {
            if meta().is_some_and(|m| m.is_file()) {
                Ok(())
            } else {
                not("a file")
            }
        }
        "Socket" => {
            if meta().is_some_and(|m| m.file_type().is_socket()) {
                Ok(())
            } else {
                not("a socket file")
            }
        }
        "CharDevice" => {
            if meta().is_some_and(|m| m.file_type().is_char_device()) {
                Ok(())
            } else {
                not("a character device")
            }
        }
        "BlockDevice" => {
            if meta().is_some_and(|m| m.file_type().is_block_device()) {
                Ok(())
            } else {
                not("a block device")
            }
        }
        other => Err(format!("{other} is an invalid volume type")),
    }
}

/// A WebAssembly guest sees a volume through a WASI preopen, which is a directory: a hostPath
/// (or PersistentVolume path) that is not one cannot be given to it.
pub fn require_directory(path: &str) -> Result<(), String> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{path} is not a directory: WebAssembly guests get volumes as WASI preopened directories, so a single file, socket or device cannot be mounted")),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_checked_and_created_as_the_kubelet_does() {
        let base = std::env::temp_dir().join(format!("wk-hostpath-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let dir = base.join("made/deep");
        let dir_s = dir.to_str().unwrap();
        assert_eq!(
            check_type(dir_s, Some("Directory")).unwrap_err(),
            format!("hostPath type check failed: {dir_s} is not a directory")
        );
        check_type(dir_s, Some("DirectoryOrCreate")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o755
        );
        check_type(dir_s, Some("Directory")).unwrap();
        assert_eq!(
            check_type(dir_s, Some("File")).unwrap_err(),
            format!("hostPath type check failed: {dir_s} is not a file")
        );

        let file = base.join("f");
        let file_s = file.to_str().unwrap();
        check_type(file_s, Some("FileOrCreate")).unwrap();
        assert!(file.is_file());
        check_type(file_s, Some("File")).unwrap();
        assert!(check_type(file_s, Some("DirectoryOrCreate"))
            .unwrap_err()
            .ends_with("is not a directory"));
        assert!(check_type(file_s, Some("Socket"))
            .unwrap_err()
            .ends_with("is not a socket file"));
        assert!(check_type(file_s, Some("CharDevice"))
            .unwrap_err()
            .ends_with("is not a character device"));
        assert!(check_type(file_s, Some("BlockDevice"))
            .unwrap_err()
            .ends_with("is not a block device"));
        check_type("/dev/null", Some("CharDevice")).unwrap();
        check_type("/does/not/exist", Some("")).unwrap();
        check_type("/does/not/exist", None).unwrap();
        assert_eq!(
            check_type("/x", Some("Fifo")).unwrap_err(),
            "Fifo is an invalid volume type"
        );
        assert!(require_directory(file_s)
            .unwrap_err()
            .contains("WASI preopened directories"));
        require_directory(dir_s).unwrap();
        let _ = fs::remove_dir_all(&base);
    }
}
