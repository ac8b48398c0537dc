//! For each path argument, prints the file's content, or a directory's entries one per line
//! (sorted, directories with a trailing `/`), to check what a pod's volumes look like inside
//! the guest. A path it cannot read is one line on stderr; the exit status is then 1.
//!
//! `file-reader --every SECONDS PATH...` does the same every SECONDS, forever (a line `---`
//! after each round), to watch a volume change while the pod runs.

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut paths: Vec<_> = std::env::args_os().skip(1).collect();
    let every = if paths.first().is_some_and(|a| a == "--every") {
        let seconds = paths
            .get(1)
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<f64>().ok())
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok());
        let Some(seconds) = seconds else {
            eprintln!("usage: file-reader --every SECONDS PATH...");
            return ExitCode::from(2);
        };
        paths.drain(..2);
        Some(seconds)
    } else {
        None
    };
    if paths.is_empty() {
        eprintln!("usage: file-reader [--every SECONDS] PATH...");
        return ExitCode::from(2);
    }
    if let Some(every) = every {
        loop {
            for path in &paths {
                let path = Path::new(path);
                if let Err(err) = print_path(path) {
                    eprintln!("file-reader: {}: {err}", path.display());
                }
            }
            println!("\n---");
            std::thread::sleep(every);
        }
    }
    let mut failed = false;
    for path in paths {
        let path = Path::new(&path);
        if let Err(err) = print_path(path) {
            eprintln!("file-reader: {}: {err}", path.display());
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_path(path: &Path) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    if !fs::metadata(path)?.is_dir() {
        // Raw bytes: the file need not be UTF-8.
        return io::copy(&mut fs::File::open(path)?, &mut stdout).map(drop);
    }
    let mut entries = Vec::new();
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let slash = if entry.file_type()?.is_dir() { "/" } else { "" };
        entries.push(format!("{}{slash}", path.join(entry.file_name()).display()));
    }
    entries.sort();
    for entry in entries {
        writeln!(stdout, "{entry}")?;
    }
    Ok(())
}
