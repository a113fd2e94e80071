//! Splits a SQL script into statements without parsing it.
//!
//! The lexer knows just enough of PostgreSQL's and SQLite's token rules to tell a
//! statement-ending `;` from one that sits inside something else: single-quoted strings
//! (with `''` doubling, and backslash escapes in PostgreSQL `E''` strings), quoted
//! identifiers (`"x"`, and SQLite's `` `x` `` and `[x]`), line comments, block comments
//! (nested in PostgreSQL, flat in SQLite), dollar-quoted bodies (`$$`, `$fn$`), parentheses
//! (PostgreSQL rules with several commands), PostgreSQL `BEGIN ATOMIC ... END` function
//! bodies and SQLite `CREATE TRIGGER ... BEGIN ... END` bodies (with `CASE ... END`
//! inside them).
//!
//! The pieces returned cover the input exactly: joining every [`Statement::raw`] gives the
//! script back byte for byte, which the property test in this module checks.

use std::fmt;

/// Which SQL dialect's token rules to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL: dollar quotes, `E''` strings, nested block comments, `BEGIN ATOMIC`.
    Postgres,
    /// SQLite: backtick and bracket identifiers, flat block comments, trigger bodies.
    Sqlite,
}

/// One piece of a script: a statement with whatever whitespace and comments lead to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement<'a> {
    /// The exact text of the piece, including leading whitespace and the closing `;`.
    pub raw: &'a str,
    /// Byte offset of `raw` in the script.
    pub offset: usize,
    /// 1-based line, in the script, of the first character that is not whitespace.
    pub line: usize,
    /// Whether the piece holds anything but whitespace and comments.
    has_code: bool,
}

impl<'a> Statement<'a> {
    /// The statement to execute: `raw` without surrounding whitespace.
    pub fn sql(&self) -> &'a str {
        self.raw.trim()
    }

    /// True when the piece is only whitespace and comments: nothing to execute.
    pub fn is_empty(&self) -> bool {
        !self.has_code
    }
}

/// A construct left open at the end of the script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LexError {
    /// What was left open, for example "dollar-quoted string $fn$".
    pub what: String,
    /// 1-based line where it was opened.
    pub line: usize,
}

impl fmt::Display for LexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unterminated {} starting at line {}; close it or check the quotes before it", self.what, self.line)
    }
}

impl std::error::Error for LexError {}

/// Splits `sql` into statements at every `;` that ends one.
///
/// Returns an error when a string, quoted identifier, comment or dollar-quoted body is
/// still open at the end of the script, since executing such a script would fail or, worse,
/// run something other than what the author meant.
pub fn split(sql: &str, dialect: Dialect) -> Result<Vec<Statement<'_>>, LexError> {
    Lexer::new(sql, dialect).run()
}

struct Lexer<'a> {
    src: &'a str,
    bytes: &'a [u8],
    dialect: Dialect,
    pos: usize,
    line: usize,
    out: Vec<Statement<'a>>,
    // State of the statement being read.
    start: usize,
    first_code_line: Option<usize>,
    paren_depth: usize,
    block_depth: usize,
    /// The first words of the statement, upper-cased, to recognise `CREATE TRIGGER`.
    leading_words: Vec<String>,
    /// The previous keyword was `BEGIN` (PostgreSQL: `ATOMIC` would open a body).
    after_begin: bool,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str, dialect: Dialect) -> Self {
        Lexer {
            src,
            bytes: src.as_bytes(),
            dialect,
            pos: 0,
            line: 1,
            out: Vec::new(),
            start: 0,
            first_code_line: None,
            paren_depth: 0,
            block_depth: 0,
            leading_words: Vec::new(),
            after_begin: false,
        }
    }

    fn run(mut self) -> Result<Vec<Statement<'a>>, LexError> {
        while self.pos < self.bytes.len() {
            let b = self.bytes[self.pos];
            match b {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b if b.is_ascii_whitespace() => self.pos += 1,
                b'-' if self.peek(1) == Some(b'-') => self.line_comment(),
                b'/' if self.peek(1) == Some(b'*') => self.block_comment()?,
                // A `;` alone is no code: a bare `;` (or a comment then `;`) is an empty
                // statement, skipped (SQLite refuses to run one).
                b';' => {
                    self.pos += 1;
                    if self.paren_depth == 0 && self.block_depth == 0 {
                        self.finish(self.pos);
                    }
                }
                b'\'' => {
                    self.code();
                    self.quoted(b'\'', false, "string")?;
                }
                b'"' => {
                    self.code();
                    self.quoted(b'"', false, "quoted identifier")?;
                }
                b'`' if self.dialect == Dialect::Sqlite => {
                    self.code();
                    self.quoted(b'`', false, "quoted identifier")?;
                }
                b'[' if self.dialect == Dialect::Sqlite => {
                    self.code();
                    self.bracket_identifier()?;
                }
                b'$' if self.dialect == Dialect::Postgres => {
                    self.code();
                    self.dollar()?;
                }
                b'(' => {
                    self.code();
                    self.paren_depth += 1;
                    self.pos += 1;
                }
                b')' => {
                    self.code();
                    self.paren_depth = self.paren_depth.saturating_sub(1);
                    self.pos += 1;
                }
                b if is_word_start(b) => self.word()?,
                _ => {
                    self.code();
                    self.after_begin = false;
                    // Step over a whole UTF-8 character.
                    self.pos += utf8_len(b);
                }
            }
        }
        if self.start < self.bytes.len() {
            self.finish(self.bytes.len());
        }
        Ok(self.out)
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.bytes.get(self.pos + ahead).copied()
    }

    /// Notes that the current statement holds code, starting on the current line.
    fn code(&mut self) {
        if self.first_code_line.is_none() {
            self.first_code_line = Some(self.line);
        }
    }

    fn finish(&mut self, end: usize) {
        let raw = &self.src[self.start..end];
        let line = self.first_code_line.unwrap_or_else(|| {
            // Only whitespace and comments: report the line of the first visible character.
            let skipped = raw.len() - raw.trim_start().len();
            self.line - raw[skipped..].matches('\n').count()
        });
        self.out.push(Statement { raw, offset: self.start, line, has_code: self.first_code_line.is_some() });
        self.start = end;
        self.first_code_line = None;
        self.paren_depth = 0;
        self.block_depth = 0;
        self.leading_words.clear();
        self.after_begin = false;
    }

    fn line_comment(&mut self) {
        while self.pos < self.bytes.len() && self.bytes[self.pos] != b'\n' {
            self.pos += 1;
        }
    }

    fn block_comment(&mut self) -> Result<(), LexError> {
        let opened_at = self.line;
        let nests = self.dialect == Dialect::Postgres;
        let mut depth = 0usize;
        while self.pos < self.bytes.len() {
            match (self.bytes[self.pos], self.peek(1)) {
                (b'/', Some(b'*')) if depth == 0 || nests => {
                    depth += 1;
                    self.pos += 2;
                }
                (b'*', Some(b'/')) => {
                    depth -= 1;
                    self.pos += 2;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                (b'\n', _) => {
                    self.line += 1;
                    self.pos += 1;
                }
                _ => self.pos += 1,
            }
        }
        Err(LexError { what: "block comment".into(), line: opened_at })
    }

    /// Reads a quoted token whose quote character is doubled to escape it. With
    /// `backslash`, a backslash escapes the next character (PostgreSQL `E''` strings).
    fn quoted(&mut self, quote: u8, backslash: bool, what: &str) -> Result<(), LexError> {
        let opened_at = self.line;
        self.pos += 1;
        while self.pos < self.bytes.len() {
            let b = self.bytes[self.pos];
            if b == b'\n' {
                self.line += 1;
            }
            if backslash && b == b'\\' {
                if self.peek(1) == Some(b'\n') {
                    self.line += 1;
                }
                self.pos += 2;
                continue;
            }
            self.pos += 1;
            if b == quote {
                if self.bytes.get(self.pos) == Some(&quote) {
                    self.pos += 1;
                } else {
                    self.after_begin = false;
                    return Ok(());
                }
            }
        }
        Err(LexError { what: what.into(), line: opened_at })
    }

    fn bracket_identifier(&mut self) -> Result<(), LexError> {
        let opened_at = self.line;
        match self.src[self.pos..].find(']') {
            Some(end) => {
                self.line += self.src[self.pos..self.pos + end].matches('\n').count();
                self.pos += end + 1;
                Ok(())
            }
            None => Err(LexError { what: "bracket-quoted identifier".into(), line: opened_at }),
        }
    }

    /// At a `$` in PostgreSQL: a dollar-quote opener `$tag$`, or a parameter like `$1`.
    fn dollar(&mut self) -> Result<(), LexError> {
        let rest = &self.bytes[self.pos + 1..];
        let tag_len = rest.iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b >= 0x80).count();
        let opens = rest.get(tag_len) == Some(&b'$') && !rest.first().is_some_and(u8::is_ascii_digit);
        if !opens {
            self.pos += 1;
            return Ok(());
        }
        let delimiter = &self.src[self.pos..self.pos + tag_len + 2];
        let opened_at = self.line;
        let body_start = self.pos + delimiter.len();
        match self.src[body_start..].find(delimiter) {
            Some(end) => {
                self.line += self.src[body_start..body_start + end].matches('\n').count();
                self.pos = body_start + end + delimiter.len();
                self.after_begin = false;
                Ok(())
            }
            None => Err(LexError { what: format!("dollar-quoted string {delimiter}"), line: opened_at }),
        }
    }

    fn word(&mut self) -> Result<(), LexError> {
        self.code();
        let begin = self.pos;
        while self.pos < self.bytes.len() && is_word_char(self.bytes[self.pos], self.dialect) {
            self.pos += 1;
        }
        let word = &self.src[begin..self.pos];
        // E'...' (and e'...') is a PostgreSQL escape string: backslashes escape.
        if self.dialect == Dialect::Postgres
            && word.eq_ignore_ascii_case("e")
            && self.bytes.get(self.pos) == Some(&b'\'')
        {
            return self.quoted(b'\'', true, "escape string");
        }
        if self.leading_words.len() < 4 {
            self.leading_words.push(word.to_ascii_uppercase());
        }
        self.keyword(word);
        Ok(())
    }

    /// Tracks the keywords that open and close statement bodies.
    fn keyword(&mut self, word: &str) {
        let is = |k: &str| word.eq_ignore_ascii_case(k);
        let after_begin = std::mem::take(&mut self.after_begin);
        if self.block_depth > 0 {
            if is("CASE") || (self.dialect == Dialect::Postgres && after_begin && is("ATOMIC")) {
                self.block_depth += 1;
            } else if is("END") {
                self.block_depth -= 1;
            } else if is("BEGIN") {
                self.after_begin = true;
            }
            return;
        }
        match self.dialect {
            Dialect::Postgres => {
                if after_begin && is("ATOMIC") {
                    self.block_depth = 1;
                } else if is("BEGIN") {
                    self.after_begin = true;
                }
            }
            Dialect::Sqlite => {
                if is("BEGIN") && self.in_create_trigger() {
                    self.block_depth = 1;
                }
            }
        }
    }

    fn in_create_trigger(&self) -> bool {
        let words: Vec<&str> = self.leading_words.iter().map(String::as_str).collect();
        matches!(words.as_slice(), ["CREATE", "TRIGGER", ..] | ["CREATE", "TEMP" | "TEMPORARY", "TRIGGER", ..])
    }
}

fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_word_char(b: u8, dialect: Dialect) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80 || (b == b'$' && dialect == Dialect::Postgres)
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statements(sql: &str, dialect: Dialect) -> Vec<&str> {
        split(sql, dialect).unwrap().into_iter().filter(|s| !s.is_empty()).map(|s| s.sql()).collect()
    }

    fn pg(sql: &str) -> Vec<&str> {
        statements(sql, Dialect::Postgres)
    }

    fn lite(sql: &str) -> Vec<&str> {
        statements(sql, Dialect::Sqlite)
    }

    #[test]
    fn plain_statements() {
        assert_eq!(pg("SELECT 1; SELECT 2;\nSELECT 3"), ["SELECT 1;", "SELECT 2;", "SELECT 3"]);
    }

    #[test]
    fn strings_with_semicolons_and_doubled_quotes() {
        assert_eq!(
            pg("INSERT INTO t VALUES ('a;b', 'it''s; fine'); SELECT 1;"),
            ["INSERT INTO t VALUES ('a;b', 'it''s; fine');", "SELECT 1;"]
        );
    }

    #[test]
    fn escape_strings_use_backslashes() {
        // In E'' strings \' is a quote inside the string; in plain strings it is not.
        assert_eq!(
            pg(r"SELECT E'it\'s; here'; SELECT 'a\'; SELECT 2;"),
            [r"SELECT E'it\'s; here';", r"SELECT 'a\';", "SELECT 2;"]
        );
        // A word that merely ends in e is not an escape-string prefix.
        assert_eq!(pg(r"SELECT some'x\'; SELECT 1;").len(), 2);
    }

    #[test]
    fn quoted_identifiers() {
        assert_eq!(
            pg(r#"CREATE TABLE "a;b" ("x""y;" int); SELECT 1;"#),
            [r#"CREATE TABLE "a;b" ("x""y;" int);"#, "SELECT 1;"]
        );
        assert_eq!(lite("CREATE TABLE `a;b` ([c;d] int); SELECT 1;"), ["CREATE TABLE `a;b` ([c;d] int);", "SELECT 1;"]);
    }

    #[test]
    fn line_and_nested_block_comments() {
        assert_eq!(
            pg("SELECT 1; -- a; comment\n/* outer /* inner; */ still; */ SELECT 2;"),
            ["SELECT 1;", "-- a; comment\n/* outer /* inner; */ still; */ SELECT 2;"]
        );
        // SQLite block comments do not nest: the first */ closes it.
        assert_eq!(lite("/* a /* b */ SELECT 1; SELECT 2;"), ["/* a /* b */ SELECT 1;", "SELECT 2;"]);
    }

    #[test]
    fn comment_only_piece_is_empty() {
        let pieces = split("SELECT 1;\n-- trailing; note\n", Dialect::Postgres).unwrap();
        assert_eq!(pieces.len(), 2);
        assert!(pieces[1].is_empty());
        assert_eq!(pieces[1].line, 2);
    }

    #[test]
    fn dollar_quotes_with_tags() {
        let sql = "CREATE FUNCTION f() RETURNS int AS $fn$ BEGIN RETURN 1; $$ not the end; END $fn$ LANGUAGE plpgsql;\nSELECT 2;";
        let got = pg(sql);
        assert_eq!(got.len(), 2);
        assert!(got[0].ends_with("LANGUAGE plpgsql;"));
        assert_eq!(pg("DO $$ BEGIN PERFORM 1; END $$; SELECT 1;").len(), 2);
    }

    #[test]
    fn dollar_parameters_and_identifiers_are_not_quotes() {
        assert_eq!(pg("PREPARE p AS SELECT $1; SELECT 2;").len(), 2);
        assert_eq!(pg("SELECT a$b$c FROM t; SELECT 2;").len(), 2);
    }

    #[test]
    fn begin_atomic_bodies() {
        let sql = "CREATE FUNCTION f(a int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT CASE WHEN a > 0 THEN 1 ELSE 0 END;\n  SELECT a;\nEND;\nSELECT 3;";
        let got = pg(sql);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(got[0].ends_with("END;"));
        // A transaction BEGIN is an ordinary statement.
        assert_eq!(pg("BEGIN; SELECT 1; COMMIT;").len(), 3);
    }

    #[test]
    fn sqlite_trigger_bodies() {
        let sql = "CREATE TRIGGER t AFTER INSERT ON a BEGIN\n  UPDATE b SET n = CASE WHEN n > 1 THEN 1 ELSE 2 END;\n  INSERT INTO c VALUES (1);\nEND;\nCREATE TEMP TRIGGER IF NOT EXISTS u AFTER DELETE ON a BEGIN DELETE FROM c; END;\nBEGIN TRANSACTION; SELECT 1;";
        let got = lite(sql);
        assert_eq!(got.len(), 4, "{got:#?}");
        assert!(got[1].starts_with("CREATE TEMP TRIGGER"));
    }

    #[test]
    fn rules_with_parenthesised_commands() {
        assert_eq!(
            pg("CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2)); SELECT 1;").len(),
            2
        );
    }

    #[test]
    fn lines_are_counted_through_every_construct() {
        let sql = "SELECT '\n';\n/* \n */ SELECT $$\n$$;\n\n  SELECT 3;";
        let pieces = split(sql, Dialect::Postgres).unwrap();
        let lines: Vec<usize> = pieces.iter().map(|p| p.line).collect();
        assert_eq!(lines, [1, 4, 7]);
    }

    #[test]
    fn unterminated_constructs_are_errors() {
        for (sql, what) in [
            ("SELECT 'abc", "string"),
            ("SELECT 1;\nSELECT $x$ abc", "dollar-quoted string $x$"),
            ("/* /* */", "block comment"),
            ("SELECT \"a", "quoted identifier"),
        ] {
            let err = split(sql, Dialect::Postgres).unwrap_err();
            assert_eq!(err.what, what, "{sql}");
        }
        assert_eq!(split("SELECT 1;\nSELECT $x$ abc", Dialect::Postgres).unwrap_err().line, 2);
        // In SQLite $ is not a quote.
        assert_eq!(lite("SELECT $x$ abc; SELECT 1;").len(), 2);
    }

    #[test]
    fn unicode_passes_through() {
        assert_eq!(pg("SELECT 'héllo;'; SELECT ünïcode FROM t;").len(), 2);
    }

    /// A tiny deterministic generator, so the property test needs no extra dependency and
    /// a failure names its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            let len = u64::try_from(items.len()).unwrap();
            items[usize::try_from(self.next() % len).unwrap()]
        }
    }

    /// Fragments that may hold a `;` that must not split, for each dialect.
    const SHARED: &[&str] = &[
        "SELECT",
        " ",
        "\n",
        "\t",
        "x",
        "42",
        "'a;b'",
        "'it''s;'",
        "\"q;\"",
        "\"a\"\"b\"",
        "-- c;c\n",
        "/* ; */",
        "(1; 2)",
        "(",
        ")",
        ",",
        "é",
        "\r\n",
        "CASE WHEN 1 THEN 2 END",
        "BEGIN",
    ];
    const POSTGRES: &[&str] = &["$$ ; $$", "$fn$ ;$$; $fn$", "E'\\';'", "/* /* ; */ ; */", "$1", "a$b"];
    const SQLITE: &[&str] = &["`a;b`", "[c;d]", "$x", "/* /* ; */"];

    fn generate(rng: &mut Rng, dialect: Dialect) -> (String, usize) {
        let extra = if dialect == Dialect::Postgres { POSTGRES } else { SQLITE };
        let mut script = String::new();
        let count = 1 + rng.next() % 6;
        for _ in 0..count {
            script.push_str("SELECT ");
            let mut open = 0usize;
            for _ in 0..rng.next() % 12 {
                let fragment = if rng.next().is_multiple_of(3) { rng.pick(extra) } else { rng.pick(SHARED) };
                // Keep parentheses balanced so every statement ends at its own `;`.
                match fragment {
                    "(" => open += 1,
                    ")" if open == 0 => continue,
                    ")" => open -= 1,
                    _ => {}
                }
                script.push_str(fragment);
                script.push(' ');
            }
            script.push_str(&")".repeat(open));
            script.push_str(if rng.next().is_multiple_of(2) { ";\n" } else { ";" });
        }
        (script, usize::try_from(count).unwrap())
    }

    #[test]
    fn property_split_then_join_keeps_the_text() {
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            for seed in 1..3000u64 {
                let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let (script, count) = generate(&mut rng, dialect);
                let pieces = split(&script, dialect).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{script}"));
                let joined: String = pieces.iter().map(|p| p.raw).collect();
                assert_eq!(joined, script, "seed {seed} {dialect:?}");
                let code = pieces.iter().filter(|p| !p.is_empty()).count();
                assert_eq!(code, count, "seed {seed} {dialect:?}:\n{script}\n{pieces:#?}");
                for piece in &pieces {
                    assert_eq!(&script[piece.offset..piece.offset + piece.raw.len()], piece.raw);
                }
            }
        }
    }
}
