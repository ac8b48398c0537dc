//! A tiny multi-call toolbox, busybox-style, to exec into a Wasm pod (`kubectl exec POD -- ls
//! /data`): the applet is the program name (argv[0]'s basename), or argv[1] when argv[0] is
//! `toolbox`. Exec runs the container's module again with the exec command as argv, so one
//! module is both the container (`sleep 3600`) and every command run inside it.
//!
//! Applets: `echo ARGS...`, `cat [FILE...]` (stdin when none, or for `-`), `ls [DIR...]`
//! (sorted, `/` after directories), `sleep SECONDS` (fractions allowed), `test -e|-f|-d PATH`
//! (exit 0 or 1), `env` (sorted), `true`, `false`, `write FILE TEXT...` (the text and a
//! newline; exit 1 with a line on stderr when the file cannot be written, e.g. on a read-only
//! mount). Anything else prints the usage on stderr and exits 2.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: toolbox APPLET [ARGS...]  (or run as APPLET)
applets:
  echo ARGS...           print the arguments, space-separated
  cat [FILE...]          print files (stdin when none, or for -)
  ls [DIR...]            list directories, sorted, / after directories
  sleep SECONDS          sleep (fractions allowed)
  test -e|-f|-d PATH     exit 0 if PATH exists / is a file / is a directory, else 1
  env                    print the environment, sorted
  true, false            exit 0, exit 1
  write FILE TEXT...     write the text and a newline to FILE";

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let mut applet = args.first().map(basename).unwrap_or_default();
    if applet == "toolbox" {
        args.remove(0);
        applet = args
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    let rest: Vec<String> = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let code = match applet.as_str() {
        "echo" => report("echo", echo(&rest)),
        "cat" => cat(&rest),
        "ls" => ls(&rest),
        "sleep" => sleep(&rest),
        "test" => test(&rest),
        "env" => report("env", env()),
        "true" => 0,
        "false" => 1,
        "write" => write(&rest),
        _ => {
            if !applet.is_empty() {
                eprintln!("toolbox: unknown applet {applet:?}");
            }
            eprintln!("{USAGE}");
            2
        }
    };
    ExitCode::from(code)
}

/// The last path component of argv[0] (`/bin/ls` runs `ls`).
fn basename(arg0: &OsString) -> String {
    let arg0 = arg0.to_string_lossy();
    arg0.rsplit('/').next().unwrap_or_default().to_string()
}

/// Exit 0, or 1 with one line on stderr (e.g. stdout closed by the reader).
fn report(applet: &str, result: io::Result<()>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("toolbox: {applet}: {e}");
            1
        }
    }
}

fn echo(words: &[String]) -> io::Result<()> {
    writeln!(io::stdout().lock(), "{}", words.join(" "))
}

fn cat(files: &[String]) -> u8 {
    let stdin_only = ["-".to_string()];
    let files = if files.is_empty() {
        &stdin_only[..]
    } else {
        files
    };
    let mut failed = false;
    for file in files {
        let copied = if file == "-" {
            io::copy(&mut io::stdin().lock(), &mut io::stdout().lock())
        } else {
            fs::File::open(file).and_then(|mut f| io::copy(&mut f, &mut io::stdout().lock()))
        };
        if let Err(e) = copied {
            eprintln!("toolbox: cat: {file}: {e}");
            failed = true;
        }
    }
    u8::from(failed)
}

fn ls(dirs: &[String]) -> u8 {
    let here = [".".to_string()];
    let dirs = if dirs.is_empty() { &here[..] } else { dirs };
    let mut failed = false;
    for (i, dir) in dirs.iter().enumerate() {
        let listed = list(dir).and_then(|names| {
            let mut out = io::stdout().lock();
            if dirs.len() > 1 {
                // As ls does for several directories: a header per directory, a blank line between.
                writeln!(out, "{}{dir}:", if i > 0 { "\n" } else { "" })?;
            }
            names.iter().try_for_each(|name| writeln!(out, "{name}"))
        });
        if let Err(e) = listed {
            eprintln!("toolbox: ls: {dir}: {e}");
            failed = true;
        }
    }
    u8::from(failed)
}

/// The sorted entry names of `dir` (directories with a trailing `/`), or `dir` itself if it is
/// not a directory.
fn list(dir: &str) -> io::Result<Vec<String>> {
    if !fs::metadata(dir)?.is_dir() {
        return Ok(vec![dir.to_string()]);
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let slash = if entry.file_type()?.is_dir() { "/" } else { "" };
        names.push(format!("{}{slash}", entry.file_name().to_string_lossy()));
    }
    names.sort();
    Ok(names)
}

fn sleep(args: &[String]) -> u8 {
    let [seconds] = args else {
        eprintln!("usage: sleep SECONDS");
        return 2;
    };
    match seconds
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
    {
        Some(duration) => {
            std::thread::sleep(duration);
            0
        }
        None => {
            eprintln!("toolbox: sleep: invalid time interval {seconds:?}");
            1
        }
    }
}

fn test(args: &[String]) -> u8 {
    let [flag, path] = args else {
        eprintln!("usage: test -e|-f|-d PATH");
        return 2;
    };
    let metadata = fs::metadata(path);
    let holds = match flag.as_str() {
        "-e" => metadata.is_ok(),
        "-f" => metadata.is_ok_and(|m| m.is_file()),
        "-d" => metadata.is_ok_and(|m| m.is_dir()),
        _ => {
            eprintln!("toolbox: test: unknown operator {flag:?} (use -e, -f or -d)");
            return 2;
        }
    };
    u8::from(!holds)
}

fn env() -> io::Result<()> {
    let mut vars: Vec<_> = std::env::vars_os().collect();
    vars.sort();
    let mut out = io::stdout().lock();
    for (key, value) in vars {
        writeln!(out, "{}={}", key.to_string_lossy(), value.to_string_lossy())?;
    }
    Ok(())
}

fn write(args: &[String]) -> u8 {
    let Some((file, words)) = args.split_first() else {
        eprintln!("usage: write FILE TEXT...");
        return 2;
    };
    match fs::write(Path::new(file), format!("{}\n", words.join(" "))) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("toolbox: write: cannot write {file}: {e}");
            1
        }
    }
}
