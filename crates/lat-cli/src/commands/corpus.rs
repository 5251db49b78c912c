//! Corpora as `lat` reads them: a file or a folder (its files in sorted order, recursively),
//! raw, gzip or zip, or the bundled corpus (the works of Shakespeare, see data/README.md), built
//! into the binary so that `lat train` works from anywhere. Anything but one raw file is first
//! unpacked and concatenated into a cache file, which is then mapped.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use linear_attention_transformer::checkpoint::write_atomic;
use linear_attention_transformer::train::data::Corpus;
use linear_attention_transformer::Error;

use super::Result;

const SHAKESPEARE: &[u8] = include_bytes!("../../../../data/shakespeare.txt.gz");

/// The corpus at `data`, else the bundled one (unpacked into `dir`); `cache` is where
/// compressed files and folders are unpacked (overwritten).
pub fn open(data: Option<&Path>, dir: &Path, cache: &Path) -> Result<(PathBuf, Corpus)> {
    let path = resolve(data, dir)?;
    let corpus = open_path(&path, cache)?;
    Ok((path, corpus))
}

/// The corpus to read: `data` if given, else the bundled one, unpacked into `dir`.
fn resolve(data: Option<&Path>, dir: &Path) -> Result<PathBuf> {
    if let Some(d) = data {
        return Ok(d.to_path_buf());
    }
    let path = dir.join("shakespeare.txt.gz");
    if fs::metadata(&path).map(|m| m.len() as usize != SHAKESPEARE.len()).unwrap_or(true) {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        write_atomic(&path, SHAKESPEARE)?;
    }
    Ok(path)
}

/// Maps `path` directly when it is one raw file, else unpacks it into `cache` first.
fn open_path(path: &Path, cache: &Path) -> Result<Corpus> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() && !is_gzip(path) && !is_zip(path) {
        return Ok(Corpus::map(path)?);
    }
    if let Some(dir) = cache.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = cache.with_extension("partial");
    let mut out = BufWriter::new(File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
    let mut files = vec![];
    collect(path, &mut files)?;
    for f in files {
        append(&f, &mut out)?;
    }
    out.flush().map_err(|e| Error::io(&tmp, e))?;
    drop(out);
    fs::rename(&tmp, cache).map_err(|e| Error::io(cache, e))?;
    Corpus::map(cache).map_err(|e| match e {
        Error::File { message, .. } => Error::file(path, message),
        e => e,
    }).map_err(Into::into)
}

fn is_gzip(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "gz")
}

fn is_zip(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "zip")
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()
            .map_err(|e| Error::io(path, e))?;
        entries.sort();
        for e in entries {
            collect(&e, out)?;
        }
    } else if meta.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn append(path: &Path, out: &mut impl Write) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let copy = |r: &mut dyn Read, out: &mut dyn Write| io::copy(r, out).map_err(|e| Error::file(path, format!("cannot read: {e}")));
    if is_gzip(path) {
        copy(&mut flate2::read::MultiGzDecoder::new(io::BufReader::new(f)), out)?;
    } else if is_zip(path) {
        let mut archive = zip::ZipArchive::new(f).map_err(|e| Error::file(path, format!("not a readable zip archive: {e}")))?;
        let mut names: Vec<String> = archive.file_names().map(String::from).collect();
        names.sort();
        for name in names {
            let mut entry = archive.by_name(&name).map_err(|e| Error::file(path, format!("{name}: {e}")))?;
            if entry.is_file() {
                copy(&mut entry, out)?;
            }
        }
    } else {
        copy(&mut io::BufReader::new(f), out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_raw_gzip_zip_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.txt");
        fs::write(&raw, b"hello ").unwrap();
        let gz = dir.path().join("b.txt.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::default());
        enc.write_all(b"world").unwrap();
        enc.finish().unwrap();
        let cache = dir.path().join("cache/corpus.bin");
        assert_eq!(open_path(&raw, &cache).unwrap().bytes(), b"hello ");
        assert_eq!(open_path(&gz, &cache).unwrap().bytes(), b"world");
        let zp = dir.path().join("c.zip");
        let mut z = zip::ZipWriter::new(File::create(&zp).unwrap());
        z.start_file("x.txt", zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(b"zipped").unwrap();
        z.finish().unwrap();
        assert_eq!(open_path(&zp, &cache).unwrap().bytes(), b"zipped");
        let folder = dir.path().join("folder");
        fs::create_dir(&folder).unwrap();
        fs::copy(&raw, folder.join("1.txt")).unwrap();
        fs::copy(&gz, folder.join("2.txt.gz")).unwrap();
        assert_eq!(open_path(&folder, &cache).unwrap().bytes(), b"hello world");
        fs::write(dir.path().join("empty"), b"").unwrap();
        assert!(open_path(&dir.path().join("empty"), &cache).err().unwrap().to_string().contains("empty"));
        assert!(open_path(&dir.path().join("missing"), &cache).is_err());
    }
}
