//! Protocol detection on a captured connection: HTTP/1.x, the HTTP/2 preface, a TLS
//! ClientHello, or anything else (opaque TCP), from the first bytes the client sends.
//!
//! Envoy's HTTP inspector and TLS inspector do the same by peeking: nothing is consumed, so
//! whichever path serves the connection reads it from its first byte. Detection waits at
//! most a short bound for the client to speak; a client that says nothing by then is served
//! as opaque TCP — a server-speaks-first protocol (MySQL, SMTP) gets its greeting through at
//! once instead of stalling, which is what a port declared `TCP` avoids entirely.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long a captured connection may stay silent before it is treated as opaque TCP
/// (Istio's former protocol sniffing timeout).
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

/// What the first bytes said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line or the HTTP/2 connection preface.
    Http,
    /// A TLS record (a ClientHello).
    Tls,
    /// Anything else, or silence past the bound.
    Opaque,
}

/// The request-line methods of RFC 9110 and WebDAV's common ones, plus the HTTP/2 preface's
/// `PRI`, each followed by the space that ends it.
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

/// Decides from `bytes` if it can: `None` while they are a prefix of something HTTP or TLS.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    if bytes[0] == 0x16 {
        // A TLS handshake record: content type 22, then major version 3.
        return match bytes.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    let mut undecided = false;
    for method in METHODS {
        let n = bytes.len().min(method.len());
        if bytes[..n] == method[..n] {
            if n == method.len() {
                return Some(Protocol::Http);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// Peeks at `stream` until its first bytes decide, for at most `timeout`. A connection that
/// closes or stays silent is opaque.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Protocol> {
    let peek = async {
        let mut buf = [0u8; 16];
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Ok(Protocol::Opaque);
            }
            if let Some(decided) = classify(&buf[..n]) {
                return Ok(decided);
            }
            // `peek` returns the same partial bytes at once: wait a moment for more.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    match tokio::time::timeout(timeout, peek).await {
        Ok(result) => result,
        Err(_elapsed) => Ok(Protocol::Opaque),
    }
}

/// Detection on a stream that cannot be peeked (a TLS session): reads the first bytes (for
/// at most `timeout`), classifies them, and hands back a stream that replays them first.
pub async fn detect_by_reading<IO>(
    mut io: IO,
    timeout: Duration,
) -> io::Result<(Protocol, Rewind<IO>)>
where
    IO: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(16);
    let read = async {
        let mut chunk = [0u8; 16];
        loop {
            let want = chunk.len() - buf.len().min(chunk.len());
            if want == 0 {
                return Ok::<_, io::Error>(Protocol::Opaque);
            }
            let n = io.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Ok(Protocol::Opaque);
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(decided) = classify(&buf) {
                return Ok(decided);
            }
        }
    };
    let protocol = match tokio::time::timeout(timeout, read).await {
        Ok(result) => result?,
        Err(_elapsed) => Protocol::Opaque,
    };
    Ok((protocol, Rewind::new(buf, io)))
}

pin_project_lite::pin_project! {
    /// `io` with `prefix` (bytes already read from it) served first.
    pub struct Rewind<IO> {
        prefix: Vec<u8>,
        pos: usize,
        #[pin]
        io: IO,
    }
}

impl<IO> Rewind<IO> {
    pub fn new(prefix: Vec<u8>, io: IO) -> Rewind<IO> {
        Rewind { prefix, pos: 0, io }
    }
}

impl<IO: AsyncRead> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.pos < this.prefix.len() {
            let rest = &this.prefix[*this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            *this.pos += n;
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"DELETE /x"), Some(Protocol::Http));
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PUX"), Some(Protocol::Opaque));
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Protocol::Tls));
        assert_eq!(classify(&[0x16, 0x00]), Some(Protocol::Opaque));
        // A MySQL client's first packet, a Redis command, SSH.
        assert_eq!(classify(b"\x20\x00\x00\x01"), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        // A lowercase method is not HTTP.
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn reading_detection_replays_what_it_read() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
        let (got, mut rewound) = detect_by_reading(server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Protocol::Http);
        client.write_all(b"rest").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"POST /x HTTP/1.1\r\nrest");

        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"\x00\x01binary").await.unwrap();
        let (got, _) = detect_by_reading(server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Protocol::Opaque);
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let got = detect(&server, Duration::from_millis(20)).await.unwrap();
        assert_eq!(got, Protocol::Opaque);
    }

    #[tokio::test]
    async fn http_is_detected_without_consuming_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let got = detect(&server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, Protocol::Http);
        let mut first = [0u8; 3];
        server.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET");
    }
}
