//! Label constraints an instance puts on its host: `role=core` (needs), `role!=personal` (avoids).

use serde::Serialize;

/// `key=value` (the host must have it) or `key!=value` (the host must not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Constraint {
    pub key: String,
    pub value: String,
    pub require: bool,
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}{}",
            self.key,
            if self.require { "=" } else { "!=" },
            self.value
        )
    }
}

/// Label keys and values: 1–63 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn valid_label_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c))
}

/// Parse `key=value` / `key!=value` constraints; contradictions are refused.
pub fn parse_constraints(raw: &[String]) -> Result<Vec<Constraint>, String> {
    let mut out: Vec<Constraint> = vec![];
    for r in raw {
        let (key, value, require) = match r.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => match r.split_once('=') {
                Some((k, v)) => (k, v, true),
                None => return Err(format!("constraint {r:?} must be key=value or key!=value")),
            },
        };
        if !valid_label_part(key) || !valid_label_part(value) {
            return Err(format!(
                "constraint {r:?}: keys and values are 1-63 of a-z, 0-9, '.', '_', '-'"
            ));
        }
        let c = Constraint {
            key: key.into(),
            value: value.into(),
            require,
        };
        for o in &out {
            let clash = o.key == c.key
                && ((o.value == c.value && o.require != c.require)
                    || (o.require && c.require && o.value != c.value));
            if clash {
                return Err(format!("constraints {o} and {c} contradict each other"));
            }
        }
        out.push(c);
    }
    Ok(out)
}
