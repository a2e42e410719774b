//! Telling a TLS ClientHello from plaintext on an accepted connection, for PERMISSIVE mode.
//!
//! Istio's PERMISSIVE `PeerAuthentication` accepts mTLS and plaintext on the same port; Envoy's
//! `tls_inspector` decides by the first bytes. A TLS connection opens with a handshake record:
//! content type `0x16`, then the record version's major byte `0x03`. Nothing else the mesh
//! carries starts that way (HTTP/1 starts with a method, the HTTP/2 preface with `PRI`).
//!
//! The bytes are peeked, not read, so whichever side handles the connection sees it whole. A
//! client that waits for the server to speak first sends nothing: after the timeout the
//! connection counts as plaintext rather than stalling.

use std::time::Duration;

use tokio::net::TcpStream;

/// TLS record content type `handshake`.
const HANDSHAKE: u8 = 0x16;
/// Major byte of every TLS (and SSL 3.0) record version.
const MAJOR_VERSION: u8 = 0x03;

/// Whether `prefix`, the first bytes of a connection, opens a TLS handshake; `None` when more
/// bytes are needed to tell.
pub fn looks_like_tls(prefix: &[u8]) -> Option<bool> {
    match prefix {
        [] => None,
        [first, ..] if *first != HANDSHAKE => Some(false),
        [_] => None,
        [_, major, ..] => Some(*major == MAJOR_VERSION),
    }
}

/// Peeks at `stream` until its first bytes say TLS or not. `false` for plaintext, for a
/// connection closed before sending anything, and when nothing decisive arrived within
/// `timeout`.
pub async fn is_tls(stream: &TcpStream, timeout: Duration) -> std::io::Result<bool> {
    match tokio::time::timeout(timeout, peek_decision(stream)).await {
        Ok(result) => result,
        Err(_elapsed) => Ok(false),
    }
}

async fn peek_decision(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 2];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        if let Some(decision) = looks_like_tls(&buf[..n]) {
            return Ok(decision);
        }
        // One byte (0x16) so far: `peek` would return it again at once, so wait a moment for
        // the rest of the record header rather than spin.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(looks_like_tls(b""), None);
        assert_eq!(looks_like_tls(&[0x16]), None);
        assert_eq!(looks_like_tls(&[0x16, 0x03]), Some(true));
        assert_eq!(looks_like_tls(&[0x16, 0x03, 0x01, 0x02, 0x00]), Some(true));
        assert_eq!(looks_like_tls(&[0x16, 0x02]), Some(false));
        assert_eq!(looks_like_tls(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(looks_like_tls(b"PRI * HTTP/2.0\r\n"), Some(false));
        assert_eq!(looks_like_tls(b"G"), Some(false));
        // An application-data record is not a handshake.
        assert_eq!(looks_like_tls(&[0x17, 0x03]), Some(false));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn plaintext_is_not_tls_and_nothing_is_consumed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, mut server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(!is_tls(&server, Duration::from_secs(5)).await.unwrap());
        let mut buf = [0u8; 3];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET");
    }

    #[tokio::test]
    async fn a_split_record_header_is_waited_for() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = pair().await;
        client.write_all(&[0x16]).await.unwrap();
        let decide = tokio::spawn(async move { is_tls(&server, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(&[0x03, 0x01]).await.unwrap();
        assert!(decide.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn silence_and_eof_count_as_plaintext() {
        let (client, server) = pair().await;
        let started = std::time::Instant::now();
        assert!(!is_tls(&server, Duration::from_millis(50)).await.unwrap());
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(client);
        assert!(!is_tls(&server, Duration::from_secs(5)).await.unwrap());
    }
}
