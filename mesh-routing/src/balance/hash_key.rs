//! Request hash keys for consistent hashing (Istio's `consistentHash` keys, Envoy's hash
//! policies), all hashed with xxHash64 (seed 0) as Envoy does:
//!
//! - `httpHeaderName`: the header's value (several values: sorted, then hashed together).
//! - `httpCookie`: the cookie's value (surrounding quotes removed). When the request has no
//!   such cookie and the policy has a `ttl`, one is generated as Envoy generates it: the hex
//!   xxHash64 of the client's and listener's addresses (so concurrent requests on one
//!   connection agree), random without them. The request is hashed *on the generated value*,
//!   so the endpoint it goes to is the one the cookie will keep choosing, and the response
//!   carries `Set-Cookie: name="value"; Max-Age=ttl; Path=path[; attributes]; HttpOnly`
//!   (no `Max-Age` for a zero ttl: a session cookie). Without a `ttl` nothing is generated.
//! - `useSourceIp`: the client IP as text (`ClientInfo.remote`).
//! - `httpQueryParameterName`: the parameter's raw value (the first occurrence).
//!
//! A request without its key gets no hash, and the balancer hashes a random number instead:
//! Envoy's behaviour, which spreads keyless requests over the table by weight.

use std::fmt::{self, Write as _};

use http::Request;
use http::header::{COOKIE, HeaderMap, HeaderValue};
use mesh_core::config::networking::HttpCookie;
use mesh_core::conn::ClientInfo;
use xxhash_rust::xxh64::{Xxh64, xxh64};

use super::policy::HashOn;

/// Hashes a key as every consistent-hash policy here does (xxHash64, seed 0); use it to
/// build keys for [`Balancer::hash_by`](super::Balancer::hash_by).
pub fn hash_key(key: impl AsRef<[u8]>) -> u64 {
    xxh64(key.as_ref(), 0)
}

/// The hash of a request, and the cookie to set on its response if one was generated.
#[derive(Debug, Default)]
pub(crate) struct RequestKey {
    pub(crate) hash: Option<u64>,
    pub(crate) set_cookie: Option<HeaderValue>,
}

pub(crate) fn request_key<B>(on: &HashOn<'_>, req: &Request<B>) -> RequestKey {
    let hash = match on {
        HashOn::Nothing => None,
        HashOn::Header(name) => header_hash(req.headers(), name),
        HashOn::Cookie(cookie) => {
            return match find_cookie(req.headers(), &cookie.name) {
                Some(value) => RequestKey {
                    hash: Some(hash_key(value)),
                    set_cookie: None,
                },
                None => generate_cookie(cookie, req.extensions().get::<ClientInfo>()),
            };
        }
        HashOn::SourceIp => req.extensions().get::<ClientInfo>().map(|client| {
            let mut buf = StackStr::default();
            // An IP address is at most 45 characters: the buffer always fits it.
            let _ = write!(buf, "{}", client.remote.ip());
            hash_key(buf.as_bytes())
        }),
        HashOn::QueryParameter(name) => req
            .uri()
            .query()
            .and_then(|q| query_value(q, name))
            .map(hash_key),
    };
    RequestKey {
        hash,
        set_cookie: None,
    }
}

fn header_hash(headers: &HeaderMap, name: &str) -> Option<u64> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(hash_key(first.as_bytes()));
    };
    // Several values: order-independent, as Envoy.
    let mut all: Vec<&[u8]> = [first, second]
        .into_iter()
        .chain(values)
        .map(HeaderValue::as_bytes)
        .collect();
    all.sort_unstable();
    let mut hasher = Xxh64::new(0);
    for value in all {
        hasher.update(value);
    }
    Some(hasher.digest())
}

/// The value of cookie `name`, without surrounding quotes.
fn find_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let (key, value) = split_once(pair.trim_ascii(), b'=')?;
            (key == name.as_bytes()).then(|| {
                let value = value.trim_ascii();
                value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value)
            })
        })
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a [u8]> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value.as_bytes())
    })
}

fn split_once(bytes: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|&b| b == sep)?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

fn generate_cookie(cookie: &HttpCookie, client: Option<&ClientInfo>) -> RequestKey {
    let Some(ttl) = cookie.ttl else {
        return RequestKey::default();
    };
    let seed = match client {
        Some(c) => {
            let mut buf = StackStr::default();
            let _ = write!(buf, "{}{}", c.remote, c.local);
            hash_key(buf.as_bytes())
        }
        None => fastrand::u64(..),
    };
    let value = format!("{seed:016x}");
    let mut header = format!("{}=\"{value}\"", cookie.name);
    let ttl = ttl.get().as_secs();
    if ttl > 0 {
        let _ = write!(header, "; Max-Age={ttl}");
    }
    if let Some(path) = cookie.path.as_deref().filter(|p| !p.is_empty()) {
        let _ = write!(header, "; Path={path}");
    }
    for attr in &cookie.attributes {
        match attr.value.as_deref().filter(|v| !v.is_empty()) {
            Some(v) => {
                let _ = write!(header, "; {}={v}", attr.name);
            }
            None => {
                let _ = write!(header, "; {}", attr.name);
            }
        }
    }
    header.push_str("; HttpOnly");
    RequestKey {
        hash: Some(hash_key(&value)),
        // A name or path the config let through that a header cannot carry: no cookie, the
        // request is still hashed consistently with the value.
        set_cookie: HeaderValue::try_from(header).ok(),
    }
}

/// A small string on the stack, for formatting addresses without allocating.
struct StackStr {
    buf: [u8; 128],
    len: usize,
}

impl Default for StackStr {
    fn default() -> Self {
        StackStr {
            buf: [0; 128],
            len: 0,
        }
    }
}

impl StackStr {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::Duration;
    use mesh_core::config::networking::CookieAttribute;

    fn cookie_policy(ttl: Option<u64>) -> HttpCookie {
        HttpCookie {
            name: "session".into(),
            path: Some("/".into()),
            ttl: ttl.map(Duration::from_secs),
            attributes: vec![CookieAttribute {
                name: "SameSite".into(),
                value: Some("Lax".into()),
            }],
        }
    }

    #[test]
    fn header_values_hash_in_any_order() {
        let one = Request::builder()
            .header("x-user", "a")
            .header("x-user", "b")
            .body(())
            .unwrap();
        let other = Request::builder()
            .header("x-user", "b")
            .header("x-user", "a")
            .body(())
            .unwrap();
        let on = HashOn::Header("X-User");
        assert_eq!(request_key(&on, &one).hash, request_key(&on, &other).hash);
        let single = Request::builder().header("x-user", "a").body(()).unwrap();
        assert_eq!(request_key(&on, &single).hash, Some(hash_key("a")));
        assert_eq!(request_key(&on, &Request::new(())).hash, None);
    }

    #[test]
    fn cookies_are_found_and_unquoted() {
        let policy = cookie_policy(None);
        let on = HashOn::Cookie(&policy);
        let req = Request::builder()
            .header("cookie", "a=1; session=\"abc\"")
            .body(())
            .unwrap();
        let key = request_key(&on, &req);
        assert_eq!(key.hash, Some(hash_key("abc")));
        assert!(key.set_cookie.is_none());
        // Absent, and no ttl: nothing generated, no hash.
        let key = request_key(&on, &Request::new(()));
        assert_eq!((key.hash, key.set_cookie), (None, None));
    }

    #[test]
    fn a_generated_cookie_hashes_like_its_value() {
        let policy = cookie_policy(Some(3600));
        let on = HashOn::Cookie(&policy);
        let mut req = Request::new(());
        req.extensions_mut().insert(ClientInfo {
            remote: "10.0.0.9:5555".parse().unwrap(),
            local: "127.0.0.1:15001".parse().unwrap(),
            tls: false,
        });
        let key = request_key(&on, &req);
        let set = key.set_cookie.unwrap();
        let set = set.to_str().unwrap();
        assert!(set.starts_with("session=\""), "{set}");
        assert!(
            set.ends_with("\"; Max-Age=3600; Path=/; SameSite=Lax; HttpOnly"),
            "{set}"
        );
        let value = &set["session=\"".len()..set.find("\";").unwrap()];
        assert_eq!(value.len(), 16);
        assert_eq!(key.hash, Some(hash_key(value)));
        // The same connection gets the same cookie.
        assert_eq!(request_key(&on, &req).hash, key.hash);
        // A zero ttl makes a session cookie.
        let policy = cookie_policy(Some(0));
        let set = request_key(&HashOn::Cookie(&policy), &req)
            .set_cookie
            .unwrap();
        assert!(!set.to_str().unwrap().contains("Max-Age"));
    }

    #[test]
    fn source_ip_and_query_parameters() {
        let mut req = Request::builder()
            .uri("/p?a=1&user=alice&user=bob")
            .body(())
            .unwrap();
        assert_eq!(
            request_key(&HashOn::QueryParameter("user"), &req).hash,
            Some(hash_key("alice"))
        );
        assert_eq!(request_key(&HashOn::QueryParameter("b"), &req).hash, None);
        assert_eq!(request_key(&HashOn::SourceIp, &req).hash, None);
        req.extensions_mut().insert(ClientInfo {
            remote: "[2001:db8::1]:5555".parse().unwrap(),
            local: "127.0.0.1:15001".parse().unwrap(),
            tls: false,
        });
        assert_eq!(
            request_key(&HashOn::SourceIp, &req).hash,
            Some(hash_key("2001:db8::1"))
        );
    }
}
