//! The TLS ClientHello a client opens with, read far enough to learn its SNI: what the
//! gateway's `PASSTHROUGH` servers and the sidecar's VirtualService `tls` routes decide on
//! (Envoy's TLS inspector does the same). The bytes read are replayed to whichever path
//! then serves the connection ([`Rewind`]).
//!
//! Hand-written: rustls parses a ClientHello only inside a handshake it then owns, and the
//! proxy must forward the client's bytes untouched to a server it does not terminate.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The most ClientHello bytes buffered while looking for the SNI (Envoy's TLS inspector
/// gives up at 64 KiB too).
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Not enough bytes yet.
    Partial,
    /// Not a TLS ClientHello.
    NotTls,
    /// A whole ClientHello, with its SNI host name (lower-case) if it sent one.
    Complete(Option<String>),
}

/// Parses the ClientHello at the start of `buf` (possibly spread over several handshake
/// records) far enough to find its `server_name` extension.
pub(crate) fn parse_client_hello(buf: &[u8]) -> Hello {
    // Reassemble the handshake message from the records' fragments.
    let mut handshake = Vec::new();
    let mut at = 0;
    let needed = loop {
        let Some(header) = buf.get(at..at + 5) else {
            return if at == 0 && buf.first().is_some_and(|b| *b != 0x16) {
                Hello::NotTls
            } else {
                Hello::Partial
            };
        };
        if header[0] != 0x16 || header[1] != 0x03 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let Some(fragment) = buf.get(at + 5..at + 5 + len) else {
            return Hello::Partial;
        };
        handshake.extend_from_slice(fragment);
        at += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != 0x01 {
                return Hello::NotTls;
            }
            let body = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if handshake.len() >= 4 + body {
                break body;
            }
        }
    };
    match server_name(&handshake[4..4 + needed]) {
        Some(name) => Hello::Complete(name),
        None => Hello::NotTls,
    }
}

/// The SNI of a ClientHello body: `Some(None)` without one, `None` when malformed.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    let n = usize::from(r.u8()?);
    r.take(n)?; // session id
    let n = usize::from(r.u16()?);
    r.take(n)?; // cipher suites
    let n = usize::from(r.u8()?);
    r.take(n)?; // compression methods
    if r.0.is_empty() {
        return Some(None); // no extensions
    }
    let n = usize::from(r.u16()?);
    let mut exts = Reader(r.take(n)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let n = usize::from(exts.u16()?);
        let data = exts.take(n)?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(data);
        let n = usize::from(list.u16()?);
        let mut names = Reader(list.take(n)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let n = usize::from(names.u16()?);
            let name = names.take(n)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Reads from `stream` into `buf` until the ClientHello there is whole: its SNI. On an error
/// (the bytes are not a ClientHello, it passes 64 KiB, the client closed first) or when the
/// caller gives up waiting, `buf` still holds every byte read, for a caller that forwards the
/// connection anyway.
pub(crate) async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Option<String>> {
    loop {
        match parse_client_hello(buf) {
            Hello::Complete(sni) => return Ok(sni),
            Hello::NotTls => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a TLS ClientHello",
                ));
            }
            Hello::Partial if buf.len() >= MAX_CLIENT_HELLO => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ClientHello larger than 64 KiB",
                ));
            }
            Hello::Partial => {}
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream whose first bytes were already read: they are replayed before the rest.
pub(crate) struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, whose first bytes `prefix` were already read from it.
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Rewind<S> {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use rustls::RootCertStore;

    use super::*;

    /// A real ClientHello, as rustls writes it.
    fn client_hello(sni: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(mesh_tls::verify::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn client_hellos_give_their_sni_whole_or_not_yet() {
        let hello = client_hello("Bookinfo.Example.com");
        assert_eq!(
            parse_client_hello(&hello),
            Hello::Complete(Some("bookinfo.example.com".to_string()))
        );
        for cut in [0, 1, 5, 20, hello.len() - 1] {
            assert_eq!(
                parse_client_hello(&hello[..cut]),
                Hello::Partial,
                "cut {cut}"
            );
        }
        // An IP address is never sent as SNI.
        assert_eq!(
            parse_client_hello(&client_hello("127.0.0.1")),
            Hello::Complete(None)
        );
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        // The same handshake split over two records.
        let body = &hello[5..];
        let (a, b) = body.split_at(40);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            parse_client_hello(&split),
            Hello::Complete(Some("bookinfo.example.com".to_string()))
        );
    }
}
