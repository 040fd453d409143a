//! Field validation shared by every resource: names, labels, strings bound for a kernel.

use std::collections::BTreeMap;

/// A validation failure naming the field (`spec.template.image`) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T = ()> = std::result::Result<T, ValidationError>;

/// Longest object name: a DNS label.
pub const MAX_NAME_LEN: usize = 63;
pub const MAX_LABELS: usize = 64;

/// Checks that `name` is a DNS label: 1 to 63 characters of `a-z`, `0-9` and `-`, starting and
/// ending with a letter or digit. Names become path segments, hostnames and cgroup names, so
/// anything else (`/`, `..`, upper case, spaces) is refused with a message saying which rule
/// was broken.
/// Turns any text into a [`name`] of at most `max` characters: lower case, every other
/// character `-`, no `-` at either end. Empty when nothing usable is left.
pub fn to_name(text: &str, max: usize) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(max.min(MAX_NAME_LEN))
        .collect();
    mapped.trim_matches('-').to_owned()
}

pub fn name(field: &str, value: &str) -> Result {
    let bad = |msg: String| Err(ValidationError::new(field, msg));
    if value.is_empty() {
        return bad("must not be empty".into());
    }
    if value.len() > MAX_NAME_LEN {
        return bad(format!(
            "{:?} is {} characters, at most {MAX_NAME_LEN} allowed",
            value,
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        let why = if c.is_ascii_uppercase() {
            "must be lower case".to_string()
        } else {
            format!("must contain only a-z, 0-9 and '-', found {c:?}")
        };
        return bad(format!("{value:?} {why}"));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return bad(format!(
            "{value:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// Labels: at most 64; keys are 1 to 63 characters of `A-Za-z0-9._-` and `/`, values at most
/// 63 of `A-Za-z0-9._-` (or empty).
pub fn labels(field: &str, labels: &BTreeMap<String, String>) -> Result {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            field,
            format!("{} labels, at most {MAX_LABELS} allowed", labels.len()),
        ));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_NAME_LEN || !k.chars().all(|c| ok(c) || c == '/') {
            return Err(ValidationError::new(
                format!("{field}.{k}"),
                "label keys are 1 to 63 characters of A-Z, a-z, 0-9, '.', '_', '-' and '/'",
            ));
        }
        if v.len() > MAX_NAME_LEN || !v.chars().all(ok) {
            return Err(ValidationError::new(
                format!("{field}.{k}"),
                "label values are at most 63 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
            ));
        }
    }
    Ok(())
}

/// A string that ends up in argv, an environment or a path: bounded and free of NUL bytes.
pub fn kernel_string(field: &str, value: &str, max: usize) -> Result {
    if value.len() > max {
        return Err(ValidationError::new(
            field,
            format!("{} bytes, at most {max} allowed", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(ValidationError::new(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// At most `max` items.
pub fn count<T>(field: &str, items: &[T], max: usize) -> Result {
    if items.len() > max {
        return Err(ValidationError::new(
            field,
            format!("{} items, at most {max} allowed", items.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web", "web-1", "0abc", &"a".repeat(63)] {
            assert_eq!(name("name", good), Ok(()), "{good}");
        }
        let cases = [
            ("", "must not be empty"),
            ("Web", "must be lower case"),
            ("a/b", "found '/'"),
            ("..", "found '.'"),
            ("a b", "found ' '"),
            ("-a", "must start and end"),
            ("a-", "must start and end"),
            ("%2f", "found '%'"),
        ];
        for (bad, why) in cases {
            let err = name("name", bad).unwrap_err();
            assert_eq!(err.field, "name");
            assert!(err.message.contains(why), "{bad:?}: {}", err.message);
        }
        let long = "a".repeat(64);
        assert!(
            name("name", &long)
                .unwrap_err()
                .message
                .contains("64 characters")
        );
    }

    #[test]
    fn label_rules() {
        let mut l = BTreeMap::new();
        l.insert("app".to_string(), "web".to_string());
        l.insert("hive.dev/tier".to_string(), String::new());
        assert_eq!(labels("labels", &l), Ok(()));
        l.insert("bad key".to_string(), "x".to_string());
        assert_eq!(labels("labels", &l).unwrap_err().field, "labels.bad key");
        let mut l = BTreeMap::new();
        l.insert("k".to_string(), "v/v".to_string());
        assert!(labels("labels", &l).is_err());
    }

    #[test]
    fn kernel_strings() {
        assert!(kernel_string("f", "ok", 10).is_ok());
        assert!(
            kernel_string("f", "a\0b", 10)
                .unwrap_err()
                .message
                .contains("NUL")
        );
        assert!(
            kernel_string("f", "abcdef", 3)
                .unwrap_err()
                .message
                .contains("at most 3")
        );
    }
}
