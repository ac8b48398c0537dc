//! Spins forever without any I/O: the host can only stop it by interrupting running Wasm code
//! (epoch or fuel), never by waiting for a host call.

use std::hint::black_box;

fn main() {
    let mut n: u64 = 0;
    loop {
        // black_box keeps the compiler from proving the loop has no effect and removing it.
        n = black_box(n.wrapping_add(1));
    }
}
