//! Configuration parsing and the trigger SQL generated from table mappings.
//!
//! Two input shapes:
//! - input starting with `{` (or whitespace): the whole input is a configuration file, for
//!   `Config::from_json` (parsing and validation of every section);
//! - anything else: mapping fields, one per line — schema, table, channel template, operations
//!   (letters I, U, D), then columns — put into the shipped `config.json` next to its own mapping,
//!   so that most inputs reach the mapping validation and the SQL generation.
//!
//! For every mapping of a configuration that validates, `db::triggers::triggers_of` must not panic,
//! and the SQL of every trigger it returns (this release's, one per operation, and the legacy one)
//! must be sound:
//! - the function body is dollar-quoted, and its tag occurs nowhere in the body (the first closing
//!   tag PostgreSQL would find is the real one);
//! - the generated comment line stays one line (no newline from the mapping ends it early);
//! - outside comments, every single-quoted literal of the body is one of the generator's own or a
//!   template literal or column name of the mapping, every double-quoted identifier is a column of
//!   the mapping, no quote is left open, and no `$` appears;
//! - the trigger statement quotes exactly its four identifiers: trigger, schema, table, function.
#![no_main]

use std::collections::HashSet;

use connector::Config;
use connector::config::{Mapping, TemplatePart, parse_template};
use connector::db::triggers::{TriggerSpec, triggers_of};
use libfuzzer_sys::fuzz_target;

const SHIPPED: &str = include_str!("../../config.json");

/// The string literals the generator writes itself.
const OWN_LITERALS: &[&str] = &[
    "", "INSERT", "DELETE", "UPDATE", "type", "schema", "table", "row", "{}", "old", "\\n", "\\r",
];

/// The literals and quoted identifiers outside comments, in order; panics on an unclosed quote or a
/// `$`.
fn lex(body: &str) -> (Vec<String>, Vec<String>) {
    let b = body.as_bytes();
    let (mut literals, mut idents) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'\'' => {
                let mut text = Vec::new();
                i += 1;
                loop {
                    assert!(i < b.len(), "unclosed string literal in\n{body}");
                    if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            text.push(b'\'');
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    text.push(b[i]);
                    i += 1;
                }
                literals.push(String::from_utf8(text).expect("literal is UTF-8"));
                i += 1;
            }
            b'"' => {
                let start = i + 1;
                i = start;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                assert!(i < b.len(), "unclosed quoted identifier in\n{body}");
                idents.push(body[start..i].to_owned());
                i += 1;
            }
            b'$' => panic!("'$' outside a literal in\n{body}"),
            _ => i += 1,
        }
    }
    (literals, idents)
}

fn check(index: usize, m: &Mapping, s: &TriggerSpec) {
    let name = s.function.strip_prefix("capture_").expect("function name");
    assert_eq!(s.trigger, format!("relay_{name}"));
    let hash = ["_insert", "_update", "_delete"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    assert_eq!(hash.len(), 16, "{name}");
    let tag = format!("$relay_{hash}$");
    let prefix = format!(
        "CREATE OR REPLACE FUNCTION relay.\"{}\"() RETURNS trigger\nLANGUAGE plpgsql VOLATILE AS {tag}",
        s.function
    );
    let rest = s
        .function_sql
        .strip_prefix(&prefix)
        .expect("function header");
    let close = rest.find(&tag).expect("closing tag");
    assert_eq!(
        close,
        rest.len() - tag.len(),
        "mapping {index}: the dollar-quote tag {tag} occurs inside the body"
    );
    let body = &rest[..close];
    let lines: Vec<&str> = body.lines().collect();
    assert!(
        lines.len() > 3
            && lines[1].starts_with("-- Generated")
            && lines[1].ends_with("; do not edit.")
            && (lines[2] == "DECLARE" || lines[2] == "BEGIN"),
        "mapping {index}: the comment line was broken:\n{body}"
    );

    let parts = parse_template(&m.channel).expect("validated template");
    let mut allowed: HashSet<&str> = OWN_LITERALS.iter().copied().collect();
    let mut columns: HashSet<&str> = HashSet::new();
    for p in &parts {
        match p {
            TemplatePart::Literal(l) => {
                allowed.insert(l);
            }
            TemplatePart::Column(c) => {
                columns.insert(c);
            }
        }
    }
    for c in m.columns.iter().flatten() {
        allowed.insert(c);
        columns.insert(c);
    }
    let (literals, idents) = lex(body);
    for l in &literals {
        assert!(
            allowed.contains(l.as_str()),
            "mapping {index}: unexpected literal {l:?} in\n{body}"
        );
    }
    for id in &idents {
        assert!(
            columns.contains(id.as_str()),
            "mapping {index}: unexpected identifier {id:?} in\n{body}"
        );
    }

    let quoted: Vec<&str> = s.trigger_sql.split('"').skip(1).step_by(2).collect();
    assert_eq!(s.trigger_sql.matches('"').count(), 8, "{}", s.trigger_sql);
    assert_eq!(
        quoted,
        vec![
            s.trigger.as_str(),
            m.schema.as_str(),
            m.table.as_str(),
            s.function.as_str()
        ],
        "{}",
        s.trigger_sql
    );
}

fn config(json: &str) {
    let Ok(config) = Config::from_json(json) else {
        return;
    };
    for (i, m) in config.mappings.iter().enumerate() {
        // A validated mapping may still be refused (a template holding the tag), never panic.
        if let Ok(t) = triggers_of(i, m) {
            assert_eq!(t.current.len(), m.operations.len());
            for s in t.current.iter().chain(std::iter::once(&t.legacy)) {
                check(i, m, s);
            }
        }
    }
}

/// Mapping fields, one per line, into the shipped configuration.
fn mapping_fields(text: &str) {
    let fields: Vec<&str> = text.split('\n').collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or("");
    let mut operations = Vec::new();
    for (letter, op) in [('I', "INSERT"), ('U', "UPDATE"), ('D', "DELETE")] {
        if field(3).contains(letter) {
            operations.push(op);
        }
    }
    let mut mapping = serde_json::json!({
        "table": field(1),
        "operations": operations,
        "channel": field(2),
    });
    if !field(0).is_empty() {
        mapping["schema"] = field(0).into();
    }
    if fields.len() > 4 {
        mapping["columns"] = fields[4..].into();
    }
    let mut base: serde_json::Value = serde_json::from_str(SHIPPED).expect("config.json");
    base["mappings"]
        .as_array_mut()
        .expect("mappings")
        .push(mapping);
    config(&base.to_string());
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if text.starts_with(|c: char| c == '{' || c.is_ascii_whitespace()) {
        config(&text);
    } else {
        mapping_fields(&text);
    }
});
