//! EC2 filters: AND across filters, OR within one filter's values; values match with `*`
//! (any run) and `?` (one character) wildcards, `\` escaping either.

use crate::error::Ec2Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

/// Refuse filter names a resource does not know. `tagged` resources also take `tag:Key`,
/// `tag-key` and `tag-value`.
pub fn check_names(filters: &[Filter], known: &[&str], tagged: bool) -> Result<(), Ec2Error> {
    for f in filters {
        let tag = tagged
            && (f.name == "tag-key"
                || f.name == "tag-value"
                || (f.name.starts_with("tag:") && f.name.len() > 4));
        if !tag && !known.contains(&f.name.as_str()) {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "The filter '{}' is invalid",
                f.name
            )));
        }
    }
    Ok(())
}

/// Does `value` match the pattern?
pub fn wildcard_match(pattern: &str, value: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Tok {
        Lit(char),
        One,
        Any,
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '\\' => Tok::Lit(chars.next().unwrap_or('\\')),
            '*' => Tok::Any,
            '?' => Tok::One,
            c => Tok::Lit(c),
        });
    }
    let v: Vec<char> = value.chars().collect();
    // Iterative matching with backtracking to the last `*`.
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < v.len() {
        match toks.get(p) {
            Some(Tok::Lit(c)) if *c == v[i] => {
                p += 1;
                i += 1;
            }
            Some(Tok::One) => {
                p += 1;
                i += 1;
            }
            Some(Tok::Any) => {
                star = Some((p, i));
                p += 1;
            }
            _ => match star {
                Some((sp, si)) => {
                    p = sp + 1;
                    i = si + 1;
                    star = Some((sp, si + 1));
                }
                None => return false,
            },
        }
    }
    toks[p.min(toks.len())..].iter().all(|t| *t == Tok::Any)
}

/// Does a resource match every filter? `values(name)` gives the resource's values for a
/// filter name (tags included); a filter matches when any of its patterns matches any value.
pub fn matches_all(filters: &[Filter], values: impl Fn(&str) -> Vec<String>) -> bool {
    filters.iter().all(|f| {
        let have = values(&f.name);
        f.values
            .iter()
            .any(|pat| have.iter().any(|v| wildcard_match(pat, v)))
    })
}

/// Values of the tag filters (`tag:Key`, `tag-key`, `tag-value`) over a resource's tags.
pub fn tag_values(name: &str, tags: &[(String, String)]) -> Option<Vec<String>> {
    if let Some(key) = name.strip_prefix("tag:") {
        return Some(
            tags.iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .collect(),
        );
    }
    match name {
        "tag-key" => Some(tags.iter().map(|(k, _)| k.clone()).collect()),
        "tag-value" => Some(tags.iter().map(|(_, v)| v.clone()).collect()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("web*", "web1"));
        assert!(wildcard_match("web*", "web"));
        assert!(!wildcard_match("web*", "db1"));
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("w?b", "web"));
        assert!(!wildcard_match("w?b", "wb"));
        assert!(wildcard_match("*-prod-*", "app-prod-7"));
        assert!(!wildcard_match("*-prod-*", "app-prod"));
        assert!(wildcard_match("a*b*c", "aXXbYYbZc"));
        assert!(!wildcard_match("a*b*c", "aXXbYYbZ"));
        assert!(wildcard_match("exact", "exact"));
        assert!(!wildcard_match("exact", "exactly"));
        assert!(!wildcard_match("Exact", "exact"), "case matters");
        assert!(wildcard_match("lit\\*", "lit*"));
        assert!(!wildcard_match("lit\\*", "litX"));
        assert!(wildcard_match("q\\?", "q?"));
        assert!(!wildcard_match("q\\?", "qa"));
        assert!(wildcard_match("**a", "ba"));
        assert!(wildcard_match("ü?", "üx"));
    }

    #[test]
    fn and_across_or_within() {
        let tags = vec![
            ("Name".to_string(), "web1".to_string()),
            ("env".to_string(), "prod".to_string()),
        ];
        let vals = |n: &str| -> Vec<String> {
            if let Some(v) = tag_values(n, &tags) {
                return v;
            }
            match n {
                "instance-state-name" => vec!["running".into()],
                _ => vec![],
            }
        };
        let f = |name: &str, values: &[&str]| Filter {
            name: name.into(),
            values: values.iter().map(|s| s.to_string()).collect(),
        };
        assert!(matches_all(&[f("tag:Name", &["db*", "web*"])], vals));
        assert!(matches_all(
            &[
                f("tag:Name", &["web1"]),
                f("instance-state-name", &["running", "stopped"])
            ],
            vals
        ));
        assert!(!matches_all(
            &[
                f("tag:Name", &["web1"]),
                f("instance-state-name", &["stopped"])
            ],
            vals
        ));
        assert!(matches_all(&[f("tag-key", &["env"])], vals));
        assert!(matches_all(&[f("tag-value", &["pro?"])], vals));
        assert!(!matches_all(&[f("tag:Missing", &["*"])], vals));
        assert!(matches_all(&[], vals));
    }

    #[test]
    fn unknown_filter_names() {
        let f = |name: &str| Filter {
            name: name.into(),
            values: vec!["x".into()],
        };
        assert!(check_names(
            &[f("instance-id"), f("tag:a"), f("tag-key")],
            &["instance-id"],
            true
        )
        .is_ok());
        assert!(check_names(&[f("bogus")], &["instance-id"], true).is_err());
        assert!(check_names(&[f("tag:")], &["instance-id"], true).is_err());
        assert!(check_names(&[f("tag:a")], &["instance-id"], false).is_err());
    }
}
