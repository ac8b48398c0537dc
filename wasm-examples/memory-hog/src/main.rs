//! Allocates memory 1 MiB at a time, printing the total every 16 MiB. Without arguments it
//! never stops: the host's memory limit must stop it (the allocation fails and the guest traps).
//! With one argument, `memory-hog <MiB>`, it stops at that many MiB and holds them, sleeping,
//! until it is stopped (a steady consumer for node-pressure eviction).

use std::hint::black_box;

const MIB: usize = 1 << 20;
/// Reporting every chunk would flood the log; 16 MiB steps still show the limit being reached.
const REPORT_EVERY_MIB: usize = 16;
/// Writing one byte per 4 KiB (the host's page size) makes the host commit every page of the
/// chunk, so the memory counts against the pod and is not just reserved address space.
const PAGE: usize = 4096;

fn main() {
    let stop_at: Option<usize> = match std::env::args().nth(1) {
        None => None,
        Some(arg) => match arg.parse() {
            Ok(mib) => Some(mib),
            Err(_) => {
                eprintln!("memory-hog: {arg:?} is not a number of MiB");
                std::process::exit(2);
            }
        },
    };
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    while stop_at.is_none_or(|mib| chunks.len() < mib) {
        let mut chunk = vec![0u8; MIB];
        for page in chunk.chunks_mut(PAGE) {
            page[0] = 1;
        }
        chunks.push(black_box(chunk));
        if chunks.len().is_multiple_of(REPORT_EVERY_MIB) {
            println!("memory-hog: {} MiB allocated", chunks.len());
        }
    }
    println!("memory-hog: holding {} MiB", chunks.len());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        black_box(&chunks);
    }
}
