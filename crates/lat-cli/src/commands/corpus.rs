//! The bundled corpus (the works of Shakespeare, see data/README.md), built into the binary so
//! that `lat train` works from anywhere.

use std::path::{Path, PathBuf};

use linear_attention_transformer::checkpoint::write_atomic;

use super::Result;

const SHAKESPEARE: &[u8] = include_bytes!("../../../../data/shakespeare.txt.gz");

/// The corpus to read: `data` if given, else the bundled one, unpacked into `dir`.
pub fn resolve(data: Option<&Path>, dir: &Path) -> Result<PathBuf> {
    if let Some(d) = data {
        return Ok(d.to_path_buf());
    }
    let path = dir.join("shakespeare.txt.gz");
    if std::fs::metadata(&path).map(|m| m.len() as usize != SHAKESPEARE.len()).unwrap_or(true) {
        std::fs::create_dir_all(dir).map_err(|e| linear_attention_transformer::Error::Io { path: dir.to_path_buf(), source: e })?;
        write_atomic(&path, SHAKESPEARE)?;
    }
    Ok(path)
}
