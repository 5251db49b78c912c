//! From text to token ids and back: bytes (ids 0..=255, the default) or a Hugging Face
//! `tokenizer.json` (BPE, WordPiece, Unigram, WordLevel), and a byte-level BPE trained on a
//! corpus. Decoding streams: [`TextDecoder`] gives each new token's text once it is whole, so
//! that nothing downstream sees half a UTF-8 character.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{one_line, Error, Result};

/// The end-of-text token a trained tokenizer gets, and the names looked for in others.
pub const END_OF_TEXT: &str = "<|endoftext|>";
const END_OF_TEXT_NAMES: [&str; 4] = [END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>"];
/// The fewest ids of a byte-level BPE: the 256 bytes and the end-of-text token.
pub const MIN_BPE_VOCABULARY: usize = 257;

/// How a model's token ids map to text.
#[derive(Clone)]
pub enum Codec {
    /// Token `b` is the byte `b`.
    Bytes,
    /// A tokenizer, with where it was read from and its file's bytes (copied into model
    /// directories, and checksummed to key token caches).
    Tokenizer {
        /// The tokenizer.
        tokenizer: Arc<Tokenizer>,
        /// Its highest id plus one.
        vocab_size: usize,
        /// Its file.
        path: PathBuf,
        /// The file's contents.
        json: Arc<Vec<u8>>,
    },
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::Bytes => write!(f, "Codec::Bytes"),
            Codec::Tokenizer { path, .. } => write!(f, "Codec::Tokenizer({})", path.display()),
        }
    }
}

impl Codec {
    /// Reads a `tokenizer.json`; a missing, broken or unsupported file is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let json = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut tokenizer = Tokenizer::from_bytes(&json).map_err(|e| Error::file(path, format!("not a tokenizer.json that can be read: {}", one_line(&e.to_string()))))?;
        // A corpus is encoded in long pieces: a hub tokenizer's truncation to a model's context
        // would silently drop most of each.
        tokenizer.with_truncation(None).map_err(|e| Error::file(path, e.to_string()))?.with_padding(None);
        let vocab_size = tokenizer.get_vocab(true).values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if vocab_size == 0 {
            return Err(Error::file(path, "the tokenizer has an empty vocabulary"));
        }
        Ok(Codec::Tokenizer { tokenizer: Arc::new(tokenizer), vocab_size, path: path.to_path_buf(), json: Arc::new(json) })
    }

    /// Whether ids are bytes.
    pub fn is_bytes(&self) -> bool {
        matches!(self, Codec::Bytes)
    }

    /// Ids run from 0 to this, exclusive: the `num_tokens` a model needs at least.
    pub fn vocab_size(&self) -> usize {
        match self {
            Codec::Bytes => 256,
            Codec::Tokenizer { vocab_size, .. } => *vocab_size,
        }
    }

    /// The end-of-text token put between documents, if the tokenizer has one.
    pub fn end_of_text(&self) -> Option<u32> {
        match self {
            Codec::Bytes => None,
            Codec::Tokenizer { tokenizer, .. } => END_OF_TEXT_NAMES.iter().find_map(|t| tokenizer.token_to_id(t)),
        }
    }

    /// The ids of `text` (invalid UTF-8 is read as U+FFFD by a tokenizer).
    pub fn encode(&self, text: &[u8]) -> Result<Vec<u32>> {
        match self {
            Codec::Bytes => Ok(text.iter().map(|&b| b as u32).collect()),
            Codec::Tokenizer { tokenizer, path, .. } => {
                let text = String::from_utf8_lossy(text);
                let encoding = tokenizer.encode(text.as_ref(), false).map_err(|e| Error::file(path, format!("cannot encode: {}", one_line(&e.to_string()))))?;
                Ok(encoding.get_ids().to_vec())
            }
        }
    }

    /// The text of `ids` (bytes that are not UTF-8, and ids the tokenizer lacks, as U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// The bytes of `ids`: exactly the ids of a byte model, the decoded text of a tokenizer's.
    fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        match self {
            Codec::Bytes => ids.iter().map(|&t| t.min(255) as u8).collect(),
            Codec::Tokenizer { tokenizer, .. } => {
                // Ids the tokenizer lacks (a model may have more) become U+FFFD where they are.
                let mut text = String::new();
                for (i, run) in ids.split(|&t| tokenizer.id_to_token(t).is_none()).enumerate() {
                    if i > 0 {
                        text.push(char::REPLACEMENT_CHARACTER);
                    }
                    text.push_str(&tokenizer.decode(run, false).unwrap_or_default());
                }
                text.into_bytes()
            }
        }
    }

    /// Its file's bytes and a CRC-32 of them: what keys a token cache (bytes: none).
    pub fn checksum(&self) -> u32 {
        match self {
            Codec::Bytes => 0,
            Codec::Tokenizer { json, .. } => crc32fast::hash(json),
        }
    }
}

/// A byte-level BPE of `vocab_size` ids trained on `texts`: every text round-trips, whatever its
/// bytes. `END_OF_TEXT` is id 0. Training runs on every core; `progress` shows the tokenizers
/// crate's progress bars.
pub fn train_bpe<I, S>(texts: I, vocab_size: usize, progress: bool) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    // 256 bytes and the end-of-text token come first.
    if vocab_size < MIN_BPE_VOCABULARY {
        return Err(Error::config("vocab_size", format!("{vocab_size} is too small: a byte-level BPE needs at least {MIN_BPE_VOCABULARY} ids (256 bytes and {END_OF_TEXT})")));
    }
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(progress)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    // No prefix space: the decoded text is the encoded text exactly.
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(byte_level)).with_decoder(Some(byte_level));
    tokenizer.train(&mut trainer, texts).map_err(|e| Error::input(format!("tokenizer training failed: {}", one_line(&e.to_string()))))?;
    Ok(tokenizer)
}

/// Writes `tokenizer` as `tokenizer.json` at `path` (creating its folder), atomically.
pub fn save_tokenizer(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    let json = tokenizer.to_string(true).map_err(|e| Error::input(format!("cannot serialise the tokenizer: {e}")))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::checkpoint::write_atomic(path, json.as_bytes())
}

/// A stream's text as its tokens arrive. A byte model's tokens come out as they are (a caller
/// that needs whole characters assembles them); a tokenizer's text comes out once it no longer
/// ends in an incomplete character, decoded with the tokens before it as context, as decoders
/// that join pieces (WordPiece's `##`, the Metaspace `▁`) need.
pub struct TextDecoder {
    codec: Codec,
    ids: Vec<u32>,
    /// Tokens from `from` are decoded together; those before `sent` have been given out.
    from: usize,
    sent: usize,
}

impl TextDecoder {
    /// A decoder with nothing decoded yet.
    pub fn new(codec: &Codec) -> Self {
        Self::after(codec, &[])
    }

    /// A decoder of what follows `prompt` (already shown): its last token is the context of
    /// the first new one.
    pub fn after(codec: &Codec, prompt: &[u32]) -> Self {
        let keep = if codec.is_bytes() { 0 } else { prompt.len().min(1) };
        Self { codec: codec.clone(), ids: prompt[prompt.len() - keep..].to_vec(), from: 0, sent: keep }
    }

    /// The bytes `id` adds (possibly none yet).
    pub fn push(&mut self, id: u32) -> Vec<u8> {
        if self.codec.is_bytes() {
            return vec![id.min(255) as u8];
        }
        self.ids.push(id);
        let (before, now) = self.window();
        if now.ends_with("\u{FFFD}".as_bytes()) {
            return vec![];
        }
        self.new_text(before, now)
    }

    /// What is still held back, at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.sent == self.ids.len() {
            return vec![];
        }
        let (before, now) = self.window();
        self.new_text(before, now)
    }

    /// The text of the tokens given out in the window, and of all of it.
    fn window(&self) -> (Vec<u8>, Vec<u8>) {
        (self.codec.decode_bytes(&self.ids[self.from..self.sent]), self.codec.decode_bytes(&self.ids[self.from..]))
    }

    /// What `now` adds to `before`, moving the window on; nothing while it adds nothing.
    fn new_text(&mut self, before: Vec<u8>, now: Vec<u8>) -> Vec<u8> {
        if now.len() <= before.len() {
            return vec![];
        }
        self.from = self.sent;
        self.sent = self.ids.len();
        // A decoder's clean-up may rewrite the window's start; the text past it is new.
        let mut at = before.len();
        while at < now.len() && now[at] & 0xC0 == 0x80 {
            at += 1;
        }
        now[at..].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "Köln, Zürich — 東京 and 🦀 crabs.\nThe quick brown fox jumps over the lazy dog. ";

    fn trained(vocab: usize) -> Codec {
        let texts: Vec<String> = (0..50).map(|i| format!("{TEXT}{i} {}", TEXT.repeat(i % 3))).collect();
        let tokenizer = train_bpe(texts.iter(), vocab, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        save_tokenizer(&tokenizer, &path).unwrap();
        Codec::load(&path).unwrap()
    }

    #[test]
    fn a_trained_bpe_round_trips_any_text_and_merges() {
        let codec = trained(400);
        assert!(codec.vocab_size() > 257 && codec.vocab_size() <= 400, "{}", codec.vocab_size());
        assert_eq!(codec.end_of_text(), Some(0));
        for text in [TEXT, "unseen: Ωμέγα ∮ 𝄞 \u{0}\t\r\n  spaces  ", "", " leading space"] {
            let ids = codec.encode(text.as_bytes()).unwrap();
            assert_eq!(codec.decode(&ids), text);
        }
        let ids = codec.encode(TEXT.as_bytes()).unwrap();
        assert!(ids.len() < TEXT.len() / 2, "{} ids for {} bytes: merges were learned", ids.len(), TEXT.len());
        assert!(train_bpe(["x"].iter(), 100, false).is_err());
    }

    #[test]
    fn streaming_decoding_never_splits_a_character() {
        let codec = trained(300);
        let text = "🦀 東京 crabs — é";
        let ids = codec.encode(text.as_bytes()).unwrap();
        let mut d = TextDecoder::new(&codec);
        let mut out = vec![];
        for &id in &ids {
            let piece = d.push(id);
            assert!(std::str::from_utf8(&piece).is_ok(), "a piece is whole characters: {piece:?}");
            out.extend(piece);
        }
        out.extend(d.finish());
        assert_eq!(String::from_utf8(out).unwrap(), text);
        // An unseen character is several byte tokens: none of its text comes out before the
        // last, and a character cut short at the end of the stream comes out as U+FFFD.
        let clef = codec.encode("𝄞".as_bytes()).unwrap();
        assert!(clef.len() > 1, "{clef:?}");
        let mut d = TextDecoder::new(&codec);
        assert!(clef[..clef.len() - 1].iter().all(|&i| d.push(i).is_empty()));
        assert_eq!(d.finish(), "\u{FFFD}".as_bytes());
        let mut d = TextDecoder::new(&codec);
        let all: Vec<u8> = clef.iter().flat_map(|&i| d.push(i)).collect();
        assert_eq!(all, "𝄞".as_bytes());
    }

    /// Writes `json` as a tokenizer file and loads it.
    fn load_json(dir: &Path, json: &str) -> Codec {
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        Codec::load(&path).unwrap()
    }

    /// Streaming decodes piece by piece what decoding the whole gives.
    fn streams_as_whole(codec: &Codec, ids: &[u32]) -> String {
        let mut d = TextDecoder::new(codec);
        let mut out: Vec<u8> = ids.iter().flat_map(|&i| d.push(i)).collect();
        out.extend(d.finish());
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, codec.decode(ids));
        text
    }

    #[test]
    fn word_piece_and_unigram_tokenizers_load_encode_and_stream() {
        let dir = tempfile::tempdir().unwrap();
        let word_piece = load_json(
            dir.path(),
            r###"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
                "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
                "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
                "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                          "vocab": {"[UNK]": 0, "the": 1, "cat": 2, "##s": 3, "sat": 4, ".": 5}}}"###,
        );
        let ids = word_piece.encode(b"the cats sat.").unwrap();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(streams_as_whole(&word_piece, &ids), "the cats sat.");
        assert_eq!(word_piece.vocab_size(), 6);
        // After a prompt, its last token is the context: `##s` continues the word.
        let mut d = TextDecoder::after(&word_piece, &[1, 2]);
        assert_eq!((d.push(3), d.push(4)), (b"s".to_vec(), b" sat".to_vec()));
        // An id the tokenizer lacks is U+FFFD in its place, and the stream goes on past it.
        let mut d = TextDecoder::new(&word_piece);
        let out: Vec<u8> = [1, 99, 2].iter().flat_map(|&i| d.push(i)).collect();
        assert_eq!(String::from_utf8(out).unwrap(), word_piece.decode(&[1, 99, 2]));
        assert!(word_piece.decode(&[1, 99, 2]).starts_with("the\u{FFFD}"));
        let unigram = load_json(
            dir.path(),
            r###"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
                "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}, "post_processor": null,
                "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
                "model": {"type": "Unigram", "unk_id": 0, "byte_fallback": false,
                          "vocab": [["<unk>", 0.0], ["▁the", -1.0], ["▁cat", -1.5], ["s", -2.0], ["▁", -3.0], ["t", -4.0], ["h", -4.0], ["e", -4.0], ["c", -4.0], ["a", -4.0], ["</s>", 0.0]]}}"###,
        );
        let ids = unigram.encode(b"the cats").unwrap();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(streams_as_whole(&unigram, &ids), "the cats");
        assert_eq!(unigram.end_of_text(), Some(10));
    }

    #[test]
    fn broken_and_missing_tokenizers_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, b"{\"model\": {\"type\": \"Nope\"}}").unwrap();
        let e = Codec::load(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("tokenizer.json") && !e.contains('\n'), "{e}");
        assert!(Codec::load(&dir.path().join("missing.json")).unwrap_err().to_string().contains("missing.json"));
    }
}
