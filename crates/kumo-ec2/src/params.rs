//! A typed reader of EC2 Query parameters. Each action takes the parameters it knows;
//! whatever is left is an `UnknownParameter`. Lists are `Name.N` from 1; malformed indexes,
//! wrong types and missing required parameters are refused with EC2's codes.

use std::collections::BTreeMap;

use crate::error::Ec2Error;
use crate::filter::Filter;

/// Parameters that are part of the protocol, not of an action.
fn is_protocol_param(k: &str) -> bool {
    k == "Action" || k == "Version" || k.starts_with("X-Amz-")
}

#[derive(Debug, Clone, Default)]
pub struct Params {
    map: BTreeMap<String, String>,
}

/// One `TagSpecification.N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSpec {
    pub resource_type: String,
    pub tags: Vec<(String, String)>,
}

/// An index of `Name.N`: digits, from 1, no leading zero.
fn parse_index(s: &str) -> Option<u32> {
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|n| *n <= 100_000)
}

fn bad_index(full: &str) -> Ec2Error {
    Ec2Error::InvalidParameterValue(format!(
        "The parameter {full} has an invalid index: list indexes are whole numbers from 1"
    ))
}

impl Params {
    /// From decoded `(key, value)` pairs; a key given twice is refused.
    pub fn from_pairs(
        pairs: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Params, Ec2Error> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if k.is_empty() {
                continue;
            }
            if map.insert(k.clone(), v).is_some() {
                return Err(Ec2Error::InvalidParameterValue(format!(
                    "The parameter {k} is given more than once"
                )));
            }
        }
        Ok(Params { map })
    }

    /// From a form-encoded string (body or query).
    pub fn from_form(form: &[u8]) -> Result<Params, Ec2Error> {
        Self::from_pairs(form_urlencoded::parse(form).into_owned())
    }

    /// Merge another set (query string and body); a key in both is refused.
    pub fn merge(mut self, other: Params) -> Result<Params, Ec2Error> {
        for (k, v) in other.map {
            if self.map.insert(k.clone(), v).is_some() {
                return Err(Ec2Error::InvalidParameterValue(format!(
                    "The parameter {k} is given more than once"
                )));
            }
        }
        Ok(self)
    }

    /// Take every parameter named `prefix` or starting with `prefix.`; true when any was there.
    pub fn take_prefix(&mut self, prefix: &str) -> bool {
        let dotted = format!("{prefix}.");
        let keys: Vec<String> = self
            .map
            .keys()
            .filter(|k| *k == prefix || k.starts_with(&dotted))
            .cloned()
            .collect();
        for k in &keys {
            self.map.remove(k);
        }
        !keys.is_empty()
    }

    pub fn peek(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    /// All parameters but the protocol's, sorted (for ClientToken request hashes).
    pub fn canonical(&self, skip: &[&str]) -> String {
        let mut s = String::new();
        for (k, v) in &self.map {
            if is_protocol_param(k) || skip.contains(&k.as_str()) {
                continue;
            }
            s.push_str(k);
            s.push('=');
            s.push_str(v);
            s.push('\n');
        }
        s
    }

    pub fn string(&mut self, name: &str) -> Option<String> {
        self.map.remove(name)
    }

    pub fn required(&mut self, name: &str) -> Result<String, Ec2Error> {
        match self.map.remove(name) {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(Ec2Error::InvalidParameterValue(format!(
                "The parameter {name} must not be empty"
            ))),
            None => Err(Ec2Error::MissingParameter(format!(
                "The request must contain the parameter {name}"
            ))),
        }
    }

    pub fn bool(&mut self, name: &str) -> Result<Option<bool>, Ec2Error> {
        match self.map.remove(name) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid value '{v}' for {name}: expected true or false"
            ))),
        }
    }

    pub fn int(&mut self, name: &str) -> Result<Option<i64>, Ec2Error> {
        match self.map.remove(name) {
            None => Ok(None),
            Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| {
                Ec2Error::InvalidParameterValue(format!(
                    "Invalid value '{v}' for {name}: expected an integer"
                ))
            }),
        }
    }

    /// An integer within `lo..=hi`.
    pub fn int_in(&mut self, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, Ec2Error> {
        match self.int(name)? {
            Some(n) if !(lo..=hi).contains(&n) => Err(Ec2Error::InvalidParameterValue(format!(
                "Value ( {n} ) for parameter {name} is invalid. Expect a number between {lo} and {hi}."
            ))),
            other => Ok(other),
        }
    }

    /// `DryRun`, as every action takes it.
    pub fn dry_run(&mut self) -> Result<bool, Ec2Error> {
        Ok(self.bool("DryRun")?.unwrap_or(false))
    }

    /// Every `prefix.N` and `prefix.N.rest`, by index: rest → value (`""` for `prefix.N`).
    pub fn indexed(
        &mut self,
        prefix: &str,
    ) -> Result<BTreeMap<u32, BTreeMap<String, String>>, Ec2Error> {
        let dotted = format!("{prefix}.");
        let keys: Vec<String> = self
            .map
            .keys()
            .filter(|k| k.starts_with(&dotted))
            .cloned()
            .collect();
        let mut out: BTreeMap<u32, BTreeMap<String, String>> = BTreeMap::new();
        for k in keys {
            let rest = &k[dotted.len()..];
            let (idx, sub) = rest.split_once('.').unwrap_or((rest, ""));
            let n = parse_index(idx).ok_or_else(|| bad_index(&k))?;
            if let Some(v) = self.map.remove(&k) {
                out.entry(n).or_default().insert(sub.to_string(), v);
            }
        }
        Ok(out)
    }

    /// A list of strings, `name.1`, `name.2`, … (gaps allowed, kept in index order).
    pub fn list(&mut self, name: &str) -> Result<Vec<String>, Ec2Error> {
        let mut out = Vec::new();
        for (n, mut fields) in self.indexed(name)? {
            let v = fields.remove("");
            if let Some(extra) = fields.keys().next() {
                return Err(unknown(&format!("{name}.{n}.{extra}")));
            }
            if let Some(v) = v {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// `Filter.N.Name` and `Filter.N.Value.M`.
    pub fn filters(&mut self) -> Result<Vec<Filter>, Ec2Error> {
        let mut out = Vec::new();
        for (n, fields) in self.indexed("Filter")? {
            let mut name = None;
            let mut values: BTreeMap<u32, String> = BTreeMap::new();
            for (sub, v) in fields {
                if sub == "Name" {
                    name = Some(v);
                } else if let Some(idx) = sub.strip_prefix("Value.") {
                    let m =
                        parse_index(idx).ok_or_else(|| bad_index(&format!("Filter.{n}.{sub}")))?;
                    values.insert(m, v);
                } else {
                    return Err(unknown(&format!("Filter.{n}.{sub}")));
                }
            }
            let name = name.ok_or_else(|| {
                Ec2Error::MissingParameter(format!(
                    "The request must contain the parameter Filter.{n}.Name"
                ))
            })?;
            if values.is_empty() {
                return Err(Ec2Error::InvalidParameterValue(format!(
                    "The filter '{name}' (Filter.{n}) has no values"
                )));
            }
            out.push(Filter {
                name,
                values: values.into_values().collect(),
            });
        }
        Ok(out)
    }

    /// `prefix.N.Key` / `prefix.N.Value` pairs; the value is `None` when not given.
    pub fn tags(&mut self, prefix: &str) -> Result<Vec<(String, Option<String>)>, Ec2Error> {
        let mut out = Vec::new();
        for (n, mut fields) in self.indexed(prefix)? {
            let key = fields.remove("Key");
            let value = fields.remove("Value");
            if let Some(extra) = fields.keys().next() {
                return Err(unknown(&format!("{prefix}.{n}.{extra}")));
            }
            let key = key.ok_or_else(|| {
                Ec2Error::MissingParameter(format!(
                    "The request must contain the parameter {prefix}.{n}.Key"
                ))
            })?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// `TagSpecification.N.ResourceType` and `TagSpecification.N.Tag.M.Key/Value`.
    pub fn tag_specs(&mut self) -> Result<Vec<TagSpec>, Ec2Error> {
        let mut out = Vec::new();
        for (n, fields) in self.indexed("TagSpecification")? {
            let mut inner = Params::default();
            let mut resource_type = None;
            for (sub, v) in fields {
                if sub == "ResourceType" {
                    resource_type = Some(v);
                } else {
                    inner.map.insert(sub, v);
                }
            }
            let tags = inner.tags("Tag").map_err(|e| prefix_error(e, n))?;
            if let Some(k) = inner.map.keys().next() {
                return Err(unknown(&format!("TagSpecification.{n}.{k}")));
            }
            let resource_type = resource_type.ok_or_else(|| {
                Ec2Error::MissingParameter(format!(
                    "The request must contain the parameter TagSpecification.{n}.ResourceType"
                ))
            })?;
            let tags = tags
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect();
            out.push(TagSpec {
                resource_type,
                tags,
            });
        }
        Ok(out)
    }

    /// Every parameter must have been taken.
    pub fn finish(self) -> Result<(), Ec2Error> {
        match self.map.keys().find(|k| !is_protocol_param(k)) {
            Some(k) => Err(unknown(k)),
            None => Ok(()),
        }
    }
}

fn unknown(name: &str) -> Ec2Error {
    Ec2Error::UnknownParameter(format!("The parameter {name} is not recognized"))
}

fn prefix_error(e: Ec2Error, n: u32) -> Ec2Error {
    let p = format!("TagSpecification.{n}.");
    match e {
        Ec2Error::MissingParameter(m) => {
            Ec2Error::MissingParameter(m.replace("parameter Tag.", &format!("parameter {p}Tag.")))
        }
        Ec2Error::UnknownParameter(m) => {
            Ec2Error::UnknownParameter(m.replace("parameter Tag.", &format!("parameter {p}Tag.")))
        }
        Ec2Error::InvalidParameterValue(m) => Ec2Error::InvalidParameterValue(
            m.replace("parameter Tag.", &format!("parameter {p}Tag.")),
        ),
        other => other,
    }
}

/// Tag keys: 1–128 characters, not `aws:`; values up to 256.
pub fn check_tag(key: &str, value: &str) -> Result<(), Ec2Error> {
    if key.is_empty() || key.chars().count() > 128 {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "Tag keys must be 1 to 128 characters long: '{key}'"
        )));
    }
    if key.starts_with("aws:") {
        return Err(Ec2Error::InvalidParameterValue(
            "Tag keys starting with 'aws:' are reserved for internal use".into(),
        ));
    }
    if value.chars().count() > 256 {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "The value of tag '{key}' is longer than 256 characters"
        )));
    }
    if key.chars().chain(value.chars()).any(char::is_control) {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "Tag '{key}' contains control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Params {
        Params::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap_or_default()
    }

    fn code<T: std::fmt::Debug>(r: Result<T, Ec2Error>) -> &'static str {
        match r {
            Err(e) => e.code(),
            Ok(v) => panic!("expected an error, got {v:?}"),
        }
    }

    #[test]
    fn form_decoding_and_duplicates() {
        let mut ps = Params::from_form(b"Action=DescribeInstances&InstanceId.1=i-a%2Bb&X=a+b")
            .unwrap_or_default();
        assert_eq!(ps.list("InstanceId").unwrap_or_default(), vec!["i-a+b"]);
        assert_eq!(ps.string("X").as_deref(), Some("a b"));
        assert!(ps.finish().is_ok());
        assert_eq!(code(Params::from_form(b"A=1&A=2")), "InvalidParameterValue");
        let a = p(&[("A", "1")]);
        assert_eq!(code(a.merge(p(&[("A", "2")]))), "InvalidParameterValue");
    }

    #[test]
    fn lists_in_index_order_with_gaps() {
        let mut ps = p(&[
            ("InstanceId.10", "c"),
            ("InstanceId.2", "b"),
            ("InstanceId.1", "a"),
        ]);
        assert_eq!(
            ps.list("InstanceId").unwrap_or_default(),
            vec!["a", "b", "c"]
        );
        assert!(ps.finish().is_ok());
        let mut empty = p(&[]);
        assert!(empty.list("InstanceId").unwrap_or_default().is_empty());
    }

    #[test]
    fn bad_indexes_are_invalid_values() {
        for bad in [
            "InstanceId.0",
            "InstanceId.x",
            "InstanceId.01",
            "InstanceId.-1",
            "InstanceId.",
            "InstanceId.1e3",
            "InstanceId.99999999999",
        ] {
            let mut ps = p(&[(bad, "i-1")]);
            assert_eq!(
                code(ps.list("InstanceId")),
                "InvalidParameterValue",
                "{bad}"
            );
        }
        let mut ps = p(&[("Filter.0.Name", "x"), ("Filter.0.Value.1", "y")]);
        assert_eq!(code(ps.filters()), "InvalidParameterValue");
        let mut ps = p(&[("Filter.1.Name", "x"), ("Filter.1.Value.0", "y")]);
        assert_eq!(code(ps.filters()), "InvalidParameterValue");
    }

    #[test]
    fn unknown_parameters_are_refused() {
        let mut ps = p(&[
            ("InstanceId.1", "i-1"),
            ("Bogus", "1"),
            ("Action", "X"),
            ("Version", "v"),
        ]);
        let _ = ps.list("InstanceId");
        assert_eq!(code(ps.finish()), "UnknownParameter");
        // A bare list name is not the list.
        let mut ps = p(&[("InstanceId", "i-1")]);
        assert!(ps.list("InstanceId").unwrap_or_default().is_empty());
        assert_eq!(code(ps.finish()), "UnknownParameter");
        let mut ps = p(&[("InstanceId.1.Foo", "i-1")]);
        assert_eq!(code(ps.list("InstanceId")), "UnknownParameter");
        let mut ps = p(&[
            ("Filter.1.Name", "a"),
            ("Filter.1.Value.1", "b"),
            ("Filter.1.Bogus", "c"),
        ]);
        assert_eq!(code(ps.filters()), "UnknownParameter");
        // Presigned-URL parameters belong to the protocol.
        let ps = p(&[("X-Amz-Signature", "abc")]);
        assert!(ps.finish().is_ok());
    }

    #[test]
    fn types_are_checked() {
        let mut ps = p(&[("MaxResults", "ten"), ("DryRun", "yes"), ("MinCount", " 3")]);
        assert_eq!(code(ps.int("MaxResults")), "InvalidParameterValue");
        assert_eq!(code(ps.dry_run()), "InvalidParameterValue");
        assert_eq!(ps.int("MinCount").ok().flatten(), Some(3));
        let mut ps = p(&[("DryRun", "TRUE"), ("MaxResults", "4")]);
        assert_eq!(ps.dry_run().ok(), Some(true));
        assert_eq!(
            code(ps.int_in("MaxResults", 5, 1000)),
            "InvalidParameterValue"
        );
        let mut ps = p(&[("MaxResults", "1001")]);
        assert_eq!(
            code(ps.int_in("MaxResults", 5, 1000)),
            "InvalidParameterValue"
        );
        let mut ps = p(&[("MaxResults", "1000")]);
        assert_eq!(ps.int_in("MaxResults", 5, 1000).ok().flatten(), Some(1000));
    }

    #[test]
    fn required_parameters() {
        let mut ps = p(&[("ImageId", "")]);
        assert_eq!(code(ps.required("ImageId")), "InvalidParameterValue");
        assert_eq!(code(ps.required("ImageId")), "MissingParameter");
    }

    #[test]
    fn filters_parse() {
        let mut ps = p(&[
            ("Filter.1.Name", "tag:Name"),
            ("Filter.1.Value.1", "web*"),
            ("Filter.1.Value.2", "db"),
            ("Filter.2.Name", "instance-state-name"),
            ("Filter.2.Value.1", "running"),
        ]);
        let f = ps.filters().unwrap_or_default();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].name, "tag:Name");
        assert_eq!(f[0].values, vec!["web*", "db"]);
        assert!(ps.finish().is_ok());
        let mut ps = p(&[("Filter.1.Value.1", "x")]);
        assert_eq!(code(ps.filters()), "MissingParameter");
        let mut ps = p(&[("Filter.1.Name", "x")]);
        assert_eq!(code(ps.filters()), "InvalidParameterValue");
    }

    #[test]
    fn tags_and_tag_specifications() {
        let mut ps = p(&[
            ("TagSpecification.1.ResourceType", "instance"),
            ("TagSpecification.1.Tag.1.Key", "Name"),
            ("TagSpecification.1.Tag.1.Value", "web"),
            ("TagSpecification.1.Tag.2.Key", "empty"),
        ]);
        let specs = ps.tag_specs().unwrap_or_default();
        assert_eq!(
            specs,
            vec![TagSpec {
                resource_type: "instance".into(),
                tags: vec![
                    ("Name".into(), "web".into()),
                    ("empty".into(), String::new())
                ]
            }]
        );
        let mut ps = p(&[("TagSpecification.1.Tag.1.Key", "a")]);
        assert_eq!(code(ps.tag_specs()), "MissingParameter");
        let mut ps = p(&[
            ("TagSpecification.1.ResourceType", "instance"),
            ("TagSpecification.1.Bogus", "a"),
        ]);
        assert_eq!(code(ps.tag_specs()), "UnknownParameter");
        let mut ps = p(&[("Tag.1.Value", "v")]);
        assert_eq!(code(ps.tags("Tag")), "MissingParameter");
        let mut ps = p(&[("Tag.1.Key", "k")]);
        assert_eq!(
            ps.tags("Tag").unwrap_or_default(),
            vec![("k".to_string(), None)]
        );
        assert!(check_tag("aws:x", "").is_err());
        assert!(check_tag("", "").is_err());
        assert!(check_tag(&"k".repeat(129), "").is_err());
        assert!(check_tag("k", &"v".repeat(257)).is_err());
        assert!(check_tag("k", "a\u{1}").is_err());
        assert!(check_tag("Name", "web server").is_ok());
    }

    #[test]
    fn canonical_form_skips_protocol_and_named() {
        let ps = p(&[
            ("Action", "RunInstances"),
            ("ClientToken", "t"),
            ("MinCount", "1"),
            ("ImageId", "ami-1"),
        ]);
        assert_eq!(
            ps.canonical(&["ClientToken"]),
            "ImageId=ami-1\nMinCount=1\n"
        );
    }
}
