//! Opaque `NextToken`s: the sort key of the last item returned. Items come sorted by key, so
//! each token names a later position than the one before (botocore refuses a repeated token).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::error::Ec2Error;

const PREFIX: &str = "kumo1:";

pub fn encode(key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PREFIX}{key}"))
}

pub fn decode(token: &str) -> Result<String, Ec2Error> {
    let bad = || Ec2Error::InvalidParameterValue(format!("Invalid NextToken '{token}'"));
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    s.strip_prefix(PREFIX).map(str::to_string).ok_or_else(bad)
}

/// One page of `items` (sorted by `key`) after `token`, and the token of the next page.
pub fn page<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> String,
    token: Option<&str>,
    max: Option<i64>,
) -> Result<(Vec<T>, Option<String>), Ec2Error> {
    let after = token.map(decode).transpose()?;
    let mut rest: Vec<T> = match &after {
        Some(a) => items
            .into_iter()
            .filter(|i| key(i).as_str() > a.as_str())
            .collect(),
        None => items,
    };
    let Some(max) = max.and_then(|m| usize::try_from(m).ok()) else {
        return Ok((rest, None));
    };
    if rest.len() <= max {
        return Ok((rest, None));
    }
    rest.truncate(max);
    let next = rest.last().map(|i| encode(&key(i)));
    Ok((rest, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_advance_with_distinct_tokens() {
        let items: Vec<String> = (0..12).map(|i| format!("i-{i:02}")).collect();
        let mut token: Option<String> = None;
        let mut seen = vec![];
        let mut tokens = vec![];
        loop {
            let (p, next) =
                page(items.clone(), |s| s.clone(), token.as_deref(), Some(5)).unwrap_or_default();
            seen.extend(p);
            match next {
                Some(t) => {
                    assert!(!tokens.contains(&t));
                    tokens.push(t.clone());
                    token = Some(t);
                }
                None => break,
            }
        }
        assert_eq!(seen, items);
        assert_eq!(tokens.len(), 2);
    }

    #[test]
    fn bad_tokens_are_refused() {
        assert!(decode("not base64!").is_err());
        assert!(decode(&URL_SAFE_NO_PAD.encode("other:x")).is_err());
        assert_eq!(decode(&encode("i-1")).ok().as_deref(), Some("i-1"));
    }
}
