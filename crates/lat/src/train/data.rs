//! Corpora, split deterministically into train / validation / test (the first 90 %, the next
//! 5 %, the last 5 % of the text: for enwik8's 100 M bytes that is the reference example's
//! 90 M / 5 M / 5 M), read through memory maps so that corpora larger than memory work: the
//! text itself for byte-level models, a token cache for token-level ones. (The `lat` command
//! gathers folders and unpacks compressed files into one file first.)

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::text::Codec;

/// A part of the corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The first 90 %.
    Train,
    /// The next 5 %.
    Validation,
    /// The last 5 %.
    Test,
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "validation" | "valid" | "val" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            _ => Err(Error::input(format!("unknown split \"{s}\": use train, validation or test"))),
        }
    }
}

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn map(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped
        // would fault, which we accept as for any reader of a file being rewritten.
        Ok(Storage::Mapped(unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// The text of a corpus: its bytes and where its documents begin.
pub struct Text {
    bytes: Storage,
    /// Byte offsets where documents begin, ascending, the first 0.
    pub documents: Vec<usize>,
    /// Where the text came from, for messages.
    pub source: PathBuf,
}

impl Text {
    /// Maps the file at `path`: one document.
    pub fn map(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::file(path, "the corpus is empty"));
        }
        Ok(Self { bytes: Storage::map(path)?, documents: vec![0], source: path.to_path_buf() })
    }

    /// Text held in memory (tests, small inputs): one document.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        if bytes.is_empty() {
            return Err(Error::input("the corpus is empty"));
        }
        Ok(Self { bytes: Storage::Owned(bytes), documents: vec![0], source: PathBuf::from("<memory>") })
    }

    /// All of the text.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.bytes()
    }

    /// The byte range of a split: the first 90 %, the next 5 %, the last 5 %. Token corpora are
    /// cut at the same offsets, so that every model is evaluated on the same text.
    pub fn split_range(&self, split: Split) -> std::ops::Range<usize> {
        let n = self.bytes().len();
        let (a, b) = (n / 100 * 90 + n % 100 * 90 / 100, n / 100 * 95 + n % 100 * 95 / 100);
        let b = b.max(a);
        match split {
            Split::Train => 0..a,
            Split::Validation => a..b,
            Split::Test => b..n,
        }
    }
}

/// A piece of a text, with whether a document begins at its start.
pub struct Chunk {
    /// Its bytes in the text.
    pub range: std::ops::Range<usize>,
    /// Whether a document other than the first begins here.
    pub document: bool,
}

impl Text {
    /// The pieces of `range`: cut where documents begin, then into pieces of at most `max`
    /// bytes ending after a newline where there is one (else on a character boundary).
    pub fn chunks(&self, range: std::ops::Range<usize>, max: usize) -> Vec<Chunk> {
        let bytes = self.bytes();
        let mut cuts: Vec<usize> = self.documents.iter().copied().filter(|&d| d > range.start && d < range.end).collect();
        cuts.push(range.end);
        let mut out = vec![];
        let mut start = range.start;
        for end in cuts {
            let mut document = start > 0 && self.documents.binary_search(&start).is_ok();
            while start < end {
                let mut cut = (start + max.max(4)).min(end);
                if cut < end {
                    cut = match bytes[start..cut].iter().rposition(|&b| b == b'\n') {
                        Some(i) => start + i + 1,
                        None => (start + 1..=cut).rev().find(|&i| bytes[i] & 0xC0 != 0x80).unwrap_or(cut),
                    };
                }
                out.push(Chunk { range: start..cut, document });
                document = false;
                start = cut;
            }
        }
        out
    }
}

/// The splits in corpus order.
pub const SPLITS: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

/// Token ids as a corpus stores them: bytes (each its own id) or the little-endian 16- or
/// 32-bit ids of a token cache, with the bytes of text they encode.
#[derive(Clone, Copy)]
pub struct Tokens<'a> {
    raw: &'a [u8],
    width: usize,
    text_bytes: usize,
}

impl<'a> Tokens<'a> {
    /// Bytes as their own ids.
    pub fn bytes(bytes: &'a [u8]) -> Self {
        Self { raw: bytes, width: 1, text_bytes: bytes.len() }
    }

    /// How many ids.
    pub fn len(&self) -> usize {
        self.raw.len() / self.width
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The id at `i`.
    pub fn get(&self, i: usize) -> u32 {
        let b = &self.raw[i * self.width..(i + 1) * self.width];
        match self.width {
            1 => b[0] as u32,
            2 => u16::from_le_bytes([b[0], b[1]]) as u32,
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    /// The ids `range` as u32.
    pub fn ids(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        range.map(|i| self.get(i)).collect()
    }

    /// Bytes of text per id: what turns a loss per token into one per byte.
    pub fn bytes_per_token(&self) -> f64 {
        self.text_bytes as f64 / self.len().max(1) as f64
    }
}

/// A corpus as a model reads it: token ids split into train / validation / test, with the
/// codec that made them. Bytes map their text directly; token ids come from a token cache (see
/// [`super::token_cache`]).
pub struct Corpus {
    storage: Storage,
    /// Where the ids begin in `storage` (after a cache's header).
    offset: usize,
    /// Bytes per id.
    width: usize,
    /// The id index where each split begins, then the end.
    bounds: [usize; 4],
    /// Bytes of text in each split.
    text_bytes: [usize; 3],
    codec: Codec,
    /// Where the text came from, for messages.
    pub source: PathBuf,
}

impl Corpus {
    /// A byte-level corpus of `text`.
    pub fn of_bytes(text: Text) -> Self {
        let r = [text.split_range(Split::Train), text.split_range(Split::Validation), text.split_range(Split::Test)];
        let bounds = [0, r[0].end, r[1].end, r[2].end];
        let text_bytes = [r[0].len(), r[1].len(), r[2].len()];
        Self { storage: text.bytes, offset: 0, width: 1, bounds, text_bytes, codec: Codec::Bytes, source: text.source }
    }

    /// Maps the file at `path` as a byte-level corpus.
    pub fn map(path: &Path) -> Result<Self> {
        Ok(Self::of_bytes(Text::map(path)?))
    }

    /// A byte-level corpus held in memory (tests, small inputs).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Ok(Self::of_bytes(Text::from_bytes(bytes)?))
    }

    /// Ids stored `width` bytes each from `offset` of the file at `path`, split at `bounds`.
    pub(crate) fn map_ids(path: &Path, offset: usize, width: usize, bounds: [usize; 4], text_bytes: [usize; 3], codec: Codec, source: PathBuf) -> Result<Self> {
        Ok(Self { storage: Storage::map(path)?, offset, width, bounds, text_bytes, codec, source })
    }

    /// How its ids map to text.
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// Ids in the corpus.
    pub fn len(&self) -> usize {
        self.bounds[3]
    }

    /// Whether the corpus has no ids (never true for an opened corpus).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of text the corpus holds.
    pub fn text_len(&self) -> usize {
        self.text_bytes.iter().sum()
    }

    /// All of its ids.
    pub fn all(&self) -> Tokens<'_> {
        let raw = &self.storage.bytes()[self.offset..self.offset + self.len() * self.width];
        Tokens { raw, width: self.width, text_bytes: self.text_len() }
    }

    /// The ids of one split.
    pub fn split(&self, split: Split) -> Tokens<'_> {
        let i = SPLITS.iter().position(|&s| s == split).expect("a split");
        let raw = &self.storage.bytes()[self.offset + self.bounds[i] * self.width..self.offset + self.bounds[i + 1] * self.width];
        Tokens { raw, width: self.width, text_bytes: self.text_bytes[i] }
    }
}

/// Inputs and next-token targets of `batch` random windows of `len` ids of `data`.
pub fn random_windows(data: Tokens, batch: usize, len: usize, rng: &mut Rng) -> Result<(Vec<u32>, Vec<u32>)> {
    if data.len() < len + 1 {
        return Err(Error::input(format!("the training split has {} tokens, fewer than seq_len + 1 = {}; lower seq_len or use more data", data.len(), len + 1)));
    }
    let mut x = Vec::with_capacity(batch * len);
    let mut y = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        let start = rng.below((data.len() - len) as u64) as usize;
        x.extend(data.ids(start..start + len));
        y.extend(data.ids(start + 1..start + len + 1));
    }
    Ok((x, y))
}

/// Starts of the evaluation windows over `n` ids: consecutive windows of `len` predicted ids
/// covering them (the last one ending at the end), or `max_windows` of them evenly spread.
pub fn eval_windows(n: usize, len: usize, max_windows: Option<usize>) -> Vec<usize> {
    if n < 2 {
        return vec![];
    }
    let len = len.min(n - 1);
    let count = (n - 1).div_ceil(len);
    let starts: Vec<usize> = (0..count).map(|i| (i * len).min(n - 1 - len)).collect();
    match max_windows {
        Some(m) if m < count => (0..m).map(|i| starts[i * count / m]).collect(),
        _ => starts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_90_5_5_and_cover_everything() {
        let c = Corpus::from_bytes((0..=255u8).cycle().take(100_000).collect()).unwrap();
        assert_eq!(c.split(Split::Train).len(), 90_000);
        assert_eq!(c.split(Split::Validation).len(), 5_000);
        assert_eq!(c.split(Split::Test).len(), 5_000);
        let odd = Corpus::from_bytes(vec![1; 1234]).unwrap();
        let total: usize = [Split::Train, Split::Validation, Split::Test].iter().map(|&s| odd.split(s).len()).sum();
        assert_eq!(total, 1234);
        // enwik8: first 90 M, next 5 M, last 5 M.
        let n = 100_000_000usize;
        assert_eq!((n / 100 * 90, n / 100 * 95), (90_000_000, 95_000_000));
    }

    #[test]
    fn windows_are_inputs_and_next_bytes() {
        let data: Vec<u8> = (0..200u8).collect();
        let (x, y) = random_windows(Tokens::bytes(&data), 3, 10, &mut Rng::new(1)).unwrap();
        assert_eq!(x.len(), 30);
        for i in 0..30 {
            assert_eq!(y[i], x[i] + 1);
        }
        assert!(random_windows(Tokens::bytes(&data[..5]), 1, 10, &mut Rng::new(1)).is_err());
        let starts = eval_windows(data.len(), 64, None);
        assert_eq!(starts, vec![0, 64, 128, 135]);
        assert_eq!(eval_windows(data.len(), 16, Some(3)).len(), 3);
    }

    #[test]
    fn chunks_cover_the_text_and_end_at_line_ends() {
        const MAX: usize = 1 << 12;
        let mut body = String::new();
        while body.len() < 3 * MAX {
            body.push_str("line of text ü\n");
        }
        let mut text = Text::from_bytes(body.into_bytes()).unwrap();
        text.documents = vec![0, 1000];
        let n = text.bytes().len();
        let c = text.chunks(10..n, MAX);
        assert_eq!(c.first().unwrap().range.start, 10);
        assert_eq!(c.last().unwrap().range.end, n);
        assert!(c.windows(2).all(|w| w[0].range.end == w[1].range.start));
        assert!(c.iter().all(|c| c.range.len() <= MAX));
        assert!(c[1..c.len() - 1].iter().all(|c| text.bytes()[c.range.end - 1] == b'\n' || c.range.end == 1000));
        assert_eq!(c.iter().filter(|c| c.document).map(|c| c.range.start).collect::<Vec<_>>(), vec![1000]);
    }
}
