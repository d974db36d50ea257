//! The device filter language, shared by the server (which evaluates it over devices) and the
//! CLI (which checks it before sending).
//!
//! ```text
//! filter  := or
//! or      := and ("or" and)*
//! and     := unary ("and" unary)*
//! unary   := "not" unary | "(" filter ")" | term
//! term    := attr "exists" | attr op value
//! op      := "=" | "!=" | "~" | "<" | ">"
//! attr    := name | "tag:" name          name: letters, digits, '_', '-', '.', '/'
//! value   := bare | "quoted"             bare: no white space, '(', ')' or '"';
//!                                        quoted: '\"' and '\\' are the escapes
//! ```
//!
//! Example: `tag:floor=3 and (device_type=nuc or os ~ "Debian GNU/Linux*") and not tag:retired exists`.
//!
//! Meaning, for an attribute that a device has with value `x`:
//! - `a = v`: `x` is exactly `v`; `a != v` is `not a = v` (also true when `a` is missing);
//! - `a ~ v`: when `v` holds `*` (any run of characters) or `?` (one character), `x` matches
//!   the glob `v` as a whole; otherwise `x` contains `v`;
//! - `a < v`, `a > v`: `v` must be a number (checked when parsing); true when `x` is a number
//!   too and compares so, false otherwise;
//! - `a exists`: the device has the attribute.
//!
//! Every comparison except `!=` is false for a missing attribute. Keywords (`and`, `or`,
//! `not`, `exists`) are lower case; matching is case-sensitive.
//!
//! Limits: [`MAX_FILTER_BYTES`] of text and [`MAX_DEPTH`] levels of nesting, so that parsing
//! and evaluation never exhaust the stack. Errors carry the 1-based column of the problem.

use std::fmt;

/// Longest filter text accepted, in bytes.
pub const MAX_FILTER_BYTES: usize = 4096;
/// Deepest nesting of parentheses and `not`.
pub const MAX_DEPTH: usize = 32;

const KEYWORDS: &[&str] = &["and", "or", "not", "exists"];

/// An attribute a filter names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Attr {
    /// An operator tag (`tag:NAME`).
    Tag(String),
    /// Anything else: `id`, `status`, identity and inventory attributes.
    Field(String),
}

/// A comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `~` (glob or substring)
    Like,
    /// `<` (numeric)
    Lt,
    /// `>` (numeric)
    Gt,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Like => "~",
            Op::Lt => "<",
            Op::Gt => ">",
        }
    }
}

/// A parsed filter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    /// Both hold.
    And(Box<Filter>, Box<Filter>),
    /// Either holds.
    Or(Box<Filter>, Box<Filter>),
    /// Does not hold.
    Not(Box<Filter>),
    /// The attribute is present.
    Exists(Attr),
    /// The attribute compares with the value.
    Cmp {
        /// What is compared.
        attr: Attr,
        /// How.
        op: Op,
        /// With what (for `<` and `>` a number, kept as written).
        value: String,
    },
}

/// Why a filter did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("filter error at column {column}: {message}")]
pub struct FilterError {
    /// 1-based column (in characters) where the problem is.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// What a filter asks of a device: the value of an attribute, if the device has it.
pub trait Attributes {
    /// The attribute's value, or `None` when the device does not have it.
    fn attribute(&self, attr: &Attr) -> Option<&str>;
}

/// Parses a filter.
pub fn parse(text: &str) -> Result<Filter, FilterError> {
    if text.len() > MAX_FILTER_BYTES {
        return Err(FilterError {
            column: 1,
            message: format!("a filter is at most {MAX_FILTER_BYTES} bytes"),
        });
    }
    let mut p = Parser {
        text,
        pos: 0,
        depth: 0,
    };
    p.skip_ws();
    if p.at_end() {
        return Err(p.error("the filter is empty"));
    }
    let f = p.or()?;
    p.skip_ws();
    if !p.at_end() {
        return Err(p.error(&format!(
            "expected `and`, `or` or the end, found {}",
            p.describe_here()
        )));
    }
    Ok(f)
}

impl std::str::FromStr for Filter {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    depth: usize,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

fn is_bare_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, '(' | ')' | '"')
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn column(&self) -> usize {
        self.text[..self.pos].chars().count() + 1
    }

    fn error(&self, message: &str) -> FilterError {
        FilterError {
            column: self.column(),
            message: message.to_owned(),
        }
    }

    fn describe_here(&self) -> String {
        match self.peek() {
            None => "the end".to_owned(),
            Some(_) => {
                let word: String = self.rest().chars().take(12).collect();
                format!("{word:?}")
            }
        }
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }

    /// The name-like word at the cursor, without consuming it.
    fn peek_word(&self) -> &str {
        let rest = self.rest();
        let end = rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len());
        &rest[..end]
    }

    /// Consumes `kw` if it is the next whole word.
    fn keyword(&mut self, kw: &str) -> bool {
        self.skip_ws();
        if self.peek_word() == kw {
            self.pos += kw.len();
            true
        } else {
            false
        }
    }

    fn enter(&mut self) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(&format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and()?;
        while self.keyword("or") {
            let right = self.and()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            let right = self.unary()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, FilterError> {
        self.skip_ws();
        if self.keyword("not") {
            self.enter()?;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Filter::Not(Box::new(inner)));
        }
        if self.peek() == Some('(') {
            self.enter()?;
            self.pos += 1;
            let inner = self.or()?;
            self.skip_ws();
            if self.peek() != Some(')') {
                return Err(self.error(&format!("expected `)`, found {}", self.describe_here())));
            }
            self.pos += 1;
            self.depth -= 1;
            return Ok(inner);
        }
        self.term()
    }

    fn name(&mut self, what: &str) -> Result<String, FilterError> {
        let word = self.peek_word();
        if word.is_empty() {
            return Err(self.error(&format!(
                "expected {what} (letters, digits, '_', '-', '.', '/'), found {}",
                self.describe_here()
            )));
        }
        let word = word.to_owned();
        self.pos += word.len();
        Ok(word)
    }

    fn term(&mut self) -> Result<Filter, FilterError> {
        let start = self.pos;
        let attr = if self.rest().starts_with("tag:") {
            self.pos += "tag:".len();
            Attr::Tag(self.name("a tag name")?)
        } else {
            let name = self.name("an attribute name")?;
            if KEYWORDS.contains(&name.as_str()) {
                self.pos = start;
                return Err(self.error(&format!(
                    "expected an attribute name, found the keyword `{name}`"
                )));
            }
            Attr::Field(name)
        };
        if self.keyword("exists") {
            return Ok(Filter::Exists(attr));
        }
        self.skip_ws();
        let rest = self.rest();
        let op = if rest.starts_with("!=") {
            Op::Ne
        } else if rest.starts_with('=') {
            Op::Eq
        } else if rest.starts_with('~') {
            Op::Like
        } else if rest.starts_with('<') {
            Op::Lt
        } else if rest.starts_with('>') {
            Op::Gt
        } else {
            return Err(self.error(&format!(
                "expected `=`, `!=`, `~`, `<`, `>` or `exists`, found {}",
                self.describe_here()
            )));
        };
        self.pos += op.symbol().len();
        self.skip_ws();
        let value_at = self.pos;
        let value = self.value()?;
        if matches!(op, Op::Lt | Op::Gt) && number(&value).is_none() {
            self.pos = value_at;
            return Err(self.error(&format!(
                "`{}` compares numbers; {value:?} is not one",
                op.symbol()
            )));
        }
        Ok(Filter::Cmp { attr, op, value })
    }

    fn value(&mut self) -> Result<String, FilterError> {
        if self.peek() == Some('"') {
            let open = self.pos;
            self.pos += 1;
            let mut out = String::new();
            let mut chars = self.rest().char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        self.pos += i + 1;
                        return Ok(out);
                    }
                    '\\' => match chars.next() {
                        Some((_, e @ ('"' | '\\'))) => out.push(e),
                        Some(_) => {
                            self.pos += i;
                            return Err(
                                self.error("only \\\" and \\\\ are escapes in a quoted value")
                            );
                        }
                        None => break,
                    },
                    c => out.push(c),
                }
            }
            self.pos = open;
            return Err(self.error("unterminated quoted value"));
        }
        let rest = self.rest();
        let end = rest.find(|c: char| !is_bare_char(c)).unwrap_or(rest.len());
        if end == 0 {
            return Err(self.error(&format!(
                "expected a value, found {} (quote an empty value: \"\")",
                self.describe_here()
            )));
        }
        let value = rest[..end].to_owned();
        self.pos += end;
        Ok(value)
    }
}

fn number(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|n| n.is_finite())
}

/// `*` matches any run of characters, `?` one character; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Filter {
    /// Whether a device with these attributes matches.
    pub fn matches(&self, device: &impl Attributes) -> bool {
        match self {
            Filter::And(a, b) => a.matches(device) && b.matches(device),
            Filter::Or(a, b) => a.matches(device) || b.matches(device),
            Filter::Not(a) => !a.matches(device),
            Filter::Exists(attr) => device.attribute(attr).is_some(),
            Filter::Cmp { attr, op, value } => {
                let actual = device.attribute(attr);
                match (op, actual) {
                    (Op::Ne, None) => true,
                    (_, None) => false,
                    (Op::Eq, Some(x)) => x == value,
                    (Op::Ne, Some(x)) => x != value,
                    (Op::Like, Some(x)) => {
                        if value.contains(['*', '?']) {
                            glob(value, x)
                        } else {
                            x.contains(value.as_str())
                        }
                    }
                    (Op::Lt | Op::Gt, Some(x)) => match (number(x), number(value)) {
                        (Some(x), Some(v)) if *op == Op::Lt => x < v,
                        (Some(x), Some(v)) => x > v,
                        _ => false,
                    },
                }
            }
        }
    }
}

fn write_name(f: &mut fmt::Formatter<'_>, attr: &Attr) -> fmt::Result {
    match attr {
        Attr::Tag(name) => write!(f, "tag:{name}"),
        Attr::Field(name) => f.write_str(name),
    }
}

fn write_value(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    let bare = !value.is_empty()
        && !value.starts_with('"')
        && value.chars().all(is_bare_char)
        && !KEYWORDS.contains(&value);
    if bare {
        return f.write_str(value);
    }
    f.write_str("\"")?;
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

/// How tightly an operator binds: `or` < `and` < `not` and terms.
fn binding(x: &Filter) -> u8 {
    match x {
        Filter::Or(..) => 0,
        Filter::And(..) => 1,
        _ => 2,
    }
}

/// Writes `x` as an operand that must bind at least `min`, in parentheses when it does not.
fn write_operand(f: &mut fmt::Formatter<'_>, x: &Filter, min: u8) -> fmt::Result {
    if binding(x) < min {
        write!(f, "({x})")
    } else {
        write!(f, "{x}")
    }
}

/// The canonical text of a filter: parses back to the same filter. Parentheses stand only where
/// the grouping needs them (`and` and `or` group from the left), so a chain of terms prints
/// flat and never nests deeper than the text it was parsed from.
impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::And(a, b) | Filter::Or(a, b) => {
                let own = binding(self);
                // The left operand may be the same operator (a chain); the right one must
                // bind tighter, or it would be read as part of the chain.
                write_operand(f, a, own)?;
                f.write_str(if own == 1 { " and " } else { " or " })?;
                write_operand(f, b, own + 1)
            }
            Filter::Not(a) => {
                f.write_str("not ")?;
                write_operand(f, a, 2)
            }
            Filter::Exists(attr) => {
                write_name(f, attr)?;
                f.write_str(" exists")
            }
            Filter::Cmp { attr, op, value } => {
                write_name(f, attr)?;
                f.write_str(op.symbol())?;
                write_value(f, value)
            }
        }
    }
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    struct Dev {
        fields: BTreeMap<String, String>,
        tags: BTreeMap<String, String>,
    }

    impl Attributes for Dev {
        fn attribute(&self, attr: &Attr) -> Option<&str> {
            match attr {
                Attr::Tag(n) => self.tags.get(n),
                Attr::Field(n) => self.fields.get(n),
            }
            .map(String::as_str)
        }
    }

    fn dev(fields: &[(&str, &str)], tags: &[(&str, &str)]) -> Dev {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        Dev {
            fields: map(fields),
            tags: map(tags),
        }
    }

    fn m(filter: &str, d: &Dev) -> bool {
        parse(filter).expect(filter).matches(d)
    }

    #[test]
    fn the_example_from_the_product_spec() {
        let nuc3 = dev(&[("device_type", "nuc")], &[("floor", "3")]);
        let nuc4 = dev(&[("device_type", "nuc")], &[("floor", "4")]);
        let f = "tag:floor=3 and device_type=nuc";
        assert!(m(f, &nuc3));
        assert!(!m(f, &nuc4));
    }

    #[test]
    fn operators_mean_what_the_docs_say() {
        let d = dev(
            &[
                ("os", "Debian GNU/Linux 12 (bookworm)"),
                ("memory_total_kb", "8000000"),
                ("status", "accepted"),
            ],
            &[("room", "north wing")],
        );
        assert!(m("os ~ Debian", &d));
        assert!(m("os ~ \"Debian*bookworm)\"", &d));
        assert!(!m("os ~ \"Debian*buster)\"", &d));
        assert!(m("os ~ \"Debian GNU?Linux*\"", &d));
        assert!(m("memory_total_kb > 4000000", &d));
        assert!(!m("memory_total_kb < 4e6", &d));
        assert!(!m("os < 3", &d), "a non-number never compares");
        assert!(m("tag:room = \"north wing\"", &d));
        assert!(m("tag:room exists and not tag:floor exists", &d));
        assert!(
            m("tag:floor != 3", &d),
            "!= is true for a missing attribute"
        );
        assert!(!m("tag:floor = 3", &d));
        assert!(!m("tag:floor ~ 3", &d));
        assert!(m("status=pending or (status=accepted and os~Linux)", &d));
        assert!(!m("not (status=accepted)", &d));
        assert!(m("not not status=accepted", &d));
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let f = parse("a=1 or b=2 and c=3").unwrap();
        assert!(matches!(f, Filter::Or(_, ref r) if matches!(**r, Filter::And(..))));
        let d = dev(&[("a", "1")], &[]);
        assert!(f.matches(&d));
    }

    #[test]
    fn errors_name_the_column() {
        for (text, column, needle) in [
            ("", 1, "empty"),
            ("tag:floor=3 and", 16, "expected an attribute name"),
            ("floor=3 )", 9, "expected `and`"),
            ("(floor=3", 9, "expected `)`"),
            ("floor 3", 7, "expected `=`"),
            ("floor<abc", 7, "compares numbers"),
            ("floor=\"abc", 7, "unterminated"),
            ("floor=", 7, "expected a value"),
            ("and=1", 1, "keyword"),
            ("x=\"a\\n\"", 5, "escapes"),
            ("é=1", 1, "attribute name"),
        ] {
            let e = parse(text).expect_err(text);
            assert_eq!(e.column, column, "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn deep_nesting_and_long_input_are_refused() {
        let deep = format!("{}a=1{}", "(".repeat(100), ")".repeat(100));
        assert!(parse(&deep).unwrap_err().message.contains("nested"));
        let nots = format!("{}a=1", "not ".repeat(100));
        assert!(parse(&nots).unwrap_err().message.contains("nested"));
        let long = "a=1 and ".repeat(1000) + "a=1";
        assert!(parse(&long).is_err());
        let ok = format!("{}a=1{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn glob_edges() {
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXbYbc"));
        assert!(!glob("a*b", "aXbY"));
        assert!(glob("??", "éa"));
        assert!(!glob("?", ""));
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_./-]{1,12}".prop_filter("not a keyword", |s| !KEYWORDS.contains(&s.as_str()))
    }

    fn attr() -> impl Strategy<Value = Attr> {
        prop_oneof![name().prop_map(Attr::Tag), name().prop_map(Attr::Field)]
    }

    fn leaf() -> impl Strategy<Value = Filter> {
        let text_cmp = (
            attr(),
            prop_oneof![Just(Op::Eq), Just(Op::Ne), Just(Op::Like)],
            any::<String>(),
        );
        let num_cmp = (
            attr(),
            prop_oneof![Just(Op::Lt), Just(Op::Gt)],
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                (-1e12f64..1e12).prop_map(|n| n.to_string())
            ],
        );
        prop_oneof![
            attr().prop_map(Filter::Exists),
            text_cmp.prop_map(|(attr, op, value)| Filter::Cmp { attr, op, value }),
            num_cmp.prop_map(|(attr, op, value)| Filter::Cmp { attr, op, value }),
        ]
    }

    fn filter() -> impl Strategy<Value = Filter> {
        leaf().prop_recursive(6, 48, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Filter::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Filter::Or(Box::new(a), Box::new(b))),
                inner.prop_map(|a| Filter::Not(Box::new(a))),
            ]
        })
    }

    #[test]
    fn long_chains_print_flat_and_parse_back() {
        // More terms than the nesting limit: accepted, and still accepted once printed.
        let chain = (0..MAX_DEPTH + 8)
            .map(|i| format!("a{i}=1"))
            .collect::<Vec<_>>()
            .join(" and ");
        let f = parse(&chain).unwrap();
        assert_eq!(f.to_string(), chain);
        let mixed = format!("{chain} or b=2 and (c=3 or d=4) or not (e=5 and f=6)");
        let f = parse(&mixed).unwrap();
        assert_eq!(f.to_string(), mixed);
        assert_eq!(parse(&f.to_string()), Ok(f));
        // Grouping to the right keeps its parentheses.
        for text in [
            "a=1 and (b=2 and c=3)",
            "a=1 or (b=2 or c=3)",
            "(a=1 or b=2) and c=3",
        ] {
            assert_eq!(parse(text).unwrap().to_string(), text);
        }
    }

    proptest! {
        #[test]
        fn printing_then_parsing_gives_the_same_filter(f in filter()) {
            let text = f.to_string();
            prop_assert_eq!(parse(&text), Ok(f), "{}", text);
        }

        #[test]
        fn any_text_parses_or_fails_without_panicking(text in "\\PC{0,80}") {
            if let Ok(f) = parse(&text) {
                prop_assert_eq!(parse(&f.to_string()), Ok(f));
            }
        }

        #[test]
        fn filter_like_text_parses_or_fails_cleanly(
            text in "[a-z:=!~<>()\" 0-9]{0,60}"
        ) {
            match parse(&text) {
                Ok(f) => prop_assert_eq!(parse(&f.to_string()), Ok(f)),
                Err(e) => prop_assert!(e.column >= 1 && e.column <= text.chars().count() + 1),
            }
        }

        #[test]
        fn not_is_the_complement(f in filter(), x in "[0-9]{1,3}", t in "[a-c]") {
            let d = dev(&[("a", &x), ("b", &t)], &[("a", &t)]);
            let negated = Filter::Not(Box::new(f.clone()));
            prop_assert_eq!(negated.matches(&d), !f.matches(&d));
        }
    }
}
