//! A small XML builder over quick-xml's writer. Every text is escaped, and characters XML
//! 1.0 cannot carry at all (most control characters) are replaced by U+FFFD.

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;

/// The EC2 namespace of API version 2016-11-15.
pub const NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

pub struct Xml {
    w: Writer<Vec<u8>>,
    failed: bool,
}

impl Default for Xml {
    fn default() -> Self {
        Self::new()
    }
}

/// Replace characters XML 1.0 cannot represent.
pub fn xml_safe(s: &str) -> std::borrow::Cow<'_, str> {
    let ok = |c: char| {
        matches!(c, '\t' | '\n' | '\r')
            || ('\u{20}'..='\u{D7FF}').contains(&c)
            || ('\u{E000}'..='\u{FFFD}').contains(&c)
            || c >= '\u{10000}'
    };
    if s.chars().all(ok) {
        std::borrow::Cow::Borrowed(s)
    } else {
        std::borrow::Cow::Owned(
            s.chars()
                .map(|c| if ok(c) { c } else { '\u{FFFD}' })
                .collect(),
        )
    }
}

impl Xml {
    pub fn new() -> Xml {
        let mut x = Xml {
            w: Writer::new(Vec::new()),
            failed: false,
        };
        x.write(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)));
        x
    }

    fn write(&mut self, e: Event<'_>) {
        if self.w.write_event(e).is_err() {
            self.failed = true;
        }
    }

    /// `<name>` … `</name>` around what `f` writes.
    pub fn elem(&mut self, name: &str, f: impl FnOnce(&mut Xml)) {
        self.write(Event::Start(BytesStart::new(name)));
        f(self);
        self.write(Event::End(BytesEnd::new(name)));
    }

    /// The root element of a successful response, in the EC2 namespace, with the request id.
    pub fn response(&mut self, action: &str, request_id: &str, f: impl FnOnce(&mut Xml)) {
        let name = format!("{action}Response");
        let mut start = BytesStart::new(name.as_str());
        start.push_attribute(("xmlns", NAMESPACE));
        self.write(Event::Start(start));
        self.leaf("requestId", request_id);
        f(self);
        self.write(Event::End(BytesEnd::new(name.as_str())));
    }

    /// `<name>text</name>`, escaped.
    pub fn leaf(&mut self, name: &str, text: &str) {
        if text.is_empty() {
            self.empty(name);
            return;
        }
        self.write(Event::Start(BytesStart::new(name)));
        let safe = xml_safe(text);
        self.write(Event::Text(BytesText::new(&safe)));
        self.write(Event::End(BytesEnd::new(name)));
    }

    /// A leaf only when there is a value.
    pub fn opt(&mut self, name: &str, text: Option<&str>) {
        if let Some(t) = text {
            self.leaf(name, t);
        }
    }

    pub fn num(&mut self, name: &str, n: impl std::fmt::Display) {
        self.leaf(name, &n.to_string());
    }

    pub fn bool(&mut self, name: &str, b: bool) {
        self.leaf(name, if b { "true" } else { "false" });
    }

    /// A list member that is a plain string: `<item>text</item>`'s text (inside [`Xml::set`],
    /// which writes the `item` element itself).
    pub fn text_item(&mut self, text: &str) {
        let safe = xml_safe(text);
        self.write(Event::Text(BytesText::new(&safe)));
    }

    /// `<name/>`
    pub fn empty(&mut self, name: &str) {
        self.write(Event::Empty(BytesStart::new(name)));
    }

    /// `<name><item>…</item>…</name>`
    pub fn set<T>(&mut self, name: &str, items: &[T], mut f: impl FnMut(&mut Xml, &T)) {
        if items.is_empty() {
            self.empty(name);
            return;
        }
        self.elem(name, |x| {
            for it in items {
                x.elem("item", |x| f(x, it));
            }
        });
    }

    /// The document. A write into memory cannot fail; if quick-xml ever reports one, the
    /// result is an error document rather than half a response.
    pub fn finish(self) -> String {
        if self.failed {
            return "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>InternalError</Code><Message>could not write the response</Message></Error></Errors><RequestID/></Response>".into();
        }
        String::from_utf8(self.w.into_inner()).unwrap_or_default()
    }
}

/// EC2's timestamp form: `2024-01-01T00:00:00.000Z`.
pub fn ts(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything() {
        let mut x = Xml::new();
        x.elem("a", |x| {
            x.leaf("b", "<x> & \"q\" 'y'");
            x.leaf("c", "bell\u{7}nul\u{0}ok");
            x.leaf("d", "");
        });
        assert_eq!(
            x.finish(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><a><b>&lt;x&gt; &amp; &quot;q&quot; &apos;y&apos;</b><c>bell\u{FFFD}nul\u{FFFD}ok</c><d/></a>"
        );
    }

    #[test]
    fn sets_and_namespace() {
        let mut x = Xml::new();
        x.response("Foo", "req-1", |x| {
            x.set("fooSet", &["a", "b"], |x, s| x.leaf("v", s));
            x.set::<&str>("emptySet", &[], |_, _| {});
        });
        assert_eq!(
            x.finish(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><FooResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>req-1</requestId><fooSet><item><v>a</v></item><item><v>b</v></item></fooSet><emptySet/></FooResponse>"
        );
    }

    #[test]
    fn timestamps_have_millis_and_z() {
        let t = chrono::DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or_default();
        assert_eq!(ts(t), "2024-01-01T00:00:00.000Z");
    }
}
