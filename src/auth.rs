//! Login authentication: the pluggable check and the built-in JWT (HS256).
//!
//! Owns: verifying a LOGIN's token for its user id, and minting test tokens.
//! Must not: do I/O or read the clock (the caller passes `now_unix_s`), or
//! block: it runs on a worker thread, between two reads of a socket.
//!
//! The JWT convention is the one Centrifugo and EMQX users know: a compact
//! JWS signed with HMAC-SHA256, claim `sub` = the user id, `exp` = expiry in
//! Unix seconds (required unless configured otherwise), `nbf` honoured when
//! present. A small clock-skew leeway applies to both.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use thiserror::Error;

use crate::proto::codes::LoginErrorCode;

/// Largest token accepted, in bytes. A JWT with a short `sub` is ~150 bytes;
/// this leaves room for application claims while bounding the work a
/// hostile LOGIN can cause.
pub const MAX_TOKEN_BYTES: usize = crate::proto::frame::MAX_LOGIN_TOKEN_BYTES;

/// Why a login was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token algorithm is not HS256")]
    UnsupportedAlgorithm,
    #[error("token signature does not match")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token subject does not match the user id")]
    UserMismatch,
    #[error("login rejected: {0}")]
    Rejected(String),
}

impl AuthError {
    /// The code sent in LOGIN_ERROR.
    pub fn code(&self) -> LoginErrorCode {
        match self {
            AuthError::Malformed(_) => LoginErrorCode::MalformedToken,
            AuthError::UnsupportedAlgorithm => LoginErrorCode::UnsupportedAlgorithm,
            AuthError::BadSignature => LoginErrorCode::BadSignature,
            AuthError::Expired => LoginErrorCode::Expired,
            AuthError::NotYetValid => LoginErrorCode::NotYetValid,
            AuthError::UserMismatch => LoginErrorCode::UserMismatch,
            AuthError::Rejected(_) => LoginErrorCode::Rejected,
        }
    }
}

/// Decides whether `user` may log in with `token`. Called on the worker
/// thread that owns the connection: it must be quick and must not block.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, user: &str, token: &[u8], now_unix_s: u64) -> Result<(), AuthError>;
}

impl<F> Authenticator for F
where
    F: Fn(&str, &[u8], u64) -> Result<(), AuthError> + Send + Sync + 'static,
{
    fn authenticate(&self, user: &str, token: &[u8], now_unix_s: u64) -> Result<(), AuthError> {
        self(user, token, now_unix_s)
    }
}

/// HS256 JWT verifier and minter for one shared secret.
#[derive(Clone)]
pub struct JwtHs256 {
    secret: Vec<u8>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    leeway_s: u64,
    /// Whether a token without `exp` is refused.
    require_exp: bool,
}

impl std::fmt::Debug for JwtHs256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtHs256").field("secret", &"<redacted>").field("leeway_s", &self.leeway_s).finish()
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    /// Whether the header has `crit`, whatever its value.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

/// `true` for a field that is there, `null` included.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
}

/// `json` read as `T`, if it is a JSON object: serde also reads a struct
/// from an array of its fields in order, which a JWT header or claims set
/// must not be (RFC 7519 sections 5 and 7.2).
fn from_json_object<T: serde::de::DeserializeOwned>(json: &[u8]) -> Option<T> {
    let start = json.iter().position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    if json[start] != b'{' {
        return None;
    }
    serde_json::from_slice(json).ok()
}

impl JwtHs256 {
    /// A verifier with a 30 s leeway that requires `exp`.
    pub fn new(secret: impl Into<Vec<u8>>) -> JwtHs256 {
        JwtHs256 { secret: secret.into(), leeway_s: 30, require_exp: true }
    }

    /// Sets the clock-skew leeway in seconds.
    pub fn with_leeway_s(mut self, leeway_s: u64) -> JwtHs256 {
        self.leeway_s = leeway_s;
        self
    }

    /// Sets whether tokens without `exp` are refused.
    pub fn with_require_exp(mut self, require_exp: bool) -> JwtHs256 {
        self.require_exp = require_exp;
        self
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; this cannot fail.
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length")
    }

    /// Mints a token for `sub` expiring at `exp_unix_s`.
    pub fn mint(&self, sub: &str, exp_unix_s: u64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = serde_json::json!({ "sub": sub, "exp": exp_unix_s });
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    /// Verifies signature and time claims; returns the `sub` claim.
    pub fn verify(&self, token: &[u8], now_unix_s: u64) -> Result<String, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed("token longer than 4096 bytes"));
        }
        let mut parts = token.splitn(3, |&b| b == b'.');
        let (Some(h), Some(p), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed("expected three dot-separated parts"));
        };
        if s.contains(&b'.') {
            return Err(AuthError::Malformed("expected three dot-separated parts"));
        }
        let header_json = URL_SAFE_NO_PAD.decode(h).map_err(|_| AuthError::Malformed("header is not base64url"))?;
        let header: Header =
            from_json_object(&header_json).ok_or(AuthError::Malformed("header is not a JSON object"))?;
        if header.alg != "HS256" {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        if header.crit {
            // RFC 7515 4.1.11: a listed extension that is not understood
            // makes the token invalid, and none is understood here.
            return Err(AuthError::Malformed(
                "header lists critical extensions (crit), which this server does not support",
            ));
        }
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| AuthError::Malformed("signature is not base64url"))?;
        let mut mac = self.mac();
        mac.update(&token[..h.len() + 1 + p.len()]);
        mac.verify_slice(&sig).map_err(|_| AuthError::BadSignature)?;
        let claims_json = URL_SAFE_NO_PAD.decode(p).map_err(|_| AuthError::Malformed("payload is not base64url"))?;
        let claims: Claims = from_json_object(&claims_json)
            .ok_or(AuthError::Malformed("payload is not a JSON object with string sub and numeric exp"))?;
        let now = now_unix_s as f64;
        match claims.exp {
            Some(exp) if now >= exp + self.leeway_s as f64 => return Err(AuthError::Expired),
            None if self.require_exp => return Err(AuthError::Malformed("missing exp claim")),
            _ => {}
        }
        if let Some(nbf) = claims.nbf {
            if now + (self.leeway_s as f64) < nbf {
                return Err(AuthError::NotYetValid);
            }
        }
        claims.sub.ok_or(AuthError::Malformed("missing sub claim"))
    }
}

impl Authenticator for JwtHs256 {
    fn authenticate(&self, user: &str, token: &[u8], now_unix_s: u64) -> Result<(), AuthError> {
        let sub = self.verify(token, now_unix_s)?;
        if sub != user {
            return Err(AuthError::UserMismatch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn minted_token_verifies() {
        let j = JwtHs256::new("s3cret");
        let t = j.mint("alice", NOW + 60);
        assert_eq!(j.verify(t.as_bytes(), NOW).unwrap(), "alice");
        assert_eq!(j.authenticate("alice", t.as_bytes(), NOW), Ok(()));
        assert_eq!(j.authenticate("bob", t.as_bytes(), NOW), Err(AuthError::UserMismatch));
    }

    #[test]
    fn known_vector_from_another_implementation() {
        // jwt.io's canonical HS256 example (secret "your-256-bit-secret"),
        // with no exp: accepted only when exp is not required.
        let t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        let j = JwtHs256::new("your-256-bit-secret");
        assert_eq!(j.verify(t.as_bytes(), NOW), Err(AuthError::Malformed("missing exp claim")));
        assert_eq!(j.with_require_exp(false).verify(t.as_bytes(), NOW).unwrap(), "1234567890");
    }

    #[test]
    fn wrong_secret_and_tampering_are_refused() {
        let t = JwtHs256::new("a").mint("alice", NOW + 60);
        assert_eq!(JwtHs256::new("b").verify(t.as_bytes(), NOW), Err(AuthError::BadSignature));
        let mut bytes = t.into_bytes();
        let mid = bytes.iter().position(|&b| b == b'.').unwrap() + 3;
        bytes[mid] ^= 1;
        assert!(matches!(
            JwtHs256::new("a").verify(&bytes, NOW),
            Err(AuthError::BadSignature | AuthError::Malformed(_))
        ));
    }

    #[test]
    fn expiry_and_not_before_honour_the_leeway() {
        let j = JwtHs256::new("k").with_leeway_s(30);
        let t = j.mint("u", NOW);
        assert!(j.verify(t.as_bytes(), NOW + 29).is_ok());
        assert_eq!(j.verify(t.as_bytes(), NOW + 30), Err(AuthError::Expired));
    }

    /// The header and the claims are JSON objects (RFC 7519 5, 7.2): an
    /// array such as `["HS256"]` used to pass for the header `{"alg":"HS256"}`
    /// (serde reads a struct from a sequence too), and `["alice", exp]` for
    /// the claims.
    #[test]
    fn header_and_claims_must_be_objects() {
        let j = JwtHs256::new("k");
        let sign = |header: &str, claims: &str| {
            let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
            let mut mac = j.mac();
            mac.update(input.as_bytes());
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
        };
        let exp = NOW + 60;
        let good = sign(r#"{"alg":"HS256"}"#, &format!(r#"{{"sub":"u","exp":{exp}}}"#));
        assert_eq!(j.verify(good.as_bytes(), NOW).unwrap(), "u");
        let array_header = sign(r#"["HS256"]"#, &format!(r#"{{"sub":"u","exp":{exp}}}"#));
        assert_eq!(j.verify(array_header.as_bytes(), NOW), Err(AuthError::Malformed("header is not a JSON object")));
        let array_claims = sign(r#"{"alg":"HS256"}"#, &format!(r#"["u",{exp}]"#));
        assert!(matches!(j.verify(array_claims.as_bytes(), NOW), Err(AuthError::Malformed(_))));
        let spaced = sign(" \n{\"alg\":\"HS256\"}", &format!(" {{\"sub\":\"u\",\"exp\":{exp}}}"));
        assert_eq!(j.verify(spaced.as_bytes(), NOW).unwrap(), "u", "whitespace before the object is JSON");
    }

    /// A header's `crit` names extensions the token's meaning depends on
    /// (RFC 7515 4.1.11); this verifier understands none, so such a token
    /// is refused whatever it lists. `b64: false` (RFC 7797), for one,
    /// changes what the signature covers and comes with `crit`.
    #[test]
    fn a_header_with_crit_is_refused() {
        let j = JwtHs256::new("k");
        let sign = |header: &str| {
            let claims = format!(r#"{{"sub":"u","exp":{}}}"#, NOW + 60);
            let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
            let mut mac = j.mac();
            mac.update(input.as_bytes());
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
        };
        for header in [
            r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            r#"{"alg":"HS256","crit":[]}"#,
            r#"{"alg":"HS256","crit":null}"#,
        ] {
            let token = sign(header);
            assert_eq!(
                j.verify(token.as_bytes(), NOW),
                Err(AuthError::Malformed(
                    "header lists critical extensions (crit), which this server does not support"
                )),
                "{header}"
            );
        }
        assert_eq!(j.verify(sign(r#"{"alg":"HS256","kid":"a","typ":"JWT"}"#).as_bytes(), NOW).unwrap(), "u");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let j = JwtHs256::new("k");
        for t in [&b""[..], b"a", b"a.b", b"a.b.c.d", b"!!.!!.!!", b"e30.e30.", &[0xff; 10]] {
            assert!(j.verify(t, NOW).is_err());
        }
        // alg none is refused before the signature is looked at.
        let none =
            format!("{}.{}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(br#"{"sub":"u"}"#));
        assert_eq!(j.verify(none.as_bytes(), NOW), Err(AuthError::UnsupportedAlgorithm));
    }
}
