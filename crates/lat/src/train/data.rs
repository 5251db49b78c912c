//! Byte-level corpora, split deterministically into train / validation / test (the first 90 %,
//! the next 5 %, the last 5 %: for enwik8's 100 M bytes that is the reference example's
//! 90 M / 5 M / 5 M), read through a memory map so that corpora larger than memory work. (The
//! `lat` command gathers folders and unpacks compressed files into one file first.)

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::rng::Rng;

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

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

/// A corpus of bytes (tokens 0..=255).
pub struct Corpus {
    bytes: Bytes,
    /// Where the bytes came from, for messages.
    pub source: PathBuf,
}

impl Corpus {
    /// Maps the file at `path`.
    pub fn map(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::file(path, "the corpus is empty"));
        }
        // SAFETY: the map is read-only; a file truncated by another process while mapped
        // would fault, which we accept as for any reader of a file being rewritten.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        Ok(Self { bytes: Bytes::Mapped(map), source: path.to_path_buf() })
    }

    /// A corpus held in memory (tests, small inputs).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        if bytes.is_empty() {
            return Err(Error::input("the corpus is empty"));
        }
        Ok(Self { bytes: Bytes::Owned(bytes), source: PathBuf::from("<memory>") })
    }

    /// All of the corpus.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }

    /// Bytes in the corpus.
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    /// Whether the corpus has no bytes (never true for an opened corpus).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of one split.
    pub fn split(&self, split: Split) -> &[u8] {
        let n = self.len();
        let (a, b) = (n / 100 * 90 + n % 100 * 90 / 100, n / 100 * 95 + n % 100 * 95 / 100);
        let b = b.max(a);
        match split {
            Split::Train => &self.bytes()[..a],
            Split::Validation => &self.bytes()[a..b],
            Split::Test => &self.bytes()[b..],
        }
    }
}

/// Inputs and next-byte targets of `batch` random windows of `len` bytes of `data`.
pub fn random_windows(data: &[u8], batch: usize, len: usize, rng: &mut Rng) -> Result<(Vec<u32>, Vec<u32>)> {
    if data.len() < len + 1 {
        return Err(Error::input(format!("the training split has {} bytes, fewer than seq_len + 1 = {}; lower seq_len or use more data", data.len(), len + 1)));
    }
    let mut x = Vec::with_capacity(batch * len);
    let mut y = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        let start = rng.below((data.len() - len) as u64) as usize;
        x.extend(data[start..start + len].iter().map(|&b| b as u32));
        y.extend(data[start + 1..start + len + 1].iter().map(|&b| b as u32));
    }
    Ok((x, y))
}

/// Starts of the evaluation windows: consecutive windows of `len` predicted bytes covering
/// `data` (the last one ending at its end), or `max_windows` of them evenly spread.
pub fn eval_windows(data: &[u8], len: usize, max_windows: Option<usize>) -> Vec<usize> {
    if data.len() < 2 {
        return vec![];
    }
    let len = len.min(data.len() - 1);
    let count = (data.len() - 1).div_ceil(len);
    let starts: Vec<usize> = (0..count).map(|i| (i * len).min(data.len() - 1 - len)).collect();
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
        let (x, y) = random_windows(&data, 3, 10, &mut Rng::new(1)).unwrap();
        assert_eq!(x.len(), 30);
        for i in 0..30 {
            assert_eq!(y[i], x[i] + 1);
        }
        assert!(random_windows(&data[..5], 1, 10, &mut Rng::new(1)).is_err());
        let starts = eval_windows(&data, 64, None);
        assert_eq!(starts, vec![0, 64, 128, 135]);
        assert_eq!(eval_windows(&data, 16, Some(3)).len(), 3);
    }
}
