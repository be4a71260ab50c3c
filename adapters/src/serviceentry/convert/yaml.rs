//! Reading a file's YAML documents the way `kubectl` reads them.
//!
//! `kubectl` (through `sigs.k8s.io/yaml`) parses with go-yaml, whose scanner
//! differs from libyaml's (which `serde_yaml_ng` uses) in one way that
//! matters for Istio objects: inside a flow collection (`[…]`, `{…}`), a
//! plain scalar may contain a `:` directly followed by `,`, `[`, `]`, `{`,
//! `}` or `?`. go-yaml keeps the `:` in the scalar, so
//! `addresses: [1.2.3.4, 001:db8::]` is the list `["1.2.3.4", "001:db8::"]`
//! (a string: go-yaml v2 has no YAML 1.1 base-60 integers, and `001:db8::`
//! would not be one anyway). libyaml stops with "found unexpected ':'",
//! which used to refuse the whole file.
//!
//! So when libyaml reports exactly that error, the offending plain scalar is
//! single-quoted (a string either way, as go-yaml would resolve it) and the
//! text parsed again. Only text libyaml refuses is rewritten, so this never
//! changes the meaning of a file libyaml already reads. Where the scalar's
//! extent is not certain (it starts on an earlier line, sits next to a quote
//! or an anchor) the original error stands.

use std::borrow::Cow;

use serde::Deserialize;
use serde_yaml_ng::Value;

/// At most this many scalars are quoted in one file before giving up.
const MAX_REWRITES: usize = 256;

/// Flow collections (`[`, `{`) nested deeper than this refuse the file
/// before it is parsed: Istio objects nest a handful of levels, and a file
/// of 100,000 nested `[` took the parser 53 CPU-seconds.
pub(crate) const MAX_FLOW_DEPTH: usize = 64;

/// Aliases (`*anchor`) in one file at most: each copies its anchor's whole
/// node, so 300,000 `<<: *anchor` merges held 341 MB.
pub(crate) const MAX_ALIASES: usize = 1_000;

/// Nodes (mapping values, sequence entries, flow items) in one file at
/// most: parsed YAML costs about 1.4 KB a node (520,000 tiny maps in an
/// 8 MB file peaked at 712 MB); 250,000 is ten thousand ServiceEntries of
/// twenty-odd fields. Split larger configurations across files.
pub(crate) const MAX_NODES: usize = 250_000;

/// Refuses text whose shape would cost the parser far more than its size
/// (see the limits above), with the limit it passes. A lexical pass, O(n):
/// quoted scalars and comments are skipped; it may over-count inside
/// block scalars (`|`, `>`), which Istio objects rarely hold at size.
pub(crate) fn guard(text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    let (mut depth, mut max_depth, mut aliases, mut nodes) = (0usize, 0usize, 0usize, 0usize);
    let mut i = 0;
    // Whether the previous byte starts a token (whitespace or an
    // indicator), for `*alias`, `#comment` and `- ` entries.
    let mut at_token = true;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\'' => {
                // To the closing quote ('' is an escaped quote).
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'#' if at_token => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                max_depth = max_depth.max(depth);
                if max_depth > MAX_FLOW_DEPTH {
                    return Err(format!(
                        "flow collections nested deeper than {MAX_FLOW_DEPTH} levels"
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'*' if at_token => aliases += 1,
            b',' if depth > 0 => nodes += 1,
            b':' if blank(bytes.get(i + 1)) => nodes += 1,
            b'-' if at_token && blank(bytes.get(i + 1)) => nodes += 1,
            _ => {}
        }
        if aliases > MAX_ALIASES {
            return Err(format!(
                "more than {MAX_ALIASES} aliases (*anchor) in the file"
            ));
        }
        if nodes > MAX_NODES {
            return Err(format!(
                "more than {MAX_NODES} nodes in the file (all its documents together); split it across files"
            ));
        }
        at_token = matches!(
            b,
            b' ' | b'\t' | b'\n' | b'\r' | b'[' | b'{' | b',' | b':' | b'-'
        );
        i += 1;
    }
    Ok(())
}

/// The documents of a file, up to the first YAML error.
pub(super) struct Loaded {
    /// One value per document, in order (`Null` for an empty document).
    pub(super) documents: Vec<Value>,
    /// The YAML error that stopped reading, in document `documents.len()`.
    pub(super) error: Option<serde_yaml_ng::Error>,
}

/// Parses every document of `text`, reading flow scalars as go-yaml does
/// (see the module docs).
pub(super) fn load(text: &str) -> Loaded {
    if let Err(why) = guard(text) {
        return Loaded {
            documents: Vec::new(),
            error: Some(<serde_yaml_ng::Error as serde::de::Error>::custom(format!(
                "refused before parsing: {why}"
            ))),
        };
    }
    let mut text = Cow::Borrowed(text);
    let mut rewrites = 0;
    loop {
        let mut documents = Vec::new();
        let mut error = None;
        for de in serde_yaml_ng::Deserializer::from_str(&text) {
            match Value::deserialize(de) {
                Ok(value) => documents.push(value),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let Some(e) = error else {
            return Loaded {
                documents,
                error: None,
            };
        };
        match quote_flow_scalar(&text, &e) {
            Some(fixed) if rewrites < MAX_REWRITES => {
                rewrites += 1;
                text = Cow::Owned(fixed);
            }
            _ => {
                return Loaded {
                    documents,
                    error: Some(e),
                };
            }
        }
    }
}

/// Flow indicators that may follow a `:` inside a go-yaml plain scalar.
fn after_colon(b: u8) -> bool {
    matches!(b, b',' | b'?' | b'[' | b']' | b'{' | b'}')
}

fn blank(b: Option<&u8>) -> bool {
    matches!(b, None | Some(b' ' | b'\t' | b'\n' | b'\r'))
}

/// If `error` is libyaml's "unexpected ':'" in a flow plain scalar, `text`
/// with that scalar single-quoted, and with it every scalar of the same
/// kind later on the same line: a long flow list of such scalars costs one
/// parse, not one per scalar (257 unquoted `…::` addresses in one list
/// passed [`MAX_REWRITES`] and refused the file).
fn quote_flow_scalar(text: &str, error: &serde_yaml_ng::Error) -> Option<String> {
    if !error.to_string().contains("found unexpected ':'") {
        return None;
    }
    let first = scalar_range(text, error.location()?.index())?;
    let bytes = text.as_bytes();
    let line_end = text[first.1..]
        .find('\n')
        .map_or(text.len(), |i| first.1 + i);
    let mut ranges = vec![first];
    let mut i = first.1;
    while i < line_end {
        match bytes[i] {
            quote @ (b'\'' | b'"') => {
                // Over a quoted scalar (an escaped `\"` or a doubled `''`
                // only ends the search early).
                match text[i + 1..line_end].find(char::from(quote)) {
                    Some(n) => i += n + 2,
                    None => break,
                }
                continue;
            }
            b'#' if blank(bytes.get(i.wrapping_sub(1))) => break,
            b':' if bytes.get(i + 1).is_some_and(|b| after_colon(*b)) => {
                match scalar_range(text, i) {
                    Some(r) if r.0 >= ranges[ranges.len() - 1].1 => {
                        i = r.1;
                        ranges.push(r);
                        continue;
                    }
                    _ => break,
                }
            }
            _ => {}
        }
        i += 1;
    }
    let mut out = String::with_capacity(text.len() + 2 * ranges.len());
    let mut at = 0;
    for (from, to) in ranges {
        out.push_str(&text[at..from]);
        out.push('\'');
        out.push_str(&text[from..to].replace('\'', "''"));
        out.push('\'');
        at = to;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// The byte range of the flow plain scalar holding the `:` at `colon`,
/// if that `:` is one libyaml refuses and go-yaml keeps (see the module
/// docs) and the scalar's extent is certain.
fn scalar_range(text: &str, colon: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(colon) != Some(&b':') || !after_colon(*bytes.get(colon + 1)?) {
        return None;
    }
    let line_start = text[..colon].rfind('\n').map_or(0, |i| i + 1);

    // Back to the start of the scalar: a flow indicator, or a value/key
    // indicator followed by a blank, on the same line.
    let mut start = None;
    for i in (line_start..colon).rev() {
        match bytes[i] {
            b'[' | b'{' | b',' => {
                start = Some(i + 1);
                break;
            }
            b':' | b'?' if blank(bytes.get(i + 1)) => {
                start = Some(i + 1);
                break;
            }
            b'"' | b'\'' | b'#' => return None,
            _ => {}
        }
    }
    let start = match start {
        Some(s) => s,
        // The scalar begins the line: fine only if the previous line ended
        // an entry (`[`, `{` or `,`), not in the middle of a scalar.
        None => {
            let before = text[..line_start].trim_end();
            if !before.ends_with(['[', '{', ',']) {
                return None;
            }
            line_start
        }
    };

    // Forward to its end, by go-yaml's rules for flow plain scalars.
    let mut end = colon + 1;
    while let Some(&b) = bytes.get(end) {
        let stop = match b {
            b'\n' | b'\r' | b',' | b'[' | b']' | b'{' | b'}' => true,
            b':' | b'?' => blank(bytes.get(end + 1)),
            b'#' => blank(bytes.get(end - 1)),
            _ => false,
        };
        if stop {
            break;
        }
        end += 1;
    }
    if matches!(bytes.get(end), None | Some(b'\n' | b'\r')) {
        // A flow scalar may go on on the next line; be sure it does not.
        let next = text[end..].trim_start();
        if !next.starts_with([',', ']', '}', '#']) {
            return None;
        }
    }

    let raw = &text[start..end];
    let scalar = raw.trim();
    // Quote only what is plainly a scalar (no anchor, tag, alias, quote …).
    let first = scalar.bytes().next()?;
    if b"&*!|>'\"%@`#-?:,[]{}".contains(&first) {
        return None;
    }
    let lead = raw.len() - raw.trim_start().len();
    let from = start + lead;
    Some((from, from + scalar.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_shapes_are_refused_before_parsing() {
        // The cases: nested flow sequences, mass aliases, tiny maps.
        let nested = format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(guard(&nested).unwrap_err().contains("nested deeper"));
        let mut merges = String::from("base: &b {x: 1}\nitems:\n");
        for _ in 0..2_000 {
            merges.push_str("- {<<: *b}\n");
        }
        assert!(guard(&merges).unwrap_err().contains("aliases"));
        let maps = "- {a: 1}\n".repeat(300_000);
        assert!(guard(&maps).unwrap_err().contains("nodes"));
        let loaded = load(&nested);
        assert!(loaded.documents.is_empty());
        assert!(
            loaded
                .error
                .unwrap()
                .to_string()
                .contains("refused before parsing")
        );
        // What Istio objects look like passes, quotes and comments
        // included.
        let fine = "spec:\n  hosts: ['[[[[', \"{{{{\"]  # [[[[[\n  ports: [{number: 80, name: http}]\n  addresses: [\"*\"]\n";
        assert_eq!(guard(fine), Ok(()));
        assert_eq!(guard(&"[".repeat(MAX_FLOW_DEPTH)), Ok(()));
    }

    fn strings(text: &str) -> Vec<String> {
        let loaded = load(text);
        assert!(loaded.error.is_none(), "{:?}", loaded.error);
        let Value::Mapping(map) = &loaded.documents[0] else {
            panic!("not a mapping")
        };
        let list = map.get("a").expect("a").as_sequence().expect("a list");
        list.iter()
            .map(|v| v.as_str().expect("a string").to_string())
            .collect()
    }

    #[test]
    fn flow_scalars_read_as_go_yaml_reads_them() {
        assert_eq!(strings("a: [1.2.3.4, 001:db8::]"), ["1.2.3.4", "001:db8::"]);
        assert_eq!(strings("a: [x:, 'q', y:]\n"), ["x:", "q", "y:"]);
        assert_eq!(strings("a: [fe80::, ab:cd:?x ]"), ["fe80::", "ab:cd:?x"]);
        assert_eq!(
            strings("a: [\n  1.2.3.4,\n  001:db8::, # v6\n]\n"),
            ["1.2.3.4", "001:db8::"]
        );
        // Past MAX_REWRITES of them in one list (found by a new user's
        // trial: the 257th refused the file), and quoted ones between.
        let many: Vec<String> = (0..300).map(|i| format!("2001:db8:{i:x}::")).collect();
        let text = format!("a: [{}, 'x:', \"y\", 10.0.0.1, fd00::]\n", many.join(", "));
        let mut want = many.clone();
        want.extend(["x:", "y", "10.0.0.1", "fd00::"].map(String::from));
        assert_eq!(strings(&text), want);
    }

    #[test]
    fn other_errors_stand() {
        for text in ["a: [b, \"c:]", "a: [&x b::]", "a: [b\n c::]", "a: {b: [c"] {
            assert!(load(text).error.is_some(), "{text}");
        }
    }
}
