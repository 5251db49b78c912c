//! The token cache: a corpus tokenized once, into a file that is memory-mapped by every later
//! run. Ids are stored as little-endian u16 when the vocabulary fits, else u32, after a
//! 64-byte header that keys them to the text (its length, a CRC-32 of its bytes and of its
//! document starts) and to the tokenizer (a CRC-32 of its file). A cache whose key differs,
//! or whose length is not what its header says (a run killed while writing it, a truncated
//! copy), is rebuilt; it is written under a temporary name and renamed when complete.
//!
//! Each split is tokenized on its own, from the byte offsets of the byte-level splits, so that
//! byte and token models are evaluated on the same text (an offset inside a multi-byte
//! character leaves each side a U+FFFD). The text is cut into chunks of about
//! a MiB at line ends and the chunks are encoded on every core; each document after the first
//! begins with the tokenizer's end-of-text token, if it has one.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::data::{Corpus, Text, SPLITS};
use crate::error::{Error, Result};
use crate::text::Codec;

const MAGIC: &[u8; 8] = b"LATTOK01";
const HEADER: usize = 64;
/// Bytes per chunk encoded at once.
const CHUNK: usize = 1 << 20;

/// What opening the cache took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// The cache matched the text and the tokenizer.
    Reused,
    /// There was none.
    Built,
    /// There was one, and it was rebuilt for the reason given.
    Rebuilt(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    width: u32,
    tokenizer_crc: u32,
    text_len: u64,
    text_crc: u32,
    documents_crc: u32,
    counts: [u64; 3],
}

impl Header {
    fn of(text: &Text, codec: &Codec) -> Self {
        let documents: Vec<u8> = text.documents.iter().flat_map(|&d| (d as u64).to_le_bytes()).collect();
        Self {
            width: if codec.vocab_size() <= 1 << 16 { 2 } else { 4 },
            tokenizer_crc: codec.checksum(),
            text_len: text.bytes().len() as u64,
            text_crc: crc32fast::hash(text.bytes()),
            documents_crc: crc32fast::hash(&documents),
            counts: [0; 3],
        }
    }

    fn encode(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&self.width.to_le_bytes());
        h[12..16].copy_from_slice(&self.tokenizer_crc.to_le_bytes());
        h[16..24].copy_from_slice(&self.text_len.to_le_bytes());
        h[24..28].copy_from_slice(&self.text_crc.to_le_bytes());
        h[28..32].copy_from_slice(&self.documents_crc.to_le_bytes());
        for (i, c) in self.counts.iter().enumerate() {
            h[32 + 8 * i..40 + 8 * i].copy_from_slice(&c.to_le_bytes());
        }
        h
    }

    fn decode(h: &[u8; HEADER]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        (&h[..8] == MAGIC).then(|| Self {
            width: u32_at(8),
            tokenizer_crc: u32_at(12),
            text_len: u64_at(16),
            text_crc: u32_at(24),
            documents_crc: u32_at(28),
            counts: [u64_at(32), u64_at(40), u64_at(48)],
        })
    }

    fn bounds(&self) -> [usize; 4] {
        let c = self.counts.map(|c| c as usize);
        [0, c[0], c[0] + c[1], c[0] + c[1] + c[2]]
    }
}

/// What a cache must match to be read for a text and a tokenizer. Working it out reads the
/// whole text (a CRC-32, about a second per GB), so a caller trying two caches does it once.
pub struct Key(Header);

impl Key {
    /// The key of `text` tokenized by `codec`.
    pub fn of(text: &Text, codec: &Codec) -> Self {
        Key(Header::of(text, codec))
    }
}

/// The corpus of `text` tokenized by `codec` (whose key is `key`), from the cache at `path`
/// when it matches, else built there first; `progress` is told the bytes of text encoded so far.
pub fn open(text: &Text, codec: &Codec, key: &Key, path: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<(Corpus, Opened)> {
    if codec.is_bytes() {
        return Err(Error::input("a token cache needs a tokenizer: byte-level corpora are read directly"));
    }
    let want = &key.0;
    let opened = match check(path, want)? {
        Some(have) => return Ok((corpus(path, &have, text, codec)?, Opened::Reused)),
        None if !path.exists() => Opened::Built,
        None => Opened::Rebuilt(stale(path, want)),
    };
    let header = build(text, codec, path, *want, progress)?;
    Ok((corpus(path, &header, text, codec)?, opened))
}

/// The corpus from the cache at `path` if it is complete and matches `key`; `None` (and the
/// file untouched) otherwise.
pub fn reuse(text: &Text, codec: &Codec, key: &Key, path: &Path) -> Result<Option<Corpus>> {
    match check(path, &key.0)? {
        Some(have) if !codec.is_bytes() => Ok(Some(corpus(path, &have, text, codec)?)),
        _ => Ok(None),
    }
}

/// The header of the cache at `path` if it is complete and keyed to `want`.
fn check(path: &Path, want: &Header) -> Result<Option<Header>> {
    let Ok(mut f) = File::open(path) else { return Ok(None) };
    let mut h = [0u8; HEADER];
    if f.read_exact(&mut h).is_err() {
        return Ok(None);
    }
    let Some(have) = Header::decode(&h) else { return Ok(None) };
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    // Checked: a damaged header must not overflow.
    let ids = have.counts.iter().try_fold(0u64, |a, &c| a.checked_add(c));
    let complete = ids.and_then(|n| n.checked_mul(have.width as u64)).and_then(|b| b.checked_add(HEADER as u64)) == Some(len);
    let same = Header { counts: have.counts, ..*want } == have;
    Ok((complete && same).then_some(have))
}

/// Why the cache at `path` cannot be used for `want`.
fn stale(path: &Path, want: &Header) -> String {
    let mut h = [0u8; HEADER];
    let header = File::open(path).ok().and_then(|mut f| f.read_exact(&mut h).ok()).and_then(|_| Header::decode(&h));
    match header {
        None => "it is not a token cache".into(),
        Some(have) if have.tokenizer_crc != want.tokenizer_crc || have.width != want.width => "the tokenizer changed".into(),
        Some(have) if (have.text_len, have.text_crc, have.documents_crc) != (want.text_len, want.text_crc, want.documents_crc) => "the corpus changed".into(),
        Some(_) => "it is incomplete (truncated)".into(),
    }
}

fn corpus(path: &Path, header: &Header, text: &Text, codec: &Codec) -> Result<Corpus> {
    let text_bytes = SPLITS.map(|s| text.split_range(s).len());
    Corpus::map_ids(path, HEADER, header.width as usize, header.bounds(), text_bytes, codec.clone(), text.source.clone())
}

/// Deletes a half-written file unless it was completed.
struct Partial(PathBuf, bool);

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.1 {
            std::fs::remove_file(&self.0).ok();
        }
    }
}

fn build(text: &Text, codec: &Codec, path: &Path, mut header: Header, progress: &(dyn Fn(u64) + Sync)) -> Result<Header> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut partial = Partial(path.with_file_name(format!("{name}.tmp-{}", std::process::id())), false);
    let tmp = &partial.0;
    let file = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(tmp, e);
    out.write_all(&[0u8; HEADER]).map_err(io)?;
    let eos = codec.end_of_text();
    let width = header.width as usize;
    let done = std::sync::atomic::AtomicU64::new(0);
    let group = 4 * rayon::current_num_threads();
    for (i, split) in SPLITS.iter().enumerate() {
        let pieces = text.chunks(text.split_range(*split), CHUNK);
        for batch in pieces.chunks(group) {
            let encoded: Vec<Vec<u32>> = batch
                .par_iter()
                .map(|c| {
                    let mut ids: Vec<u32> = c.document.then_some(eos).flatten().into_iter().collect();
                    ids.extend(codec.encode(&text.bytes()[c.range.clone()])?);
                    let total = done.fetch_add(c.range.len() as u64, std::sync::atomic::Ordering::Relaxed) + c.range.len() as u64;
                    progress(total);
                    Ok(ids)
                })
                .collect::<Result<_>>()?;
            for ids in encoded {
                header.counts[i] += ids.len() as u64;
                let mut buf = Vec::with_capacity(ids.len() * width);
                for id in ids {
                    if width == 2 {
                        buf.extend_from_slice(&(id as u16).to_le_bytes());
                    } else {
                        buf.extend_from_slice(&id.to_le_bytes());
                    }
                }
                out.write_all(&buf).map_err(io)?;
            }
        }
    }
    let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(&header.encode()).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    partial.1 = true;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::Split;

    fn codec(dir: &Path, name: &str, vocab: usize, texts: &[&str]) -> Codec {
        let texts: Vec<String> = texts.iter().map(|t| t.repeat(20)).collect();
        let t = crate::text::train_bpe(texts.iter(), vocab, false).unwrap();
        let path = dir.join(name);
        crate::text::save_tokenizer(&t, &path).unwrap();
        Codec::load(&path).unwrap()
    }

    #[test]
    fn built_once_reused_and_rebuilt_when_anything_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (codec(dir.path(), "a.json", 280, &["the cat sat on the mat. "]), codec(dir.path(), "b.json", 280, &["a dog, a log; the fog. "]));
        let cache = dir.path().join("run/tokens.bin");
        let body = "the cat sat on the mat.\n".repeat(300) + "Ünïcödé fog 🦀\n";
        let mut text = Text::from_bytes(body.clone().into_bytes()).unwrap();
        let none = |_| {};
        let (c, how) = open(&text, &a, &Key::of(&text, &a), &cache, &none).unwrap();
        assert_eq!(how, Opened::Built);
        // Each split decodes to exactly its bytes of the text.
        for s in SPLITS {
            let ids = c.split(s).ids(0..c.split(s).len());
            assert_eq!(a.decode(&ids).as_bytes(), &text.bytes()[text.split_range(s)], "{s:?}");
        }
        assert!(c.split(Split::Train).bytes_per_token() > 1.5);
        let ids = c.all().ids(0..c.len());
        assert_eq!(open(&text, &a, &Key::of(&text, &a), &cache, &none).unwrap().1, Opened::Reused);
        assert_eq!(open(&text, &a, &Key::of(&text, &a), &cache, &none).unwrap().0.all().ids(0..c.len()), ids);
        // Another tokenizer.
        assert_eq!(open(&text, &b, &Key::of(&text, &b), &cache, &none).unwrap().1, Opened::Rebuilt("the tokenizer changed".into()));
        // Another text, and the same text cut into documents: each after the first begins with <|endoftext|>.
        text = Text::from_bytes((body.clone() + "more").into_bytes()).unwrap();
        assert_eq!(open(&text, &b, &Key::of(&text, &b), &cache, &none).unwrap().1, Opened::Rebuilt("the corpus changed".into()));
        text.documents = vec![0, 24];
        let (c, how) = open(&text, &b, &Key::of(&text, &b), &cache, &none).unwrap();
        assert_eq!(how, Opened::Rebuilt("the corpus changed".into()));
        let train = c.split(Split::Train);
        assert_eq!(train.ids(0..train.len()).iter().filter(|&&t| t == 0).count(), 1);
        // Cut short, as by a killed run.
        let len = std::fs::metadata(&cache).unwrap().len();
        drop(c);
        std::fs::OpenOptions::new().write(true).open(&cache).unwrap().set_len(len - 10).unwrap();
        assert_eq!(open(&text, &b, &Key::of(&text, &b), &cache, &none).unwrap().1, Opened::Rebuilt("it is incomplete (truncated)".into()));
        assert_eq!(std::fs::metadata(&cache).unwrap().len(), len);
        std::fs::write(&cache, b"junk").unwrap();
        assert_eq!(open(&text, &b, &Key::of(&text, &b), &cache, &none).unwrap().1, Opened::Rebuilt("it is not a token cache".into()));
        // Nothing half-written is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("run")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["tokens.bin".to_string()]);
    }
}
