//! Loading a TOML config file with environment-variable overrides.
//!
//! An override variable is `<PREFIX><SECTION>__<KEY>`, upper case, `__` between path segments:
//! with prefix `TOLLGATE_EDGE_`, `TOLLGATE_EDGE_KAFKA__BROKERS=host:9092` sets `kafka.brokers`.
//! The value is read as a TOML value when it parses as one (`5`, `true`, `["a"]`), otherwise as
//! a string. The overrides come from a map so that tests pass their own instead of the process
//! environment.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;

/// A config that could not be loaded. The message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config override {var}: cannot set `{key}`: {reason}")]
    Override { var: String, key: String, reason: String },
    #[error("config {origin}: key `{key}`: {reason}")]
    Invalid { origin: String, key: String, reason: String },
}

impl ConfigError {
    /// An error for a key that deserialized but failed validation.
    pub fn invalid(origin: &str, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { origin: origin.to_owned(), key: key.into(), reason: reason.into() }
    }
}

/// Reads `path`, applies the overrides among `env` that start with `prefix`, and deserializes
/// into `T` (usually a raw struct with `deny_unknown_fields`).
pub fn load<T: DeserializeOwned>(path: &Path, prefix: &str, env: &BTreeMap<String, String>) -> Result<T, ConfigError> {
    parse(&read(path)?, &path.display().to_string(), prefix, env)
}

/// A config file's text (for [`parse`] or [`parse_split`]).
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })
}

/// Like [`load`], from a string; `origin` names it in errors.
pub fn parse<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    prefix: &str,
    env: &BTreeMap<String, String>,
) -> Result<T, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax { path: origin.to_owned(), message: e.to_string() })?;
    deserialize_table(table, origin, prefix, env)
}

/// Applies the overrides to a parsed document and deserializes it.
fn deserialize_table<T: DeserializeOwned>(
    mut table: toml::Table,
    origin: &str,
    prefix: &str,
    env: &BTreeMap<String, String>,
) -> Result<T, ConfigError> {
    apply_overrides(&mut table, prefix, env)?;
    let value = toml::Value::Table(table);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Invalid { origin: origin.to_owned(), key, reason: e.into_inner().to_string() }
    })
}

/// [`parse`] for a config whose top-level array of tables `name` (`[[name]]` sections) may be
/// long, e.g. 100,000 `[[consumers]]`: the rest of the document is parsed as [`parse`] does,
/// and the `[[name]]` sections (each with its sub-tables) are left in the text, to be parsed
/// one at a time by [`ArrayTables::iter`]. The whole document's tree is never built: it costs
/// some kilobytes per element (the `[[consumers]]` of 100,000 consumers took ~490 MB), one
/// element's tree does not.
///
/// Documents that use `name` otherwise as well (an inline `name = [...]`, dotted keys, quoted
/// headers) are parsed whole, as [`parse`] does, and their elements are in `T`.
pub fn parse_split<'a, T: DeserializeOwned>(
    text: &'a str,
    origin: &'a str,
    prefix: &str,
    env: &BTreeMap<String, String>,
    name: &'a str,
) -> Result<(T, ArrayTables<'a>), ConfigError> {
    let (main, ranges) = split_array_tables(text, name);
    let none = ArrayTables { text, origin, name, ranges: Vec::new() };
    let overridden = env.keys().any(|var| {
        var.strip_prefix(prefix)
            .is_some_and(|rest| rest.split("__").next().is_some_and(|s| s.eq_ignore_ascii_case(name)))
    });
    if ranges.is_empty() || overridden {
        return Ok((parse(text, origin, prefix, env)?, none));
    }
    let table: toml::Table = main
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax { path: origin.to_owned(), message: e.to_string() })?;
    if table.contains_key(name) {
        return Ok((parse(text, origin, prefix, env)?, none));
    }
    Ok((deserialize_table(table, origin, prefix, env)?, ArrayTables { text, origin, name, ranges }))
}

/// The `[[name]]` sections [`parse_split`] left in a config's text.
#[derive(Debug)]
pub struct ArrayTables<'a> {
    text: &'a str,
    origin: &'a str,
    name: &'a str,
    /// Byte ranges of the sections, in file order: each one element, with its sub-tables.
    ranges: Vec<std::ops::Range<usize>>,
}

impl ArrayTables<'_> {
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The elements, parsed one by one. Errors name the element as a whole-document parse
    /// would (`consumers[7].plan`) and, for syntax errors, the line in the file.
    pub fn iter<E: DeserializeOwned>(&self) -> impl Iterator<Item = Result<E, ConfigError>> + '_ {
        self.ranges.iter().enumerate().map(|(i, range)| self.element(i, range.clone()))
    }

    fn element<E: DeserializeOwned>(&self, i: usize, range: std::ops::Range<usize>) -> Result<E, ConfigError> {
        let section = &self.text[range.clone()];
        let mut table: toml::Table = section.parse().map_err(|e: toml::de::Error| {
            let at = range.start + e.span().map_or(0, |s| s.start);
            let line = self.text[..at].matches('\n').count() + 1;
            let column = at - self.text[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
            ConfigError::Syntax {
                path: self.origin.to_owned(),
                message: format!("TOML parse error at line {line}, column {column}: {}", e.message()),
            }
        })?;
        let element = match table.remove(self.name) {
            Some(toml::Value::Array(mut a)) if a.len() == 1 => a.pop(),
            _ => None,
        };
        let element = element.ok_or_else(|| {
            ConfigError::invalid(
                self.origin,
                format!("{}[{i}]", self.name),
                "is not one table (a section split wrongly?)",
            )
        })?;
        serde_path_to_error::deserialize(element).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." { format!("{}[{i}]", self.name) } else { format!("{}[{i}].{path}", self.name) };
            ConfigError::Invalid { origin: self.origin.to_owned(), key, reason: e.into_inner().to_string() }
        })
    }
}

/// Splits the `[[name]]` sections (with the sub-tables that follow each, `[name.x]`,
/// `[[name.x]]`) out of a TOML text: returns the rest of the text, each section replaced by its
/// newlines (so that line numbers stay those of the file), and the sections' byte ranges.
/// Header lines are only recognized at the start of a line, outside strings and outside
/// arrays and inline tables spanning lines.
fn split_array_tables<'t>(text: &'t str, name: &str) -> (std::borrow::Cow<'t, str>, Vec<std::ops::Range<usize>>) {
    let b = text.as_bytes();
    let mut ranges = Vec::new();
    let mut current: Option<usize> = None;
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        let line_start = i;
        let mut j = i;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if depth == 0 && b.get(j) == Some(&b'[') {
            // A table header: what follows it on its line is whitespace or a comment.
            let double = b.get(j + 1) == Some(&b'[');
            let mut k = j + if double { 2 } else { 1 };
            while k < b.len() && (b[k] == b' ' || b[k] == b'\t') {
                k += 1;
            }
            let key_start = k;
            while k < b.len() && (b[k].is_ascii_alphanumeric() || b[k] == b'_' || b[k] == b'-') {
                k += 1;
            }
            let ours = &text[key_start..k] == name;
            let mut after = k;
            while after < b.len() && (b[after] == b' ' || b[after] == b'\t') {
                after += 1;
            }
            if ours && double && b.get(after) == Some(&b']') {
                // A new element.
                if let Some(start) = current.replace(line_start) {
                    ranges.push(start..line_start);
                }
            } else if !(ours && b.get(after) == Some(&b'.')) {
                // Another table (a sub-table of the element stays with it).
                if let Some(start) = current.take() {
                    ranges.push(start..line_start);
                }
            }
            i = b[j..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| j + n + 1);
            continue;
        }
        i = scan_line(b, j, &mut depth);
    }
    if let Some(start) = current {
        ranges.push(start..b.len());
    }
    if ranges.is_empty() {
        return (std::borrow::Cow::Borrowed(text), ranges);
    }
    let mut rest = String::with_capacity(text.len() - ranges.iter().map(|r| r.len()).sum::<usize>() + 1024);
    let mut at = 0;
    for r in &ranges {
        rest.push_str(&text[at..r.start]);
        rest.extend(std::iter::repeat_n('\n', text[r.clone()].matches('\n').count()));
        at = r.end;
    }
    rest.push_str(&text[at..]);
    (std::borrow::Cow::Owned(rest), ranges)
}

/// Scans a line that is not a table header from `i`, through any multi-line string it opens,
/// tracking the nesting of arrays and inline tables; returns the start of the next line.
fn scan_line(b: &[u8], mut i: usize, depth: &mut usize) -> usize {
    // The end of a string whose closing `quote` (1 or 3 bytes) starts its search at `i`.
    let close = |mut i: usize, quote: &[u8], escapes: bool| -> usize {
        while i < b.len() {
            if escapes && b[i] == b'\\' {
                i += 2;
            } else if b[i..].starts_with(quote) {
                i += quote.len();
                // `"""a""""` ends with up to two more quotes, part of the string.
                if quote.len() == 3 {
                    let mut extra = 0;
                    while extra < 2 && b.get(i) == Some(&quote[0]) {
                        i += 1;
                        extra += 1;
                    }
                }
                return i;
            } else if quote.len() == 1 && b[i] == b'\n' {
                // An unterminated single-line string: the parser will say so.
                return i;
            } else {
                i += 1;
            }
        }
        i
    };
    while i < b.len() {
        match b[i] {
            b'\n' => return i + 1,
            b'#' => {
                i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n);
            }
            b'"' if b[i..].starts_with(b"\"\"\"") => i = close(i + 3, b"\"\"\"", true),
            b'"' => i = close(i + 1, b"\"", true),
            b'\'' if b[i..].starts_with(b"'''") => i = close(i + 3, b"'''", false),
            b'\'' => i = close(i + 1, b"'", false),
            b'[' | b'{' => {
                *depth += 1;
                i += 1;
            }
            b']' | b'}' => {
                *depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
    }
    i
}

/// A replica's static membership id (`kafka.instance_id`): the configured one (not blank),
/// else `<role>-$HOSTNAME`, else `<role>-0`.
pub fn instance_id(configured: Option<String>, role: &str) -> Result<String, &'static str> {
    match configured {
        Some(id) if id.trim().is_empty() => Err("must not be empty"),
        Some(id) => Ok(id),
        None => Ok(std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .map_or_else(|| format!("{role}-0"), |h| format!("{role}-{h}"))),
    }
}

/// The process environment as a map, for [`load`].
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

fn apply_overrides(table: &mut toml::Table, prefix: &str, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (var, raw) in env.range(prefix.to_owned()..) {
        let Some(rest) = var.strip_prefix(prefix) else { break };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        let key = path.join(".");
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Override { var: var.clone(), key, reason: "empty path segment".into() });
        }
        let value = parse_scalar(raw);
        let mut cursor = &mut *table;
        for (i, segment) in path.iter().enumerate() {
            if i + 1 == path.len() {
                cursor.insert(segment.clone(), value.clone());
                break;
            }
            let entry = cursor.entry(segment.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Override {
                        var: var.clone(),
                        key,
                        reason: format!("`{segment}` is not a table"),
                    });
                }
            };
        }
    }
    Ok(())
}

fn parse_scalar(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        kafka: Kafka,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Kafka {
        brokers: String,
        #[serde(default)]
        linger_ms: u32,
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn overrides_replace_and_add_keys_with_typed_values() {
        let raw: Raw = parse(
            "[kafka]\nbrokers = \"a:1\"\n",
            "test.toml",
            "T_",
            &env(&[("T_KAFKA__BROKERS", "b:2"), ("T_KAFKA__LINGER_MS", "7"), ("OTHER", "x")]),
        )
        .unwrap();
        assert_eq!(raw.kafka.brokers, "b:2");
        assert_eq!(raw.kafka.linger_ms, 7);
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct WithItems {
        kafka: Kafka,
        #[serde(default)]
        items: Vec<Item>,
        #[serde(default)]
        after: Option<Kafka>,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Item {
        id: String,
        #[serde(default)]
        note: String,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        limits: BTreeMap<String, u32>,
    }

    /// The items as `parse_split` gives them, and whether it split the document.
    fn split_items(text: &str, vars: &[(&str, &str)]) -> Result<(WithItems, Vec<Item>, bool), ConfigError> {
        let (raw, tables) = parse_split::<WithItems>(text, "t.toml", "T_", &env(vars), "items")?;
        let split = !tables.is_empty();
        let items = tables.iter::<Item>().collect::<Result<Vec<_>, _>>()?;
        Ok((raw, items, split))
    }

    const HEAD: &str = "[kafka]\nbrokers = \"a\"\n";

    #[test]
    fn split_array_tables_parse_as_the_whole_document() {
        // Header-looking lines in multi-line strings of both kinds, in an array spanning
        // lines, in comments; escaped quotes; a header with spaces and a comment; CRLF; a
        // sub-table of an item; a table after the items.
        let tricky = r#"[[items]] # first
id = "a"
note = """
[[items]]
id = \"x\" """"
tags = [
  "[[items]]",
  # [after]
  '[kafka]',
]
  [[ items ]]
id = 'b'
note = '''
[kafka]
'''
[items.limits]
x = 1
[[items]]
id = "c]" # ] [
tags = [ "{", "[" ]
[after]
brokers = "z"
"#;
        let docs = [
            format!("{HEAD}[[items]]\nid = \"a\"\n[[items]]\nid = \"b\"\n[items.limits]\nx = 1\n"),
            format!("{HEAD}{tricky}"),
            format!("{HEAD}{}", tricky.replace('\n', "\r\n")),
            // Items first: what follows them is tables.
            format!("[[items]]\nid = \"a\"\ntags = [\"x\", \"y\"]\n{HEAD}"),
        ];
        for doc in &docs {
            let whole: WithItems = parse(doc, "t.toml", "T_", &env(&[])).unwrap();
            let (raw, items, split) = split_items(doc, &[]).unwrap();
            assert!(split, "{doc}");
            assert!(raw.items.is_empty());
            assert_eq!((&raw.kafka, &raw.after), (&whole.kafka, &whole.after), "{doc}");
            assert_eq!(items, whole.items, "{doc}");
        }
        let items = split_items(&docs[1], &[]).unwrap().1;
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c]"]);
        assert_eq!(items[0].note, "[[items]]\nid = \"x\" \"");
        assert_eq!(items[1].limits["x"], 1);
        assert_eq!(split_items(&docs[1], &[]).unwrap().0.after.unwrap().brokers, "z");
        // `items` also used otherwise (inline array, quoted header, an override): parsed whole.
        for (doc, vars) in [
            (format!("items = [{{ id = \"a\" }}]\n{HEAD}"), vec![]),
            (format!("{HEAD}[[items]]\nid = \"a\"\n[[\"items\"]]\nid = \"b\"\n"), vec![]),
            (format!("{HEAD}[[items]]\nid = \"a\"\n"), vec![("T_ITEMS", "[{ id = \"o\" }]")]),
        ] {
            let (raw, items, split) = split_items(&doc, &vars).unwrap();
            assert!(!split && items.is_empty(), "{doc}");
            let whole: WithItems = parse(&doc, "t.toml", "T_", &env(&vars)).unwrap();
            assert!(!whole.items.is_empty());
            assert_eq!(raw, whole);
        }
    }

    #[test]
    fn split_array_table_errors_name_the_element_and_the_line() {
        for bad in ["idd = \"x\"", "id = 5", "limits = { x = \"y\" }", "tags = \"x\""] {
            let doc = format!("{HEAD}[[items]]\nid = \"a\"\n[[items]]\nid = \"b\"\n[[items]]\n{bad}\n");
            let whole = parse::<WithItems>(&doc, "t.toml", "T_", &env(&[])).unwrap_err().to_string();
            let split = split_items(&doc, &[]).unwrap_err().to_string();
            // (The whole document's message adds the context "in `items`".)
            assert_eq!(split.lines().next(), whole.lines().next(), "{bad}");
            assert!(split.contains("items[2]"), "{split}");
        }
        // A syntax error in an item: the file's line.
        let doc = format!("{HEAD}[[items]]\nid = \"a\"\n\n[[items]]\nid = \"b\nnote = \"\"\n");
        let err = split_items(&doc, &[]).unwrap_err().to_string();
        assert!(err.contains("t.toml") && err.contains("line 7, column"), "{err}");
        // One in the rest of the document: the file's line too.
        let doc = format!("[[items]]\nid = \"a\"\n[[items]]\nid = \"b\"\n{HEAD}linger_ms = 1 2\n");
        let err = split_items(&doc, &[]).unwrap_err().to_string();
        assert!(err.contains("line 7"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        let err = parse::<Raw>("[kafka]\nbrokers = 5\n", "edge.toml", "T_", &env(&[])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("kafka.brokers") && msg.contains("edge.toml"), "{msg}");
        let err = parse::<Raw>("[kafka]\nbrokers = \"a\"\nbrokerz = 1\n", "edge.toml", "T_", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
        let err = parse::<Raw>("[kafka]\nbrokers = \"a\"\n", "edge.toml", "T_", &env(&[("T_KAFKA__BROKERS__X", "1")]))
            .unwrap_err();
        assert!(err.to_string().contains("T_KAFKA__BROKERS__X"), "{err}");
    }
}
