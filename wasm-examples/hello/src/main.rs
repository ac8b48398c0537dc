//! Prints one line to stdout and exits 0: the smallest pod that succeeds.

fn main() {
    println!("Hello from WebAssembly!");
}
