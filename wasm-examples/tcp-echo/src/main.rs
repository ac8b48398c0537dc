//! `tcp-echo ADDR:PORT`: a WASI preview2 command that listens through `wasi:sockets` (std's
//! `TcpListener`) and echoes every connection back, line by line, prefixed `echo: `. It says
//! `listening on ADDR:PORT` once bound; a bind the host refuses (a port the container does not
//! declare) is `cannot listen on ADDR:PORT: <error>` and exit 1.

use std::io::{BufRead, BufReader, Write};

use std::net::TcpListener;

fn main() {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: tcp-echo ADDR:PORT");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            println!("cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening on {addr}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        for line in BufReader::new(&stream).lines() {
            let Ok(line) = line else { break };
            if (&stream)
                .write_all(format!("echo: {line}\n").as_bytes())
                .is_err()
            {
                break;
            }
        }
    }
}
