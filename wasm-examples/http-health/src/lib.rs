//! `http-health`: a `wasi:http/proxy` component (one instance per request) for health-check and
//! networking tests. Its state lives in files under `$STATE_DIR` (default `/data`, an emptyDir
//! in its pod), because every request runs in a fresh instance:
//!
//! - `GET /healthz`: 200 `ok`, or 500 once `/set/unhealthy` was called (until `/set/healthy`);
//! - `GET /ready`: 200 `ready`, or 503 once `/set/unready` was called (until `/set/ready`);
//! - `GET /set/{healthy,unhealthy,ready,unready}`: changes the state, says so on stdout;
//! - `GET /sleep?ms=N`: says `sleeping N ms` on stdout, answers after N milliseconds (slow
//!   requests for drain and load tests);
//! - `GET /env/NAME`: the value of env var NAME (404 when unset);
//! - `GET /fetch?url=http://HOST[:PORT]/PATH`: an outgoing request through
//!   `wasi:http/outgoing-handler`; answers `fetched STATUS: BODY` or 502 `refused: ERROR`, and
//!   logs the same line on stdout;
//! - anything else: 200 `hello from http-health`.

use std::io::Write as _;

use wasip2::http::types::{
    ErrorCode, Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

wasip2::http::proxy::export!(HttpHealth);

struct HttpHealth;

impl wasip2::exports::http::incoming_handler::Guest for HttpHealth {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let (status, body) = route(path, query);
        respond(out, status, &body);
    }
}

fn state_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::var("STATE_DIR").unwrap_or_else(|_| "/data".into());
    std::path::Path::new(&dir).join(name)
}

fn route(path: &str, query: &str) -> (u16, String) {
    match path {
        "/healthz" if state_file("unhealthy").exists() => (500, "unhealthy\n".into()),
        "/healthz" => (200, "ok\n".into()),
        "/ready" if state_file("unready").exists() => (503, "not ready\n".into()),
        "/ready" => (200, "ready\n".into()),
        "/set/unhealthy" | "/set/unready" => {
            let name = &path["/set/".len()..];
            match std::fs::write(state_file(name), b"1") {
                Ok(()) => {
                    println!("state: {name}");
                    (200, format!("{name}\n"))
                }
                Err(e) => (
                    500,
                    format!("cannot write {}: {e}\n", state_file(name).display()),
                ),
            }
        }
        "/set/healthy" | "/set/ready" => {
            let name = format!("un{}", &path["/set/".len()..]);
            match std::fs::remove_file(state_file(&name)) {
                Ok(()) => println!("state: {}", &path["/set/".len()..]),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return (
                        500,
                        format!("cannot remove {}: {e}\n", state_file(&name).display()),
                    )
                }
            }
            (200, format!("{}\n", &path["/set/".len()..]))
        }
        "/sleep" => {
            let ms: u64 = param(query, "ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            println!("sleeping {ms} ms");
            wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
            (200, format!("slept {ms} ms\n"))
        }
        "/fetch" => match param(query, "url") {
            Some(url) => {
                let (status, line) = match fetch(&url) {
                    Ok((code, body)) => (200, format!("fetched {code}: {body}")),
                    Err(e) => (502, format!("refused: {e}")),
                };
                println!("fetch {url}: {line}");
                (status, format!("{line}\n"))
            }
            None => (400, "usage: /fetch?url=http://HOST[:PORT]/PATH\n".into()),
        },
        _ => match path.strip_prefix("/env/") {
            Some(name) => match std::env::var(name) {
                Ok(v) => (200, format!("{v}\n")),
                Err(_) => (404, format!("{name} is not set\n")),
            },
            None => (200, "hello from http-health\n".into()),
        },
    }
}

fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn respond(out: ResponseOutparam, status: u16, body: &str) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"text/plain".to_vec()]);
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(outgoing) = response.body() else {
        return;
    };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(mut stream) = outgoing.write() {
        let _ = stream.write_all(body.as_bytes());
        let _ = stream.flush();
    }
    let _ = OutgoingBody::finish(outgoing, None);
}

/// GET `url` (plain http only) through the host's outgoing handler; the status and the first
/// line of the body, or the error.
fn fetch(url: &str) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request
        .set_method(&Method::Get)
        .map_err(|()| "bad method")?;
    request
        .set_scheme(Some(&Scheme::Http))
        .map_err(|()| "bad scheme")?;
    request
        .set_authority(Some(authority))
        .map_err(|()| format!("bad authority {authority}"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| format!("bad path {path}"))?;
    let body = request.body().map_err(|()| "no request body")?;
    let future = wasip2::http::outgoing_handler::handle(request, None).map_err(|e| describe(&e))?;
    OutgoingBody::finish(body, None).map_err(|e| describe(&e))?;
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(describe(&e)),
        Some(Err(())) | None => return Err("no response".into()),
    };
    let status = response.status();
    let mut text = Vec::new();
    if let Ok(incoming) = response.consume() {
        if let Ok(stream) = incoming.stream() {
            while text.len() < 4096 {
                match stream.blocking_read(4096) {
                    Ok(chunk) if !chunk.is_empty() => text.extend_from_slice(&chunk),
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&text);
    Ok((status, text.lines().next().unwrap_or("").to_string()))
}

fn describe(e: &ErrorCode) -> String {
    match e {
        ErrorCode::InternalError(Some(m)) => m.clone(),
        other => format!("{other:?}"),
    }
}
