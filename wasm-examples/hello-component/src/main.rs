//! `hello` as a WASI preview2 component: built for wasm32-wasip2, std's `main` becomes the
//! component's `wasi:cli/run` export.

fn main() {
    println!("Hello from a WebAssembly component!");
}
