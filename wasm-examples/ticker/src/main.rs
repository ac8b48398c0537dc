//! Prints `tick N` to stdout once a second, forever: a long-running pod whose logs grow.
//!
//! WASI preview1 has no signals, so there is no handler here: the host stops the guest by
//! interrupting it. If stdout goes away (the host closed it), the program ends cleanly.

use std::io::{self, Write};
use std::thread;
use std::time::Duration;

fn main() {
    let mut stdout = io::stdout().lock();
    for n in 1u64.. {
        // Flush each line so it reaches the log as it happens, not when a buffer fills.
        let written = writeln!(stdout, "tick {n}").and_then(|()| stdout.flush());
        if written.is_err() {
            return;
        }
        thread::sleep(Duration::from_secs(1));
    }
}
