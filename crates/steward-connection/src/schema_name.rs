use std::fmt;
use std::str::FromStr;

/// A validated Postgres schema name: lowercase identifier, safe to splice into SQL unquoted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaName(String);

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid schema name {:?}: use 1-63 characters of a-z, 0-9 and _, not starting with a digit",
    crate::redact_text(.0)
)]
pub struct InvalidSchemaName(pub String);

impl SchemaName {
    pub const DEFAULT: &'static str = "steward";

    pub fn new(name: impl Into<String>) -> Result<Self, InvalidSchemaName> {
        let name = name.into();
        let mut chars = name.chars();
        let valid_start = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let valid_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid_start && valid_rest && name.len() <= 63 && !name.starts_with("pg_") {
            Ok(Self(name))
        } else {
            Err(InvalidSchemaName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl FromStr for SchemaName {
    type Err = InvalidSchemaName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(SchemaName::new("steward").is_ok());
        assert!(SchemaName::new("_s2").is_ok());
        for bad in [
            "",
            "Steward",
            "2x",
            "a-b",
            "a;drop",
            "pg_x",
            &"a".repeat(64),
        ] {
            assert!(SchemaName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
