//! SPDY/3.1 (draft 3.1) as Kubernetes uses it: frames, header blocks compressed with zlib and
//! the SPDY/3 dictionary, and a server-side [`Session`] over any async byte stream (the
//! upgraded HTTP connection).
//!
//! Where to start: [`Session::new`] spawns a reader and a writer task over the connection;
//! [`Session::accept`] yields each stream the client opens as an [`IncomingStream`], which the
//! caller [accepts](IncomingStream::accept) (SYN_REPLY) or [rejects](IncomingStream::reject)
//! (RST_STREAM). An accepted [`SpdyStream`] reads data with [`SpdyStream::recv`] and writes with
//! its [`StreamSender`], or becomes one `AsyncRead + AsyncWrite` pipe with
//! [`SpdyStream::into_io`]. [`Session::close`] sends GOAWAY and ends the connection.
//!
//! The frame layer ([`encode_frame`], [`read_frame`], [`HeaderCompressor`],
//! [`HeaderDecompressor`]) is public so tests and tools can play the client.
//!
//! Flow control: every consumed byte is credited back to the peer with WINDOW_UPDATE (per
//! stream and for the session) once half a window has been consumed. On the sending side the
//! peer's windows are tracked; whether they are *enforced* is [`FlowControl`]: the Go peer the
//! apiserver uses (moby/spdystream) implements no flow control and never sends WINDOW_UPDATE,
//! so by default ([`FlowControl::Auto`]) windows are enforced only once the peer has shown it
//! does flow control (a WINDOW_UPDATE or a SETTINGS with INITIAL_WINDOW_SIZE).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tracing::debug;

use super::{Error, Result};

/// The SPDY version in every control frame.
pub const VERSION: u16 = 3;
/// Control frame types.
pub const TYPE_SYN_STREAM: u16 = 1;
pub const TYPE_SYN_REPLY: u16 = 2;
pub const TYPE_RST_STREAM: u16 = 3;
pub const TYPE_SETTINGS: u16 = 4;
pub const TYPE_PING: u16 = 6;
pub const TYPE_GOAWAY: u16 = 7;
pub const TYPE_HEADERS: u16 = 8;
pub const TYPE_WINDOW_UPDATE: u16 = 9;
/// FLAG_FIN on SYN_STREAM, SYN_REPLY, HEADERS and DATA.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// RST_STREAM status codes.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_INVALID_STREAM: u32 = 2;
pub const RST_REFUSED_STREAM: u32 = 3;
pub const RST_CANCEL: u32 = 5;
pub const RST_INTERNAL_ERROR: u32 = 6;
/// GOAWAY status codes.
pub const GOAWAY_OK: u32 = 0;
pub const GOAWAY_PROTOCOL_ERROR: u32 = 1;
pub const GOAWAY_INTERNAL_ERROR: u32 = 2;
/// SETTINGS id of the initial per-stream window.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;
/// The initial stream and session window of SPDY/3.1: 64 KiB.
pub const DEFAULT_INITIAL_WINDOW: u32 = 64 * 1024;

/// Lengths are 24 bits on the wire.
const MAX_FRAME_LEN: usize = 0x00ff_ffff;
/// Upper bound of one decompressed header block, and of the headers decoded from it (names and
/// values, counted after a NUL-joined value is split). Kubernetes' streams carry a handful of
/// short headers (streamType, port, requestID); 256 KiB leaves room for anything legitimate
/// and stops a zlib bomb. Enforced while inflating, on every frame that has a header block.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Most (name, value) pairs one header block may decode to (after NUL-joined values are split):
/// Kubernetes sends two or three; 128 leaves room for proxies' additions.
pub const MAX_HEADER_PAIRS: usize = 128;
/// Largest control frame accepted: a header block can only be legitimate if it inflates within
/// [`MAX_HEADER_BLOCK`], and compressed data is never much larger than its input.
const MAX_CONTROL_FRAME: usize = MAX_HEADER_BLOCK + 1024;
/// Largest DATA frame accepted. moby/spdystream (the apiserver's side) sends each Write as one
/// frame, and the apiserver and kubectl copy with 32 KiB buffers; 1 MiB is 32 times that, and
/// keeps what one frame makes the agent buffer (twice: read, then handed on) small.
const MAX_DATA_FRAME: usize = 1024 * 1024;
/// Commands the reader (and stream consumers' credit) may queue for the writer before they wait.
/// A peer that floods PINGs or opens streams without reading our replies then stalls its own
/// reading instead of growing our queue. 256 is a few per stream for the handful of streams a
/// session has.
const PEER_QUEUE: usize = 256;
/// Most streams a session holds open for the peer at once; one over it is refused
/// (RST_STREAM REFUSED_STREAM). exec/attach use up to five, port-forward two per forwarded
/// connection: 1024 allows 500 connections forwarded at once.
pub const MAX_OPEN_STREAMS: usize = 1024;
/// Largest DATA payload this side sends: small enough to interleave streams fairly.
const MAX_SEND_CHUNK: usize = 16 * 1024;
/// Credit the peer once half of the initial window has been consumed, so a peer that waits for
/// credit never stalls while we hold back less than half a window.
const WINDOW_UPDATE_THRESHOLD: u32 = DEFAULT_INITIAL_WINDOW / 2;
/// Capacity of the pipes made by [`SpdyStream::into_io`]: one initial window.
const PIPE_CAPACITY: usize = DEFAULT_INITIAL_WINDOW as usize;
/// After our GOAWAY, how long to keep reading so the peer can take our last frames before we
/// drop the connection (closing with unread input can make TCP reset and lose them).
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1), byte for byte as
/// moby/spdystream and Chromium use it: 1423 bytes, Adler-32 0xe3c6a7c2.
#[rustfmt::skip]
pub static HEADER_DICTIONARY: &[u8; 1423] = b"\
    \x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\x00\
    \x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-charset\x00\
    \x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\x0daccept-ranges\x00\
    \x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\x0dauthorization\x00\x00\x00\x0dcache-contr\
    ol\x00\x00\x00\x0aconnection\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10content-encoding\x00\
    \x00\x00\x10content-language\x00\x00\x00\x0econtent-length\x00\x00\x00\x10content-location\
    \x00\x00\x00\x0bcontent-md5\x00\x00\x00\x0dcontent-range\x00\x00\x00\x0ccontent-type\x00\x00\
    \x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\x00\x00\x07expires\x00\x00\x00\
    \x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\x00\x00\x11if-modified-since\x00\
    \x00\x00\x0dif-none-match\x00\x00\x00\x08if-range\x00\x00\x00\x13if-unmodified-since\x00\x00\
    \x00\x0dlast-modified\x00\x00\x00\x08location\x00\x00\x00\x0cmax-forwards\x00\x00\x00\x06pra\
    gma\x00\x00\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-authorization\x00\x00\x00\x05rang\
    e\x00\x00\x00\x07referer\x00\x00\x00\x0bretry-after\x00\x00\x00\x06server\x00\x00\x00\x02te\
    \x00\x00\x00\x07trailer\x00\x00\x00\x11transfer-encoding\x00\x00\x00\x07upgrade\x00\x00\x00\
    \x0auser-agent\x00\x00\x00\x04vary\x00\x00\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10\
    www-authenticate\x00\x00\x00\x06method\x00\x00\x00\x03get\x00\x00\x00\x06status\x00\x00\x00\
    \x06200\x20OK\x00\x00\x00\x07version\x00\x00\x00\x08HTTP/1.1\x00\x00\x00\x03url\x00\x00\x00\
    \x06public\x00\x00\x00\x0aset-cookie\x00\x00\x00\x0akeep-alive\x00\x00\x00\x06origin10010120\
    1202205206300302303304305306307402405406407408409410411412413414415416417502504505203\x20Non\
    -Authoritative\x20Information204\x20No\x20Content301\x20Moved\x20Permanently400\x20Bad\x20Re\
    quest401\x20Unauthorized403\x20Forbidden404\x20Not\x20Found500\x20Internal\x20Server\x20Erro\
    r501\x20Not\x20Implemented503\x20Service\x20UnavailableJan\x20Feb\x20Mar\x20Apr\x20May\x20Ju\
    n\x20Jul\x20Aug\x20Sept\x20Oct\x20Nov\x20Dec\x2000:00:00\x20Mon,\x20Tue,\x20Wed,\x20Thu,\x20\
    Fri,\x20Sat,\x20Sun,\x20GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,a\
    pplication/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharse\
    t=utf-8charset=iso-8859-1,utf-,*,enq=0.";

/// A SPDY header block: names are lowercase on the wire; a name with several values is sent
/// once, the values joined by NUL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// An empty header block.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// Adds `name: value` (the name is lowercased), builder style.
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.insert(name, value);
        self
    }

    /// Adds `name: value`; the name is lowercased.
    pub fn insert(&mut self, name: &str, value: &str) {
        self.0.push((name.to_ascii_lowercase(), value.to_string()));
    }

    /// The first value of `name`, compared case-insensitively (Go's `Header.Get`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All `(name, value)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of `(name, value)` pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The uncompressed name/value block: count, then length-prefixed names and values.
    fn encode(&self) -> Vec<u8> {
        let mut grouped: Vec<(&str, Vec<&str>)> = Vec::new();
        for (n, v) in &self.0 {
            match grouped.iter_mut().find(|(gn, _)| *gn == n.as_str()) {
                Some((_, vs)) => vs.push(v),
                None => grouped.push((n, vec![v])),
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&(grouped.len() as u32).to_be_bytes());
        for (n, vs) in grouped {
            let v = vs.join("\0");
            out.extend_from_slice(&(n.len() as u32).to_be_bytes());
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }

    fn decode(block: &[u8]) -> Result<Headers> {
        let mut cur = Cursor::new(block);
        let count = cur.u32()? as usize;
        // Each pair takes at least 8 bytes: a count beyond that is a lie.
        if count > block.len() / 8 {
            return Err(Error::Protocol(format!(
                "header block claims {count} pairs"
            )));
        }
        let mut headers = Headers::new();
        // What the decoded headers hold: a name is copied once per value, so a long name with
        // many NUL-separated values must not multiply past the block's own bound.
        let mut bytes = 0usize;
        for _ in 0..count {
            let name_len = cur.u32()? as usize;
            let name = cur.take(name_len)?;
            if name.is_empty() {
                return Err(Error::Protocol("zero-length header name".into()));
            }
            let value_len = cur.u32()? as usize;
            let value = cur.take(value_len)?;
            let name = std::str::from_utf8(name)
                .map_err(|_| Error::Protocol("header name is not UTF-8".into()))?;
            let value = String::from_utf8_lossy(value);
            for v in value.split('\0') {
                bytes = bytes.saturating_add(name.len() + v.len());
                if headers.len() >= MAX_HEADER_PAIRS || bytes > MAX_HEADER_BLOCK {
                    return Err(Error::Protocol(format!(
                        "header block holds more than {MAX_HEADER_PAIRS} headers or {MAX_HEADER_BLOCK} bytes"
                    )));
                }
                headers.insert(name, v);
            }
        }
        if cur.remaining() != 0 {
            return Err(Error::Protocol("trailing bytes after header block".into()));
        }
        Ok(headers)
    }
}

/// Reads big-endian fields from a frame payload, failing (never panicking) when it is short.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| Error::Protocol("frame or header block too short".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// One SETTINGS entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

/// A SPDY/3.1 frame, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        settings: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame of a type SPDY/3.1 does not define: ignored, as the spec requires.
    Unknown {
        frame_type: u16,
    },
}

/// The compressing half of a session's header context: one per direction, for the whole
/// session (every header block continues the same zlib stream, ended by a sync flush).
pub struct HeaderCompressor {
    z: Compress,
}

impl HeaderCompressor {
    /// A fresh context primed with [`HEADER_DICTIONARY`].
    pub fn new() -> Result<Self> {
        // Best compression, as spdystream uses.
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(HEADER_DICTIONARY)
            .map_err(|e| Error::Compression(e.to_string()))?;
        Ok(HeaderCompressor { z })
    }

    /// Compresses one header block, ending it with a sync flush.
    pub fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>> {
        let input = headers.encode();
        let mut out = Vec::with_capacity(input.len() + 64);
        let mut pos = 0;
        loop {
            out.reserve(256);
            let before = self.z.total_in();
            self.z
                .compress_vec(&input[pos..], &mut out, FlushCompress::Sync)
                .map_err(|e| Error::Compression(e.to_string()))?;
            pos += (self.z.total_in() - before) as usize;
            // The flush is complete once all input is in and deflate left output space unused.
            if pos >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// The decompressing half of a session's header context (see [`HeaderCompressor`]).
pub struct HeaderDecompressor {
    z: Decompress,
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecompressor {
    /// A fresh context; the dictionary is supplied when the zlib header asks for it.
    pub fn new() -> Self {
        HeaderDecompressor {
            z: Decompress::new(true),
        }
    }

    /// Decompresses and parses one header block.
    pub fn decompress(&mut self, block: &[u8]) -> Result<Headers> {
        let raw = self.inflate(block)?;
        Headers::decode(&raw)
    }

    /// Inflates one header block, through a fixed chunk so the output never grows past
    /// [`MAX_HEADER_BLOCK`] (plus one chunk) whatever the input's compression ratio.
    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>> {
        const CHUNK: usize = 4096;
        let mut out: Vec<u8> = Vec::with_capacity((input.len() * 4 + 256).min(MAX_HEADER_BLOCK));
        let mut chunk = [0u8; CHUNK];
        let mut pos = 0;
        loop {
            let (before_in, before_out) = (self.z.total_in(), self.z.total_out());
            let res = self
                .z
                .decompress(&input[pos..], &mut chunk, FlushDecompress::Sync);
            pos += (self.z.total_in() - before_in) as usize;
            let produced = (self.z.total_out() - before_out) as usize;
            out.extend_from_slice(&chunk[..produced]);
            if out.len() > MAX_HEADER_BLOCK {
                return Err(Error::Protocol(format!(
                    "header block inflates past {MAX_HEADER_BLOCK} bytes"
                )));
            }
            let progressed = self.z.total_in() != before_in || produced != 0;
            match res {
                Ok(Status::StreamEnd) => return Ok(out),
                Ok(Status::Ok) | Ok(Status::BufError) => {
                    // Done once all input is in and deflate left output space unused.
                    if pos >= input.len() && (produced < CHUNK || !progressed) {
                        return Ok(out);
                    }
                    if !progressed {
                        return Err(Error::Compression("header block is truncated".into()));
                    }
                }
                Err(e) => match e.needs_dictionary() {
                    Some(_) => {
                        self.z
                            .set_dictionary(HEADER_DICTIONARY)
                            .map_err(|e| Error::Compression(e.to_string()))?;
                    }
                    None => return Err(Error::Compression(e.to_string())),
                },
            }
        }
    }
}

fn control_header(out: &mut Vec<u8>, frame_type: u16, flags: u8, len: usize) -> Result<()> {
    if len > MAX_FRAME_LEN {
        return Err(Error::Protocol(format!(
            "frame of {len} bytes is too large"
        )));
    }
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&frame_type.to_be_bytes());
    out.extend_from_slice(&((u32::from(flags) << 24) | len as u32).to_be_bytes());
    Ok(())
}

/// Serialises `frame`, compressing any header block with `hc`.
pub fn encode_frame(frame: &Frame, hc: &mut HeaderCompressor) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match frame {
        Frame::SynStream {
            stream_id,
            associated_to,
            priority,
            flags,
            headers,
        } => {
            let block = hc.compress(headers)?;
            control_header(&mut out, TYPE_SYN_STREAM, *flags, 10 + block.len())?;
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&(associated_to & 0x7fff_ffff).to_be_bytes());
            out.push((priority & 0x07) << 5);
            out.push(0);
            out.extend_from_slice(&block);
        }
        Frame::SynReply {
            stream_id,
            flags,
            headers,
        }
        | Frame::Headers {
            stream_id,
            flags,
            headers,
        } => {
            let ty = if matches!(frame, Frame::SynReply { .. }) {
                TYPE_SYN_REPLY
            } else {
                TYPE_HEADERS
            };
            let block = hc.compress(headers)?;
            control_header(&mut out, ty, *flags, 4 + block.len())?;
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&block);
        }
        Frame::RstStream { stream_id, status } => {
            control_header(&mut out, TYPE_RST_STREAM, 0, 8)?;
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&status.to_be_bytes());
        }
        Frame::Settings { flags, settings } => {
            control_header(&mut out, TYPE_SETTINGS, *flags, 4 + 8 * settings.len())?;
            out.extend_from_slice(&(settings.len() as u32).to_be_bytes());
            for s in settings {
                out.extend_from_slice(
                    &((u32::from(s.flags) << 24) | (s.id & 0x00ff_ffff)).to_be_bytes(),
                );
                out.extend_from_slice(&s.value.to_be_bytes());
            }
        }
        Frame::Ping { id } => {
            control_header(&mut out, TYPE_PING, 0, 4)?;
            out.extend_from_slice(&id.to_be_bytes());
        }
        Frame::GoAway {
            last_good_stream_id,
            status,
        } => {
            control_header(&mut out, TYPE_GOAWAY, 0, 8)?;
            out.extend_from_slice(&(last_good_stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&status.to_be_bytes());
        }
        Frame::WindowUpdate { stream_id, delta } => {
            control_header(&mut out, TYPE_WINDOW_UPDATE, 0, 8)?;
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            if data.len() > MAX_FRAME_LEN {
                return Err(Error::Protocol(format!(
                    "DATA of {} bytes is too large",
                    data.len()
                )));
            }
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&((u32::from(*flags) << 24) | data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
        }
        Frame::Unknown { frame_type } => {
            control_header(&mut out, *frame_type, 0, 0)?;
        }
    }
    Ok(out)
}

/// Decodes one frame from its 8-byte head and payload. Header blocks are always decompressed,
/// even of frames the caller will ignore, to keep the zlib context in step with the peer.
pub fn decode_frame(head: [u8; 8], payload: &[u8], hd: &mut HeaderDecompressor) -> Result<Frame> {
    let first = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let flags = head[4];
    let mut cur = Cursor::new(payload);
    if first & 0x8000_0000 == 0 {
        let stream_id = first & 0x7fff_ffff;
        if stream_id == 0 {
            return Err(Error::Protocol("DATA frame on stream 0".into()));
        }
        return Ok(Frame::Data {
            stream_id,
            flags,
            data: Bytes::copy_from_slice(payload),
        });
    }
    let version = ((first >> 16) & 0x7fff) as u16;
    let frame_type = (first & 0xffff) as u16;
    if version != VERSION {
        return Err(Error::Protocol(format!(
            "unsupported SPDY version {version}"
        )));
    }
    let exact = |want: usize| -> Result<()> {
        if payload.len() != want {
            return Err(Error::Protocol(format!(
                "control frame type {frame_type} has length {}, want {want}",
                payload.len()
            )));
        }
        Ok(())
    };
    let nonzero = |id: u32, what: &str| -> Result<u32> {
        if id == 0 {
            return Err(Error::Protocol(format!("{what} on stream 0")));
        }
        Ok(id)
    };
    let frame = match frame_type {
        TYPE_SYN_STREAM => {
            let stream_id = cur.u32()? & 0x7fff_ffff;
            let associated_to = cur.u32()? & 0x7fff_ffff;
            let priority = cur.u8()? >> 5;
            let _slot = cur.u8()?;
            let headers = hd.decompress(cur.rest())?;
            Frame::SynStream {
                stream_id: nonzero(stream_id, "SYN_STREAM")?,
                associated_to,
                priority,
                flags,
                headers,
            }
        }
        TYPE_SYN_REPLY | TYPE_HEADERS => {
            let stream_id = cur.u32()? & 0x7fff_ffff;
            let headers = hd.decompress(cur.rest())?;
            let stream_id = nonzero(stream_id, "SYN_REPLY/HEADERS")?;
            if frame_type == TYPE_SYN_REPLY {
                Frame::SynReply {
                    stream_id,
                    flags,
                    headers,
                }
            } else {
                Frame::Headers {
                    stream_id,
                    flags,
                    headers,
                }
            }
        }
        TYPE_RST_STREAM => {
            exact(8)?;
            let stream_id = nonzero(cur.u32()? & 0x7fff_ffff, "RST_STREAM")?;
            let status = cur.u32()?;
            if status == 0 {
                return Err(Error::Protocol("RST_STREAM with status 0".into()));
            }
            Frame::RstStream { stream_id, status }
        }
        TYPE_SETTINGS => {
            let count = cur.u32()? as usize;
            if Some(payload.len()) != count.checked_mul(8).and_then(|n| n.checked_add(4)) {
                return Err(Error::Protocol(
                    "SETTINGS length does not match its entry count".into(),
                ));
            }
            let mut settings = Vec::with_capacity(count);
            for _ in 0..count {
                let id = cur.u32()?;
                let value = cur.u32()?;
                settings.push(Setting {
                    flags: (id >> 24) as u8,
                    id: id & 0x00ff_ffff,
                    value,
                });
            }
            Frame::Settings { flags, settings }
        }
        TYPE_PING => {
            exact(4)?;
            Frame::Ping { id: cur.u32()? }
        }
        TYPE_GOAWAY => {
            // SPDY/3 GOAWAY carries a status; accept the 4-byte SPDY/2 form too.
            if payload.len() != 8 && payload.len() != 4 {
                exact(8)?;
            }
            let last_good_stream_id = cur.u32()? & 0x7fff_ffff;
            let status = if cur.remaining() == 4 {
                cur.u32()?
            } else {
                GOAWAY_OK
            };
            Frame::GoAway {
                last_good_stream_id,
                status,
            }
        }
        TYPE_WINDOW_UPDATE => {
            exact(8)?;
            let stream_id = cur.u32()? & 0x7fff_ffff;
            let delta = cur.u32()? & 0x7fff_ffff;
            if delta == 0 {
                return Err(Error::Protocol("WINDOW_UPDATE with delta 0".into()));
            }
            Frame::WindowUpdate { stream_id, delta }
        }
        other => Frame::Unknown { frame_type: other },
    };
    Ok(frame)
}

/// Reads one frame. `Ok(None)` is a clean end of input at a frame boundary; input that ends
/// inside a frame is a protocol error.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    hd: &mut HeaderDecompressor,
) -> Result<Option<Frame>> {
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(Error::Protocol(
                "connection ended inside a frame header".into(),
            ));
        }
        got += n;
    }
    let len = (u32::from_be_bytes([0, head[5], head[6], head[7]])) as usize;
    let control = head[0] & 0x80 != 0;
    let max = if control {
        MAX_CONTROL_FRAME
    } else {
        MAX_DATA_FRAME
    };
    if len > max {
        return Err(Error::Protocol(format!(
            "{} frame of {len} bytes (at most {max})",
            if control { "control" } else { "DATA" }
        )));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                Error::Protocol("connection ended inside a frame".into())
            }
            _ => Error::Io(e),
        })?;
    decode_frame(head, &payload, hd).map(Some)
}

/// Whether this side waits for the peer's flow-control window before sending DATA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlowControl {
    /// Track the peer's windows, and enforce them once the peer has shown it does flow control
    /// (sent WINDOW_UPDATE, or SETTINGS with INITIAL_WINDOW_SIZE). moby/spdystream, the Go
    /// library behind the apiserver, does neither, and would otherwise stall after 64 KiB.
    #[default]
    Auto,
    /// Strict SPDY/3.1: never exceed the peer's stream or session window.
    Enforce,
    /// Never wait for window (SPDY/3 behaviour).
    Ignore,
}

/// Session settings; [`Default`] is what the kubelet needs against the apiserver.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// See [`FlowControl`]. Default: `Auto`.
    pub flow_control: FlowControl,
    /// Received bytes a stream may hold that its consumer has not read yet before this side
    /// stops reading the connection (backpressure through TCP, as Go's unbuffered channels
    /// do). Only peers that ignore our window get near it. Default 1 MiB.
    pub max_unconsumed_per_stream: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            flow_control: FlowControl::Auto,
            max_unconsumed_per_stream: 1024 * 1024,
        }
    }
}

/// Work for the writer task, the only owner of the write half, the header compressor and the
/// send windows.
enum Cmd {
    /// Accept a peer stream: SYN_REPLY with no headers.
    Reply { stream_id: u32 },
    /// RST_STREAM.
    Reset { stream_id: u32, status: u32 },
    /// DATA (split by window and chunk size); `done` answers once it is all written.
    Data {
        stream_id: u32,
        data: Bytes,
        fin: bool,
        done: oneshot::Sender<Result<()>>,
    },
    /// The consumer read `bytes` of a stream: credit them back. `last` forgets the stream.
    Credit {
        stream_id: u32,
        bytes: u32,
        last: bool,
    },
    /// From the reader: the peer opened a stream.
    PeerStream { stream_id: u32 },
    /// From the reader: WINDOW_UPDATE.
    PeerWindowUpdate { stream_id: u32, delta: u32 },
    /// From the reader: SETTINGS INITIAL_WINDOW_SIZE.
    PeerInitialWindow { value: u32 },
    /// From the reader: the peer reset a stream.
    PeerReset { stream_id: u32 },
    /// From the reader: echo a PING.
    Ping { id: u32 },
    /// Send GOAWAY, shut the write half and stop.
    GoAway {
        status: u32,
        done: Option<oneshot::Sender<()>>,
    },
    /// From the reader: the peer's input ended; stop.
    PeerGone,
}

fn send_cmd(tx: &mpsc::UnboundedSender<Cmd>, cmd: Cmd) {
    // The writer has stopped: the session is over and there is nobody to tell.
    let _ = tx.send(cmd);
}

/// A server-side SPDY/3.1 session over one upgraded connection.
///
/// Dropping it aborts its tasks; [`Session::close`] ends it cleanly.
pub struct Session {
    incoming: mpsc::Receiver<IncomingStream>,
    cmd: mpsc::UnboundedSender<Cmd>,
    reader: Option<JoinHandle<Result<()>>>,
    writer: Option<JoinHandle<Result<()>>>,
}

impl Session {
    /// Starts serving `io` (spawns the reader and writer tasks on the current runtime).
    pub fn new<IO>(io: IO, config: SessionConfig) -> Session
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        // What the peer's frames make the writer do, bounded (see PEER_QUEUE).
        let (peer_tx, peer_rx) = mpsc::channel(PEER_QUEUE);
        // Streams the application has not picked up yet; beyond this the reader waits.
        let (in_tx, in_rx) = mpsc::channel(32);
        let enforce = config.flow_control == FlowControl::Enforce;
        let writer = tokio::spawn(run_writer(
            wr,
            cmd_rx,
            peer_rx,
            config.flow_control,
            enforce,
        ));
        let reader = tokio::spawn(run_reader(rd, cmd_tx.clone(), peer_tx, in_tx, config));
        Session {
            incoming: in_rx,
            cmd: cmd_tx,
            reader: Some(reader),
            writer: Some(writer),
        }
    }

    /// The next stream the peer opens; `None` once the peer's side of the session has ended
    /// (connection closed, or a protocol error: see [`Session::close`] for which).
    pub async fn accept(&mut self) -> Option<IncomingStream> {
        self.incoming.recv().await
    }

    /// Sends GOAWAY, flushes, shuts the connection's write half and lingers briefly for the
    /// peer to close. Returns the session's first error: a protocol error from the peer, or a
    /// transport error.
    pub async fn close(mut self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        send_cmd(
            &self.cmd,
            Cmd::GoAway {
                status: GOAWAY_OK,
                done: Some(tx),
            },
        );
        let _ = rx.await;
        let writer_result = match self.writer.take() {
            Some(w) => w.await.unwrap_or(Err(Error::SessionClosed)),
            None => Ok(()),
        };
        // Stop handing out streams; the reader keeps draining input until the peer closes.
        self.incoming.close();
        let reader_result = match self.reader.take() {
            Some(mut r) => match tokio::time::timeout(CLOSE_LINGER, &mut r).await {
                Ok(joined) => joined.unwrap_or(Err(Error::SessionClosed)),
                Err(_) => {
                    r.abort();
                    Ok(())
                }
            },
            None => Ok(()),
        };
        reader_result?;
        match writer_result {
            // The peer hung up first; nothing was lost that it still wanted.
            Err(Error::Io(e)) if is_hangup(&e) => Ok(()),
            other => other,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for task in [self.reader.take(), self.writer.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

fn is_hangup(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::NotConnected
    )
}

/// A stream the peer opened, not yet accepted. Dropping it rejects it (RST_STREAM CANCEL).
pub struct IncomingStream {
    stream: Option<SpdyStream>,
    unidirectional: bool,
}

impl IncomingStream {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.stream.as_ref().map_or(0, |s| s.id)
    }

    /// The headers of its SYN_STREAM.
    pub fn headers(&self) -> &Headers {
        static EMPTY: Headers = Headers(Vec::new());
        self.stream.as_ref().map_or(&EMPTY, |s| &s.headers)
    }

    /// Accepts it: sends SYN_REPLY. Data the peer sent before is kept.
    pub fn accept(mut self) -> Option<SpdyStream> {
        let stream = self.stream.take()?;
        send_cmd(
            &stream.sender.cmd,
            Cmd::Reply {
                stream_id: stream.id,
            },
        );
        if self.unidirectional {
            stream.sender.finished.store(true, Ordering::SeqCst);
        }
        Some(stream)
    }

    /// Rejects it with RST_STREAM `status` (the kubelet resets with CANCEL).
    pub fn reject(mut self, status: u32) {
        if let Some(stream) = self.stream.take() {
            stream.sender.reset(status);
        }
    }
}

impl Drop for IncomingStream {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            debug!(stream = stream.id, "rejecting stream nobody accepted");
            stream.sender.reset(RST_CANCEL);
        }
    }
}

/// An accepted stream: what the peer sends arrives through [`SpdyStream::recv`]; this side
/// writes through [`SpdyStream::sender`].
pub struct SpdyStream {
    id: u32,
    headers: Headers,
    rx: mpsc::UnboundedReceiver<Bytes>,
    budget: Arc<Semaphore>,
    budget_cap: usize,
    sender: StreamSender,
    /// Credit goes to the writer through the bounded queue: a consumer reading a flood of tiny
    /// frames waits for the writer instead of queueing a command per frame without limit.
    credit: mpsc::Sender<Cmd>,
    ended: bool,
}

impl Drop for SpdyStream {
    fn drop(&mut self) {
        // The reader may wait on this stream's budget for a consumer that is now gone.
        self.budget.close();
        if !self.ended {
            // Best effort: the writer forgets the stream's pending credit (the reader credits
            // later DATA itself once it sees nobody reads the stream).
            let _ = self.credit.try_send(Cmd::Credit {
                stream_id: self.id,
                bytes: 0,
                last: true,
            });
        }
    }
}

impl SpdyStream {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The headers of its SYN_STREAM.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The next chunk of data from the peer, `None` after its FIN (or RST, or the session's
    /// end). Reading credits the bytes back to the peer's window.
    pub async fn recv(&mut self) -> Option<Bytes> {
        match self.rx.recv().await {
            Some(chunk) => {
                self.budget.add_permits(chunk.len().min(self.budget_cap));
                let _ = self
                    .credit
                    .send(Cmd::Credit {
                        stream_id: self.id,
                        bytes: chunk.len() as u32,
                        last: false,
                    })
                    .await;
                Some(chunk)
            }
            None => {
                if !self.ended {
                    self.ended = true;
                    let _ = self
                        .credit
                        .send(Cmd::Credit {
                            stream_id: self.id,
                            bytes: 0,
                            last: true,
                        })
                        .await;
                }
                None
            }
        }
    }

    /// A handle to write to the stream; cheap to clone.
    pub fn sender(&self) -> StreamSender {
        self.sender.clone()
    }

    /// Turns the stream into one in-memory pipe: reads yield the peer's data (EOF at its FIN),
    /// writes become DATA, and shutting down or dropping the pipe sends FIN. The returned task
    /// ends once this side's FIN has been written (or the session ended).
    pub fn into_io(self) -> (DuplexStream, JoinHandle<()>) {
        let (ours, theirs) = tokio::io::duplex(PIPE_CAPACITY);
        let (mut pipe_rd, mut pipe_wr) = tokio::io::split(ours);
        let sender = self.sender.clone();
        let id = self.id;
        let mut stream = self;
        tokio::spawn(async move {
            while let Some(chunk) = stream.recv().await {
                if pipe_wr.write_all(&chunk).await.is_err() {
                    debug!(
                        stream = id,
                        "pipe reader gone; dropping the rest of the input"
                    );
                    break;
                }
            }
            let _ = pipe_wr.shutdown().await;
        });
        let outbound = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_SEND_CHUNK];
            loop {
                match pipe_rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sender
                            .send(Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = sender.finish().await;
        });
        (theirs, outbound)
    }
}

/// Writes to one stream. Clones share the stream's "finished" state.
#[derive(Clone)]
pub struct StreamSender {
    id: u32,
    cmd: mpsc::UnboundedSender<Cmd>,
    finished: Arc<AtomicBool>,
}

impl StreamSender {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `data`; returns once it has been written to the connection, which with flow
    /// control may wait for the peer's window.
    pub async fn send(&self, data: Bytes) -> Result<()> {
        if self.finished.load(Ordering::SeqCst) {
            return Err(Error::StreamClosed(self.id));
        }
        self.data(data, false).await
    }

    /// Sends FIN: this side will write no more. Idempotent.
    pub async fn finish(&self) -> Result<()> {
        if self.finished.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.data(Bytes::new(), true).await
    }

    /// Resets the stream (RST_STREAM `status`); no more writes.
    pub fn reset(&self, status: u32) {
        self.finished.store(true, Ordering::SeqCst);
        send_cmd(
            &self.cmd,
            Cmd::Reset {
                stream_id: self.id,
                status,
            },
        );
    }

    async fn data(&self, data: Bytes, fin: bool) -> Result<()> {
        let (done, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Data {
                stream_id: self.id,
                data,
                fin,
                done,
            })
            .map_err(|_| Error::SessionClosed)?;
        rx.await.unwrap_or(Err(Error::SessionClosed))
    }
}

/// What the reader keeps per open peer stream.
struct Inbound {
    tx: mpsc::UnboundedSender<Bytes>,
    budget: Arc<Semaphore>,
}

async fn run_reader<R: AsyncRead + Unpin>(
    mut rd: R,
    cmd: mpsc::UnboundedSender<Cmd>,
    peer: mpsc::Sender<Cmd>,
    incoming: mpsc::Sender<IncomingStream>,
    config: SessionConfig,
) -> Result<()> {
    // Every command a peer's frame causes goes through the bounded queue: when the writer is
    // behind (the peer does not read), the reader waits, and so stops reading the peer.
    macro_rules! to_writer {
        ($c:expr) => {
            if peer.send($c).await.is_err() {
                break Err(Error::SessionClosed);
            }
        };
    }
    let mut hd = HeaderDecompressor::new();
    let mut streams: HashMap<u32, Inbound> = HashMap::new();
    let mut last_peer_stream = 0u32;
    let mut peer_gone_away = false;
    let cap = config.max_unconsumed_per_stream.max(1);
    let result = loop {
        let frame = match read_frame(&mut rd, &mut hd).await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => {
                if stream_id % 2 == 0 || stream_id <= last_peer_stream {
                    break Err(Error::Protocol(format!(
                        "SYN_STREAM {stream_id} after {last_peer_stream} (client ids are odd and increasing)"
                    )));
                }
                last_peer_stream = stream_id;
                to_writer!(Cmd::PeerStream { stream_id });
                // Forget streams whose consumer is gone (rejected, reset, or dropped).
                streams.retain(|_, s| !s.tx.is_closed());
                if peer_gone_away || streams.len() >= MAX_OPEN_STREAMS {
                    debug!(stream = stream_id, open = streams.len(), "refusing stream");
                    to_writer!(Cmd::Reset {
                        stream_id,
                        status: RST_REFUSED_STREAM,
                    });
                    continue;
                }
                debug!(stream = stream_id, ?headers, "peer opened stream");
                let (tx, rx) = mpsc::unbounded_channel();
                let budget = Arc::new(Semaphore::new(cap));
                if flags & FLAG_FIN == 0 {
                    streams.insert(
                        stream_id,
                        Inbound {
                            tx,
                            budget: budget.clone(),
                        },
                    );
                }
                let stream = SpdyStream {
                    id: stream_id,
                    headers,
                    rx,
                    budget,
                    budget_cap: cap,
                    sender: StreamSender {
                        id: stream_id,
                        cmd: cmd.clone(),
                        finished: Arc::new(AtomicBool::new(false)),
                    },
                    credit: peer.clone(),
                    ended: false,
                };
                let incoming_stream = IncomingStream {
                    stream: Some(stream),
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                };
                // If nobody accepts streams any more, dropping it here rejects it.
                let _ = incoming.send(incoming_stream).await;
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let len = data.len();
                let mut delivered = len == 0;
                if let Some(inbound) = streams.get(&stream_id) {
                    if len > 0 {
                        // Backpressure for peers that ignore our window. The budget is closed
                        // when the consumer goes away, so this never waits for nobody.
                        let permits = len.min(cap) as u32;
                        if let Ok(p) = inbound.budget.clone().acquire_many_owned(permits).await {
                            p.forget();
                        }
                        delivered = inbound.tx.send(data).is_ok();
                    }
                    if !delivered || flags & FLAG_FIN != 0 {
                        streams.remove(&stream_id);
                    }
                }
                if !delivered {
                    // Dead or unknown stream: the data is dropped, and credited back for the
                    // session (the stream is forgotten) so the peer's window does not shrink.
                    debug!(
                        stream = stream_id,
                        len, "DATA for a stream nobody reads; dropped"
                    );
                    to_writer!(Cmd::Credit {
                        stream_id,
                        bytes: len as u32,
                        last: true,
                    });
                }
            }
            Frame::Headers {
                stream_id, flags, ..
            } => {
                if flags & FLAG_FIN != 0 {
                    streams.remove(&stream_id);
                }
            }
            Frame::RstStream { stream_id, status } => {
                debug!(stream = stream_id, status, "peer reset stream");
                streams.remove(&stream_id);
                to_writer!(Cmd::PeerReset { stream_id });
            }
            Frame::Settings { settings, .. } => {
                // The last INITIAL_WINDOW_SIZE of the frame is the one that holds.
                if let Some(s) = settings
                    .iter()
                    .rev()
                    .find(|s| s.id == SETTINGS_INITIAL_WINDOW_SIZE)
                {
                    to_writer!(Cmd::PeerInitialWindow { value: s.value });
                }
            }
            Frame::Ping { id } => {
                // Odd ids are the client's pings: echo them. Even ones would answer ours.
                if id % 2 == 1 {
                    to_writer!(Cmd::Ping { id });
                }
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                debug!(last_good_stream_id, status, "peer sent GOAWAY");
                peer_gone_away = true;
            }
            Frame::WindowUpdate { stream_id, delta } => {
                to_writer!(Cmd::PeerWindowUpdate { stream_id, delta });
            }
            Frame::SynReply { stream_id, .. } => {
                debug!(
                    stream = stream_id,
                    "SYN_REPLY for a stream this side never opened; ignored"
                );
            }
            Frame::Unknown { frame_type } => {
                debug!(frame_type, "unknown control frame ignored");
            }
        }
    };
    drop(streams);
    // The session's end goes by the unbounded queue: it must not wait behind a full one.
    match &result {
        Err(e @ (Error::Protocol(_) | Error::Compression(_))) => {
            debug!(error = %e, "ending session with GOAWAY PROTOCOL_ERROR");
            send_cmd(
                &cmd,
                Cmd::GoAway {
                    status: GOAWAY_PROTOCOL_ERROR,
                    done: None,
                },
            );
        }
        _ => send_cmd(&cmd, Cmd::PeerGone),
    }
    result
}

/// Send-side state of one stream.
struct SendStream {
    window: i64,
    queue: VecDeque<Pending>,
}

struct Pending {
    data: Bytes,
    fin: bool,
    done: oneshot::Sender<Result<()>>,
}

struct Writer {
    hc: HeaderCompressor,
    out: Vec<u8>,
    acks: Vec<oneshot::Sender<Result<()>>>,
    streams: BTreeMap<u32, SendStream>,
    session_window: i64,
    initial_window: i64,
    mode: FlowControl,
    enforce: bool,
    last_peer_stream: u32,
    credit: HashMap<u32, u32>,
    session_credit: u32,
}

impl Writer {
    fn frame(&mut self, frame: &Frame) -> Result<()> {
        let bytes = encode_frame(frame, &mut self.hc)?;
        self.out.extend_from_slice(&bytes);
        Ok(())
    }

    fn peer_shows_flow_control(&mut self) {
        if self.mode == FlowControl::Auto && !self.enforce {
            debug!("peer does flow control; enforcing its windows");
            self.enforce = true;
        }
    }

    /// Handles one command; `Ok(true)` means stop.
    fn handle(&mut self, cmd: Cmd) -> Result<bool> {
        match cmd {
            Cmd::Reply { stream_id } => {
                self.frame(&Frame::SynReply {
                    stream_id,
                    flags: 0,
                    headers: Headers::new(),
                })?;
            }
            Cmd::Reset { stream_id, status } => {
                self.fail_stream(stream_id);
                self.credit.remove(&stream_id);
                self.frame(&Frame::RstStream { stream_id, status })?;
            }
            Cmd::Data {
                stream_id,
                data,
                fin,
                done,
            } => {
                let initial = self.initial_window;
                self.streams
                    .entry(stream_id)
                    .or_insert_with(|| SendStream {
                        window: initial,
                        queue: VecDeque::new(),
                    })
                    .queue
                    .push_back(Pending { data, fin, done });
            }
            Cmd::Credit {
                stream_id,
                bytes,
                last,
            } => {
                let pending = self.credit.entry(stream_id).or_insert(0);
                *pending = pending.saturating_add(bytes);
                let stream_delta = *pending;
                if stream_delta >= WINDOW_UPDATE_THRESHOLD {
                    self.credit.remove(&stream_id);
                    if !last {
                        self.frame(&Frame::WindowUpdate {
                            stream_id,
                            delta: stream_delta,
                        })?;
                    }
                }
                if last {
                    self.credit.remove(&stream_id);
                }
                self.session_credit = self.session_credit.saturating_add(bytes);
                if self.session_credit >= WINDOW_UPDATE_THRESHOLD {
                    let delta = std::mem::take(&mut self.session_credit);
                    self.frame(&Frame::WindowUpdate {
                        stream_id: 0,
                        delta,
                    })?;
                }
            }
            Cmd::PeerStream { stream_id } => {
                self.last_peer_stream = self.last_peer_stream.max(stream_id);
            }
            Cmd::PeerWindowUpdate { stream_id, delta } => {
                self.peer_shows_flow_control();
                if stream_id == 0 {
                    self.session_window += i64::from(delta);
                } else if let Some(s) = self.streams.get_mut(&stream_id) {
                    s.window += i64::from(delta);
                }
            }
            Cmd::PeerInitialWindow { value } => {
                self.peer_shows_flow_control();
                let change = i64::from(value) - self.initial_window;
                self.initial_window = i64::from(value);
                for s in self.streams.values_mut() {
                    s.window += change;
                }
            }
            Cmd::PeerReset { stream_id } => {
                self.fail_stream(stream_id);
                self.credit.remove(&stream_id);
            }
            Cmd::Ping { id } => self.frame(&Frame::Ping { id })?,
            Cmd::GoAway { status, done } => {
                self.flush_data()?;
                self.frame(&Frame::GoAway {
                    last_good_stream_id: self.last_peer_stream,
                    status,
                })?;
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return Ok(true);
            }
            Cmd::PeerGone => return Ok(true),
        }
        Ok(false)
    }

    fn fail_stream(&mut self, stream_id: u32) {
        if let Some(s) = self.streams.remove(&stream_id) {
            for p in s.queue {
                let _ = p.done.send(Err(Error::StreamClosed(stream_id)));
            }
        }
    }

    /// Moves queued DATA into the output as far as windows allow, one chunk per stream per
    /// round so streams share the connection.
    fn flush_data(&mut self) -> Result<()> {
        loop {
            let mut progressed = false;
            let ids: Vec<u32> = self.streams.keys().copied().collect();
            for id in ids {
                let session_window = self.session_window;
                let enforce = self.enforce;
                let Some(s) = self.streams.get_mut(&id) else {
                    continue;
                };
                let Some(front) = s.queue.front_mut() else {
                    continue;
                };
                let allowed = if enforce {
                    s.window.min(session_window).max(0) as usize
                } else {
                    usize::MAX
                };
                if !front.data.is_empty() && allowed == 0 {
                    continue;
                }
                let n = front.data.len().min(allowed).min(MAX_SEND_CHUNK);
                let chunk = front.data.split_to(n);
                let last = front.data.is_empty();
                let fin = last && front.fin;
                s.window -= n as i64;
                let mut finished = false;
                if last {
                    if let Some(p) = s.queue.pop_front() {
                        self.acks.push(p.done);
                    }
                    finished = fin;
                }
                self.session_window -= n as i64;
                if finished {
                    self.streams.remove(&id);
                }
                let flags = if fin { FLAG_FIN } else { 0 };
                self.frame(&Frame::Data {
                    stream_id: id,
                    flags,
                    data: chunk,
                })?;
                progressed = true;
            }
            if !progressed {
                return Ok(());
            }
        }
    }
}

async fn run_writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    mut peer_rx: mpsc::Receiver<Cmd>,
    mode: FlowControl,
    enforce: bool,
) -> Result<()> {
    let mut w = Writer {
        hc: HeaderCompressor::new()?,
        out: Vec::new(),
        acks: Vec::new(),
        streams: BTreeMap::new(),
        session_window: i64::from(DEFAULT_INITIAL_WINDOW),
        initial_window: i64::from(DEFAULT_INITIAL_WINDOW),
        mode,
        enforce,
        last_peer_stream: 0,
        credit: HashMap::new(),
        session_credit: 0,
    };
    let result = async {
        loop {
            let cmd = tokio::select! {
                Some(cmd) = rx.recv() => cmd,
                Some(cmd) = peer_rx.recv() => cmd,
                else => break,
            };
            let mut stop = w.handle(cmd)?;
            // Batch whatever else is already queued into one write (at most a queue's worth
            // of commands, so the batch stays bounded while the reader keeps filling the queue).
            let mut batched = 0;
            while !stop && batched < PEER_QUEUE {
                batched += 1;
                match rx.try_recv() {
                    Ok(cmd) => stop = w.handle(cmd)?,
                    Err(_) => match peer_rx.try_recv() {
                        Ok(cmd) => stop = w.handle(cmd)?,
                        Err(_) => break,
                    },
                }
            }
            if !stop {
                w.flush_data()?;
            }
            if !w.out.is_empty() {
                wr.write_all(&w.out).await?;
                wr.flush().await?;
                w.out.clear();
            }
            for ack in w.acks.drain(..) {
                let _ = ack.send(Ok(()));
            }
            if stop {
                let _ = wr.shutdown().await;
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    // Whatever is still queued will never be sent.
    for (id, s) in std::mem::take(&mut w.streams) {
        for p in s.queue {
            let _ = p.done.send(Err(Error::StreamClosed(id)));
        }
    }
    for ack in w.acks.drain(..) {
        let _ = ack.send(Err(Error::SessionClosed));
    }
    rx.close();
    peer_rx.close();
    while let Ok(cmd) = rx.try_recv() {
        if let Cmd::Data { done, .. } = cmd {
            let _ = done.send(Err(Error::SessionClosed));
        }
    }
    result
}
