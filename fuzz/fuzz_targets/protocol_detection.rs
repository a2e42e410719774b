//! Protocol detection: `mesh_proxy::detect` on arbitrary first bytes of a connection.
//!
//! Input: byte 0 chooses the mode (how the client's bytes are chunked, whether it closes or
//! stays silent after them, how the rewound stream is read); the rest is what the client sends.
//!
//! Exercised, none of which may panic:
//! - `classify` on the input and on every prefix of it (the first 64 bytes; past them nothing
//!   can change, see below);
//! - `detect_by_reading` over an in-memory `tokio::io::duplex` pipe on a current-thread runtime
//!   with a paused clock (so the 100 ms bound of a silent client elapses at once), with the
//!   client's bytes written in fuzzer-chosen chunks;
//! - reading the returned `Rewind` to the end in fuzzer-chosen read sizes, and a `Rewind`
//!   built directly over a `&[u8]` reader with a fuzzer-chosen prefix split; writes through
//!   `Rewind` to the underlying stream.
//!
//! Properties checked (all from `detect.rs`: the doc of `classify` — "`None` while they are a
//! prefix of something HTTP or TLS" —, the callers classifying a growing buffer, and the
//! 16-byte peek/read buffers):
//! 1. `classify` is stable: once a prefix decides, every longer input decides the same.
//! 2. `classify` is `None` only for the empty input, a lone `0x16` (a TLS record type whose
//!    version byte is still missing), or a proper prefix of one of the request-line methods
//!    (`GET `, …, `PRI `): checked against an independent copy of the documented method list.
//!    `Http` only when the input starts with such a method, `Tls` only for `0x16 0x03`.
//! 3. Any 16 bytes decide (`classify` is `Some`): `detect`/`detect_by_reading` look at no
//!    more than 16 bytes, so an undecided 16-byte prefix would stall detection until the
//!    timeout.
//! 4. `detect_by_reading` answers `classify(first min(len,16) bytes)`, or `Opaque` when those
//!    do not decide (the client closed or went silent), however the bytes were chunked.
//! 5. `Rewind` loses and duplicates nothing: reading it yields exactly the client's bytes, in
//!    order, then end of stream once the client has closed.
//! 6. `mesh_tls::detect::looks_like_tls` (PERMISSIVE mode's TLS-or-plaintext test, the same
//!    `0x16 0x03` record header) agrees with `classify` on every prefix: TLS exactly when
//!    `classify` says `Tls`, undecided exactly for the empty input and a lone `0x16`.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_proxy::detect::{DETECT_TIMEOUT, Protocol, Rewind, classify, detect_by_reading};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The request-line methods `detect.rs` documents ("RFC 9110 and WebDAV's common ones, plus
/// the HTTP/2 preface's `PRI`"), each with the space that ends it: the oracle for property 2.
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
    b"PRI ",
    b"PROPFIND ",
    b"PROPPATCH ",
    b"MKCOL ",
    b"COPY ",
    b"MOVE ",
    b"LOCK ",
    b"UNLOCK ",
];

/// How many bytes detection looks at (`detect`'s peek buffer, `detect_by_reading`'s chunk).
const DETECT_WINDOW: usize = 16;

fn runtime() -> &'static tokio::runtime::Runtime {
    thread_local! {
        static RT: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("a current-thread runtime"),
        ));
    }
    RT.with(|rt| *rt)
}

fn check_classify(data: &[u8]) {
    let mut decided: Option<(usize, Protocol)> = None;
    // Past 16 bytes everything has decided (property 3), so 64 is plenty for property 1.
    for len in 0..=data.len().min(64) {
        let prefix = &data[..len];
        let got = classify(prefix);
        match got {
            None => {
                let undecided_ok = prefix.is_empty()
                    || prefix == [0x16]
                    || METHODS
                        .iter()
                        .any(|m| prefix.len() < m.len() && m.starts_with(prefix));
                assert!(
                    undecided_ok,
                    "classify({prefix:?}) is None, but it is no prefix of a method or of a TLS record"
                );
                assert!(
                    len < DETECT_WINDOW,
                    "classify of {len} bytes ({prefix:?}) is still undecided"
                );
            }
            Some(Protocol::Http) => assert!(
                METHODS.iter().any(|m| prefix.starts_with(m)),
                "classify({prefix:?}) is Http, but it starts with no method"
            ),
            Some(Protocol::Tls) => assert!(
                prefix.starts_with(&[0x16, 0x03]),
                "classify({prefix:?}) is Tls without 0x16 0x03"
            ),
            Some(Protocol::Opaque) => {}
        }
        let tls = mesh_tls::detect::looks_like_tls(prefix);
        assert_eq!(
            tls == Some(true),
            got == Some(Protocol::Tls),
            "looks_like_tls({prefix:?}) = {tls:?} but classify = {got:?}"
        );
        assert_eq!(
            tls.is_none(),
            prefix.is_empty() || prefix == [0x16],
            "looks_like_tls({prefix:?}) = {tls:?}"
        );
        match (decided, got) {
            (Some((at, first)), now) => assert_eq!(
                now,
                Some(first),
                "classify decided {first:?} at {at} bytes but says {now:?} at {len} ({prefix:?})"
            ),
            (None, Some(now)) => decided = Some((len, now)),
            (None, None) => {}
        }
    }
    // The whole input, however long, agrees with the first decision.
    if let Some((at, first)) = decided {
        assert_eq!(
            classify(data),
            Some(first),
            "classify decided {first:?} at {at} bytes but not on the whole input"
        );
    }
}

/// Reads `io` to its end in reads of the given sizes (cycled; 0 means a 1-byte read).
async fn read_all<R: tokio::io::AsyncRead + Unpin>(mut io: R, sizes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    for i in 0.. {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(256, |&s| usize::from(s).max(1));
        let n = io
            .read(&mut buf[..size])
            .await
            .expect("reading from memory");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    check_classify(data);

    let window = &data[..data.len().min(DETECT_WINDOW)];
    let expected = classify(window).unwrap_or(Protocol::Opaque);
    // Mode bits: 0-2 the chunk size the client writes in (0: all at once), 3 whether the
    // client stays open (silent) after its bytes, 4-7 the reader's read size.
    let chunk = match mode & 0x07 {
        0 => data.len().max(1),
        n => usize::from(n),
    };
    let silent = mode & 0x08 != 0;
    let read_size = [(mode >> 4).max(1)];

    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(64);
        let payload = data.to_vec();
        let writer = tokio::spawn(async move {
            for piece in payload.chunks(chunk) {
                client.write_all(piece).await.expect("writing to the pipe");
                tokio::task::yield_now().await;
            }
            if silent {
                // Hold the connection open without a word until told to close.
                Some(client)
            } else {
                drop(client);
                None
            }
        });
        let (got, mut rewound) = detect_by_reading(server, DETECT_TIMEOUT)
            .await
            .expect("detection over memory does not fail");
        assert_eq!(
            got, expected,
            "detect_by_reading of {data:?} (chunks of {chunk}, silent: {silent})"
        );

        let mut seen = vec![0u8; data.len()];
        rewound
            .read_exact(&mut seen)
            .await
            .expect("the rewound stream yields every byte the client sent");
        assert_eq!(seen, data, "Rewind lost or reordered bytes");
        let client = writer.await.expect("the writer task");
        // Writes pass through to the client's side.
        if let Some(mut client) = client {
            rewound.write_all(b"pong").await.expect("writing back");
            let mut back = [0u8; 4];
            client
                .read_exact(&mut back)
                .await
                .expect("the client reads");
            assert_eq!(&back, b"pong");
            drop(client);
        }
        let mut rest = Vec::new();
        rewound
            .read_to_end(&mut rest)
            .await
            .expect("reading to the end");
        assert!(rest.is_empty(), "Rewind yielded {} extra bytes", rest.len());

        // A second pass with small reads from the start, and a silent client timing out.
        let (mut client, server) = tokio::io::duplex(data.len().max(1));
        client.write_all(data).await.expect("writing to the pipe");
        let (got, rewound) = detect_by_reading(server, Duration::from_millis(5))
            .await
            .expect("detection over memory does not fail");
        assert_eq!(got, expected, "detect_by_reading (all at once, silent)");
        drop(client);
        let all = read_all(rewound, &read_size).await;
        assert_eq!(all, data, "Rewind read in {}-byte reads", read_size[0]);

        // Rewind over a plain reader, the prefix split anywhere.
        let split = usize::from(mode) % (data.len() + 1);
        let (prefix, tail) = data.split_at(split);
        let all = read_all(Rewind::new(prefix.to_vec(), tail), &read_size).await;
        assert_eq!(all, data, "Rewind::new split at {split}");
    });
});
