//! HTTP/1.1 request heads and the small responses this server writes: the
//! one parser behind the WebSocket upgrade (`ws::handshake`) and the admin
//! API (`crate::admin`).
//!
//! Owns: parsing a request head (request line and header fields) from the
//! front of a buffer, bounded in bytes ([`RequestHead::parse`]) and in
//! fields ([`MAX_HEADERS`]); looking up header values and comma-separated
//! tokens; splitting the request target into path and query; decoding query
//! strings ([`query_pairs`], [`percent_decode`]); status phrases and the
//! bytes of a response ([`response`]).
//! Must not: do I/O (each caller reads its own way: a worker from its
//! sockets, the admin thread from a blocking stream), read or frame a body,
//! or decide what a request means. "Incomplete" (`Ok(None)`) is not
//! "invalid" (`Err`).

use thiserror::Error;

/// Header fields parsed per request; more is an error (431).
pub const MAX_HEADERS: usize = 64;

/// Why bytes are not an acceptable request head. Each maps to a status
/// ([`HeadError::status`]).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HeadError {
    #[error("request head larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("more than {} header fields", MAX_HEADERS)]
    TooManyHeaders,
    #[error("malformed HTTP request: {0}")]
    Malformed(httparse::Error),
}

impl HeadError {
    /// 431 for a head too large or with too many fields, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge { .. } | HeadError::TooManyHeaders => 431,
            HeadError::Malformed(_) => 400,
        }
    }
}

/// A header that may appear once appeared more than once (its name).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Error)]
#[error("header {0} appears more than once")]
pub struct DuplicateHeader(pub &'static str);

/// A parsed request head, borrowing the buffer it was parsed from.
#[derive(Debug)]
pub struct RequestHead<'b> {
    method: &'b str,
    target: &'b str,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    version: u8,
    fields: [httparse::Header<'b>; MAX_HEADERS],
    count: usize,
    len: usize,
}

impl<'b> RequestHead<'b> {
    /// Parses a request head from the start of `buf`.
    ///
    /// `Ok(None)`: the head is incomplete and shorter than `max_head`; read
    /// more and call again with the whole buffer (the parse starts over,
    /// which is cheap at these sizes). `Ok(Some(head))`: the head took the
    /// first [`RequestHead::len`] bytes; a body or the next protocol's bytes
    /// follow. A head longer than `max_head`, complete or not, is
    /// [`HeadError::TooLarge`].
    pub fn parse(buf: &'b [u8], max_head: usize) -> Result<Option<RequestHead<'b>>, HeadError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) if n <= max_head => n,
            Ok(httparse::Status::Partial) if buf.len() < max_head => return Ok(None),
            Ok(_) => return Err(HeadError::TooLarge { max: max_head }),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(e) => return Err(HeadError::Malformed(e)),
        };
        // A complete parse sets all three.
        let (method, target, version) = (req.method.unwrap_or(""), req.path.unwrap_or(""), req.version.unwrap_or(0));
        let count = req.headers.len();
        Ok(Some(RequestHead { method, target, version, fields, count, len }))
    }

    /// The method, as sent (`GET`).
    pub fn method(&self) -> &'b str {
        self.method
    }

    /// The request target, as sent (`/ws?user=a`).
    pub fn target(&self) -> &'b str {
        self.target
    }

    /// The target before any `?`.
    pub fn path(&self) -> &'b str {
        self.target.split_once('?').map_or(self.target, |(p, _)| p)
    }

    /// The target after the first `?` (empty without one), not decoded.
    pub fn query(&self) -> &'b str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// The minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Bytes the head took, its final empty line included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the head is empty: never, a request line is at least a few
    /// bytes (here for the `len`/`is_empty` pair).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every header field, in the order sent.
    pub fn fields(&self) -> &[httparse::Header<'b>] {
        &self.fields[..self.count]
    }

    /// Values of every field called `name` (case-insensitive), in order.
    pub fn values<'h>(&'h self, name: &'h str) -> impl Iterator<Item = &'b [u8]> + 'h {
        self.fields().iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }

    /// The value of a field that may appear at most once.
    pub fn single(&self, name: &'static str) -> Result<Option<&'b [u8]>, DuplicateHeader> {
        let mut it = self.values(name);
        let first = it.next();
        if it.next().is_some() {
            return Err(DuplicateHeader(name));
        }
        Ok(first)
    }

    /// Whether any field called `name` lists `token` (case-insensitive, in
    /// a comma-separated value such as `Connection: keep-alive, Upgrade`).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name).any(|v| has_token(v, token))
    }
}

/// Whether a comma-separated header value lists `token` (case-insensitive,
/// whitespace around items ignored).
pub fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The `key=value` pairs of a query string, not decoded, in order; empty
/// pairs (`a=1&&b=2`) are skipped and a pair without `=` has an empty value.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query.split('&').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

/// Why a query key or value cannot be decoded.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Error)]
pub enum PercentError {
    #[error("a `%` is not followed by two hex digits")]
    BadEscape,
    #[error("not UTF-8 once percent-decoded")]
    NotUtf8,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes a query key or value: `%XX` escapes and `+` as a space (form
/// encoding, what `URLSearchParams` and curl's `--data-urlencode` write).
///
/// Refuses rather than guesses: a `%` without two hex digits after it, and
/// decoded bytes that are not UTF-8 (as U+FFFD, `%ff%fe` and `%fe%ff` would
/// name the same user).
pub fn percent_decode(s: &str) -> Result<String, PercentError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = b.get(i + 1).copied().and_then(hex).ok_or(PercentError::BadEscape)?;
                let lo = b.get(i + 2).copied().and_then(hex).ok_or(PercentError::BadEscape)?;
                out.push((hi << 4) | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| PercentError::NotUtf8)
}

/// The standard reason phrase for the statuses this server sends.
pub fn status_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Appends `name: value\r\n`, with any CR or LF turned into a space so a
/// value cannot inject a header.
pub fn push_header(r: &mut String, name: &str, value: &str) {
    let clean = |s: &str, r: &mut String| r.extend(s.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }));
    clean(name, r);
    r.push_str(": ");
    clean(value, r);
    r.push_str("\r\n");
}

/// A whole response with a body: the status line with the standard phrase
/// ([`status_phrase`]), `Content-Type`, `Content-Length`, `Connection`,
/// `extra_headers`, then `body`.
///
/// `close`: the connection ends after this response (`Connection: close`);
/// otherwise it stays open for the next request (HTTP/1.1's default, no
/// header). Whoever sends `Upgrade` also lists `upgrade` in `Connection`
/// (RFC 9110 §7.8), so intermediaries do not forward it.
pub fn response(status: u16, content_type: &str, body: &[u8], extra_headers: &[(&str, &str)], close: bool) -> Vec<u8> {
    let mut r = String::with_capacity(160);
    r.push_str("HTTP/1.1 ");
    r.push_str(&status.to_string());
    r.push(' ');
    r.push_str(status_phrase(status));
    r.push_str("\r\n");
    push_header(&mut r, "Content-Type", content_type);
    push_header(&mut r, "Content-Length", &body.len().to_string());
    let upgrade = extra_headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("Upgrade"));
    match (upgrade, close) {
        (true, true) => push_header(&mut r, "Connection", "Upgrade, close"),
        (true, false) => push_header(&mut r, "Connection", "Upgrade"),
        (false, true) => push_header(&mut r, "Connection", "close"),
        (false, false) => {}
    }
    for (name, value) in extra_headers {
        push_header(&mut r, name, value);
    }
    r.push_str("\r\n");
    let mut out = r.into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REQ: &[u8] = b"POST /push?user=a%20b&x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\
        Connection: keep-alive, Close\r\nX-A: 1\r\nx-a: 2\r\n\r\nabc";

    #[test]
    fn parses_a_head_and_leaves_the_body() {
        let h = RequestHead::parse(REQ, 1024).unwrap().unwrap();
        assert_eq!((h.method(), h.target(), h.version()), ("POST", "/push?user=a%20b&x", 1));
        assert_eq!((h.path(), h.query()), ("/push", "user=a%20b&x"));
        assert_eq!(&REQ[h.len()..], b"abc");
        assert_eq!(h.fields().len(), 5);
        assert_eq!(h.single("content-length"), Ok(Some(&b"3"[..])));
        assert_eq!(h.single("Missing"), Ok(None));
        assert_eq!(h.single("X-A"), Err(DuplicateHeader("X-A")));
        assert_eq!(h.values("x-a").collect::<Vec<_>>(), [&b"1"[..], &b"2"[..]]);
        assert!(h.has_token("Connection", "close"));
        assert!(!h.has_token("Connection", "upgrade"));
        let no_query = RequestHead::parse(b"GET /healthz HTTP/1.0\r\n\r\n", 1024).unwrap().unwrap();
        assert_eq!((no_query.path(), no_query.query(), no_query.version()), ("/healthz", "", 0));
    }

    #[test]
    fn incomplete_too_large_and_malformed_heads() {
        let head_len = REQ.len() - 3;
        for cut in 0..head_len {
            assert!(RequestHead::parse(&REQ[..cut], 1024).unwrap().is_none(), "prefix {cut}");
        }
        let e = RequestHead::parse(&REQ[..40], 40).unwrap_err();
        assert_eq!((e.clone(), e.status()), (HeadError::TooLarge { max: 40 }, 431));
        assert_eq!(RequestHead::parse(REQ, head_len - 1).unwrap_err(), HeadError::TooLarge { max: head_len - 1 });
        assert!(RequestHead::parse(REQ, head_len).unwrap().is_some(), "exactly at the limit");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let e = RequestHead::parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), 1 << 20).unwrap_err();
        assert_eq!((e.clone(), e.status()), (HeadError::TooManyHeaders, 431));
        let e = RequestHead::parse(b"\x00\x01 nonsense\r\n\r\n", 1024).unwrap_err();
        assert!(matches!(e, HeadError::Malformed(_)) && e.status() == 400, "{e:?}");
    }

    #[test]
    fn tokens_are_comma_separated_and_case_insensitive() {
        assert!(has_token(b"Upgrade", "upgrade"));
        assert!(has_token(b"keep-alive,  UPGRADE ", "upgrade"));
        assert!(!has_token(b"upgrades", "upgrade"));
        assert!(!has_token(b"", "upgrade"));
    }

    #[test]
    fn query_pairs_and_percent_decoding() {
        let pairs: Vec<_> = query_pairs("a=1&&b&c=x=y&").collect();
        assert_eq!(pairs, [("a", "1"), ("b", ""), ("c", "x=y")]);
        assert_eq!(percent_decode("a%20b+c%2Fd").unwrap(), "a b c/d");
        assert_eq!(percent_decode("J%C3%BCrgen").unwrap(), "Jürgen");
        assert_eq!(percent_decode("%C3%a9").unwrap(), "é", "hex digits of either case");
        assert_eq!(percent_decode(""), Ok(String::new()));
        for bad in ["100%", "%zz", "%4", "%%41", "a%g1"] {
            assert_eq!(percent_decode(bad), Err(PercentError::BadEscape), "{bad}");
        }
        assert_eq!(percent_decode("%ff%fe"), Err(PercentError::NotUtf8), "refused, not U+FFFD");
        assert_eq!(percent_decode("%C3"), Err(PercentError::NotUtf8), "half a character");
    }

    #[test]
    fn responses_are_byte_exact() {
        assert_eq!(
            response(200, "application/json", b"{}", &[], false),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
        assert_eq!(
            response(405, "text/plain", b"", &[("Allow", "GET")], true),
            b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\
              Connection: close\r\nAllow: GET\r\n\r\n"
        );
        let r = String::from_utf8(response(426, "t", b"", &[("Upgrade", "websocket")], false)).unwrap();
        assert!(r.contains("\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"), "{r}");
        let r = String::from_utf8(response(400, "t", b"", &[("X-A", "1\r\nSet-Cookie: a=b")], true)).unwrap();
        assert!(r.contains("\r\nX-A: 1  Set-Cookie: a=b\r\n"), "a value cannot inject a header: {r}");
        assert_eq!(status_phrase(408), "Request Timeout");
        assert_eq!(status_phrase(599), "Error");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_parser(b in proptest::collection::vec(any::<u8>(), 0..600), max in 0usize..1024) {
            if let Ok(Some(h)) = RequestHead::parse(&b, max) {
                prop_assert!(h.len() <= b.len() && h.len() <= max);
                let _ = (h.path(), h.query(), h.single("Host"));
            }
        }

        #[test]
        fn percent_decoding_inverts_encoding(s in "\\PC{0,40}") {
            let encoded: String = s.bytes().map(|b| format!("%{b:02X}")).collect();
            prop_assert_eq!(percent_decode(&encoded), Ok(s.clone()));
            let _ = percent_decode(&s);
        }
    }
}
