//! `net-client HOST:PORT [PATH]`: a WASI preview2 command that opens a TCP connection through
//! `wasi:sockets` (std's `TcpStream`), sends `GET PATH` and prints `connected: <status line>`,
//! or `refused: <error>` and exits 1. For the outbound policy tests: a host outside the pod's
//! allowed list is refused by the host before any packet leaves.

use std::io::{Read, Write};
use std::net::TcpStream;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(addr) = args.next() else {
        eprintln!("usage: net-client HOST:PORT [PATH]");
        std::process::exit(2);
    };
    let path = args.next().unwrap_or_else(|| "/".into());
    match get(&addr, &path) {
        Ok(line) => println!("connected: {line}"),
        Err(e) => {
            println!("refused: {e}");
            std::process::exit(1);
        }
    }
}

fn get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}
