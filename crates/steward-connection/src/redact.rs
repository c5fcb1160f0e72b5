//! What Steward prints about connections: driver errors with their cause, and URLs with
//! their passwords replaced.

/// A driver error with its cause. tokio-postgres's own message is only its kind ("db error",
/// "error connecting to server"); the server's message or the OS error is what an operator
/// needs to read in a log line.
pub fn describe_pg_error(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// `text` (an error message, a configuration line, a value someone typed) with every password
/// replaced that a connection URL or key=value string in it carries: in a URL's userinfo, in a
/// `password=` parameter or key, quoted or not. For echoing anything a user configured.
pub fn redact_text(text: &str) -> String {
    static USERINFO: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        // The password runs to the last `@` of the token, as a URL parser would take it.
        regex::Regex::new(r#"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'"]*):[^\s'"]*@"#)
            .expect("a valid pattern")
    });
    static KEY: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|"[^"]*"?|[^\s&'"]+)"#)
            .expect("a valid pattern")
    });
    let text = USERINFO.replace_all(text, "${1}:***@");
    KEY.replace_all(&text, "${1}***").into_owned()
}

/// The URL with any password replaced, for logs and errors: the userinfo password and a
/// `password` query parameter of a URL, or a `password` key (quoted or not) of a key=value
/// connection string.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (base, query) = match rest.split_once('?') {
                Some((base, query)) => (base, Some(query)),
                None => (rest, None),
            };
            let mut out = format!("{scheme}://");
            match base.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***@{host}")),
                    None => out.push_str(&format!("{userinfo}@{host}")),
                },
                None => out.push_str(base),
            }
            if let Some(query) = query {
                let params: Vec<&str> = query
                    .split('&')
                    .map(|kv| match kv.split_once('=') {
                        Some((key, _)) if key.eq_ignore_ascii_case("password") => "password=***",
                        _ => kv,
                    })
                    .collect();
                out.push('?');
                out.push_str(&params.join("&"));
            }
            out
        }
        None => redact_key_value(url),
    }
}

/// libpq's key=value form: `key = value` pairs, values optionally single-quoted with `\\`
/// escapes. Everything but the password's value is kept as written.
fn redact_key_value(conninfo: &str) -> String {
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    while let Some(eq) = rest.find('=') {
        let (before, after) = (&rest[..eq], &rest[eq + 1..]);
        let key = before
            .trim_end()
            .rsplit(char::is_whitespace)
            .next()
            .unwrap_or_default();
        out.push_str(before);
        out.push('=');
        let spaces = after.len() - after.trim_start().len();
        out.push_str(&after[..spaces]);
        let value = &after[spaces..];
        let len = conninfo_value_len(value);
        if key.eq_ignore_ascii_case("password") {
            out.push_str("***");
        } else {
            out.push_str(&value[..len]);
        }
        rest = &value[len..];
    }
    out.push_str(rest);
    out
}

/// Length of the value at the start of `value`: up to the closing quote of a quoted value
/// (an unclosed one runs to the end), else up to the next whitespace.
fn conninfo_value_len(value: &str) -> usize {
    let Some(quoted) = value.strip_prefix('\'') else {
        return value.find(char::is_whitespace).unwrap_or(value.len());
    };
    let mut escaped = false;
    for (i, c) in quoted.char_indices() {
        match c {
            '\'' if !escaped => return i + 2,
            '\\' => escaped = !escaped,
            _ => escaped = false,
        }
    }
    value.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=secret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@h/db?password=other"),
            "postgres://u:***@h/db?password=***"
        );
        assert_eq!(
            redact_url("host=h password = 'a \\' b' user=u"),
            "host=h password = *** user=u"
        );
        assert_eq!(
            redact_url("host=h  PASSWORD=secret"),
            "host=h  PASSWORD=***"
        );
    }

    #[test]
    fn redacts_passwords_in_free_text() {
        let line = r#"1 | database_url = "postgres://u:Sup3rS3cretPw!@127.0.0.1:5432/postgres"#;
        let redacted = redact_text(line);
        assert!(!redacted.contains("Sup3rS3cretPw"), "{redacted}");
        assert!(
            redacted.contains("postgres://u:***@127.0.0.1:5432/postgres"),
            "{redacted}"
        );
        let text =
            "--set database_url=host=h password='a b' user=u and postgres://x:p@ss@h/db?password=q";
        let redacted = redact_text(text);
        for secret in ["a b", "p@ss", "=q"] {
            assert!(!redacted.contains(secret), "{redacted}");
        }
        assert_eq!(redact_text("nothing secret here"), "nothing secret here");
    }

    proptest::proptest! {
        /// Whatever the password and however the string is written, it never shows.
        #[test]
        fn no_form_of_connection_string_shows_the_password(
            suffix in "[A-Za-z0-9!#$%^*()_+ -]{4,20}",
        ) {
            let password = format!("pw-{suffix}");
            let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
            let forms = [
                format!("host=h password='{quoted}' user=u"),
                format!("password = '{quoted}' host=h"),
                format!("postgres://u:{}@h/db", password.replace(' ', "%20")),
                format!("postgres://u@h/db?password={}", password.replace(' ', "%20")),
            ];
            for form in forms {
                // Alone, and inside a line of text.
                let in_text = redact_text(&format!("line 1 | url = \"{form}\" <- here"));
                proptest::prop_assert!(!in_text.contains(password.trim()), "{form} -> {in_text}");
                let redacted = redact_url(&form);
                let needle = password.trim().replace(' ', "%20");
                proptest::prop_assert!(
                    !redacted.contains(&needle) && !redacted.contains(password.trim()),
                    "{form} -> {redacted}"
                );
            }
        }
    }
}
