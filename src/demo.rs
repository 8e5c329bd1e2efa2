//! The browser demo page served on the WebSocket port (`GET /`), and its
//! development-token helper (`GET /demo/token/<user>`).
//!
//! Owns: the page (one static HTML file with its script, no build step)
//! and minting a short-lived token for it when the server runs on the
//! built-in development secret, so a newcomer sees pushes arrive within a
//! minute of starting the server.
//! Must not: mint tokens with a real secret: with `auth.jwt_secret` set the
//! helper answers 403 and the page asks for a token from the application.

use crate::proto::ws::handshake::{response_200, response_error};
use crate::runtime::Shared;

/// The demo page.
pub static PAGE: &[u8] = include_bytes!("demo/index.html");

/// How long a demo token is valid.
const TOKEN_TTL_S: u64 = 24 * 3600;

/// `GET /demo/token/<user>`: a token for `user` signed with the
/// development secret, or 403 when a real secret is configured.
pub(crate) fn token_response(shared: &Shared, path: &str) -> Vec<u8> {
    let user = path.strip_prefix("/demo/token/").unwrap_or("");
    let (secret, dev) = shared.config.jwt_secret();
    if !dev {
        let reason = "auth.jwt_secret is set: the demo cannot mint tokens; paste one from your application \
                      (or `switchboard token --user ID --config FILE`)";
        return response_error(403, reason, &[]);
    }
    let valid = !user.is_empty()
        && user.len() <= 64
        && user.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !valid {
        return response_error(400, "user ids for the demo: 1-64 of A-Z a-z 0-9 _ - .", &[]);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let token = crate::auth::JwtHs256::new(secret.into_bytes()).mint(user, now + TOKEN_TTL_S);
    response_200("text/plain; charset=utf-8", token.as_bytes())
}
