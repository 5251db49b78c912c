//! From tokens to the text a stream sends: a tokenizer's tokens are decoded (see
//! [`TextDecoder`]); bytes become UTF-8 only once a character is complete
//! (an incomplete sequence is held back; bytes that can never form one become U+FFFD, exactly as
//! `String::from_utf8_lossy` of the whole output would have them), and text that may be the start
//! of a stop string is held back until it is known not to be.

use linear_attention_transformer::text::{Codec, TextDecoder};

/// The text of one stream as its tokens arrive.
pub struct TextStream {
    decoder: TextDecoder,
    /// Bytes of an incomplete character.
    partial: Vec<u8>,
    /// Decoded text not yet sent: it may begin a stop string.
    held: String,
    stop: Vec<String>,
}

impl TextStream {
    /// The text after `prompt`, decoded by `codec`, ending at the first of `stop`.
    pub fn new(stop: Vec<String>, codec: &Codec, prompt: &[u32]) -> Self {
        Self { decoder: TextDecoder::after(codec, prompt), partial: vec![], held: String::new(), stop }
    }

    /// Adds a token: see [`TextStream::push`].
    pub fn push_token(&mut self, id: u32) -> (String, bool) {
        let bytes = self.decoder.push(id);
        self.push(&bytes)
    }

    /// Adds a token's bytes. Returns the text that can be sent now and whether a stop string
    /// was found (the text then ends just before it, and the stream is over).
    pub fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        self.partial.extend_from_slice(bytes);
        let mut rest: &[u8] = &self.partial;
        let mut decoded = String::new();
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    decoded.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    decoded.push_str(std::str::from_utf8(valid).expect("valid up to here"));
                    match e.error_len() {
                        // Bytes that no continuation can make valid.
                        Some(n) => {
                            decoded.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        // The start of a character whose remaining bytes have not come yet.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.partial = rest.to_vec();
        self.held.push_str(&decoded);
        self.release()
    }

    /// The rest at the end of the stream (an incomplete character as U+FFFD).
    pub fn finish(&mut self) -> String {
        let rest = self.decoder.finish();
        let (mut text, stopped) = self.push(&rest);
        if stopped {
            return text;
        }
        text.push_str(&self.finish_bytes());
        text
    }

    fn finish_bytes(&mut self) -> String {
        if !self.partial.is_empty() {
            self.partial.clear();
            self.held.push(char::REPLACEMENT_CHARACTER);
        }
        match self.release() {
            (text, true) => text,
            (mut text, false) => {
                text.push_str(&std::mem::take(&mut self.held));
                text
            }
        }
    }

    /// What of the held text can go: up to a stop string, or all but its longest end that
    /// begins one.
    fn release(&mut self) -> (String, bool) {
        if let Some(at) = self.stop.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let text = self.held[..at].to_string();
            self.held.clear();
            return (text, true);
        }
        let keep = self.stop.iter().flat_map(|s| s.char_indices().skip(1).map(|(i, _)| &s[..i])).filter(|prefix| self.held.ends_with(prefix)).map(str::len).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        (text, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8], stop: &[&str]) -> (String, bool) {
        let mut t = TextStream::new(stop.iter().map(|s| s.to_string()).collect(), &Codec::Bytes, &[]);
        let mut out = String::new();
        for &b in bytes {
            let (text, stopped) = t.push(&[b]);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&t.finish());
        (out, false)
    }

    #[test]
    fn byte_by_byte_gives_the_lossy_text_of_the_whole() {
        for bytes in [&b"plain"[..], "é€😀".as_bytes(), b"\xff\xfe ok", b"cut \xe2\x82", b"\xe2\x82\xe2\x82\xac!", b"\xf0\x9f\x98"] {
            assert_eq!(run(bytes, &[]).0, String::from_utf8_lossy(bytes), "{bytes:?}");
        }
    }

    #[test]
    fn characters_are_never_split() {
        let mut t = TextStream::new(vec![], &Codec::Bytes, &[]);
        let euro = "€".as_bytes();
        assert_eq!(t.push(&euro[..1]).0, "");
        assert_eq!(t.push(&euro[1..2]).0, "");
        assert_eq!(t.push(&euro[2..]).0, "€");
    }

    #[test]
    fn stop_strings_end_the_text_before_them_even_across_tokens() {
        assert_eq!(run(b"hello world\n\nmore", &["\n\n"]), ("hello world".to_string(), true));
        assert_eq!(run(b"abcabd", &["abd", "zz"]), ("abc".to_string(), true));
        assert_eq!(run(b"no stop here", &["xyz"]), ("no stop here".to_string(), false));
        // A held prefix that turns out not to be a stop string is sent in the end.
        assert_eq!(run(b"ends with ab", &["abc"]), ("ends with ab".to_string(), false));
        let mut t = TextStream::new(vec!["STOP".into()], &Codec::Bytes, &[]);
        assert_eq!(t.push(b"go ST"), ("go ".to_string(), false));
        assert_eq!(t.push(b"OP"), (String::new(), true));
    }
}
