//! Property tests of the parsers that read what hostile peers send the agent: SPDY frames and
//! header blocks (the kubelet API's exec/attach/port-forward), exec/attach and container-log
//! query strings, and static pod manifests. The properties: arbitrary bytes never panic, what
//! is decoded stays within the parser's bounds, and what an encoder writes decodes to the same
//! thing. The default case counts run in seconds as part of `cargo test`; `deploy/fuzz` runs
//! them with `PROPTEST_CASES` raised.

use std::collections::BTreeMap;

use proptest::prelude::*;
use wasm_kubelet::streaming::spdy::{
    self, Frame, HeaderCompressor, HeaderDecompressor, Headers, Setting,
};

/// Reads frames from `bytes` until the end or the first error; never panics.
fn read_all(bytes: &[u8], hd: &mut HeaderDecompressor) -> (Vec<Frame>, Option<String>) {
    let mut input = bytes;
    let mut frames = Vec::new();
    loop {
        match futures::executor::block_on(spdy::read_frame(&mut input, hd)) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e.to_string())),
        }
    }
}

/// Whether decoded headers stay within the decoder's bounds.
fn within_bounds(headers: &Headers) -> bool {
    let bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    headers.len() <= spdy::MAX_HEADER_PAIRS && bytes <= spdy::MAX_HEADER_BLOCK
}

fn check_frame_bounds(frame: &Frame) -> bool {
    match frame {
        Frame::SynStream { headers, .. }
        | Frame::SynReply { headers, .. }
        | Frame::Headers { headers, .. } => within_bounds(headers),
        _ => true,
    }
}

fn arb_headers() -> impl Strategy<Value = Headers> {
    // Distinct names (the encoder groups a repeated name), printable values without NUL (NUL
    // joins a name's values on the wire).
    prop::collection::btree_map("[a-z][a-z0-9-]{0,15}", "[ -~]{0,40}", 0..6).prop_map(
        |pairs: BTreeMap<String, String>| {
            let mut headers = Headers::new();
            for (name, value) in pairs {
                headers.insert(&name, &value);
            }
            headers
        },
    )
}

fn stream_id() -> impl Strategy<Value = u32> {
    1u32..=0x7fff_ffff
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            stream_id(),
            0u32..=0x7fff_ffff,
            0u8..8,
            any::<u8>(),
            arb_headers()
        )
            .prop_map(|(stream_id, associated_to, priority, flags, headers)| {
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    headers,
                }
            }),
        (stream_id(), any::<u8>(), arb_headers()).prop_map(|(stream_id, flags, headers)| {
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            }
        }),
        (stream_id(), any::<u8>(), arb_headers()).prop_map(|(stream_id, flags, headers)| {
            Frame::Headers {
                stream_id,
                flags,
                headers,
            }
        }),
        (stream_id(), 1u32..)
            .prop_map(|(stream_id, status)| Frame::RstStream { stream_id, status }),
        (
            any::<u8>(),
            prop::collection::vec((any::<u8>(), 0u32..0x0100_0000, any::<u32>()), 0..8)
        )
            .prop_map(|(flags, s)| Frame::Settings {
                flags,
                settings: s
                    .into_iter()
                    .map(|(flags, id, value)| Setting { flags, id, value })
                    .collect()
            }),
        any::<u32>().prop_map(|id| Frame::Ping { id }),
        (0u32..=0x7fff_ffff, any::<u32>()).prop_map(|(last_good_stream_id, status)| {
            Frame::GoAway {
                last_good_stream_id,
                status,
            }
        }),
        (0u32..=0x7fff_ffff, 1u32..=0x7fff_ffff)
            .prop_map(|(stream_id, delta)| Frame::WindowUpdate { stream_id, delta }),
        (
            stream_id(),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..256)
        )
            .prop_map(|(stream_id, flags, data)| Frame::Data {
                stream_id,
                flags,
                data: data.into()
            }),
    ]
}

/// An uncompressed SPDY name/value block of `pairs`, with counts and lengths as given (they
/// may lie).
fn raw_block(count: u32, pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut raw = count.to_be_bytes().to_vec();
    for (name, value) in pairs {
        raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
        raw.extend_from_slice(name);
        raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
        raw.extend_from_slice(value);
    }
    raw
}

/// A SYN_STREAM whose block is `raw` deflated with a sync flush (no dictionary).
fn syn_stream_with_block(raw: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(raw).unwrap();
    z.flush().unwrap();
    let block = z.get_ref().clone();
    let mut frame = vec![0x80, 0x03, 0x00, 0x01];
    frame.extend_from_slice(&((10 + block.len()) as u32).to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    frame.extend_from_slice(&block);
    frame
}

proptest! {
    /// Arbitrary bytes: frames are read until the first error, never a panic, and any header
    /// block decoded stays within bounds.
    #[test]
    fn spdy_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut hd = HeaderDecompressor::new();
        let (frames, _) = read_all(&bytes, &mut hd);
        prop_assert!(frames.iter().all(check_frame_bounds));
    }

    /// A plausible frame head (control bit, version 3, a known type, a length that fits) over
    /// arbitrary payload bytes: reaches the per-type decoders far more often than random heads.
    #[test]
    fn spdy_control_frames_with_arbitrary_payloads_never_panic(frame_type in 0u16..12, flags in any::<u8>(), payload in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = vec![0x80, 0x03];
        bytes.extend_from_slice(&frame_type.to_be_bytes());
        bytes.extend_from_slice(&((u32::from(flags) << 24) | payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&payload);
        let mut hd = HeaderDecompressor::new();
        let (frames, _) = read_all(&bytes, &mut hd);
        prop_assert!(frames.iter().all(check_frame_bounds));
    }

    /// Header blocks with arbitrary (lying) counts, names and NUL-laden values, properly
    /// deflated so they reach the block decoder: decoded headers never exceed the bounds.
    #[test]
    fn spdy_header_blocks_stay_bounded(count in any::<u32>(), pairs in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..64), prop::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..512)), 0..8), repeat in 1usize..600) {
        let mut all = Vec::new();
        for _ in 0..repeat {
            all.extend(pairs.iter().cloned());
            if all.len() > 4096 { break; }
        }
        let frame = syn_stream_with_block(&raw_block(count, &all));
        let mut hd = HeaderDecompressor::new();
        let (frames, _) = read_all(&frame, &mut hd);
        prop_assert!(frames.iter().all(check_frame_bounds));
    }

    /// What the encoder writes, the reader decodes to the same frames, through one shared
    /// header compression context per direction (as a session has).
    #[test]
    fn spdy_frames_round_trip(frames in prop::collection::vec(arb_frame(), 1..8)) {
        let mut hc = HeaderCompressor::new().unwrap();
        let mut wire = Vec::new();
        for frame in &frames {
            wire.extend(spdy::encode_frame(frame, &mut hc).unwrap());
        }
        let mut hd = HeaderDecompressor::new();
        let (decoded, error) = read_all(&wire, &mut hd);
        prop_assert_eq!(error, None);
        prop_assert_eq!(decoded, frames);
    }

    /// Exec and attach query strings: arbitrary text never panics.
    #[test]
    fn exec_and_attach_queries_never_panic(query in "[a-zA-Z0-9=&%+._~-]{0,200}|\\PC{0,200}") {
        let _ = wasm_kubelet::streaming::remotecommand::ExecOptions::from_exec_query(&query);
        let _ = wasm_kubelet::streaming::remotecommand::ExecOptions::from_attach_query(&query);
        let _ = wasm_kubelet::streaming::remotecommand::parse_query(&query);
    }

    /// Percent-encoded pairs decode back to what was encoded.
    #[test]
    fn query_strings_round_trip(pairs in prop::collection::vec(("[a-z]{1,8}", "\\PC{0,16}"), 0..6)) {
        let encode = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
        let query = pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&");
        let parsed = wasm_kubelet::streaming::remotecommand::parse_query(&query);
        prop_assert_eq!(parsed, pairs);
    }

    /// Container-log query parameters: arbitrary names and values never panic.
    #[test]
    fn container_log_queries_never_panic(pairs in prop::collection::vec((prop_oneof![Just("follow".to_string()), Just("previous".to_string()), Just("timestamps".to_string()), Just("tailLines".to_string()), Just("limitBytes".to_string()), Just("sinceSeconds".to_string()), Just("sinceTime".to_string()), Just("stream".to_string()), "\\PC{0,10}"], prop_oneof!["-?[0-9]{1,25}", "\\PC{0,30}", Just("9223372036854775807".to_string()), Just("-9223372036854775808".to_string())]), 0..8)) {
        let _ = wasm_kubelet::server::logs::LogOptions::parse(&pairs, jiff::Timestamp::now());
    }

    /// Static pod manifests: arbitrary text never panics.
    #[test]
    fn static_manifests_of_arbitrary_text_never_panic(text in "\\PC{0,400}") {
        let origin = wasm_kubelet::pods::static_source::Origin::File("/etc/kubernetes/manifests/x.yaml".into());
        let _ = wasm_kubelet::pods::static_source::parse_manifest(&text, &origin, "node");
    }

    /// Manifests built from pod-shaped fragments (so parsing reaches validation) never panic.
    #[test]
    fn static_manifests_of_pod_fragments_never_panic(
        kind in prop_oneof![Just("Pod"), Just("List"), Just("PodList"), Just("Other"), Just("")],
        name in prop_oneof!["[a-z0-9.-]{0,70}", "\\PC{0,20}"],
        namespace in prop_oneof![Just(None), "[a-z0-9-]{0,70}".prop_map(Some)],
        image in "\\PC{0,30}",
        extra in prop_oneof![Just(""), Just("  hostNetwork: true\n"), Just("  volumes: [{name: v, hostPath: {path: /}}]\n"), Just("  containers: null\n"), Just("  containers: [1, 2]\n")],
        documents in 1usize..4,
    ) {
        let ns = namespace.map(|n| format!("  namespace: \"{n}\"\n")).unwrap_or_default();
        let doc = format!("apiVersion: v1\nkind: {kind}\nmetadata:\n  name: {name:?}\n{ns}spec:\n  containers:\n  - name: c\n    image: {image:?}\n{extra}");
        let text = vec![doc; documents].join("---\n");
        let origin = wasm_kubelet::pods::static_source::Origin::Url("http://127.0.0.1/m".into());
        let _ = wasm_kubelet::pods::static_source::parse_manifest(&text, &origin, "node");
    }
}

/// A header block whose one name is repeated per NUL-separated value: within the inflate cap,
/// but decoded naively it copies the name a quarter of a million times.
#[test]
fn spdy_nul_split_header_bomb_is_refused() {
    let frame = syn_stream_with_block(&raw_block(1, &[(vec![b'n'; 512], vec![0u8; 255 * 1024])]));
    let mut hd = HeaderDecompressor::new();
    let (frames, error) = read_all(&frame, &mut hd);
    assert!(
        frames.is_empty(),
        "the block decoded to {} frames",
        frames.len()
    );
    assert!(
        error.is_some_and(|e| e.contains("headers")),
        "refused as too many headers"
    );
}

/// A zlib bomb: a small frame that inflates to 16 MiB is refused while inflating.
#[test]
fn spdy_zlib_bomb_is_refused() {
    let frame = syn_stream_with_block(&raw_block(1, &[(b"a".to_vec(), vec![b'a'; 16 << 20])]));
    // Under the control-frame cap, so it is the inflater that refuses it.
    assert!(
        frame.len() < spdy::MAX_HEADER_BLOCK / 2,
        "the bomb is small on the wire: {}",
        frame.len()
    );
    let mut hd = HeaderDecompressor::new();
    let (frames, error) = read_all(&frame, &mut hd);
    assert!(frames.is_empty());
    assert!(
        error.is_some_and(|e| e.contains("inflates past")),
        "refused while inflating"
    );
}

/// A YAML alias bomb ("billion laughs") as a static manifest is refused, not expanded.
#[test]
fn static_manifest_alias_bomb_is_refused() {
    let mut text = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let mut prev = 'a';
    for name in "bcdefghij".chars() {
        text.push_str(&format!("{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
        prev = name;
    }
    text.push_str("kind: Pod\n");
    let origin = wasm_kubelet::pods::static_source::Origin::File("/m.yaml".into());
    let started = std::time::Instant::now();
    let result = wasm_kubelet::pods::static_source::parse_manifest(&text, &origin, "node");
    assert!(result.is_err(), "an alias bomb is not a manifest");
    eprintln!("alias bomb refused in {:?}", started.elapsed());
}
