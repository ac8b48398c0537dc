//! Fails about a second after it starts, every time: with `restartPolicy: Always` the pod goes
//! into CrashLoopBackOff. The delay keeps each run long enough to be seen running.

use std::process::ExitCode;
use std::thread;
use std::time::Duration;

fn main() -> ExitCode {
    eprintln!("crash-looper: failing on purpose in 1 s (exit status 1)");
    thread::sleep(Duration::from_secs(1));
    ExitCode::FAILURE
}
