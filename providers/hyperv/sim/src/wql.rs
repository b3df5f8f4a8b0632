//! The WQL subset real clients send (WIRE.md): `SELECT * FROM <Class>
//! [WHERE ...]` with `=`, `<>`, `!=`, `<`, `>`, `<=`, `>=`, `LIKE`, `IS
//! [NOT] NULL`, `AND`, `OR`, `NOT` and parentheses; string literals in
//! single or double quotes with `\` escapes, numbers, `TRUE`/`FALSE`/`NULL`;
//! and `ASSOCIATORS OF {<object path>} WHERE AssocClass = X ResultClass = Y
//! [Role = R] [ResultRole = RR]`. Also the WMI object paths that `Parent`
//! and `HostResource` carry. String comparisons ignore case, as WMI's do.

use crate::catalog::Catalog;
use crate::model::{Instance, Val};

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Query {
    Select { class: String, filter: Option<Expr> },
    Associators(Associators),
}

/// `ASSOCIATORS OF`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Associators {
    pub(crate) source: ObjectPath,
    pub(crate) assoc_class: Option<String>,
    pub(crate) result_class: Option<String>,
    pub(crate) role: Option<String>,
    pub(crate) result_role: Option<String>,
}

/// A condition.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(String, Op, Lit),
    IsNull(String, bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Like,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Lit {
    Str(String),
    Num(i128),
    Bool(bool),
    Null,
}

/// Why a query is refused (the enumerate handler answers it with
/// `w:CannotProcessFilter`, see `wsman::filter_fault`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WqlError {
    /// A number literal that does not fit.
    #[error("bad number {text}")]
    BadNumber {
        /// The literal.
        text: String,
        /// Why it does not parse.
        #[source]
        source: std::num::ParseIntError,
    },
    /// A quote is opened and never closed.
    #[error("a string literal is not terminated")]
    UnterminatedString,
    /// A `\` at the end of the text.
    #[error("a dangling '\\'")]
    DanglingEscape,
    /// A `{` without its `}`.
    #[error("an object path is not terminated by '}}'")]
    UnterminatedPath,
    /// A character no token starts with.
    #[error("unexpected character '{found}'")]
    UnexpectedChar {
        /// The character.
        found: char,
    },
    /// The grammar wants `expected` here.
    #[error("expected {expected}")]
    Expected {
        /// A keyword, symbol or what kind of name.
        expected: &'static str,
    },
    /// A property not followed by an operator.
    #[error("expected an operator after {property}")]
    NoOperator {
        /// The property.
        property: String,
    },
    /// An operator not followed by a literal.
    #[error("expected a literal after {property}")]
    NoLiteral {
        /// The property compared.
        property: String,
    },
    /// `LIKE` with a number, boolean or `NULL`.
    #[error("LIKE needs a string")]
    LikeNeedsString,
    /// `SELECT` of named properties.
    #[error("only SELECT * is simulated")]
    NotSelectStar,
    /// A class the catalogue does not have.
    #[error("invalid class {class}")]
    InvalidClass {
        /// The name as written.
        class: String,
    },
    /// An `ASSOCIATORS OF` qualifier without `=`.
    #[error("expected '=' after {qualifier}")]
    NoEquals {
        /// The qualifier.
        qualifier: String,
    },
    /// An `ASSOCIATORS OF` qualifier other than the four simulated.
    #[error("{qualifier} is not simulated in ASSOCIATORS OF")]
    UnsupportedQualifier {
        /// The qualifier.
        qualifier: String,
    },
    /// An `ASSOCIATORS OF` qualifier given twice.
    #[error("{qualifier} given twice")]
    RepeatedQualifier {
        /// The qualifier.
        qualifier: String,
    },
    /// Tokens after a complete query.
    #[error("unexpected text after the query")]
    TrailingText,
    /// A condition on a property the class does not have.
    #[error("{class} has no property {property}")]
    NoProperty {
        /// The class queried.
        class: String,
        /// The property as written.
        property: String,
    },
    /// A condition on an array property.
    #[error("{class}.{property} is an array and cannot be compared")]
    ArrayProperty {
        /// The class queried.
        class: String,
        /// The property as written.
        property: String,
    },
    /// The `ASSOCIATORS OF` object path does not parse.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The `ASSOCIATORS OF` object path is in another namespace.
    #[error("the object path is in namespace {namespace}")]
    Namespace {
        /// The namespace the path names.
        namespace: String,
    },
    /// The `ASSOCIATORS OF` object path does not give exactly the class's keys.
    #[error("the object path must give exactly the keys {} of {class}", keys.join(", "))]
    Keys {
        /// The class the path names.
        class: String,
        /// Its key properties.
        keys: Vec<String>,
    },
}

/// Why an object path does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    /// `\\HOST` without `\namespace`.
    #[error("no namespace after the host")]
    NoNamespace,
    /// A namespace without the `:` before the class.
    #[error("no ':' after the namespace")]
    NoColon,
    /// A class without `.` and keys.
    #[error("no '.' after the class name")]
    NoDot,
    /// The class part is not a name.
    #[error("'{class}' is not a class name")]
    BadClass {
        /// The text in the class's place.
        class: String,
    },
    /// `=` or `,` where a key name belongs.
    #[error("a key name is missing")]
    NoKeyName,
    /// A key name not followed by `=`.
    #[error("no '=' after key {key}")]
    NoEquals {
        /// The key.
        key: String,
    },
    /// A key value without quotes.
    #[error("the value of {key} is not quoted")]
    Unquoted {
        /// The key.
        key: String,
    },
    /// A key value whose quote is never closed.
    #[error("the value of {key} is not terminated")]
    Unterminated {
        /// The key.
        key: String,
    },
    /// A `\` at the end of the path.
    #[error("a dangling '\\'")]
    DanglingEscape,
    /// Something other than `,` after a key value.
    #[error("unexpected '{found}' after a key value")]
    AfterValue {
        /// The character found.
        found: char,
    },
}

/// A WMI object path: `[\\HOST\namespace:]Class.Key="v",Key2='v'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectPath {
    pub(crate) host: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) class: String,
    pub(crate) keys: Vec<(String, String)>,
}

/// Parses an object path.
pub(crate) fn parse_object_path(s: &str) -> Result<ObjectPath, PathError> {
    let s = s.trim();
    let (host, namespace, rest) = if let Some(after) = s.strip_prefix("\\\\") {
        let (host, rest) = after.split_once('\\').ok_or(PathError::NoNamespace)?;
        let (ns, rest) = rest.split_once(':').ok_or(PathError::NoColon)?;
        (Some(host.to_owned()), Some(ns.to_owned()), rest)
    } else if let Some((ns, rest)) = s.split_once(':').filter(|(ns, _)| ns.contains('\\') || ns.contains('/'))
    {
        (None, Some(ns.to_owned()), rest)
    } else {
        (None, None, s)
    };
    let (class, keys_text) = rest.split_once('.').ok_or(PathError::NoDot)?;
    if class.is_empty() || !class.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(PathError::BadClass { class: class.to_owned() });
    }
    let chars: Vec<char> = keys_text.chars().collect();
    let mut i = 0;
    let mut keys = Vec::new();
    loop {
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        if name.is_empty() {
            return Err(PathError::NoKeyName);
        }
        if chars.get(i) != Some(&'=') {
            return Err(PathError::NoEquals { key: name });
        }
        i += 1;
        let quote = match chars.get(i) {
            Some(q @ ('"' | '\'')) => *q,
            _ => return Err(PathError::Unquoted { key: name }),
        };
        i += 1;
        let mut value = String::new();
        loop {
            match chars.get(i) {
                None => return Err(PathError::Unterminated { key: name }),
                Some('\\') => {
                    value.push(*chars.get(i + 1).ok_or(PathError::DanglingEscape)?);
                    i += 2;
                }
                Some(c) if *c == quote => {
                    i += 1;
                    break;
                }
                Some(c) => {
                    value.push(*c);
                    i += 1;
                }
            }
        }
        keys.push((name, value));
        match chars.get(i) {
            None => break,
            Some(',') => i += 1,
            Some(c) => return Err(PathError::AfterValue { found: *c }),
        }
    }
    Ok(ObjectPath { host, namespace, class: class.to_owned(), keys })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(i128),
    Sym(&'static str),
    /// The raw text between `{` and `}`.
    Path(String),
}

fn tokenize(q: &str) -> Result<Vec<Tok>, WqlError> {
    let chars: Vec<char> = q.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let n = text.parse().map_err(|source| WqlError::BadNumber { text: text.clone(), source })?;
            out.push(Tok::Num(n));
        } else if c == '\'' || c == '"' {
            i += 1;
            let mut s = String::new();
            loop {
                match chars.get(i) {
                    None => return Err(WqlError::UnterminatedString),
                    Some('\\') => {
                        s.push(*chars.get(i + 1).ok_or(WqlError::DanglingEscape)?);
                        i += 2;
                    }
                    Some(q) if *q == c => {
                        i += 1;
                        break;
                    }
                    Some(x) => {
                        s.push(*x);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(s));
        } else if c == '{' {
            // Object paths may hold quotes with braces inside: scan quoted
            // runs whole.
            i += 1;
            let mut s = String::new();
            let mut quote: Option<char> = None;
            loop {
                let Some(&x) = chars.get(i) else {
                    return Err(WqlError::UnterminatedPath);
                };
                i += 1;
                match quote {
                    Some(q) => {
                        s.push(x);
                        if x == '\\' {
                            if let Some(&n) = chars.get(i) {
                                s.push(n);
                                i += 1;
                            }
                        } else if x == q {
                            quote = None;
                        }
                    }
                    None if x == '}' => break,
                    None => {
                        if x == '"' || x == '\'' {
                            quote = Some(x);
                        }
                        s.push(x);
                    }
                }
            }
            out.push(Tok::Path(s));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let sym = match two.as_str() {
                "<>" => Some("<>"),
                "!=" => Some("!="),
                "<=" => Some("<="),
                ">=" => Some(">="),
                _ => None,
            };
            if let Some(s) = sym {
                out.push(Tok::Sym(s));
                i += 2;
                continue;
            }
            let s = match c {
                '*' => "*",
                '=' => "=",
                '<' => "<",
                '>' => ">",
                '(' => "(",
                ')' => ")",
                ',' => ",",
                _ => return Err(WqlError::UnexpectedChar { found: c }),
            };
            out.push(Tok::Sym(s));
            i += 1;
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn keyword(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case(kw)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, kw: &'static str) -> Result<(), WqlError> {
        if self.keyword(kw) { Ok(()) } else { Err(WqlError::Expected { expected: kw }) }
    }

    fn ident(&mut self, what: &'static str) -> Result<String, WqlError> {
        match self.next() {
            Some(Tok::Ident(s)) => Ok(s),
            _ => Err(WqlError::Expected { expected: what }),
        }
    }

    fn sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(x)) if *x == s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Result<Expr, WqlError> {
        let mut left = self.term()?;
        while self.keyword("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.term()?));
        }
        Ok(left)
    }

    fn term(&mut self) -> Result<Expr, WqlError> {
        let mut left = self.factor()?;
        while self.keyword("AND") {
            left = Expr::And(Box::new(left), Box::new(self.factor()?));
        }
        Ok(left)
    }

    fn factor(&mut self) -> Result<Expr, WqlError> {
        if self.keyword("NOT") {
            return Ok(Expr::Not(Box::new(self.factor()?)));
        }
        if self.sym("(") {
            let e = self.expr()?;
            if !self.sym(")") {
                return Err(WqlError::Expected { expected: "')'" });
            }
            return Ok(e);
        }
        let prop = self.ident("a property name")?;
        if self.keyword("IS") {
            let not = self.keyword("NOT");
            self.expect_keyword("NULL")?;
            return Ok(Expr::IsNull(prop, !not));
        }
        let op = if self.keyword("LIKE") {
            Op::Like
        } else {
            match self.next() {
                Some(Tok::Sym("=")) => Op::Eq,
                Some(Tok::Sym("<>" | "!=")) => Op::Ne,
                Some(Tok::Sym("<")) => Op::Lt,
                Some(Tok::Sym(">")) => Op::Gt,
                Some(Tok::Sym("<=")) => Op::Le,
                Some(Tok::Sym(">=")) => Op::Ge,
                _ => return Err(WqlError::NoOperator { property: prop }),
            }
        };
        let lit = match self.next() {
            Some(Tok::Str(s)) => Lit::Str(s),
            Some(Tok::Num(n)) => Lit::Num(n),
            Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("TRUE") => Lit::Bool(true),
            Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("FALSE") => Lit::Bool(false),
            Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("NULL") => Lit::Null,
            _ => return Err(WqlError::NoLiteral { property: prop }),
        };
        if op == Op::Like && !matches!(lit, Lit::Str(_)) {
            return Err(WqlError::LikeNeedsString);
        }
        Ok(Expr::Cmp(prop, op, lit))
    }
}

/// Parses a query and checks its class and property names against the
/// catalogue.
pub(crate) fn parse(q: &str) -> Result<Query, WqlError> {
    let mut p = Parser { toks: tokenize(q)?, pos: 0 };
    let catalog = Catalog::get();
    let query = if p.keyword("SELECT") {
        if !p.sym("*") {
            return Err(WqlError::NotSelectStar);
        }
        p.expect_keyword("FROM")?;
        let class = p.ident("a class name")?;
        let Some(def) = catalog.class_nocase(&class) else {
            return Err(WqlError::InvalidClass { class });
        };
        let filter = if p.keyword("WHERE") { Some(p.expr()?) } else { None };
        if let Some(f) = &filter {
            check_props(f, &def.name)?;
        }
        Query::Select { class: def.name.clone(), filter }
    } else if p.keyword("ASSOCIATORS") {
        p.expect_keyword("OF")?;
        let Some(Tok::Path(path)) = p.next() else {
            return Err(WqlError::Expected { expected: "{object path}" });
        };
        let source = parse_object_path(&path)?;
        let mut a =
            Associators { source, assoc_class: None, result_class: None, role: None, result_role: None };
        if p.keyword("WHERE") {
            while p.peek().is_some() {
                let word = p.ident("AssocClass, ResultClass, Role or ResultRole")?;
                if !p.sym("=") {
                    return Err(WqlError::NoEquals { qualifier: word });
                }
                let value = p.ident("a name")?;
                let slot = match word.to_ascii_lowercase().as_str() {
                    "assocclass" => &mut a.assoc_class,
                    "resultclass" => &mut a.result_class,
                    "role" => &mut a.role,
                    "resultrole" => &mut a.result_role,
                    _ => return Err(WqlError::UnsupportedQualifier { qualifier: word }),
                };
                if slot.replace(value).is_some() {
                    return Err(WqlError::RepeatedQualifier { qualifier: word });
                }
            }
        }
        for c in [&a.assoc_class, &a.result_class].into_iter().flatten() {
            if catalog.class_nocase(c).is_none() {
                return Err(WqlError::InvalidClass { class: c.clone() });
            }
        }
        Query::Associators(a)
    } else {
        return Err(WqlError::Expected { expected: "SELECT or ASSOCIATORS OF" });
    };
    if p.peek().is_some() {
        return Err(WqlError::TrailingText);
    }
    Ok(query)
}

fn check_props(e: &Expr, class: &str) -> Result<(), WqlError> {
    let def =
        Catalog::get().class(class).ok_or_else(|| WqlError::InvalidClass { class: class.to_owned() })?;
    let check = |name: &str| -> Result<(), WqlError> {
        if def.props.is_empty() {
            return Ok(());
        }
        let (class, property) = (class.to_owned(), name.to_owned());
        match def.props.iter().find(|p| p.name.eq_ignore_ascii_case(name)) {
            None => Err(WqlError::NoProperty { class, property }),
            Some(p) if p.array => Err(WqlError::ArrayProperty { class, property }),
            Some(_) => Ok(()),
        }
    };
    match e {
        Expr::And(a, b) | Expr::Or(a, b) => {
            check_props(a, class)?;
            check_props(b, class)
        }
        Expr::Not(a) => check_props(a, class),
        Expr::Cmp(p, _, _) | Expr::IsNull(p, _) => check(p),
    }
}

/// Evaluates a condition on an instance.
pub(crate) fn matches(e: &Expr, inst: &Instance) -> bool {
    match e {
        Expr::And(a, b) => matches(a, inst) && matches(b, inst),
        Expr::Or(a, b) => matches(a, inst) || matches(b, inst),
        Expr::Not(a) => !matches(a, inst),
        Expr::IsNull(p, is_null) => matches!(prop(inst, p), Val::Null) == *is_null,
        Expr::Cmp(p, op, lit) => compare(prop(inst, p), *op, lit),
    }
}

fn prop<'a>(inst: &'a Instance, name: &str) -> &'a Val {
    inst.props.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v).unwrap_or(&Val::Null)
}

fn compare(v: &Val, op: Op, lit: &Lit) -> bool {
    use std::cmp::Ordering;
    if let Lit::Null = lit {
        let null = matches!(v, Val::Null);
        return match op {
            Op::Eq => null,
            Op::Ne => !null,
            _ => false,
        };
    }
    let ord: Option<Ordering> = match (v, lit) {
        (Val::Null, _) => None,
        (_, Lit::Str(s)) if op == Op::Like => {
            return v.text().is_some_and(|t| like(&t.to_lowercase(), &s.to_lowercase()));
        }
        (Val::U(n), Lit::Num(m)) => Some(i128::from(*n).cmp(m)),
        (Val::Bool(b), Lit::Bool(c)) => Some(b.cmp(c)),
        (Val::U(n), Lit::Str(s)) => s.trim().parse::<i128>().ok().map(|m| i128::from(*n).cmp(&m)),
        (v, Lit::Str(s)) => v.text().map(|t| t.to_lowercase().cmp(&s.to_lowercase())),
        (Val::Str(t), Lit::Num(m)) => t.trim().parse::<i128>().ok().map(|n| n.cmp(m)),
        _ => None,
    };
    let Some(ord) = ord else { return false };
    match op {
        Op::Eq => ord == Ordering::Equal,
        Op::Ne => ord != Ordering::Equal,
        Op::Lt => ord == Ordering::Less,
        Op::Gt => ord == Ordering::Greater,
        Op::Le => ord != Ordering::Greater,
        Op::Ge => ord != Ordering::Less,
        Op::Like => false,
    }
}

/// WQL LIKE: `%` any run, `_` one character.
fn like(text: &str, pattern: &str) -> bool {
    let t: Vec<char> = text.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    // Iterative wildcard matching with backtracking on the last '%'.
    let (mut ti, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || p[pi] == t[ti]) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '%' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst() -> Instance {
        Instance::new("Msvm_ComputerSystem")
            .set("ElementName", Val::str("hcp-It's"))
            .set("Caption", Val::str("Virtual Machine"))
            .set("EnabledState", Val::U(2))
    }

    #[test]
    fn select_with_escapes_and_logic() {
        let check = |q: &str, expected: bool| {
            let Query::Select { filter: Some(f), .. } = parse(q).unwrap_or_else(|e| panic!("{q}: {e}"))
            else {
                panic!("{q}: not a filtered select");
            };
            assert_eq!(matches(&f, &inst()), expected, "{q}");
        };
        check(r"SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'hcp-It\'s'", true);
        check("SELECT * FROM Msvm_ComputerSystem WHERE caption = 'virtual machine'", true);
        check("SELECT * FROM Msvm_ComputerSystem WHERE Caption <> 'Virtual Machine'", false);
        check("SELECT * FROM Msvm_ComputerSystem WHERE EnabledState = 2 AND Caption LIKE 'Virt%'", true);
        check("SELECT * FROM Msvm_ComputerSystem WHERE EnabledState = 3 OR ElementName LIKE '%s'", true);
        check("SELECT * FROM Msvm_ComputerSystem WHERE NOT (EnabledState >= 2)", false);
        check("SELECT * FROM Msvm_ComputerSystem WHERE Description IS NULL", true);
        check("SELECT * FROM Msvm_ComputerSystem WHERE ElementName LIKE 'hcp-_t%'", true);
    }

    #[test]
    fn refusals() {
        for q in [
            "SELECT Name FROM Msvm_ComputerSystem",
            "SELECT * FROM Msvm_Nothing",
            "SELECT * FROM Msvm_ComputerSystem WHERE Nope = 1",
            "SELECT * FROM Msvm_ComputerSystem WHERE Roles = 'x'",
            "SELECT * FROM Msvm_ComputerSystem WHERE Name = 'x",
            "SELECT * FROM Msvm_ComputerSystem WHERE",
            "ASSOCIATORS OF {Msvm_ComputerSystem.Name='x'} WHERE AssocClass = Msvm_Nothing",
            "DELETE FROM x",
        ] {
            assert!(parse(q).is_err(), "{q}");
        }
    }

    #[test]
    fn associators_and_paths() {
        let q = parse(
            "ASSOCIATORS OF {Msvm_VirtualSystemSettingData.InstanceID='Microsoft:AB\\\\C'} WHERE AssocClass = Msvm_VirtualSystemSettingDataComponent ResultClass = Msvm_ProcessorSettingData",
        )
        .unwrap();
        let Query::Associators(a) = q else { panic!() };
        assert_eq!(a.source.class, "Msvm_VirtualSystemSettingData");
        assert_eq!(a.source.keys, vec![("InstanceID".to_owned(), "Microsoft:AB\\C".to_owned())]);
        assert_eq!(a.result_class.as_deref(), Some("Msvm_ProcessorSettingData"));
        let p = parse_object_path(
            r#"\\HV1\root\virtualization\v2:Msvm_ComputerSystem.CreationClassName="Msvm_ComputerSystem",Name="G""#,
        )
        .unwrap();
        assert_eq!(p.host.as_deref(), Some("HV1"));
        assert_eq!(p.namespace.as_deref(), Some("root\\virtualization\\v2"));
        assert_eq!(p.keys.len(), 2);
        assert!(parse_object_path("Msvm_X").is_err());
        assert!(parse_object_path("Msvm_X.A=1").is_err());
    }

    #[test]
    fn like_patterns() {
        assert!(like("microsoft:abc\\def", "microsoft:abc%"));
        assert!(like("abc", "%"));
        assert!(like("abc", "a%c"));
        assert!(!like("abc", "a%d"));
        assert!(like("axbxc", "%x%x%"));
        assert!(!like("axbx", "%x%x%c"));
    }
}
