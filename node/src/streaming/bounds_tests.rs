//! What a hostile SPDY peer can make a session hold: streams it opens and the server refuses
//! or forgets, a consumer that went away while the peer kept sending, and frames sent by a
//! peer that never reads the replies. Each test plays the peer over an in-memory pipe.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use super::spdy::*;

struct Peer {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    hc: HeaderCompressor,
    hd: HeaderDecompressor,
    next_id: u32,
}

impl Peer {
    fn new(io: DuplexStream) -> Peer {
        let (rd, wr) = tokio::io::split(io);
        Peer {
            rd,
            wr,
            hc: HeaderCompressor::new().unwrap(),
            hd: HeaderDecompressor::new(),
            next_id: 1,
        }
    }

    async fn send(&mut self, frame: Frame) {
        let bytes = encode_frame(&frame, &mut self.hc).unwrap();
        self.wr.write_all(&bytes).await.unwrap();
    }

    async fn open(&mut self) -> u32 {
        let stream_id = self.next_id;
        self.next_id += 2;
        self.send(Frame::SynStream {
            stream_id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: Headers::new().with("streamtype", "data"),
        })
        .await;
        stream_id
    }

    async fn next(&mut self) -> Frame {
        tokio::time::timeout(
            Duration::from_secs(10),
            read_frame(&mut self.rd, &mut self.hd),
        )
        .await
        .expect("timed out waiting for a frame")
        .expect("a well-formed frame")
        .expect("the session is open")
    }
}

/// A peer may not make the session hold more than [`MAX_OPEN_STREAMS`]: one over it is
/// refused; streams the server rejected do not count, so the peer cannot fill the table with
/// streams nobody serves.
#[tokio::test]
async fn open_streams_are_capped_and_rejected_ones_forgotten() {
    let (server_io, peer_io) = tokio::io::duplex(1 << 20);
    let mut session = Session::new(server_io, SessionConfig::default());
    let mut peer = Peer::new(peer_io);
    // Reject twice the cap's worth of streams: none of them may linger.
    let rejecting = tokio::spawn(async move {
        for _ in 0..2 * MAX_OPEN_STREAMS {
            session.accept().await.expect("a stream").reject(RST_CANCEL);
        }
        session
    });
    let mut resets = 0;
    for _ in 0..2 * MAX_OPEN_STREAMS {
        peer.open().await;
    }
    while resets < 2 * MAX_OPEN_STREAMS {
        if let Frame::RstStream { status, .. } = peer.next().await {
            assert_eq!(
                status, RST_CANCEL,
                "rejected by the application, not refused by the cap"
            );
            resets += 1;
        }
    }
    let mut session = rejecting.await.unwrap();
    // Now hold streams open: the cap's worth are accepted, the next is refused.
    let mut held = Vec::new();
    for _ in 0..MAX_OPEN_STREAMS {
        peer.open().await;
        held.push(
            session
                .accept()
                .await
                .expect("a stream within the cap")
                .accept()
                .expect("accepted"),
        );
    }
    let over = peer.open().await;
    loop {
        match peer.next().await {
            Frame::RstStream { stream_id, status } => {
                assert_eq!((stream_id, status), (over, RST_REFUSED_STREAM));
                break;
            }
            Frame::SynReply { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Closing one held stream makes room again.
    let closed = held.pop().unwrap();
    let closed_id = closed.id();
    drop(closed);
    peer.send(Frame::RstStream {
        stream_id: closed_id,
        status: RST_CANCEL,
    })
    .await;
    let again = peer.open().await;
    let incoming = tokio::time::timeout(Duration::from_secs(10), session.accept())
        .await
        .expect("a stream after room was made")
        .expect("open");
    assert_eq!(incoming.id(), again);
}

/// A consumer that stops reading and goes away while the peer keeps sending (past the
/// stream's unconsumed budget) must not stall the session: other streams still get their
/// data, and the dead stream's data is credited back to the session window.
#[tokio::test]
async fn a_consumer_gone_mid_stream_does_not_stall_the_session() {
    let (server_io, peer_io) = tokio::io::duplex(1 << 20);
    let config = SessionConfig {
        max_unconsumed_per_stream: 1024,
        ..SessionConfig::default()
    };
    let mut session = Session::new(server_io, config);
    let mut peer = Peer::new(peer_io);
    let a = peer.open().await;
    let b = peer.open().await;
    let stream_a = session.accept().await.unwrap().accept().unwrap();
    let mut stream_b = session.accept().await.unwrap().accept().unwrap();
    // Past A's budget: the reader waits for A's consumer...
    for _ in 0..4 {
        peer.send(Frame::Data {
            stream_id: a,
            flags: 0,
            data: Bytes::from(vec![b'a'; 1024]),
        })
        .await;
    }
    peer.send(Frame::Data {
        stream_id: b,
        flags: 0,
        data: Bytes::from_static(b"for b"),
    })
    .await;
    // ...which goes away instead of reading.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stream_a);
    let got = tokio::time::timeout(Duration::from_secs(10), stream_b.recv())
        .await
        .expect("B's data arrives although A's consumer left")
        .unwrap();
    assert_eq!(&got[..], b"for b");
    // A's data beyond what was delivered is credited to the session.
    peer.send(Frame::Data {
        stream_id: a,
        flags: 0,
        data: Bytes::from(vec![b'a'; 40 * 1024]),
    })
    .await;
    loop {
        if let Frame::WindowUpdate { stream_id: 0, .. } = peer.next().await {
            break;
        }
    }
}

/// A peer that floods PINGs (each answered) and never reads the answers: the server stops
/// reading once its queue of replies is full, so the flood cannot all be written, instead of
/// the server queueing a reply per PING without limit.
#[tokio::test(start_paused = true)]
async fn a_peer_that_never_reads_cannot_grow_the_write_queue() {
    let (server_io, peer_io) = tokio::io::duplex(4096);
    let _session = Session::new(server_io, SessionConfig::default());
    let (_unread, mut wr) = tokio::io::split(peer_io);
    let mut hc = HeaderCompressor::new().unwrap();
    let mut flood = Vec::new();
    for id in 0..200_000u32 {
        flood.extend(encode_frame(&Frame::Ping { id: 2 * id + 1 }, &mut hc).unwrap());
    }
    // Paused time: the timeout fires only once every task is blocked.
    let written = tokio::time::timeout(Duration::from_secs(60), wr.write_all(&flood)).await;
    assert!(
        written.is_err(),
        "the server kept reading PINGs whose answers nobody read"
    );
}
