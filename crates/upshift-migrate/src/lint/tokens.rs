//! The tokens of one statement, for the linter's matcher: words, quoted identifiers,
//! strings, numbers and single-character symbols, each with its line. Comments and
//! whitespace are dropped. The statement comes from [`crate::lexer::split`], which has
//! already refused anything left open, so an unterminated token here just runs to the end.

use crate::lexer::Dialect;

/// What a token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A keyword or an unquoted identifier.
    Word,
    /// A quoted identifier: `"x"` (and SQLite's `` `x` `` and `[x]`).
    Quoted,
    /// A string: `'x'`, `E'x'`, or a dollar-quoted body.
    String,
    /// A number.
    Number,
    /// Any other character: `(`, `)`, `,`, `.`, `=`, `;`, ...
    Symbol,
}

/// One token of a statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Token<'a> {
    pub(super) kind: Kind,
    /// The exact text, quotes included.
    pub(super) text: &'a str,
    /// 1-based line in the file.
    pub(super) line: usize,
}

impl Token<'_> {
    /// Whether this is the keyword `keyword` (any case).
    pub(super) fn is(&self, keyword: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(keyword)
    }

    /// Whether this is the symbol `symbol`.
    pub(super) fn is_symbol(&self, symbol: char) -> bool {
        self.kind == Kind::Symbol && self.text.len() == symbol.len_utf8() && self.text.starts_with(symbol)
    }

    /// The identifier as the database folds it: unquoted lower-cased, quoted as written.
    pub(super) fn identifier(&self) -> Option<String> {
        match self.kind {
            Kind::Word => Some(self.text.to_lowercase()),
            Kind::Quoted => {
                let quote = self.text.chars().next()?;
                let close = if quote == '[' { ']' } else { quote };
                let inner = self.text.get(1..self.text.len().saturating_sub(1)).unwrap_or_default();
                Some(inner.replace(&format!("{close}{close}"), &close.to_string()))
            }
            Kind::String | Kind::Number | Kind::Symbol => None,
        }
    }

    /// The value of a plain single-quoted string (`'5s'` is `5s`).
    pub(super) fn string_value(&self) -> Option<String> {
        let inner = self.text.strip_prefix('\'')?.strip_suffix('\'')?;
        (self.kind == Kind::String).then(|| inner.replace("''", "'"))
    }
}

/// Splits one statement into tokens. `first_line` is the file line `sql` starts on.
pub(super) fn tokenize(sql: &str, first_line: usize, dialect: Dialect) -> Vec<Token<'_>> {
    let bytes = sql.as_bytes();
    let mut tokens = Vec::new();
    let mut line = first_line;
    let mut pos = 0;
    while pos < bytes.len() {
        let start = pos;
        let start_line = line;
        let b = bytes[pos];
        let kind = match b {
            b'\n' => {
                line += 1;
                pos += 1;
                continue;
            }
            _ if b.is_ascii_whitespace() => {
                pos += 1;
                continue;
            }
            b'-' if bytes.get(pos + 1) == Some(&b'-') => {
                pos = sql[pos..].find('\n').map_or(bytes.len(), |n| pos + n);
                continue;
            }
            b'/' if bytes.get(pos + 1) == Some(&b'*') => {
                pos = block_comment_end(bytes, pos, dialect == Dialect::Postgres);
                line += count_lines(&sql[start..pos]);
                continue;
            }
            b'\'' => {
                pos = quoted_end(bytes, pos, b'\'', false);
                Kind::String
            }
            b'"' => {
                pos = quoted_end(bytes, pos, b'"', false);
                Kind::Quoted
            }
            b'`' if dialect == Dialect::Sqlite => {
                pos = quoted_end(bytes, pos, b'`', false);
                Kind::Quoted
            }
            b'[' if dialect == Dialect::Sqlite => {
                pos = sql[pos..].find(']').map_or(bytes.len(), |n| pos + n + 1);
                Kind::Quoted
            }
            b'$' if dialect == Dialect::Postgres && dollar_tag(bytes, pos).is_some() => {
                let tag = dollar_tag(bytes, pos).expect("checked");
                let delimiter = &sql[pos..pos + tag];
                pos = sql[pos + tag..].find(delimiter).map_or(bytes.len(), |n| pos + tag + n + tag);
                Kind::String
            }
            b'0'..=b'9' => {
                while pos < bytes.len() && (bytes[pos].is_ascii_digit() || bytes[pos] == b'.') {
                    pos += 1;
                }
                Kind::Number
            }
            _ if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 => {
                while pos < bytes.len()
                    && (bytes[pos].is_ascii_alphanumeric()
                        || bytes[pos] == b'_'
                        || bytes[pos] >= 0x80
                        || (bytes[pos] == b'$' && dialect == Dialect::Postgres))
                {
                    pos += 1;
                }
                // E'...' is a PostgreSQL escape string: backslashes escape.
                if dialect == Dialect::Postgres
                    && pos - start == 1
                    && (b | 0x20) == b'e'
                    && bytes.get(pos) == Some(&b'\'')
                {
                    pos = quoted_end(bytes, pos, b'\'', true);
                    Kind::String
                } else {
                    Kind::Word
                }
            }
            _ => {
                pos += sql[pos..].chars().next().map_or(1, char::len_utf8);
                Kind::Symbol
            }
        };
        line += count_lines(&sql[start..pos]);
        tokens.push(Token { kind, text: &sql[start..pos], line: start_line });
    }
    tokens
}

fn count_lines(text: &str) -> usize {
    text.bytes().filter(|&b| b == b'\n').count()
}

/// The end of a quoted token opened at `start`; the quote doubled escapes it, and with
/// `backslash` a backslash escapes the next byte.
fn quoted_end(bytes: &[u8], start: usize, quote: u8, backslash: bool) -> usize {
    let mut pos = start + 1;
    while pos < bytes.len() {
        if backslash && bytes[pos] == b'\\' {
            pos += 2;
            continue;
        }
        if bytes[pos] == quote {
            if bytes.get(pos + 1) == Some(&quote) {
                pos += 2;
                continue;
            }
            return pos + 1;
        }
        pos += 1;
    }
    bytes.len()
}

fn block_comment_end(bytes: &[u8], start: usize, nests: bool) -> usize {
    let mut depth = 0usize;
    let mut pos = start;
    while pos < bytes.len() {
        match (bytes[pos], bytes.get(pos + 1)) {
            (b'/', Some(b'*')) if depth == 0 || nests => {
                depth += 1;
                pos += 2;
            }
            (b'*', Some(b'/')) => {
                depth -= 1;
                pos += 2;
                if depth == 0 {
                    return pos;
                }
            }
            _ => pos += 1,
        }
    }
    bytes.len()
}

/// The length of the dollar-quote delimiter (`$$`, `$tag$`) at `pos`, if one opens there
/// (`$1` is a parameter).
fn dollar_tag(bytes: &[u8], pos: usize) -> Option<usize> {
    let rest = &bytes[pos + 1..];
    let tag = rest.iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b >= 0x80).count();
    (rest.get(tag) == Some(&b'$') && !rest.first().is_some_and(u8::is_ascii_digit)).then_some(tag + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str) -> Vec<&str> {
        tokenize(sql, 1, Dialect::Postgres).into_iter().map(|t| t.text).collect()
    }

    #[test]
    fn words_strings_and_symbols() {
        assert_eq!(
            texts("ALTER TABLE \"My \"\"T\"\" \" ADD c int DEFAULT 'it''s' -- no\n/* a /* b */ c */ , x;"),
            ["ALTER", "TABLE", "\"My \"\"T\"\" \"", "ADD", "c", "int", "DEFAULT", "'it''s'", ",", "x", ";"]
        );
        assert_eq!(
            texts(r"SELECT E'a\'b', $f$ x ; $f$, $1"),
            ["SELECT", r"E'a\'b'", ",", "$f$ x ; $f$", ",", "$", "1"]
        );
    }

    #[test]
    fn lines_and_identifiers() {
        let tokens = tokenize("CREATE\n  INDEX /* x\n */ i\nON \"Notes\"", 10, Dialect::Postgres);
        let lines: Vec<usize> = tokens.iter().map(|t| t.line).collect();
        assert_eq!(lines, [10, 11, 12, 13, 13]);
        assert_eq!(tokens[4].identifier().as_deref(), Some("Notes"));
        assert_eq!(tokens[0].identifier().as_deref(), Some("create"));
        assert!(tokens[1].is("index") && !tokens[1].is("indexes"));
        let lite = tokenize("ALTER TABLE [my t] RENAME TO `n``x`", 1, Dialect::Sqlite);
        assert_eq!(lite[2].identifier().as_deref(), Some("my t"));
        assert_eq!(lite[5].identifier().as_deref(), Some("n`x"));
    }
}
