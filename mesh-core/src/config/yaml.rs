//! The one module that knows the YAML library (serde-saphyr): swapping it means rewriting
//! only this file.
//!
//! A stream is split into documents here rather than by the library because each document
//! is parsed on its own: twice (a lenient header pass reads `apiVersion`/`kind`, then the
//! typed pass for that kind) and independently, so one broken document does not hide the
//! errors of the next. Splitting on `---`/`...` lines is exact: YAML forbids those markers at
//! the start of a line anywhere else, even inside scalars.

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Visitor};
use serde_saphyr::{Location, MessageFormatter, Spanned};

/// One document of a YAML stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Document<'a> {
    /// 1-based position in the stream; empty documents count.
    pub index: usize,
    /// 1-based line of the stream on which `text` starts.
    pub first_line: usize,
    pub text: &'a str,
}

/// A parse failure, with positions in the whole stream.
#[derive(Debug)]
pub(crate) struct YamlError {
    /// Field path as `spec.http[0].route`, when the failure is inside the document.
    pub path: Option<String>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

/// Splits a stream into documents. Comments and directives before a `---` belong to the
/// document it opens; each document's text keeps its own lines, so positions map back.
pub(crate) fn split_documents<'a>(text: &'a str) -> Vec<Document<'a>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    // Whether the current chunk began with `---`, and whether it has content lines.
    let (mut opened, mut content) = (false, false);
    let push = |docs: &mut Vec<Document<'a>>, range: std::ops::Range<usize>, first_line| {
        let index = docs.len() + 1;
        let text = &text[range];
        docs.push(Document {
            index,
            first_line,
            text,
        });
    };
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let line_no = n + 1;
        let body = line.trim_end_matches(['\n', '\r']);
        if is_marker(body, "---") {
            // Comments and directives before a first `---` belong to its document.
            if opened || content {
                push(&mut docs, start..offset, start_line);
                (start, start_line) = (offset, line_no);
            }
            (opened, content) = (true, false);
        } else if is_marker(body, "...") {
            offset += line.len();
            if opened || content {
                push(&mut docs, start..offset, start_line);
            }
            (start, start_line, opened, content) = (offset, line_no + 1, false, false);
            continue;
        } else {
            let trimmed = body.trim_start();
            if !(trimmed.is_empty() || trimmed.starts_with('#') || body.starts_with('%')) {
                content = true;
            }
        }
        offset += line.len();
    }
    if opened || content {
        push(&mut docs, start..text.len(), start_line);
    }
    docs
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Deserializes one document, reporting the field path and stream line of any failure.
pub(crate) fn parse<T: DeserializeOwned>(doc: &Document<'_>) -> Result<T, YamlError> {
    let mut path = None;
    let result = serde_saphyr::with_deserializer_from_str_with_options(doc.text, options(), |de| {
        let mut track = serde_path_to_error::Track::new();
        let value = T::deserialize(serde_path_to_error::Deserializer::new(de, &mut track));
        if value.is_err() {
            path = Some(track.path().to_string());
        }
        value
    });
    result.map_err(|err| {
        let (line, column) = position(doc, err.location());
        let message = serde_saphyr::DefaultMessageFormatter.format_message(err.without_snippet());
        YamlError {
            // serde_path_to_error prints the document root as ".".
            path: path.filter(|p| p != "."),
            line,
            column,
            // The text may quote the input; keep it on one line and free of control codes.
            message: one_line(&message),
        }
    })
}

/// The stream position (line, column) of the node at `path` (`spec.http[0].route`), or of
/// its nearest ancestor present in the document. Used for errors found after parsing; it
/// parses the document again, which only happens when there is an error to report.
pub(crate) fn locate(doc: &Document<'_>, path: &str) -> (Option<usize>, Option<usize>) {
    let Ok(root) = serde_saphyr::from_str_with_options::<Spanned<Tree>>(doc.text, options()) else {
        return (None, None);
    };
    let mut node = &root;
    let mut at = root.referenced;
    for segment in segments(path) {
        let child = match (&node.value, segment) {
            (Tree::Map(entries), Segment::Key(key)) => entries
                .iter()
                .find(|(k, _)| k.value == key)
                .map(|(k, v)| (k.referenced, v)),
            (Tree::Seq(items), Segment::Index(i)) => items.get(i).map(|v| (v.referenced, v)),
            _ => None,
        };
        let Some((location, child)) = child else {
            break;
        };
        (node, at) = (child, location);
    }
    position(doc, Some(at))
}

fn options() -> serde_saphyr::Options {
    // Snippets are rendered text we do not print; positions are enough.
    serde_saphyr::options! { with_snippet: false }
}

fn position(doc: &Document<'_>, location: Option<Location>) -> (Option<usize>, Option<usize>) {
    match location {
        Some(l) if l.line() > 0 => (
            usize::try_from(l.line())
                .ok()
                .map(|line| line + doc.first_line - 1),
            usize::try_from(l.column()).ok(),
        ),
        _ => (None, None),
    }
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// `spec.http[0].route` → `spec`, `http`, `0`, `route`.
fn segments(path: &str) -> impl Iterator<Item = Segment<'_>> {
    path.split('.').flat_map(|part| {
        let (key, indexes) = part.split_once('[').unwrap_or((part, ""));
        let key = (!key.is_empty()).then_some(Segment::Key(key));
        let indexes = indexes
            .split('[')
            .filter_map(|i| i.trim_end_matches(']').parse().ok())
            .map(Segment::Index);
        key.into_iter().chain(indexes)
    })
}

/// A YAML node tree that remembers where every key and item is.
enum Tree {
    Leaf,
    Map(Vec<(Spanned<String>, Spanned<Tree>)>),
    Seq(Vec<Spanned<Tree>>),
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TreeVisitor)
    }
}

struct TreeVisitor;

impl<'de> Visitor<'de> for TreeVisitor {
    type Value = Tree;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Tree, E> {
        Ok(Tree::Leaf)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Tree, E> {
        Ok(Tree::Leaf)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Tree, E> {
        Ok(Tree::Leaf)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Tree, E> {
        Ok(Tree::Leaf)
    }
    fn visit_str<E>(self, _: &str) -> Result<Tree, E> {
        Ok(Tree::Leaf)
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Tree, E> {
        Ok(Tree::Leaf)
    }
    fn visit_unit<E>(self) -> Result<Tree, E> {
        Ok(Tree::Leaf)
    }
    fn visit_none<E>(self) -> Result<Tree, E> {
        Ok(Tree::Leaf)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Tree, D::Error> {
        Tree::deserialize(d)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Tree::Seq(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
            let value = map.next_value()?;
            let key = Spanned::new(key.value.0, key.referenced, key.defined);
            entries.push((key, value));
        }
        Ok(Tree::Map(entries))
    }
}

/// A mapping key as text (port maps have integer keys).
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E>(self, s: &str) -> Result<KeyText, E> {
                Ok(KeyText(s.to_string()))
            }
            fn visit_i64<E>(self, n: i64) -> Result<KeyText, E> {
                Ok(KeyText(n.to_string()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<KeyText, E> {
                Ok(KeyText(n.to_string()))
            }
            fn visit_bool<E>(self, b: bool) -> Result<KeyText, E> {
                Ok(KeyText(b.to_string()))
            }
            fn visit_f64<E>(self, n: f64) -> Result<KeyText, E> {
                Ok(KeyText(n.to_string()))
            }
            fn visit_unit<E>(self) -> Result<KeyText, E> {
                Ok(KeyText(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Escapes control characters (line breaks included) so a message stays on one line.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(stream: &str) -> Vec<(usize, usize, &str)> {
        split_documents(stream)
            .into_iter()
            .map(|d| (d.index, d.first_line, d.text))
            .collect()
    }

    #[test]
    fn splits_on_markers_and_keeps_line_numbers() {
        let stream = "# header comment\n---\na: 1\n---\n---\nb: 2\n...\n%YAML 1.2\n---\nc: 3\n";
        assert_eq!(
            texts(stream),
            [
                (1, 1, "# header comment\n---\na: 1\n"),
                (2, 4, "---\n"),
                (3, 5, "---\nb: 2\n...\n"),
                (4, 8, "%YAML 1.2\n---\nc: 3\n"),
            ]
        );
        assert_eq!(
            texts("a: 1\n---\nb: 2"),
            [(1, 1, "a: 1\n"), (2, 2, "---\nb: 2")]
        );
        assert_eq!(texts("--- {a: 1}\n"), [(1, 1, "--- {a: 1}\n")]);
        assert!(texts("# only a comment\n\n").is_empty());
        // `---x` is content, not a marker.
        assert_eq!(texts("a: |\n  ---x\n").len(), 1);
    }

    #[test]
    fn locates_paths_in_the_stream() {
        let stream = "x: 1\n---\nspec:\n  http:\n  - route:\n    - weight: 5\n    - weight: 6\n";
        let docs = split_documents(stream);
        let doc = &docs[1];
        assert_eq!(
            locate(doc, "spec.http[0].route[1].weight"),
            (Some(7), Some(7))
        );
        assert_eq!(locate(doc, "spec.http[0].route"), (Some(5), Some(5)));
        // Missing leaf: nearest ancestor.
        assert_eq!(locate(doc, "spec.http[0].nope"), (Some(5), Some(5)));
    }
}
