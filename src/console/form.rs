//! `application/x-www-form-urlencoded` bodies and query strings, decoded by hand.
//!
//! The console's forms send a handful of short fields; decoding them is a few lines and
//! needs no crate. Bad percent-escapes are kept as they are and invalid UTF-8 is replaced,
//! so a hostile body decodes to something harmless instead of an error.

/// The fields of a form body or query string, in order; names may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn parse(raw: &[u8]) -> Self {
        Self(
            raw.split(|b| *b == b'&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let mut parts = pair.splitn(2, |b| *b == b'=');
                    let name = decode(parts.next().unwrap_or_default());
                    let value = decode(parts.next().unwrap_or_default());
                    (name, value)
                })
                .collect(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name` (checkboxes).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < raw.len() => match (hex(raw[i + 1]), hex(raw[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_fields() {
        let form = Form::parse(b"csrf=ab%2Fc&id=1-0%40s&id=2-0&q=user+42&bad=%zz%4&empty=");
        assert_eq!(form.get("csrf"), Some("ab/c"));
        assert_eq!(form.all("id"), vec!["1-0@s", "2-0"]);
        assert_eq!(form.get("q"), Some("user 42"));
        assert_eq!(form.get("bad"), Some("%zz%4"));
        assert_eq!(form.get("empty"), Some(""));
        assert_eq!(form.get("missing"), None);
    }

    proptest! {
        #[test]
        fn any_body_decodes(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Form::parse(&raw);
        }
    }
}
