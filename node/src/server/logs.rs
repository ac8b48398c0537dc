//! `/containerLogs/{namespace}/{pod}/{container}`: a container's CRI log files as text, with
//! the kubelet's query options (`follow`, `tailLines`, `sinceSeconds`, `sinceTime`,
//! `timestamps`, `previous`, `limitBytes`).
//!
//! Files are `<pod-logs-dir>/<ns>_<pod>_<uid>/<container>/<n>.log`, one `n` per run (the
//! current run is the highest; `previous` is the one before), each preceded by its rotated
//! files `<n>.log.<timestamp>`. Start at [`LogOptions::parse`] and [`open`]; [`LogStream`]
//! yields the output chunk by chunk, so a follow ends as soon as the client goes away (the
//! stream is dropped).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use tokio::io::AsyncReadExt;

use super::StatusError;
use crate::config::is_dns_subdomain;

/// How often a followed log is checked for new lines (the kubelet waits on inotify; polling
/// at this rate keeps `kubectl logs -f` feeling live without a watcher per file).
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// A followed log quiet for this long makes us ask whether its container still runs.
const FOLLOW_IDLE_CHECK: Duration = Duration::from_secs(1);
/// Bytes read from a file at a time, and the most output gathered into one chunk.
const CHUNK: usize = 64 * 1024;

/// The query of a containerLogs request (the kubelet decodes it into PodLogOptions).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub limit_bytes: Option<u64>,
    pub since: Option<Timestamp>,
}

impl LogOptions {
    /// Parses the decoded query pairs. Unknown keys are ignored, as a decoder of PodLogOptions
    /// would; a value that does not parse is 400, a parsed value PodLogOptions validation
    /// refuses (negative tail, both since forms) is 422.
    pub fn parse(pairs: &[(String, String)], now: Timestamp) -> Result<Self, StatusError> {
        let mut o = LogOptions::default();
        let mut since_seconds: Option<i64> = None;
        let mut since_time: Option<Timestamp> = None;
        let bad = |key: &str, value: &str, want: &str| {
            StatusError::bad_request(format!(
                "invalid value {value:?} for query parameter {key}: {want}"
            ))
        };
        for (key, value) in pairs {
            let value = value.as_str();
            let int = || {
                value
                    .parse::<i64>()
                    .map_err(|_| bad(key, value, "want an integer"))
            };
            match key.as_str() {
                "follow" => {
                    o.follow =
                        parse_bool(value).ok_or_else(|| bad(key, value, "want true or false"))?
                }
                "previous" => {
                    o.previous =
                        parse_bool(value).ok_or_else(|| bad(key, value, "want true or false"))?
                }
                "timestamps" => {
                    o.timestamps =
                        parse_bool(value).ok_or_else(|| bad(key, value, "want true or false"))?
                }
                "tailLines" => {
                    let n = int()?;
                    o.tail_lines = Some(u64::try_from(n).map_err(|_| {
                        StatusError::invalid(format!("tailLines must be >= 0, got {n}"))
                    })?);
                }
                "limitBytes" => {
                    let n = int()?;
                    o.limit_bytes =
                        Some(u64::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                            StatusError::invalid(format!("limitBytes must be >= 1, got {n}"))
                        })?);
                }
                "sinceSeconds" => {
                    let n = int()?;
                    if n < 1 {
                        return Err(StatusError::invalid(format!(
                            "sinceSeconds must be >= 1, got {n}"
                        )));
                    }
                    since_seconds = Some(n);
                }
                "sinceTime" => {
                    since_time = Some(
                        value
                            .parse::<Timestamp>()
                            .map_err(|_| bad(key, value, "want an RFC 3339 time"))?,
                    )
                }
                _ => {}
            }
        }
        o.since = match (since_seconds, since_time) {
            (Some(_), Some(_)) => {
                return Err(StatusError::invalid(
                    "at most one of sinceTime or sinceSeconds may be given".into(),
                ))
            }
            // A huge sinceSeconds means "from the beginning"; saturate instead of overflowing.
            (Some(s), None) => Some(
                now.checked_sub(jiff::SignedDuration::from_secs(s))
                    .unwrap_or(Timestamp::MIN),
            ),
            (None, t) => t,
        };
        Ok(o)
    }
}

/// Go's strconv.ParseBool, as the kubelet's query decoding uses; empty is false.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "" | "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// The container a request names, located on disk.
#[derive(Debug)]
pub struct ContainerLogs {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub container: String,
    /// The files of the chosen run, in order (rotated ones first, the live one last).
    pub files: Vec<PathBuf>,
    /// The run's number `n` and its directory, to notice a newer run while following.
    pub run: u64,
    pub dir: PathBuf,
}

/// Finds the log files of the run the request asks for. `client` (when there is an API
/// server) tells a pod or container that has not started yet from one that does not exist.
pub async fn open(
    logs_dir: &Path,
    client: Option<&kube::Client>,
    namespace: &str,
    pod: &str,
    container: &str,
    previous: bool,
) -> Result<ContainerLogs, StatusError> {
    // Names are DNS subdomains/labels: nothing a client sends can climb out of the logs dir.
    if !is_dns_subdomain(namespace) || !is_dns_subdomain(pod) || !is_dns_subdomain(container) {
        return Err(StatusError::not_found(format!(
            "pod \"{namespace}/{pod}\" container \"{container}\" not found"
        )));
    }
    // Several UIDs (a pod deleted and made again under the same name): the newest directory.
    let mut newest: Option<(std::time::SystemTime, PathBuf, String)> = None;
    if let Ok(entries) = std::fs::read_dir(logs_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(uid) = crate::pods::layout::uid_of_pod_log_dir(&name, namespace, pod) else {
                continue;
            };
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if newest.as_ref().is_none_or(|(t, _, _)| modified > *t) {
                newest = Some((modified, entry.path(), uid.to_string()));
            }
        }
    }
    let not_running = |what: String| async move {
        match client {
            Some(client) if pod_has_container(client, namespace, pod, container).await => {
                StatusError::bad_request(format!(
                    "container \"{container}\" in pod \"{pod}\" is waiting to start"
                ))
            }
            _ => StatusError::not_found(what),
        }
    };
    let Some((_, pod_dir, uid)) = newest else {
        return Err(not_running(format!("pod \"{namespace}/{pod}\" not found")).await);
    };
    let dir = pod_dir.join(container);
    let runs = runs(&dir);
    let Some(&current) = runs.last() else {
        return Err(not_running(format!(
            "container \"{container}\" not found in pod \"{namespace}/{pod}\""
        ))
        .await);
    };
    let run = if previous {
        match runs.iter().rev().nth(1) {
            Some(&n) => n,
            None => {
                return Err(StatusError::bad_request(format!(
                    "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                )))
            }
        }
    } else {
        current
    };
    Ok(ContainerLogs {
        namespace: namespace.into(),
        pod: pod.into(),
        uid,
        container: container.into(),
        files: run_files(&dir, run),
        run,
        dir,
    })
}

async fn pod_has_container(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    container: &str,
) -> bool {
    let Ok(Some(pod)) = kube::Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(pod)
        .await
    else {
        return false;
    };
    let spec = pod.spec.unwrap_or_default();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == container)
}

/// The run numbers that have a live log file, ascending.
fn runs(dir: &Path) -> Vec<u64> {
    let mut runs: Vec<u64> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    runs.sort_unstable();
    runs
}

/// `<n>.log.<timestamp>` files sorted (the timestamp sorts as text), then `<n>.log`.
fn run_files(dir: &Path, run: u64) -> Vec<PathBuf> {
    let rotated_prefix = format!("{run}.log.");
    let mut rotated: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with(&rotated_prefix) && !n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default();
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|n| dir.join(n)).collect();
    files.push(dir.join(format!("{run}.log")));
    files
}

/// One parsed CRI entry.
#[derive(Debug, PartialEq)]
struct Entry<'a> {
    time: Option<Timestamp>,
    stream: usize,
    partial: bool,
    content: &'a [u8],
}

/// `<time> stdout|stderr F|P <content>`; `None` for a line that is not a CRI entry.
fn parse_entry(line: &[u8]) -> Option<Entry<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?)
        .ok()?
        .parse::<Timestamp>()
        .ok();
    let stream = match parts.next()? {
        b"stdout" => 0,
        b"stderr" => 1,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"F" => false,
        b"P" => true,
        _ => return None,
    };
    Some(Entry {
        time,
        stream,
        partial,
        content: parts.next().unwrap_or_default(),
    })
}

/// A complete output line: its first piece's time and its text (newline included when the
/// line was ended).
struct Line {
    time: Option<Timestamp>,
    text: Vec<u8>,
}

/// Where the stream is.
enum Phase {
    /// Reading what is already written: lines go to the tail buffer (with tailLines) or out.
    Backlog,
    /// Past the end: waiting for more (follow), stopping when the run is over.
    Following,
    /// Nothing more will come.
    Done,
}

/// The output of one request, produced chunk by chunk.
pub struct LogStream {
    logs: ContainerLogs,
    options: LogOptions,
    client: Option<kube::Client>,
    /// Files not opened yet.
    pending_files: VecDeque<PathBuf>,
    file: Option<(tokio::fs::File, PathBuf, u64)>,
    /// A raw line not yet ended by `\n`.
    raw: Vec<u8>,
    /// Per stream (stdout, stderr): the pieces of a line still being written (`P` entries).
    partial: [Option<Line>; 2],
    tail: VecDeque<Line>,
    out: Vec<u8>,
    remaining: Option<u64>,
    phase: Phase,
    idle_since: tokio::time::Instant,
    /// Set once the run is known to be over: read what is left, then stop.
    finishing: bool,
}

impl LogStream {
    pub fn new(logs: ContainerLogs, options: LogOptions, client: Option<kube::Client>) -> Self {
        LogStream {
            pending_files: logs.files.iter().cloned().collect(),
            logs,
            remaining: options.limit_bytes,
            options,
            client,
            file: None,
            raw: Vec::new(),
            partial: [None, None],
            tail: VecDeque::new(),
            out: Vec::new(),
            phase: Phase::Backlog,
            idle_since: tokio::time::Instant::now(),
            finishing: false,
        }
    }

    /// The stream of output chunks, for a response body.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        futures::stream::unfold(self, |mut s| async move {
            s.next_chunk().await.map(|c| (Ok(c), s))
        })
    }

    /// The next piece of output, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if !self.out.is_empty() {
                return self.take_out();
            }
            match self.phase {
                Phase::Done => return None,
                Phase::Backlog | Phase::Following => {}
            }
            match self.read_more().await {
                Some(true) => continue,
                Some(false) => self.at_end().await,
                None => {
                    // The file vanished or cannot be read: end what we have.
                    self.flush_partial();
                    self.phase = Phase::Done;
                }
            }
        }
    }

    fn take_out(&mut self) -> Option<Bytes> {
        let mut chunk = std::mem::take(&mut self.out);
        if let Some(remaining) = &mut self.remaining {
            if chunk.len() as u64 >= *remaining {
                chunk.truncate(*remaining as usize);
                self.phase = Phase::Done;
            }
            *remaining -= chunk.len() as u64;
        }
        (!chunk.is_empty()).then(|| Bytes::from(chunk))
    }

    /// Reads from the current file. `Some(true)`: something was read; `Some(false)`: at the end
    /// of the last file; `None`: an error.
    async fn read_more(&mut self) -> Option<bool> {
        loop {
            if self.file.is_none() {
                let Some(path) = self.pending_files.pop_front() else {
                    return Some(false);
                };
                match tokio::fs::File::open(&path).await {
                    Ok(f) => self.file = Some((f, path, 0)),
                    // A rotated file may be removed between listing and opening: skip it.
                    Err(_) if !self.pending_files.is_empty() => continue,
                    Err(_) => return None,
                }
            }
            let (file, _, offset) = self.file.as_mut()?;
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf).await.ok()?;
            if n == 0 {
                if self.pending_files.is_empty() {
                    return Some(false);
                }
                self.file = None;
                continue;
            }
            *offset += n as u64;
            self.raw.extend_from_slice(&buf[..n]);
            self.consume_raw();
            return Some(true);
        }
    }

    /// Turns every complete raw line into entries and complete output lines.
    fn consume_raw(&mut self) {
        let raw = std::mem::take(&mut self.raw);
        let mut start = 0;
        while let Some(pos) = raw[start..].iter().position(|b| *b == b'\n') {
            let line = &raw[start..start + pos];
            start += pos + 1;
            let Some(entry) = parse_entry(line) else {
                continue;
            };
            let piece = self.partial[entry.stream].get_or_insert_with(|| Line {
                time: entry.time,
                text: Vec::new(),
            });
            piece.text.extend_from_slice(entry.content);
            if !entry.partial {
                piece.text.push(b'\n');
                if let Some(line) = self.partial[entry.stream].take() {
                    self.push_line(line);
                }
            }
        }
        self.raw = raw[start..].to_vec();
    }

    fn push_line(&mut self, line: Line) {
        if let (Some(since), Some(time)) = (self.options.since, line.time) {
            if time < since {
                return;
            }
        }
        match (&self.phase, self.options.tail_lines) {
            (Phase::Backlog, Some(n)) => {
                if n == 0 {
                    return;
                }
                if self.tail.len() as u64 >= n {
                    self.tail.pop_front();
                }
                self.tail.push_back(line);
            }
            _ => self.emit(line),
        }
    }

    fn emit(&mut self, line: Line) {
        if self.options.timestamps {
            let stamp = line.time.map(|t| format!("{t:.9}")).unwrap_or_default();
            self.out.extend_from_slice(stamp.as_bytes());
            self.out.push(b' ');
        }
        self.out.extend_from_slice(&line.text);
    }

    /// Unfinished lines go out as they are (the container ended mid-line).
    fn flush_partial(&mut self) {
        for stream in 0..2 {
            if let Some(line) = self.partial[stream].take() {
                self.push_line(line);
            }
        }
    }

    /// At the end of what is written: end the backlog, then stop or wait for more.
    async fn at_end(&mut self) {
        if let Phase::Backlog = self.phase {
            if !self.options.follow {
                self.flush_partial();
            }
            while let Some(line) = self.tail.pop_front() {
                self.emit(line);
            }
            self.phase = if self.options.follow {
                Phase::Following
            } else {
                Phase::Done
            };
            self.idle_since = tokio::time::Instant::now();
            return;
        }
        if self.finishing {
            self.flush_partial();
            self.phase = Phase::Done;
            return;
        }
        // The live file may have been rotated: continue in the new one from its start.
        if let Some((_, path, offset)) = &self.file {
            if let Ok(meta) = tokio::fs::metadata(path).await {
                if meta.len() < *offset || self.rotated_away().await {
                    let path = path.clone();
                    self.file = None;
                    self.pending_files.push_back(path);
                    return;
                }
            }
        }
        // A newer run has begun: this one is over once what is left is read.
        if runs(&self.logs.dir)
            .last()
            .is_some_and(|n| *n > self.logs.run)
        {
            self.finishing = true;
            return;
        }
        if self.idle_since.elapsed() >= FOLLOW_IDLE_CHECK {
            if !self.container_may_write().await {
                self.finishing = true;
                return;
            }
            self.idle_since = tokio::time::Instant::now();
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }

    /// Whether the file at the live path is no longer the one we read (renamed by rotation).
    async fn rotated_away(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some((file, path, _)) = &self.file else {
            return false;
        };
        match (file.metadata().await, tokio::fs::metadata(path).await) {
            (Ok(open), Ok(at_path)) => open.ino() != at_path.ino(),
            _ => false,
        }
    }

    /// Whether the container may still write to this run's log, per the API server: the pod
    /// exists with this UID and the container's state is running. Without an API server, or
    /// when it cannot be asked, keep following.
    async fn container_may_write(&self) -> bool {
        let Some(client) = &self.client else {
            return true;
        };
        let pods = kube::Api::<Pod>::namespaced(client.clone(), &self.logs.namespace);
        let pod = match pods.get_opt(&self.logs.pod).await {
            Ok(Some(pod)) => pod,
            Ok(None) => return false,
            // The Node authorizer forbids a node a pod no longer bound to it: a deleted pod
            // is 403 to the node, not 404. Its containers write no more.
            Err(kube::Error::Api(e)) if e.code == 403 => return false,
            Err(_) => return true,
        };
        if pod.metadata.uid.as_deref() != Some(self.logs.uid.as_str()) {
            return false;
        }
        let status = pod.status.unwrap_or_default();
        let statuses = status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten());
        match statuses.into_iter().find(|c| c.name == self.logs.container) {
            Some(c) => c.state.as_ref().is_some_and(|s| s.running.is_some()),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn now() -> Timestamp {
        "2026-01-01T00:10:00Z".parse().unwrap()
    }

    #[test]
    fn options_parse_and_validate() {
        let o = LogOptions::parse(
            &pairs(&[
                ("follow", "true"),
                ("tailLines", "2"),
                ("limitBytes", "10"),
                ("sinceSeconds", "60"),
                ("x", "y"),
            ]),
            now(),
        )
        .unwrap();
        assert!(o.follow && !o.previous);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(2), Some(10)));
        assert_eq!(o.since, Some("2026-01-01T00:09:00Z".parse().unwrap()));
        let code = |q: &[(&str, &str)]| LogOptions::parse(&pairs(q), now()).unwrap_err().code;
        assert_eq!(code(&[("follow", "yes")]), 400);
        assert_eq!(code(&[("tailLines", "ten")]), 400);
        assert_eq!(code(&[("sinceTime", "yesterday")]), 400);
        assert_eq!(code(&[("tailLines", "-1")]), 422);
        assert_eq!(code(&[("limitBytes", "0")]), 422);
        assert_eq!(code(&[("sinceSeconds", "0")]), 422);
        assert_eq!(
            code(&[("sinceSeconds", "5"), ("sinceTime", "2026-01-01T00:00:00Z")]),
            422
        );
        let huge =
            LogOptions::parse(&pairs(&[("sinceSeconds", "9223372036854775807")]), now()).unwrap();
        assert_eq!(huge.since, Some(Timestamp::MIN));
    }

    #[test]
    fn entries_parse() {
        let e = parse_entry(b"2026-01-01T00:00:00.5Z stderr P half").unwrap();
        assert_eq!((e.stream, e.partial, e.content), (1, true, &b"half"[..]));
        assert_eq!(
            parse_entry(b"2026-01-01T00:00:00Z stdout F")
                .unwrap()
                .content,
            b""
        );
        assert!(parse_entry(b"garbage").is_none());
        assert!(parse_entry(b"2026-01-01T00:00:00Z stdin F x").is_none());
    }

    fn write_run(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    async fn read_all(logs_dir: &Path, options: LogOptions) -> String {
        let logs = open(logs_dir, None, "ns", "pod", "c", options.previous)
            .await
            .unwrap();
        let mut s = LogStream::new(logs, options, None);
        let mut out = Vec::new();
        while let Some(chunk) = s.next_chunk().await {
            out.extend_from_slice(&chunk);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn reads_runs_rotations_partials_and_options() {
        let root =
            std::env::temp_dir().join(format!("wasm-kubelet-logs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("ns_pod_uid1/c");
        write_run(&dir, "0.log", "2026-01-01T00:00:00Z stdout F run zero\n");
        write_run(
            &dir,
            "1.log.20260101-000101",
            "2026-01-01T00:01:00Z stdout F one\n",
        );
        write_run(
            &dir,
            "1.log",
            "2026-01-01T00:02:00.123Z stdout P hel\n2026-01-01T00:02:01Z stderr F err\n2026-01-01T00:02:02Z stdout F lo\n2026-01-01T00:03:00Z stdout F last\n",
        );
        let all = read_all(&root, LogOptions::default()).await;
        assert_eq!(all, "one\nerr\nhello\nlast\n");
        assert_eq!(
            read_all(
                &root,
                LogOptions {
                    previous: true,
                    ..Default::default()
                }
            )
            .await,
            "run zero\n"
        );
        assert_eq!(
            read_all(
                &root,
                LogOptions {
                    tail_lines: Some(2),
                    ..Default::default()
                }
            )
            .await,
            "hello\nlast\n"
        );
        assert_eq!(
            read_all(
                &root,
                LogOptions {
                    tail_lines: Some(0),
                    ..Default::default()
                }
            )
            .await,
            ""
        );
        assert_eq!(
            read_all(
                &root,
                LogOptions {
                    limit_bytes: Some(6),
                    ..Default::default()
                }
            )
            .await,
            "one\ner"
        );
        let since = Some("2026-01-01T00:02:30Z".parse().unwrap());
        assert_eq!(
            read_all(
                &root,
                LogOptions {
                    since,
                    ..Default::default()
                }
            )
            .await,
            "last\n"
        );
        let stamped = read_all(
            &root,
            LogOptions {
                timestamps: true,
                tail_lines: Some(2),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            stamped,
            "2026-01-01T00:02:00.123000000Z hello\n2026-01-01T00:03:00.000000000Z last\n"
        );

        let e = open(&root, None, "ns", "nopod", "c", false)
            .await
            .unwrap_err();
        assert_eq!((e.code, e.reason), (404, "NotFound"));
        let e = open(&root, None, "ns", "pod", "other", false)
            .await
            .unwrap_err();
        assert_eq!(e.code, 404);
        let e = open(&root, None, "ns", "pod", "../../etc", false)
            .await
            .unwrap_err();
        assert_eq!(e.code, 404);
        write_run(&root.join("ns_single_uid/c"), "0.log", "");
        let e = open(&root, None, "ns", "single", "c", true)
            .await
            .unwrap_err();
        assert_eq!(e.code, 400, "no previous run");
    }

    #[tokio::test]
    async fn follow_streams_until_a_newer_run_appears() {
        let root =
            std::env::temp_dir().join(format!("wasm-kubelet-follow-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("ns_pod_uid/c");
        write_run(&dir, "0.log", "2026-01-01T00:00:00Z stdout F first\n");
        let logs = open(&root, None, "ns", "pod", "c", false).await.unwrap();
        let mut s = LogStream::new(
            logs,
            LogOptions {
                follow: true,
                ..Default::default()
            },
            None,
        );
        assert_eq!(s.next_chunk().await.unwrap(), "first\n");
        let writer = {
            let dir = dir.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(dir.join("0.log"))
                    .unwrap();
                std::io::Write::write_all(&mut f, b"2026-01-01T00:00:01Z stdout F second\n")
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                std::fs::write(dir.join("1.log"), "").unwrap();
            })
        };
        assert_eq!(s.next_chunk().await.unwrap(), "second\n");
        assert!(
            s.next_chunk().await.is_none(),
            "a newer run ends the follow"
        );
        writer.await.unwrap();
    }
}
