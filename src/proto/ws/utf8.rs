//! Incremental UTF-8 validation of a text message that arrives in pieces:
//! fragments, and parts of one frame that arrive in separate reads.
//!
//! Owns: the state between two pieces (at most 3 bytes of a character cut
//! off at the end of the last piece) and the rule that an invalid sequence
//! is refused as soon as the byte that makes it invalid arrives (RFC 6455
//! §8.1: "fail the connection" on invalid text, which a server can do at
//! once only if it checks as bytes arrive).
//! Must not: buffer the text itself or allocate. The checks are std's
//! (`str::from_utf8`), which reports a sequence cut off at the end of its
//! input as incomplete only while it can still become valid: a lead byte
//! that can never start a character, a wrong continuation byte, an
//! overlong form, a surrogate or a code point above U+10FFFF is an error at
//! the first byte that shows it.

/// Bytes of UTF-8 seen so far do not form a prefix of valid UTF-8.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct InvalidUtf8;

/// Validation state between pieces: 4 bytes.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Utf8Stream {
    /// The start of a character cut off at the end of the last piece.
    pending: [u8; 3],
    /// How many bytes of `pending` are in use (0 to 3).
    len: u8,
}

/// The length of the character a valid lead byte starts.
fn char_width(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

impl Utf8Stream {
    /// Checks the next piece of text. `Err` as soon as the bytes so far
    /// (all pieces together) cannot be the start of valid UTF-8.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Result<(), InvalidUtf8> {
        if self.len > 0 {
            // Complete the cut-off character first, from the front of `data`.
            let have = self.len as usize;
            let need = char_width(self.pending[0]) - have;
            let take = need.min(data.len());
            let mut c = [0u8; 4];
            c[..have].copy_from_slice(&self.pending[..have]);
            c[have..have + take].copy_from_slice(&data[..take]);
            match std::str::from_utf8(&c[..have + take]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still incomplete: `data` was shorter than the rest of it.
                    self.pending[..have + take].copy_from_slice(&c[..have + take]);
                    self.len = (have + take) as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
            data = &data[take..];
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &data[e.valid_up_to()..];
                debug_assert!(!rest.is_empty() && rest.len() <= 3, "an incomplete character is 1 to 3 bytes");
                self.pending[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// True when the text so far ends on a character boundary: the message
    /// may end here.
    pub(crate) fn is_complete(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `pieces` in order: the index of the piece that failed, or
    /// whether the whole ended on a character boundary.
    fn run(pieces: &[&[u8]]) -> Result<bool, usize> {
        let mut s = Utf8Stream::default();
        for (i, p) in pieces.iter().enumerate() {
            s.feed(p).map_err(|_| i)?;
        }
        Ok(s.is_complete())
    }

    /// Whether `b` can be the start of valid UTF-8 (std as the oracle).
    fn valid_prefix(b: &[u8]) -> bool {
        match std::str::from_utf8(b) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        }
    }

    #[test]
    fn every_split_of_valid_text_is_accepted() {
        // 1, 2, 3 and 4 byte characters next to each other.
        let text = "aé€😀z\u{7ff}\u{800}\u{ffff}\u{10000}\u{10ffff}".as_bytes();
        for i in 0..=text.len() {
            for j in i..=text.len() {
                assert_eq!(run(&[&text[..i], &text[i..j], &text[j..]]), Ok(true), "split at {i}, {j}");
            }
        }
        // Byte by byte, and with empty pieces between.
        let bytes: Vec<&[u8]> = text.chunks(1).flat_map(|c| [c, &[][..]]).collect();
        assert_eq!(run(&bytes), Ok(true));
    }

    #[test]
    fn a_character_cut_off_at_the_end_is_incomplete() {
        assert_eq!(run(&[b"caf\xc3"]), Ok(false));
        assert_eq!(run(&[b"\xe2", b"\x82"]), Ok(false));
        assert_eq!(run(&[b"\xf0\x9f", b"\x98"]), Ok(false));
        assert_eq!(run(&[b"\xf0\x9f", b"\x98", b"\x80"]), Ok(true));
    }

    #[test]
    fn invalid_sequences_fail_at_the_piece_that_shows_them() {
        // (bytes, index of the first byte that makes them invalid)
        let cases: [(&[u8], usize); 11] = [
            // never a lead byte
            (b"ab\xff", 2),
            // overlong lead
            (b"\xc0\xaf", 0),
            // not a continuation
            (b"\xc3\x28", 1),
            // overlong 3-byte form
            (b"\xe0\x80\x80", 1),
            // surrogate U+D800
            (b"\xed\xa0\x80", 1),
            // above U+10FFFF
            (b"\xf4\x90\x80\x80", 1),
            // lead byte above U+10FFFF
            (b"\xf5", 0),
            // "κόσμε", then a surrogate (Autobahn 6.3.1)
            (b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited", 12),
            // third byte not a continuation
            (b"\xe2\x82\x28", 2),
            // fourth byte not a continuation
            (b"\xf0\x9f\x98\x28", 3),
            // a lone continuation
            (b"a\x80", 1),
        ];
        for (bytes, bad) in cases {
            assert!(!valid_prefix(bytes), "{bytes:x?}");
            assert!(valid_prefix(&bytes[..bad]), "{bytes:x?} is fine before byte {bad}");
            // Whatever the split, the error comes with the piece holding
            // byte `bad`, never before and never later.
            for i in 0..=bytes.len() {
                for j in i..=bytes.len() {
                    let pieces = [&bytes[..i], &bytes[i..j], &bytes[j..]];
                    let failing = if bad < i {
                        0
                    } else if bad < j {
                        1
                    } else {
                        2
                    };
                    assert_eq!(run(&pieces), Err(failing), "{bytes:x?} split at {i}, {j}");
                }
            }
        }
    }

    #[test]
    fn the_state_is_four_bytes() {
        assert_eq!(std::mem::size_of::<Utf8Stream>(), 4);
    }

    /// Bytes that are mostly UTF-8-like: ASCII, lead and continuation
    /// bytes, and a few of every other value.
    fn utf8ish() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            3 => 0x20u8..0x7f,
            2 => 0x80u8..0xc0,
            2 => 0xc2u8..0xf5,
            1 => any::<u8>(),
        ];
        proptest::collection::vec(byte, 0..40)
    }

    proptest! {
        #[test]
        fn agrees_with_std_on_every_prefix(bytes in utf8ish(), cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(bytes.len());
            let mut s = Utf8Stream::default();
            let mut at = 0;
            for c in cuts {
                let ok = s.feed(&bytes[at..c]).is_ok();
                // Accepted exactly while everything so far is a prefix of
                // valid UTF-8; complete exactly when it is valid UTF-8.
                prop_assert_eq!(ok, valid_prefix(&bytes[..c]));
                if !ok {
                    return Ok(());
                }
                prop_assert_eq!(s.is_complete(), std::str::from_utf8(&bytes[..c]).is_ok());
                at = c;
            }
        }

        #[test]
        fn valid_text_in_any_pieces_is_accepted(text in "\\PC{0,30}", cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
            let b = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (b.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(b.len());
            let mut s = Utf8Stream::default();
            let mut at = 0;
            for c in cuts {
                prop_assert!(s.feed(&b[at..c]).is_ok());
                at = c;
            }
            prop_assert!(s.is_complete());
        }
    }
}
