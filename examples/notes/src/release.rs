//! The three releases and what each one may do with the schema.

use std::fmt;

/// Which release the process behaves as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Notes with a title; the schema of `20260101000000_create_notes`.
    V1,
    /// Notes with tags and no title; needs `20260201000000_add_tags`.
    V2,
    /// Like 2.0.0, but its health check always fails.
    V3,
}

impl Release {
    /// Reads `1.0.0`, `2.0.0` or `3.0.0`.
    pub fn parse(text: &str) -> Option<Release> {
        match text {
            "1.0.0" => Some(Release::V1),
            "2.0.0" => Some(Release::V2),
            "3.0.0" => Some(Release::V3),
            _ => None,
        }
    }

    /// The version string, as in [`crate::RELEASES`].
    pub fn as_str(self) -> &'static str {
        match self {
            Release::V1 => "1.0.0",
            Release::V2 => "2.0.0",
            Release::V3 => "3.0.0",
        }
    }

    /// The shape of the data this release reads and writes.
    pub(crate) fn schema(self) -> Schema {
        match self {
            Release::V1 => Schema::Titles,
            Release::V2 | Release::V3 => Schema::Tags,
        }
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The columns a release uses: the database code is gated on this, not on version numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Schema {
    /// `notes.title` is read and written; `tags` is never touched.
    Titles,
    /// `tags` is read and written; `notes.title` is never touched.
    Tags,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_listed_release() {
        for name in crate::RELEASES {
            assert_eq!(Release::parse(name).map(Release::as_str), Some(*name));
        }
        assert_eq!(Release::parse("4.0.0"), None);
    }
}
