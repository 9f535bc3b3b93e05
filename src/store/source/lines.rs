//! Lines of CSV or JSON, read one record at a time: the format told by the first line, the
//! CSV header's column order, quoting, and a reason for every line that is not a user.

use std::io::{self, BufRead};

use anyhow::Context as _;

use super::{Format, Record};
use crate::identity::check_identity;
use crate::store::NewUser;

/// A line longer than this is refused unread: a user id and an email take at most a few
/// hundred bytes, and reading a runaway line whole could exhaust memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Which column holds what, as the CSV header says.
#[derive(Debug, Clone, Copy)]
struct Columns {
    user_id: usize,
    email: usize,
}

const IN_ORDER: Columns = Columns {
    user_id: 0,
    email: 1,
};

/// Reads records from lines of CSV or JSON, one record per non-empty line.
///
/// A CSV record never spans lines: a quoted newline could only be part of a value, and
/// neither a user id nor an email may hold a control character, so an open quote at the
/// end of a line is reported as that line's mistake instead of swallowing the lines after.
pub struct LineReader<R> {
    input: R,
    format: Option<Format>,
    columns: Columns,
    line: u64,
    /// A non-empty line was read (a CSV header can only be the first).
    started: bool,
    buf: Vec<u8>,
}

impl<R: BufRead> LineReader<R> {
    /// A reader of `input`; without a `format`, the first non-empty line decides: a
    /// `userId,email` header means CSV, a `{` JSON lines.
    pub fn new(input: R, format: Option<Format>) -> Self {
        Self {
            input,
            format,
            columns: IN_ORDER,
            line: 0,
            started: false,
            buf: Vec::new(),
        }
    }

    /// The next record; `Ok(None)` at the end of the input.
    pub fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        loop {
            let Some(too_long) = read_line_capped(&mut self.input, &mut self.buf)
                .with_context(|| format!("cannot read line {}", self.line + 1))?
            else {
                return Ok(None);
            };
            self.line += 1;
            let number = self.line;
            if too_long {
                return Ok(Some(Record {
                    number,
                    user: Err(format!("the line is longer than {MAX_LINE_BYTES} bytes")),
                }));
            }
            let mut bytes = self.buf.as_slice();
            if number == 1 {
                bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            }
            let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
            let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(text) = std::str::from_utf8(bytes) else {
                return Ok(Some(Record {
                    number,
                    user: Err("the line is not UTF-8".into()),
                }));
            };
            let first = !std::mem::replace(&mut self.started, true);
            let format = match self.format {
                Some(format) => format,
                None if text.trim_start().starts_with('{') => Format::JsonLines,
                None if header(text).is_some() => Format::Csv,
                None => anyhow::bail!(
                    "line {number} is neither a `userId,email` header nor a JSON object; \
                     name the format with --format csv or --format jsonl"
                ),
            };
            self.format = Some(format);
            let pair = match format {
                Format::JsonLines => json_pair(text),
                Format::Csv => {
                    // A header is optional with --format csv, and only ever the first line.
                    if first {
                        if let Some(columns) = header(text) {
                            self.columns = columns;
                            continue;
                        }
                    }
                    csv_pair(text, self.columns)
                }
            };
            return Ok(Some(Record {
                number,
                user: pair.and_then(|(user_id, email)| {
                    check_identity(&user_id, &email).map_err(|e| e.to_string())?;
                    Ok(NewUser::new(user_id, email))
                }),
            }));
        }
    }
}

/// Reads one line (with its `\n`) into `buf`; `None` at the end of the input,
/// `Some(true)` when the line was longer than [`MAX_LINE_BYTES`] (it is skipped whole and
/// `buf` left empty).
fn read_line_capped(input: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Option<bool>> {
    buf.clear();
    let (mut any, mut too_long) = (false, false);
    loop {
        let available = match input.fill_buf() {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(any.then_some(too_long));
        }
        any = true;
        let (taken, ends) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if !too_long {
            if buf.len() + taken > MAX_LINE_BYTES + 2 {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&available[..taken]);
            }
        }
        input.consume(taken);
        if ends {
            return Ok(Some(too_long));
        }
    }
}

/// The columns of a `userId,email` header (either order, names in any case), or `None`
/// when the line is not one.
fn header(line: &str) -> Option<Columns> {
    let fields = csv_fields(line).ok()?;
    let find = |name: &str| {
        fields
            .iter()
            .position(|f| f.trim().eq_ignore_ascii_case(name))
    };
    let columns = Columns {
        user_id: find("userId")?,
        email: find("email")?,
    };
    (fields.len() == 2).then_some(columns)
}

/// One CSV line's two values, taken from the columns the header named.
fn csv_pair(line: &str, columns: Columns) -> Result<(String, String), String> {
    let mut fields = csv_fields(line)?;
    if fields.len() != 2 {
        return Err(format!(
            "expected 2 fields (userId,email), found {}",
            fields.len()
        ));
    }
    let email = std::mem::take(&mut fields[columns.email]);
    let user_id = std::mem::take(&mut fields[columns.user_id]);
    Ok((user_id, email))
}

/// Splits one line into RFC 4180 fields: separated by commas, a field either bare (no
/// quote in it) or wholly quoted, with `""` for a quote inside. Spaces are kept: they are
/// part of a value, and the value check then says what is wrong with it.
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        let ended = if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("a quoted field is not closed on its line".into()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            match chars.next() {
                None => true,
                Some(',') => false,
                Some(c) => return Err(format!("{c:?} after a closing quote")),
            }
        } else {
            loop {
                match chars.next() {
                    None => break true,
                    Some(',') => break false,
                    Some('"') => return Err(
                        "a quote inside a bare field (quote the whole field, doubling its quotes)"
                            .into(),
                    ),
                    Some(c) => field.push(c),
                }
            }
        };
        fields.push(field);
        if ended {
            return Ok(fields);
        }
    }
}

/// One JSON line's string `userId` and `email`.
fn json_pair(line: &str) -> Result<(String, String), String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err("not a JSON object".into());
    };
    let mut take = |name: &str| match object.remove(name) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(format!("{name} is not a string")),
        None => Err(format!("{name} is missing")),
    };
    let user_id = take("userId")?;
    let email = take("email")?;
    Ok((user_id, email))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each record as `(number, "ok ID EMAIL")` or `(number, reason)`.
    fn read(input: &[u8], format: Option<Format>) -> Vec<(u64, String)> {
        let mut reader = LineReader::new(input, format);
        let mut out = Vec::new();
        while let Some(r) = reader.next_record().unwrap() {
            let shown = match r.user {
                Ok(u) => format!("ok {} {}", u.user_id, u.email),
                Err(reason) => reason,
            };
            out.push((r.number, shown));
        }
        out
    }

    fn expect(records: &[(u64, &str)]) -> Vec<(u64, String)> {
        records.iter().map(|(n, s)| (*n, s.to_string())).collect()
    }

    #[test]
    fn csv_with_quotes_and_a_header_in_either_order() {
        let got = read(
            "\u{feff}email,userId\r\n\"a,b\"\"@x.com\",u1\r\n\nc@x.com,\"u 2\"\n".as_bytes(),
            None,
        );
        assert_eq!(
            got,
            expect(&[(2, "ok u1 a,b\"@x.com"), (4, "ok u 2 c@x.com")])
        );
    }

    #[test]
    fn bad_csv_lines_are_reported_and_reading_goes_on() {
        let got = read(
            b"userId,email\nu1\n\"u2,a@x.com\nu\"3,a@x.com\n\"u4\"x,a@x.com\nu5,a@x.com,extra\nu6,not-an-email\nu7,b@x.com",
            None,
        );
        assert_eq!(
            got,
            expect(&[
                (2, "expected 2 fields (userId,email), found 1"),
                (3, "a quoted field is not closed on its line"),
                (
                    4,
                    "a quote inside a bare field (quote the whole field, doubling its quotes)"
                ),
                (5, "'x' after a closing quote"),
                (6, "expected 2 fields (userId,email), found 3"),
                (
                    7,
                    "email is not an address (local@domain, at most 254 bytes, no spaces)"
                ),
                (8, "ok u7 b@x.com"),
            ])
        );
    }

    #[test]
    fn json_lines() {
        let got = read(
            b"{\"userId\":\"u1\",\"email\":\"a@x.com\",\"name\":\"A\"}\n{\"userId\":5,\"email\":\"b@x.com\"}\n{\"userId\":\"u3\"}\n[1]\n{nope\n",
            None,
        );
        assert_eq!(
            got[..4],
            expect(&[
                (1, "ok u1 a@x.com"),
                (2, "userId is not a string"),
                (3, "email is missing"),
                (4, "not a JSON object"),
            ])
        );
        assert!(got[4].1.starts_with("not JSON: "), "{:?}", got[4]);
    }

    #[test]
    fn values_meet_the_http_paths_limits() {
        let long_id = "u".repeat(129);
        let input = format!("userId,email\n{long_id},a@x.com\n,b@x.com\nu\u{7},c@x.com\n");
        assert_eq!(
            read(input.as_bytes(), Some(Format::Csv)),
            expect(&[
                (2, "userId is longer than 128 bytes"),
                (3, "userId is empty"),
                (4, "userId contains a control character"),
            ])
        );
    }

    #[test]
    fn an_unknown_first_line_names_no_format() {
        let mut reader = LineReader::new("id;mail\nu1;a@x.com\n".as_bytes(), None);
        let err = reader.next_record().unwrap_err().to_string();
        assert!(err.contains("--format"), "{err}");
        // Named, it is read as CSV without a header.
        assert_eq!(
            read(b"u1,a@x.com\n", Some(Format::Csv)),
            expect(&[(1, "ok u1 a@x.com")])
        );
    }

    #[test]
    fn long_and_non_utf8_lines_are_refused_whole() {
        let mut input = b"userId,email\n".to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_LINE_BYTES + 10));
        input.extend(b"\nu\xff,a@x.com\nu2,b@x.com\n");
        let too_long = format!("the line is longer than {MAX_LINE_BYTES} bytes");
        assert_eq!(
            read(&input, None),
            expect(&[
                (2, &too_long),
                (3, "the line is not UTF-8"),
                (4, "ok u2 b@x.com"),
            ])
        );
    }

    proptest::proptest! {
        #[test]
        fn no_input_makes_the_reader_panic(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            for format in [None, Some(Format::Csv), Some(Format::JsonLines)] {
                let mut reader = LineReader::new(input.as_slice(), format);
                while let Ok(Some(_)) = reader.next_record() {}
            }
        }
    }
}
