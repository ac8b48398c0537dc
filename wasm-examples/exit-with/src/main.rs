//! Exits with the status given as its first argument (default 1), for testing how exit codes
//! reach the pod status.

use std::process::ExitCode;

/// Without an argument the program fails, the common case a pod's status must show.
const DEFAULT_STATUS: u8 = 1;

/// WASI preview1 hosts refuse `proc_exit` statuses of 126 and above (wasmtime traps on them):
/// shells reserve those values for "cannot execute" and signals.
const MAX_STATUS: u8 = 125;

fn main() -> ExitCode {
    let status = match std::env::args().nth(1) {
        None => DEFAULT_STATUS,
        Some(arg) => match arg.parse::<u8>() {
            Ok(status) if status <= MAX_STATUS => status,
            _ => {
                eprintln!("exit-with: {arg:?} is not an exit status in 0..={MAX_STATUS}");
                return ExitCode::from(2);
            }
        },
    };
    println!("exit-with: exiting with status {status}");
    ExitCode::from(status)
}
