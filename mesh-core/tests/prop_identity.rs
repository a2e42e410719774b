//! SPIFFE ID parsing as properties, checked against the SPIFFE ID specification
//! (`standards/SPIFFE-ID.md`, sections 2 to 2.3):
//!
//! - scheme `spiffe` (lower case, as the reference implementations require), then `://`;
//! - a trust domain of 1 to 255 bytes that holds only `[a-z0-9.-_]` (so no user info, no
//!   port, no percent-encoding, no upper case);
//! - an optional path whose segments are not empty, not `.` or `..`, hold only
//!   `[a-zA-Z0-9.-_]`, with no trailing `/`;
//! - no query and no fragment;
//! - implementations must support IDs up to 2048 bytes (this one rejects longer ones).
//!
//! `spec_valid` below is that list written out independently of `mesh_core::identity`; the
//! properties compare the parser with it on valid IDs, on IDs broken in one specific way,
//! and on arbitrary text.

#![allow(clippy::unwrap_used)]

use mesh_core::Identity;
use proptest::prelude::*;

const MAX_LEN: usize = 2048;
/// The trust domain's bound (RFC 3986's on a host).
const MAX_DOMAIN_LEN: usize = 255;

fn trust_domain_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// The specification's rules, as listed in the module docs.
fn spec_valid(id: &str) -> bool {
    if id.len() > MAX_LEN {
        return false;
    }
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if domain.is_empty() || domain.len() > MAX_DOMAIN_LEN || !domain.bytes().all(trust_domain_byte)
    {
        return false;
    }
    if path.is_empty() {
        return true;
    }
    path[1..].split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment.bytes().all(segment_byte)
    })
}

fn trust_domain() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,40}"
}

/// A valid path segment (not `.` or `..`).
fn segment() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,24}".prop_filter("`.` and `..` are not segments", |s| s != "." && s != "..")
}

/// An ID with an arbitrary valid path (possibly none), often nearly Istio's shape
/// (`ns` and `sa` segments in other places or numbers).
fn valid_id() -> impl Strategy<Value = (String, String, Vec<String>)> {
    let segment = prop_oneof![
        2 => segment(),
        1 => Just("ns".to_string()),
        1 => Just("sa".to_string()),
    ];
    (trust_domain(), proptest::collection::vec(segment, 0..7)).prop_map(|(td, segments)| {
        let path: String = segments.iter().map(|s| format!("/{s}")).collect();
        (format!("spiffe://{td}{path}"), td, segments)
    })
}

/// A character the trust domain may not hold (`/` excluded: it ends the trust domain).
fn bad_domain_char() -> impl Strategy<Value = char> {
    prop_oneof![
        proptest::char::range('A', 'Z'),
        proptest::sample::select(vec![
            ':', '@', '%', '?', '#', ' ', '~', '+', '!', '$', '&', '\'', '(', ')', '*', ',', ';',
            '=', '[', ']', '\\', '\t', 'é', 'ß', '\u{0}', '\u{7f}',
        ]),
    ]
}

/// A character no path segment may hold (`/` excluded: it separates segments).
fn bad_segment_char() -> impl Strategy<Value = char> {
    proptest::sample::select(vec![
        ':', '@', '%', '?', '#', ' ', '~', '+', '!', '$', '&', '\'', '(', ')', '*', ',', ';', '=',
        '[', ']', '\\', '\t', '\n', 'é', 'ß', '\u{0}', '\u{7f}', '€', '日',
    ])
}

/// Spellings of the scheme other than exactly `spiffe://`.
fn bad_scheme() -> impl Strategy<Value = String> {
    prop_oneof![
        // `spiffe` with at least one letter upper-cased.
        (1u8..64).prop_map(|mask| {
            "spiffe"
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if mask & (1 << i) != 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .chain("://".chars())
                .collect()
        }),
        proptest::sample::select(vec![
            "",
            "http://",
            "https://",
            "spiffe:/",
            "spiffe:",
            "spiffe//",
            "spiffe:///",
            " spiffe://",
            "spife://",
            "spiffe-://",
            "urn:spiffe://",
        ])
        .prop_map(str::to_string),
    ]
}

/// An ID with exactly one defect the specification rejects, and a label for it.
fn invalid_id() -> impl Strategy<Value = (&'static str, String)> {
    let parts = || (trust_domain(), segment(), segment());
    prop_oneof![
        (bad_scheme(), parts())
            .prop_map(|(scheme, (td, ns, sa))| ("scheme", format!("{scheme}{td}/ns/{ns}/sa/{sa}"))),
        (parts(), any::<bool>()).prop_map(|((_, ns, sa), with_path)| (
            "empty trust domain",
            if with_path {
                format!("spiffe:///ns/{ns}/sa/{sa}")
            } else {
                "spiffe://".to_string()
            }
        )),
        (parts(), bad_domain_char(), any::<prop::sample::Index>()).prop_map(
            |((td, ns, sa), c, at)| {
                let mut td: Vec<char> = td.chars().collect();
                td.insert(at.index(td.len() + 1), c);
                let td: String = td.into_iter().collect();
                (
                    "trust domain character",
                    format!("spiffe://{td}/ns/{ns}/sa/{sa}"),
                )
            }
        ),
        (parts(), 1u16..).prop_map(|((td, ns, sa), port)| (
            "port",
            format!("spiffe://{td}:{port}/ns/{ns}/sa/{sa}")
        )),
        (parts(), segment()).prop_map(|((td, ns, sa), user)| (
            "user info",
            format!("spiffe://{user}@{td}/ns/{ns}/sa/{sa}")
        )),
        (parts(), bad_segment_char(), any::<prop::sample::Index>()).prop_map(
            |((td, ns, sa), c, at)| {
                let mut sa: Vec<char> = sa.chars().collect();
                sa.insert(at.index(sa.len() + 1), c);
                let sa: String = sa.into_iter().collect();
                ("path character", format!("spiffe://{td}/ns/{ns}/sa/{sa}"))
            }
        ),
        (parts(), "[0-9A-F]{2}").prop_map(|((td, ns, sa), hex)| (
            "percent-encoding",
            format!("spiffe://{td}/ns/{ns}/sa/{sa}%{hex}")
        )),
        (parts(), "[a-z0-9=&]{0,10}", any::<bool>()).prop_map(|((td, ns, sa), tail, query)| (
            "query or fragment",
            format!(
                "spiffe://{td}/ns/{ns}/sa/{sa}{}{tail}",
                if query { '?' } else { '#' }
            )
        )),
        parts()
            .prop_map(|(td, ns, sa)| ("trailing slash", format!("spiffe://{td}/ns/{ns}/sa/{sa}/"))),
        parts().prop_map(|(td, _, _)| ("trailing slash", format!("spiffe://{td}/"))),
        (
            parts(),
            0usize..5,
            proptest::sample::select(vec!["", ".", ".."])
        )
            .prop_map(|((td, ns, sa), at, bad)| {
                let mut segments = vec!["ns", &ns, "sa", &sa];
                segments.insert(at.min(segments.len()), bad);
                (
                    "empty, `.` or `..` segment",
                    format!("spiffe://{td}/{}", segments.join("/")),
                )
            }),
        (trust_domain(), 1usize..200).prop_map(|(td, extra)| {
            // Valid characters only, just over the limit.
            let head = format!("spiffe://{td}/");
            let fill = MAX_LEN + extra - head.len();
            (
                "longer than 2048 bytes",
                format!("{head}{}", "a".repeat(fill)),
            )
        }),
    ]
}

/// Text close to a SPIFFE ID: the scheme half of the time, then characters valid and not.
fn near_id() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        proptest::collection::vec(
            proptest::sample::select(vec![
                'a', 'z', 'A', 'Z', '0', '9', '.', '-', '_', '/', '/', '/', ':', '@', '%', '?',
                '#', ' ', 'é', 's', 'p', 'i', 'f', 'e',
            ]),
            0..40,
        ),
    )
        .prop_map(|(scheme, chars)| {
            let body: String = chars.into_iter().collect();
            if scheme {
                format!("spiffe://{body}")
            } else {
                body
            }
        })
}

proptest! {
    /// An Istio identity `spiffe://td/ns/NS/sa/SA` parses, prints back as written, and its
    /// accessors return the parts it was made of; the principal form, the service-account
    /// constructor and serde give the same identity.
    #[test]
    fn istio_identities_round_trip(td in trust_domain(), ns in segment(), sa in segment()) {
        let text = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
        let id = Identity::parse(&text).unwrap();
        prop_assert_eq!(id.to_string(), text.as_str());
        prop_assert_eq!(id.as_str(), text.as_str());
        prop_assert_eq!(id.trust_domain(), td.as_str());
        prop_assert_eq!(id.path(), format!("/ns/{ns}/sa/{sa}"));
        prop_assert_eq!(id.namespace(), Some(ns.as_str()));
        prop_assert_eq!(id.service_account(), Some(sa.as_str()));
        let principal = format!("{td}/ns/{ns}/sa/{sa}");
        prop_assert_eq!(id.principal(), principal.as_str());
        prop_assert_eq!(&Identity::from_principal(&principal).unwrap(), &id);
        prop_assert_eq!(&Identity::for_service_account(&td, &ns, &sa).unwrap(), &id);
        prop_assert_eq!(&text.parse::<Identity>().unwrap(), &id);
        let json = serde_json::to_string(&id).unwrap();
        prop_assert_eq!(&json, &serde_json::to_string(&text).unwrap());
        prop_assert_eq!(&serde_json::from_str::<Identity>(&json).unwrap(), &id);
    }

    /// Any valid SPIFFE ID (any path, or none) parses and prints back as written; only a
    /// path of Istio's exact shape `/ns/<ns>/sa/<sa>` yields a namespace and service account.
    #[test]
    fn valid_ids_round_trip((text, td, segments) in valid_id()) {
        let id = Identity::parse(&text).unwrap();
        prop_assert_eq!(id.to_string(), text.as_str());
        prop_assert_eq!(id.trust_domain(), td.as_str());
        let path: String = segments.iter().map(|s| format!("/{s}")).collect();
        prop_assert_eq!(id.path(), path.as_str());
        prop_assert_eq!(id.principal(), &text["spiffe://".len()..]);
        let istio = segments.len() == 4 && segments[0] == "ns" && segments[2] == "sa";
        prop_assert_eq!(id.namespace(), istio.then(|| segments[1].as_str()));
        prop_assert_eq!(id.service_account(), istio.then(|| segments[3].as_str()));
        prop_assert_eq!(Identity::parse(&id.to_string()).unwrap(), id);
    }

    /// An ID broken in one of the ways the specification forbids is rejected with an error
    /// that names the input.
    #[test]
    fn invalid_ids_are_rejected((defect, text) in invalid_id()) {
        prop_assert!(!spec_valid(&text), "generator bug: {} ({})", text, defect);
        match Identity::parse(&text) {
            Ok(id) => prop_assert!(false, "{:?} ({}) was accepted as {:?}", text, defect, id),
            Err(e) => prop_assert_eq!(e.id, text),
        }
    }

    /// IDs of valid characters are accepted up to and including 2048 bytes (the length the
    /// specification requires implementations to support), rejected beyond.
    #[test]
    fn length_limit_is_2048_bytes(td in trust_domain(), len in (MAX_LEN - 8)..(MAX_LEN + 8)) {
        let head = format!("spiffe://{td}/");
        let text = format!("{head}{}", "x".repeat(len - head.len()));
        prop_assert_eq!(text.len(), len);
        prop_assert_eq!(Identity::parse(&text).is_ok(), len <= MAX_LEN, "length {}", len);
    }

    /// On text near the grammar, the parser accepts exactly what the specification does,
    /// and what it accepts prints back unchanged.
    #[test]
    fn parser_agrees_with_the_specification(text in near_id()) {
        let parsed = Identity::parse(&text);
        prop_assert_eq!(parsed.is_ok(), spec_valid(&text), "{:?}: {:?}", text, parsed);
        if let Ok(id) = parsed {
            prop_assert_eq!(id.to_string(), text);
        }
    }

    /// Arbitrary text never panics the parser (nor the principal form), and whatever is
    /// accepted is valid by the specification and prints back unchanged.
    #[test]
    fn arbitrary_text_never_panics(text in any::<String>(), scheme in any::<bool>()) {
        let text = if scheme { format!("spiffe://{text}") } else { text };
        match Identity::parse(&text) {
            Ok(id) => {
                prop_assert!(spec_valid(&text), "accepted {:?}", text);
                prop_assert_eq!(id.to_string(), text.as_str());
            }
            Err(e) => prop_assert_eq!(&e.id, &text),
        }
        let _ = Identity::from_principal(&text);
        let _ = serde_json::from_value::<Identity>(serde_json::Value::String(text));
    }
}

/// The specification (section 2.3) bounds the trust domain at 255 bytes (RFC 3986's limit
/// on the host), below the 2048 bytes of the whole ID.
#[test]
fn trust_domains_longer_than_255_bytes_are_rejected() {
    for len in [256, 300, 1000] {
        let text = format!("spiffe://{}/ns/default/sa/reviews", "a".repeat(len));
        assert!(
            Identity::parse(&text).is_err(),
            "a {len}-byte trust domain was accepted"
        );
    }
    let at_limit = format!("spiffe://{}/ns/default/sa/reviews", "a".repeat(255));
    assert!(Identity::parse(&at_limit).is_ok());
}
