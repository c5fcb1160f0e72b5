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
