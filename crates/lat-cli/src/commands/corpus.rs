//! Corpora as `lat` reads them: a file or a folder (recursively, in sorted order: its text
//! files, `.gz` and `.zip` archives and `.jsonl` files), or the bundled corpus (the works of
//! Shakespeare, see data/README.md), built into the binary so that `lat train` works from
//! anywhere. JSON Lines files give one document per record (its `--text-field`); every other
//! file, and every archive member, is one document. One raw text file is mapped as it is;
//! anything else is first unpacked and concatenated into a cache file, which is then mapped.
//! Token-level models read the text through a token cache built from it.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use linear_attention_transformer::checkpoint::write_atomic;
use linear_attention_transformer::text::Codec;
use linear_attention_transformer::train::data::{Corpus, Text};
use linear_attention_transformer::train::token_cache::{self, Opened};
use linear_attention_transformer::Error;

use super::Result;

const SHAKESPEARE: &[u8] = include_bytes!("../../../../data/shakespeare.txt.gz");

/// Where a corpus comes from, as the commands that read one take it.
#[derive(clap::Args, Clone, Debug)]
pub struct Source {
    /// Corpus: a file or folder (recursively), raw, .gz, .zip or JSON Lines (.jsonl). Default:
    /// the bundled Shakespeare.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The field of each JSON Lines record that holds its text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
}

/// The text of `source`, else the bundled corpus (unpacked into `dir`); `cache` is where
/// archives, JSON Lines and folders are unpacked (overwritten).
pub fn open(source: &Source, dir: &Path, cache: &Path) -> Result<(PathBuf, Text)> {
    let path = resolve(source.data.as_deref(), dir)?;
    let text = open_path(&path, cache, &source.text_field)?;
    Ok((path, text))
}

/// How messages name the corpus at `path`, opened from `source`.
pub fn name(source: &Source, path: &Path) -> String {
    match source.data {
        Some(_) => path.display().to_string(),
        None => "the bundled Shakespeare".into(),
    }
}

/// `text` as a model with `codec` reads it: the bytes themselves, or ids from the token cache
/// at `existing` if given and matching (left untouched otherwise), else from the one at `cache`
/// (built, with a progress bar unless `quiet`, when it is missing or stale).
pub fn tokens(text: Text, codec: &Codec, existing: Option<&Path>, cache: &Path, quiet: bool) -> Result<Corpus> {
    if codec.is_bytes() {
        return Ok(Corpus::of_bytes(text));
    }
    let key = token_cache::Key::of(&text, codec);
    if let Some(existing) = existing {
        if let Some(corpus) = token_cache::reuse(&text, codec, &key, existing)? {
            return Ok(corpus);
        }
    }
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::with_draw_target(Some(text.bytes().len() as u64), ProgressDrawTarget::stderr_with_hz(4)) };
    bar.set_style(ProgressStyle::with_template("tokenizing {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)").expect("a valid template"));
    let started = std::time::Instant::now();
    let (corpus, opened) = token_cache::open(&text, codec, &key, cache, &|done| bar.set_position(done))?;
    bar.finish_and_clear();
    let took = format!(" in {:.1} s", started.elapsed().as_secs_f64());
    let what = match opened {
        Opened::Reused => "reused".to_string(),
        Opened::Built => format!("built{took}"),
        Opened::Rebuilt(why) => format!("rebuilt{took}: {why}"),
    };
    if !quiet {
        eprintln!("# token cache {} ({what}): {} tokens, {:.2} bytes per token", cache.display(), corpus.len(), corpus.all().bytes_per_token());
    }
    Ok(corpus)
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

/// What a file holds, by its name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gzip,
    Zip,
    JsonLines,
    Plain,
}

fn kind(name: &str) -> Kind {
    let name = name.to_ascii_lowercase();
    if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") {
        Kind::JsonLines
    } else if name.ends_with(".gz") {
        Kind::Gzip
    } else if name.ends_with(".zip") {
        Kind::Zip
    } else {
        Kind::Plain
    }
}

/// Maps `path` directly when it is one raw file, else unpacks it into `cache` first.
fn open_path(path: &Path, cache: &Path, text_field: &str) -> Result<Text> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() && kind(&path.to_string_lossy()) == Kind::Plain {
        return Text::map(path);
    }
    if let Some(dir) = cache.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = cache.with_extension("partial");
    let mut out = Documents { out: BufWriter::new(File::create(&tmp).map_err(|e| Error::io(&tmp, e))?), len: 0, starts: vec![], text_field };
    let unpacked = (|| {
        let (mut files, mut skipped) = (vec![], 0);
        collect(path, true, &mut files, &mut skipped)?;
        if skipped > 0 {
            eprintln!("note: {}: left out {skipped} files that are hidden or not UTF-8 text", path.display());
        }
        for f in files {
            out.file(&f)?;
        }
        out.out.flush().map_err(|e| Error::io(&tmp, e))
    })();
    let starts = std::mem::take(&mut out.starts);
    drop(out);
    if let Err(e) = unpacked {
        fs::remove_file(&tmp).ok();
        return Err(e);
    }
    fs::rename(&tmp, cache).map_err(|e| Error::io(cache, e))?;
    let mut text = Text::map(cache).map_err(|e| {
        fs::remove_file(cache).ok();
        match e {
            Error::File { message, .. } => Error::file(path, message),
            e => e,
        }
    })?;
    text.source = path.to_path_buf();
    text.documents = starts;
    Ok(text)
}

/// The files of `path`: itself if a file, else (recursively, sorted) the files of the folder
/// that hold text, leaving out (and counting in `skipped`) hidden ones. `named` is true for the
/// path given by the user, which is read whatever it looks like.
fn collect(path: &Path, named: bool, out: &mut Vec<PathBuf>, skipped: &mut usize) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
    if meta.is_dir() && (named || !hidden) {
        let mut entries: Vec<PathBuf> = fs::read_dir(path).map_err(|e| Error::io(path, e))?.map(|e| e.map(|e| e.path())).collect::<io::Result<_>>().map_err(|e| Error::io(path, e))?;
        entries.sort();
        for e in entries {
            collect(&e, false, out, skipped)?;
        }
    } else if meta.is_file() && (named || (!hidden && (kind(&path.to_string_lossy()) != Kind::Plain || looks_like_text(path)?))) {
        out.push(path.to_path_buf());
    } else {
        *skipped += 1;
    }
    Ok(())
}

/// Whether the file's first 8 KiB are UTF-8 without NUL bytes (a character cut at the end is
/// fine): text, as opposed to images, binaries, model files.
fn looks_like_text(path: &Path) -> Result<bool> {
    let mut head = Vec::with_capacity(8192);
    File::open(path).and_then(|f| f.take(8192).read_to_end(&mut head)).map_err(|e| Error::io(path, e))?;
    Ok(is_text(&head))
}

fn is_text(head: &[u8]) -> bool {
    !head.contains(&0)
        && match std::str::from_utf8(head) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none() && head.len() - e.valid_up_to() < 4,
        }
}

/// The unpacked text being written, and where each document begins.
struct Documents<'a, W: Write> {
    out: W,
    len: usize,
    starts: Vec<usize>,
    text_field: &'a str,
}

impl<W: Write> Documents<'_, W> {
    fn file(&mut self, path: &Path) -> Result<()> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let name = path.to_string_lossy();
        match kind(&name) {
            Kind::Zip => {
                let mut archive = zip::ZipArchive::new(f).map_err(|e| Error::file(path, format!("not a readable zip archive: {e}")))?;
                let mut names: Vec<String> = archive.file_names().map(String::from).collect();
                names.sort();
                for entry_name in names {
                    let entry = archive.by_name(&entry_name).map_err(|e| Error::file(path, format!("{entry_name}: {e}")))?;
                    if entry.is_file() {
                        let at = format!("{}:{entry_name}", path.display());
                        self.stream(&at, kind(&entry_name), BufReader::new(entry), true)?;
                    }
                }
                Ok(())
            }
            Kind::Gzip => self.stream(&name, Kind::Plain, BufReader::new(flate2::read::MultiGzDecoder::new(BufReader::new(f))), false),
            Kind::JsonLines if name.to_ascii_lowercase().ends_with(".gz") => self.stream(&name, Kind::JsonLines, BufReader::new(flate2::read::MultiGzDecoder::new(BufReader::new(f))), false),
            k => self.stream(&name, k, BufReader::new(f), false),
        }
    }

    /// Appends one stream: a document, or a document per JSON Lines record. An archive member
    /// (`sniff`) is left out unless it looks like text.
    fn stream(&mut self, name: &str, kind: Kind, mut r: impl BufRead, sniff: bool) -> Result<()> {
        let bad = |m: String| Error::file(Path::new(name), m);
        match kind {
            Kind::JsonLines => {
                let mut line = String::new();
                let mut number = 0;
                loop {
                    line.clear();
                    number += 1;
                    if r.read_line(&mut line).map_err(|e| bad(format!("line {number}: cannot read: {e}")))? == 0 {
                        return Ok(());
                    }
                    if line.trim().is_empty() {
                        continue;
                    }
                    let record: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(format!("line {number}: not JSON: {e}")))?;
                    let text = record
                        .get(self.text_field)
                        .and_then(|v| v.as_str())
                        .ok_or_else(|| bad(format!("line {number}: no string field \"{}\" (choose the field with --text-field)", self.text_field)))?;
                    self.document(text.as_bytes(), name)?;
                    self.write(b"\n", name)?;
                }
            }
            Kind::Gzip | Kind::Zip => Err(bad("archives inside archives are not read; unpack it first".into())),
            Kind::Plain => {
                if sniff && !is_text(r.fill_buf().map_err(|e| bad(format!("cannot read: {e}")))?) {
                    return Ok(());
                }
                let start = self.len;
                loop {
                    let chunk = r.fill_buf().map_err(|e| bad(format!("cannot read: {e}")))?;
                    if chunk.is_empty() {
                        break;
                    }
                    let n = chunk.len();
                    self.write(chunk, name)?;
                    r.consume(n);
                }
                if self.len > start {
                    self.starts.push(start);
                }
                Ok(())
            }
        }
    }

    fn document(&mut self, bytes: &[u8], name: &str) -> Result<()> {
        self.starts.push(self.len);
        self.write(bytes, name)
    }

    fn write(&mut self, bytes: &[u8], name: &str) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| Error::file(Path::new(name), format!("cannot write the unpacked corpus: {e}")))?;
        self.len += bytes.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(path: &Path, bytes: &[u8]) {
        let mut enc = flate2::write::GzEncoder::new(File::create(path).unwrap(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap();
    }

    #[test]
    fn opens_raw_gzip_zip_json_lines_and_folders_with_their_documents() {
        let dir = tempfile::tempdir().unwrap();
        let open = |p: &Path| open_path(p, &dir.path().join("cache/corpus.bin"), "text");
        let raw = dir.path().join("a.txt");
        fs::write(&raw, b"hello ").unwrap();
        let gz = dir.path().join("b.txt.gz");
        gzip(&gz, b"world");
        assert_eq!(open(&raw).unwrap().bytes(), b"hello ");
        assert_eq!(open(&gz).unwrap().bytes(), b"world");
        let zp = dir.path().join("c.zip");
        let mut z = zip::ZipWriter::new(File::create(&zp).unwrap());
        for (name, body) in [("x.txt", &b"zipped"[..]), ("y.bin", b"\x00\x01binary"), ("z.jsonl", b"{\"text\": \"json\"}\n")] {
            z.start_file(name, zip::write::SimpleFileOptions::default()).unwrap();
            z.write_all(body).unwrap();
        }
        z.finish().unwrap();
        let t = open(&zp).unwrap();
        assert_eq!((t.bytes(), t.documents.clone()), (&b"zippedjson\n"[..], vec![0, 6]));
        let jl = dir.path().join("d.jsonl");
        fs::write(&jl, "{\"text\": \"one\", \"id\": 1}\n\n{\"text\": \"two é\"}\n").unwrap();
        let t = open(&jl).unwrap();
        assert_eq!((t.bytes(), t.documents.clone()), ("one\ntwo é\n".as_bytes(), vec![0, 4]));
        let folder = dir.path().join("folder");
        fs::create_dir_all(folder.join("sub")).unwrap();
        fs::copy(&raw, folder.join("1.txt")).unwrap();
        fs::copy(&gz, folder.join("sub/2.txt.gz")).unwrap();
        fs::write(folder.join("3.md"), b"# notes").unwrap();
        fs::write(folder.join("4.png"), b"\x89PNG\x00\x00").unwrap();
        fs::write(folder.join(".hidden"), b"secret").unwrap();
        let t = open(&folder).unwrap();
        assert_eq!((t.bytes(), t.documents.clone()), (&b"hello # notesworld"[..], vec![0, 6, 13]));
        assert_eq!(t.source, folder);
    }

    #[test]
    fn bad_corpora_are_one_line_errors_and_leave_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache/corpus.bin");
        let open = |p: &Path, field: &str| open_path(p, &cache, field).err().unwrap().to_string();
        fs::write(dir.path().join("empty"), b"").unwrap();
        assert!(open(&dir.path().join("empty"), "text").contains("empty"));
        assert!(open(&dir.path().join("missing"), "text").contains("missing"));
        let jl = dir.path().join("d.jsonl");
        fs::write(&jl, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n").unwrap();
        let e = open(&jl, "text");
        assert!(e.contains("d.jsonl") && e.contains("line 2") && e.contains("\"text\"") && e.contains("--text-field") && !e.contains('\n'), "{e}");
        fs::write(&jl, "{\"text\": \"one\"}\nnot json\n").unwrap();
        assert!(open(&jl, "text").contains("line 2: not JSON"));
        assert_eq!(fs::read_dir(dir.path().join("cache")).unwrap().count(), 0, "no partial file");
        fs::create_dir(dir.path().join("nothing")).unwrap();
        assert!(open(&dir.path().join("nothing"), "text").contains("empty"));
        assert_eq!(fs::read_dir(dir.path().join("cache")).unwrap().count(), 0, "no empty cache");
    }
}
