//! The checks every API request passes before its route runs: each header they read at most once, `Host`, cross-site origin, content type and the API key.
//!
//! Owns: pure functions over a request's headers, each answering with the
//! status and the words the client gets.
//! Must not: read a body, or take time that depends on a key's bytes.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap};

/// A refusal: the status and the words the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    pub error: String,
}

fn refuse(status: u16, error: impl Into<String>) -> Refusal {
    Refusal { status, error: error.into() }
}

/// What a route needs of the caller.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Health and readiness: never a key (probes cannot send one).
    Public,
    /// Stats, presence, inbox state, metrics: the read key or the write key.
    Read,
    /// Everything that changes something: the write key.
    Write,
}

/// The configured keys (`admin.token`, `admin.read_token`).
pub(crate) struct Keys {
    pub write: Option<String>,
    pub read: Option<String>,
}

/// The key a request presents: `Authorization: Bearer K` or `X-API-Key: K`.
fn presented(h: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = h.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(&v[7..]);
        }
        return Some(b"");
    }
    h.get("x-api-key").map(|v| v.as_bytes())
}

impl Keys {
    /// Whether the request may use a route of `scope`. Without any key
    /// configured (a loopback listener only: config validation) every
    /// request may.
    pub fn check(&self, h: &HeaderMap, scope: Scope) -> Result<(), Refusal> {
        if scope == Scope::Public || (self.write.is_none() && self.read.is_none()) {
            return Ok(());
        }
        let Some(key) = presented(h) else {
            return Err(refuse(401, "an API key is required: Authorization: Bearer <key> or X-API-Key: <key>"));
        };
        // Both compared, always: the time taken does not tell which one
        // (or whether any) matched.
        let write = self.write.as_deref().is_some_and(|w| key_matches(key, w.as_bytes()));
        let read = self.read.as_deref().is_some_and(|r| key_matches(key, r.as_bytes()));
        match (write, read, scope) {
            (true, _, _) => Ok(()),
            (false, true, Scope::Read) => Ok(()),
            (false, true, _) => Err(refuse(403, "the read-only key (admin.read_token) cannot use a write route")),
            _ => Err(refuse(401, "wrong API key")),
        }
    }
}

/// Compares a presented key with a configured one in time that does not
/// depend on where they differ (or on their lengths): both are hashed with
/// SHA-256 and the digests compared without an early exit, so timing the
/// answers cannot recover the key byte by byte.
pub(crate) fn key_matches(presented: &[u8], expected: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(presented), Sha256::digest(expected));
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box: the optimiser may not turn the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Which `Host` values the API answers to.
pub(crate) struct Hosts {
    pub listen: SocketAddr,
    /// `admin.allowed_hosts`: names (with or without a port) accepted
    /// besides the loopback ones.
    pub allowed: Vec<String>,
}

/// Splits a `Host` value into its name (lowercased, brackets kept off an
/// IPv6 literal) and its port.
fn split_host(v: &str) -> Option<(String, Option<u16>)> {
    let v = v.trim();
    let (name, port) = if let Some(rest) = v.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        (ip, after.strip_prefix(':'))
    } else {
        match v.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (v, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    (!name.is_empty()).then(|| (name.to_ascii_lowercase(), port))
}

impl Hosts {
    /// DNS rebinding: a page on a name the attacker controls, resolved to
    /// 127.0.0.1, reaches a loopback API with that name in `Host`. On a
    /// loopback listener only loopback names (`localhost`, loopback IPs)
    /// and `admin.allowed_hosts` are answered. A listener on another
    /// address needs a key (config validation), which a rebound page does
    /// not have; there `Host` is checked only when `admin.allowed_hosts` is
    /// set.
    pub fn check(&self, h: &HeaderMap) -> Result<(), Refusal> {
        let loopback = self.listen.ip().is_loopback();
        if !loopback && self.allowed.is_empty() {
            return Ok(());
        }
        let Some(value) = h.get(header::HOST).and_then(|v| v.to_str().ok()) else {
            return Err(refuse(400, "the request has no Host header"));
        };
        let Some((name, port)) = split_host(value) else {
            return Err(refuse(400, "the Host header is not host[:port]"));
        };
        let loopback_name =
            name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip == self.listen.ip());
        if loopback && loopback_name && port.is_none_or(|p| p == self.listen.port()) {
            return Ok(());
        }
        let listed = self.allowed.iter().any(|a| match split_host(a) {
            Some((n, None)) => n == name,
            Some((n, Some(p))) => n == name && port.unwrap_or(80) == p,
            None => false,
        });
        if listed {
            return Ok(());
        }
        Err(refuse(403, format!("Host {value:?} is not an address of this API (admin.allowed_hosts)")))
    }
}

/// A request a browser sent from another site: `Sec-Fetch-Site` says so,
/// or `Origin` names another host than `Host`. A page cannot forge these
/// headers, so they tell a cross-site form or `fetch` from a backend (which
/// sends neither).
pub(crate) fn cross_site(h: &HeaderMap) -> Result<(), Refusal> {
    if let Some(site) = h.get("sec-fetch-site") {
        let site = site.as_bytes();
        if !(site.eq_ignore_ascii_case(b"same-origin") || site.eq_ignore_ascii_case(b"none")) {
            return Err(refuse(403, "cross-site requests are refused (Sec-Fetch-Site)"));
        }
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let host = h.get(header::HOST).map(|v| v.as_bytes()).unwrap_or(b"");
        let authority = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://").or_else(|| o.strip_prefix("https://")))
            .map(|a| a.trim_end_matches('/'));
        if !authority.is_some_and(|a| a.as_bytes().eq_ignore_ascii_case(host)) {
            return Err(refuse(403, "cross-site requests are refused (Origin is not this API's host)"));
        }
    }
    Ok(())
}

/// The headers the checks here read, each of which must come at most once.
const SINGLE_VALUED: [&str; 6] = ["host", "content-type", "origin", "sec-fetch-site", "authorization", "x-api-key"];

/// A header the checks read, given twice, is refused with 400 before any
/// check: each check reads the first line, so a foreign `Host` or a form's
/// content type behind an accepted one was obeyed, and a front or proxy
/// that reads the last line would judge the request otherwise (RFC 9112
/// 3.2 asks 400 for more than one `Host`). Every route, probes included.
pub(crate) fn single_valued(h: &HeaderMap) -> Result<(), Refusal> {
    match SINGLE_VALUED.iter().find(|name| h.get_all(**name).iter().nth(1).is_some()) {
        Some(name) => Err(refuse(400, format!("the header {name} appears more than once"))),
        None => Ok(()),
    }
}

/// The content type of a request body: what a route accepts.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// No Content-Type (an empty body, or a backend that sends none).
    Unstated,
    Json,
    Raw,
}

/// The body's content type. A write route takes `application/json`, or
/// `application/octet-stream` where it takes one raw payload. The types a
/// browser may send cross-site without asking first (`text/plain`, forms)
/// are refused with 415, so a page cannot submit to the API even where
/// `Origin` is missing.
pub(crate) fn body_kind(h: &HeaderMap) -> Result<Body, Refusal> {
    let Some(v) = h.get(header::CONTENT_TYPE) else {
        return Ok(Body::Unstated);
    };
    let mime = v.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(Body::Json),
        "application/octet-stream" => Ok(Body::Raw),
        _ => Err(refuse(
            415,
            format!("Content-Type {mime:?} is not accepted: send application/json, or application/octet-stream for a raw payload"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn key_comparison_accepts_only_the_exact_key() {
        let t = b"0123456789abcdef-admin";
        assert!(key_matches(t, t));
        assert!(!key_matches(b"0123456789abcdef-admin ", t), "longer");
        assert!(!key_matches(b"0123456789abcdef-admi", t), "a prefix");
        assert!(!key_matches(b"1123456789abcdef-admin", t), "first byte differs");
        assert!(!key_matches(b"0123456789abcdef-admiN", t), "last byte differs");
        assert!(!key_matches(b"", t));
    }

    #[test]
    fn keys_are_taken_from_bearer_or_x_api_key_and_scoped() {
        let keys = Keys { write: Some("write-key-0123456789".into()), read: Some("read-key-0123456789".into()) };
        let w = headers(&[("authorization", "Bearer write-key-0123456789")]);
        let r = headers(&[("x-api-key", "read-key-0123456789")]);
        assert_eq!(keys.check(&w, Scope::Write), Ok(()));
        assert_eq!(keys.check(&headers(&[("x-api-key", "write-key-0123456789")]), Scope::Write), Ok(()));
        assert_eq!(keys.check(&r, Scope::Read), Ok(()));
        assert_eq!(keys.check(&r, Scope::Write).unwrap_err().status, 403);
        assert_eq!(keys.check(&headers(&[]), Scope::Read).unwrap_err().status, 401);
        assert_eq!(keys.check(&headers(&[("authorization", "Basic eDp5")]), Scope::Read).unwrap_err().status, 401);
        assert_eq!(keys.check(&headers(&[]), Scope::Public), Ok(()));
        let none = Keys { write: None, read: None };
        assert_eq!(none.check(&headers(&[]), Scope::Write), Ok(()));
    }

    #[test]
    fn a_loopback_listener_answers_loopback_names_only() {
        let hosts = Hosts { listen: "127.0.0.1:7701".parse().unwrap(), allowed: vec!["push.internal".into()] };
        for ok in ["127.0.0.1:7701", "localhost:7701", "LOCALHOST", "127.0.0.1", "[::1]:7701", "push.internal:7701"] {
            assert_eq!(hosts.check(&headers(&[("host", ok)])), Ok(()), "{ok}");
        }
        for bad in ["evil.example:7701", "127.0.0.1:80", "evil.example", "127.0.0.1:x"] {
            assert!(hosts.check(&headers(&[("host", bad)])).is_err(), "{bad}");
        }
        assert_eq!(hosts.check(&headers(&[])).unwrap_err().status, 400);
        let open = Hosts { listen: "0.0.0.0:7701".parse().unwrap(), allowed: vec![] };
        assert_eq!(open.check(&headers(&[("host", "anything:1")])), Ok(()));
    }

    #[test]
    fn cross_site_browser_requests_are_refused() {
        let same = headers(&[("host", "127.0.0.1:7701"), ("origin", "http://127.0.0.1:7701")]);
        assert_eq!(cross_site(&same), Ok(()));
        assert_eq!(cross_site(&headers(&[("host", "127.0.0.1:7701")])), Ok(()));
        let foreign = headers(&[("host", "127.0.0.1:7701"), ("origin", "https://evil.example")]);
        assert_eq!(cross_site(&foreign).unwrap_err().status, 403);
        assert!(cross_site(&headers(&[("host", "h"), ("origin", "null")])).is_err());
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])).is_err());
        assert!(cross_site(&headers(&[("sec-fetch-site", "same-site")])).is_err());
        assert_eq!(cross_site(&headers(&[("sec-fetch-site", "none")])), Ok(()));
    }

    #[test]
    fn a_header_the_checks_read_may_come_once_only() {
        let once = headers(&[("host", "127.0.0.1:7701"), ("content-type", "application/json"), ("accept", "a")]);
        assert_eq!(single_valued(&once), Ok(()));
        let accept_twice = headers(&[("accept", "a"), ("accept", "b")]);
        assert_eq!(single_valued(&accept_twice), Ok(()), "a header no check reads");
        for name in ["host", "content-type", "origin", "sec-fetch-site", "authorization", "x-api-key"] {
            let twice = headers(&[(name, "x"), (name, "x")]);
            let r = single_valued(&twice).unwrap_err();
            assert_eq!((r.status, r.error.contains(name)), (400, true), "{name}: {r:?}");
        }
    }

    #[test]
    fn only_json_and_raw_bodies_are_accepted() {
        assert_eq!(body_kind(&headers(&[])), Ok(Body::Unstated));
        assert_eq!(body_kind(&headers(&[("content-type", "application/json; charset=utf-8")])), Ok(Body::Json));
        assert_eq!(body_kind(&headers(&[("content-type", "Application/Octet-Stream")])), Ok(Body::Raw));
        for simple in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
            assert_eq!(body_kind(&headers(&[("content-type", simple)])).unwrap_err().status, 415, "{simple}");
        }
    }
}
