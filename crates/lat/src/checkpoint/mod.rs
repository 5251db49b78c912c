//! Model files and the import of the reference's PyTorch checkpoints.
//!
//! A model file is one `.safetensors` file whose tensor names are the reference's `state_dict`
//! keys for the model's configuration, and whose header metadata holds `"lat.config"`: the JSON
//! object of the Python keyword arguments. Files are written atomically (a temporary file,
//! synced, then renamed): a crash leaves the previous file intact.
//!
//! A model directory holds [`MODEL_FILE`], [`CONFIG_FILE`] (the keyword arguments, for a
//! weights file without `"lat.config"`) and, for a token-level model, [`TOKENIZER_FILE`];
//! training runs write one, and every function that reads a model takes the directory too.
//!
//! Importing reads the state dicts users keep: `torch.save` archives (PyTorch 1.6 and later) and
//! the format before them, `safetensors.torch.save_file` files, and training checkpoints that
//! hold the state dict beside the optimizer's (under `--key` or one of the usual keys); see
//! [`read_state_dict`]. It accepts the spellings the reference's versions and wrappers
//! produce: reversible (`layers.blocks.j.f.net.…`) and sequential (`layers.layers.j.0.…`) pair
//! names, the axial embedding's (`pos_emb.weights.0`, `weights_0` with the 2021 dependencies,
//! `axial_pos_emb.…` before 0.17), and the prefixes of the usual wrappers ([`WRAPPER_PREFIXES`]).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub mod torch;

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::decode::Packed;
use crate::model::LinearAttentionTransformerLM;
use crate::quantize::{Quantization, QUANTIZATION_KEY};

/// Metadata key of the configuration in model files.
pub const CONFIG_KEY: &str = "lat.config";

/// The weights in a model directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// The keyword arguments in a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The model file `path` names: itself, or a model directory's [`MODEL_FILE`].
pub fn model_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(MODEL_FILE)
    } else {
        path.to_path_buf()
    }
}

/// The [`TOKENIZER_FILE`] of the model directory that `path` (a directory, or its
/// [`MODEL_FILE`]) is, if it has one.
pub fn directory_tokenizer(path: &Path) -> Option<PathBuf> {
    let file = model_file(path);
    file.file_name().is_some_and(|n| n == MODEL_FILE).then(|| file.with_file_name(TOKENIZER_FILE)).filter(|t| t.is_file())
}

/// The codec of the model at `path`: the tokenizer `explicit`, else the model directory's (a
/// directory, or a [`MODEL_FILE`] with a [`TOKENIZER_FILE`] beside it), else bytes for a model
/// of at most 256 ids; `None` for a larger model without a tokenizer (it takes token ids only).
/// A tokenizer with more ids than the model is refused.
pub fn codec(path: &Path, explicit: Option<&Path>, config: &Config) -> Result<Option<crate::text::Codec>> {
    let file = model_file(path);
    let codec = match explicit.map(Path::to_path_buf).or_else(|| directory_tokenizer(path)) {
        Some(t) => crate::text::Codec::load(&t)?,
        // Fewer ids than bytes (an imported model) is for token ids; the model checks them.
        None if config.num_tokens <= 256 => return Ok(Some(crate::text::Codec::Bytes)),
        None => return Ok(None),
    };
    crate::train::check_vocabulary(config, &codec).map_err(|e| Error::file(&file, e.to_string()))?;
    Ok(Some(codec))
}

/// The configuration in `metadata`, else in the [`CONFIG_FILE`] beside `path`.
fn config_of(path: &Path, metadata: &mut HashMap<String, String>) -> Result<Config> {
    let beside = path.with_file_name(CONFIG_FILE);
    let (json, from) = match metadata.remove(CONFIG_KEY) {
        Some(json) => (json, path.to_path_buf()),
        None if beside.is_file() => (fs::read_to_string(&beside).map_err(|e| Error::io(&beside, e))?, beside),
        None => return Err(Error::file(path, format!("no \"{CONFIG_KEY}\" in the header and no {CONFIG_FILE} beside it: not a model file"))),
    };
    Config::from_json_str(&json).map_err(|e| Error::file(&from, format!("its configuration is invalid: {e}")))
}

/// Metadata key of the CRC-32 of a file's tensor data, checked when it is read.
pub const CHECKSUM_KEY: &str = "lat.crc32";

fn crc32(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

/// Checks the CRC-32 of the tensor data of safetensors `bytes`, when the header carries one.
fn verify(path: &Path, bytes: &[u8], header_len: usize, metadata: &HashMap<String, String>) -> Result<()> {
    if let Some(want) = metadata.get(CHECKSUM_KEY) {
        let got = crc32(&bytes[8 + header_len..]);
        if &got != want {
            return Err(Error::file(path, format!("the tensor data is corrupt (CRC-32 {got}, the header says {want})")));
        }
    }
    Ok(())
}

/// Prefixes that wrappers put before every name of the model's state dict: `AutoregressiveWrapper`
/// (`net.net.`), `nn.DataParallel` and DDP (`module.`), `torch.compile` (`_orig_mod.`), and a
/// training module holding the model as `model` (`model.`). Each is stripped when every name
/// carries it, repeatedly (a compiled model inside DataParallel has both).
pub const WRAPPER_PREFIXES: [&str; 4] = ["net.net.", "module.", "_orig_mod.", "model."];

/// Strips the wrappers' prefixes shared by every name.
pub fn strip_wrappers(mut tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    while let Some(prefix) = WRAPPER_PREFIXES.iter().find(|p| !tensors.is_empty() && tensors.keys().all(|k| k.starts_with(*p))) {
        tensors = tensors.into_iter().map(|(k, v)| (k[prefix.len()..].to_string(), v)).collect();
    }
    tensors
}

/// Renames `tensors` from any accepted spelling to the one `config` uses.
pub fn canonical_names(config: &Config, tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    strip_wrappers(tensors).into_iter().map(|(k, v)| (respell(&k, config.reversible), v)).collect()
}

/// One key in the spelling of a reversible (`blocks.j.f.net`) or sequential (`layers.j.0`) stack.
fn respell(key: &str, reversible: bool) -> String {
    // Releases before 0.17 named the axial embedding `axial_pos_emb`; the 2021 dependencies
    // spelled its weights `weights_0`.
    let key = match key.strip_prefix("axial_pos_emb.") {
        Some(rest) => format!("pos_emb.{rest}"),
        None => key.to_string(),
    };
    let key = key.replace("pos_emb.weights_0", "pos_emb.weights.0").replace("pos_emb.weights_1", "pos_emb.weights.1");
    let t: Vec<&str> = key.split('.').collect();
    let Some(i) = (0..t.len().saturating_sub(3)).find(|&i| t[i] == "layers" && t[i + 2].parse::<usize>().is_ok()) else {
        return key;
    };
    let head = &t[..i + 1];
    let j = t[i + 2];
    let (half, rest) = match (t[i + 1], t[i + 3]) {
        ("layers", "0") => ("f", &t[i + 4..]),
        ("layers", "1") => ("g", &t[i + 4..]),
        ("blocks", h @ ("f" | "g")) if t.get(i + 4) == Some(&"net") => (h, &t[i + 5..]),
        _ => return key,
    };
    let middle = match (reversible, half) {
        (true, h) => vec!["blocks", j, h, "net"],
        (false, "f") => vec!["layers", j, "0"],
        (false, _) => vec!["layers", j, "1"],
    };
    head.iter().chain(middle.iter()).chain(rest.iter()).copied().collect::<Vec<_>>().join(".")
}

/// The state dict in a checkpoint file, read safely (see [`torch`]): a `torch.save` file (the
/// zip archive, or the format before PyTorch 1.6) or a safetensors file; the dictionary itself,
/// or inside a training checkpoint the entry `key` or the first of [`torch::USUAL_KEYS`] that
/// holds one. Wrapper prefixes are stripped.
pub fn read_state_dict(path: impl AsRef<Path>, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let f = open_file(path)?;
    // SAFETY: read-only; a file truncated by another process while mapped would fault, as for
    // any reader of a file being rewritten.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    let in_file = |e: Error| match e {
        Error::Input(m) => Error::file(path, m),
        e => e,
    };
    let tensors = if torch::looks_like_torch(&map) {
        torch::state_dict(&map, key).map_err(in_file)?
    } else if looks_like_safetensors(&map) {
        if let Some(k) = key {
            return Err(Error::file(path, format!("--key {k}: a safetensors file holds one flat state dict; leave --key out")));
        }
        candle_core::safetensors::load_buffer(&map, &Device::Cpu).map_err(|e| Error::file(path, format!("an unreadable safetensors file: {e}")))?
    } else {
        let head: String = map.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(Error::file(
            path,
            format!("neither a PyTorch checkpoint (torch.save) nor a safetensors file (it starts with bytes {head}); save the state dict with torch.save or safetensors.torch.save_file"),
        ));
    };
    if tensors.is_empty() {
        return Err(Error::file(path, "the state dict holds no tensors"));
    }
    Ok(strip_wrappers(tensors))
}

/// Opens a file to map, refusing a folder with a message that says so.
fn open_file(path: &Path) -> Result<fs::File> {
    if path.is_dir() {
        return Err(Error::file(path, "is a directory, not a file"));
    }
    fs::File::open(path).map_err(|e| Error::io(path, e))
}

/// Whether `bytes` start like a safetensors file: a little-endian header length, then JSON.
fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() > 9 && u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes")).checked_add(8).is_some_and(|end| end <= bytes.len() as u64) && bytes[8] == b'{'
}

/// Builds a model from a reference state dict (any form [`read_state_dict`] reads) and its
/// keyword arguments: `lat import`.
pub fn import(state_dict: impl AsRef<Path>, key: Option<&str>, config: &Config, device: &Device, trainable: bool) -> Result<LinearAttentionTransformerLM> {
    let path = state_dict.as_ref();
    let tensors = canonical_names(config, read_state_dict(path, key)?);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let found = format!("the file's {} tensors are named {}{}", names.len(), names.iter().take(3).map(|n| n.as_str()).collect::<Vec<_>>().join(", "), if names.len() > 3 { ", …" } else { "" });
    LinearAttentionTransformerLM::from_tensors(config, tensors, device, DType::F32, trainable).map_err(|e| match e {
        Error::Input(m) => Error::file(path, format!("{m}; {found}: is the configuration the one the model was built with?")),
        e => e,
    })
}

/// The tensors and configuration of a model file.
pub struct ModelFile {
    /// The configuration (the Python keyword arguments).
    pub config: Config,
    /// Every tensor, by name.
    pub tensors: HashMap<String, Tensor>,
    /// How the linear weights are stored, for a quantized file.
    pub quantization: Option<Quantization>,
    /// Every other metadata entry (training state, checksums).
    pub metadata: HashMap<String, String>,
}

/// The configuration and metadata of a model file, from its header alone (its tensors are not
/// read): what the memory plan needs before the model is loaded.
pub fn peek(path: impl AsRef<Path>) -> Result<(Config, HashMap<String, String>)> {
    let path = &model_file(path.as_ref());
    let f = open_file(path)?;
    // SAFETY: read-only; only the header is looked at.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut metadata = header.metadata().clone().unwrap_or_default();
    let config = config_of(path, &mut metadata)?;
    Ok((config, metadata))
}

/// Reads a model file (or any safetensors file carrying `lat.config`).
pub fn read(path: impl AsRef<Path>) -> Result<ModelFile> {
    let path = &model_file(path.as_ref());
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(path, &bytes)
}

/// Parses the bytes of a model file; `path` names it in errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<ModelFile> {
    let bad = |m: String| Error::file(path, m);
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut metadata = header.metadata().clone().unwrap_or_default();
    let config = config_of(path, &mut metadata)?;
    let quantization = metadata.remove(QUANTIZATION_KEY).map(|q| q.parse::<Quantization>()).transpose().map_err(|e| bad(e.to_string()))?;
    let tensors = tensors_of(path, bytes)?;
    metadata.remove(CHECKSUM_KEY);
    Ok(ModelFile { config, tensors, quantization, metadata })
}

/// Reads every tensor of a safetensors file onto the CPU; booleans and int8 become u8 (the
/// same bits).
pub fn read_tensors(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    tensors_of(path, &bytes)
}

/// The tensors of safetensors `bytes`, checked against the header's CRC-32 when it has one.
fn tensors_of(path: &Path, bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    let bad = |e: safetensors::SafeTensorError| Error::file(path, format!("not a valid safetensors file: {e}"));
    let (header_len, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(bad)?;
    verify(path, bytes, header_len, &header.metadata().clone().unwrap_or_default())?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(bad)?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = match view.dtype() {
            safetensors::Dtype::BOOL | safetensors::Dtype::I8 => Tensor::from_vec(view.data().to_vec(), view.shape(), &Device::Cpu)?,
            _ => view.load(&Device::Cpu).map_err(|e| Error::file(path, format!("tensor {name}: {e}")))?,
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Loads a model file onto `device`. A quantized file loads on the CPU, for inference only.
pub fn load(path: impl AsRef<Path>, device: &Device, trainable: bool) -> Result<LinearAttentionTransformerLM> {
    let path = &model_file(path.as_ref());
    let file = read(path)?;
    let tensors = canonical_names(&file.config, file.tensors);
    let in_file = |e: Error| match e {
        Error::Input(m) => Error::file(path, m),
        e => e,
    };
    match file.quantization {
        None => LinearAttentionTransformerLM::from_tensors(&file.config, tensors, device, DType::F32, trainable).map_err(in_file),
        Some(q) if trainable => Err(Error::file(path, format!("is quantized to {q}: a quantized model cannot be trained; train the f32 model it was quantized from"))),
        Some(q) if !device.is_cpu() => Err(Error::file(path, format!("is quantized to {q}: quantized models run on the CPU; use the f32 model on {device:?}"))),
        Some(q) => LinearAttentionTransformerLM::from_quantized(&file.config, tensors, q).map_err(in_file),
    }
}

/// What [`quantize`] wrote.
#[derive(Clone, Copy, Debug)]
pub struct Quantized {
    /// Linear weights packed.
    pub matrices: usize,
    /// Bytes of the source file.
    pub bytes_before: u64,
    /// Bytes of the quantized file.
    pub bytes_after: u64,
}

/// Writes the model file `from` with its linear weights quantized to `to` as the model file
/// `out` (see [`crate::quantize`]), atomically. A file that is already quantized is refused.
pub fn quantize(from: &Path, to: Quantization, out: &Path) -> Result<Quantized> {
    let file = read(from)?;
    if let Some(q) = file.quantization {
        return Err(Error::file(from, format!("is already quantized ({q}); quantize the f32 model it came from")));
    }
    let model = load(from, &Device::Cpu, false)?;
    let mut entries = Vec::with_capacity(model.params().len());
    let mut matrices = 0;
    for p in model.params() {
        if !p.linear {
            entries.push((p.name.clone(), Entry::tensor(&p.tensor)?));
            continue;
        }
        matrices += 1;
        let rows = p.tensor.dim(0)?;
        let shape = p.tensor.dims().to_vec();
        let values = p.tensor.flatten_all()?.to_vec1::<f32>()?;
        match to.pack(&values, rows) {
            Packed::Bf16(bits) => entries.push((p.name.clone(), Entry::Raw { dtype: safetensors::Dtype::BF16, shape, data: bits.iter().flat_map(|b| b.to_le_bytes()).collect() })),
            Packed::Int8 { q, scale } => {
                entries.push((p.name.clone(), Entry::Raw { dtype: safetensors::Dtype::I8, shape, data: q.iter().map(|&v| v as u8).collect() }));
                entries.push((format!("{}.scale", p.name), Entry::tensor(&Tensor::from_vec(scale, rows, &Device::Cpu)?)?));
            }
        }
    }
    let mut meta = file.metadata.clone();
    meta.insert(CONFIG_KEY.to_string(), model.config().to_json());
    meta.insert(QUANTIZATION_KEY.to_string(), to.to_string());
    write_entries(out, entries, &meta)?;
    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).map_err(|e| Error::io(p, e));
    Ok(Quantized { matrices, bytes_before: size(from)?, bytes_after: size(out)? })
}

/// Writes `model` as a model file, with extra `metadata` entries, atomically.
///
/// ```
/// use std::collections::HashMap;
/// use candle_core::{DType, Device};
/// use linear_attention_transformer::{checkpoint, Config, LinearAttentionTransformerLM};
///
/// let model = LinearAttentionTransformerLM::new(&Config::new(16, 8, 1, 16), 0, &Device::Cpu, DType::F32)?;
/// let path = std::env::temp_dir().join(format!("lat-doc-{}.safetensors", std::process::id()));
/// checkpoint::save(&model, &path, &HashMap::new())?;
/// let loaded = checkpoint::load(&path, &Device::Cpu, false)?;
/// assert_eq!(loaded.config(), model.config());
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), linear_attention_transformer::Error>(())
/// ```
pub fn save(model: &LinearAttentionTransformerLM, path: impl AsRef<Path>, metadata: &HashMap<String, String>) -> Result<()> {
    model.refuse_quantized("be saved again (its f32 weights are gone)")?;
    let tensors: Vec<(String, Tensor)> = model.params().iter().map(|p| (p.name.clone(), p.tensor.clone())).collect();
    let mut meta = metadata.clone();
    meta.insert(CONFIG_KEY.to_string(), model.config().to_json());
    write_safetensors(path.as_ref(), &tensors, &meta)
}

/// Writes `model`'s state dict, named and shaped exactly as the reference's `state_dict()` for
/// the model's configuration (buffers included, in its order), to `path`: a safetensors file, or
/// with the extension `.pt` a `torch.save` archive. The reference loads either with
/// `load_state_dict(strict=True)` (safetensors through `safetensors.torch.load_file`). Returns
/// the keyword arguments to build it with, as JSON.
pub fn export(model: &LinearAttentionTransformerLM, path: &Path) -> Result<String> {
    model.refuse_quantized("be exported to the reference (it loads f32 weights)")?;
    let tensors: Vec<(String, Tensor)> = model.params().iter().map(|p| (p.name.clone(), p.tensor.detach())).collect();
    let bytes = match path.extension().and_then(|e| e.to_str()) {
        Some("pt" | "pth" | "bin") => torch::write_state_dict(&tensors)?,
        Some("safetensors") => {
            let cpu = tensors.iter().map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?))).collect::<Result<Vec<_>>>()?;
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            safetensors::tensor::serialize(cpu.iter().map(|(n, t)| (n.clone(), t)), Some(meta)).map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?
        }
        _ => return Err(Error::file(path, "the export's extension says its format: .safetensors, or .pt for a torch.save archive")),
    };
    write_atomic(path, &bytes)?;
    Ok(model.config().to_json())
}

/// Serialises named tensors (as f32, or their own integer types) with metadata and the CRC-32
/// of the tensor data, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: &HashMap<String, String>) -> Result<()> {
    let entries = tensors.iter().map(|(n, t)| Ok((n.clone(), Entry::tensor(t)?))).collect::<Result<Vec<_>>>()?;
    write_entries(path, entries, metadata)
}

/// One tensor to serialise: a CPU tensor, or bytes of a dtype candle has no type for (int8).
enum Entry {
    Tensor(Tensor),
    Raw { dtype: safetensors::Dtype, shape: Vec<usize>, data: Vec<u8> },
}

impl Entry {
    /// `t` on the CPU, floats as f32.
    fn tensor(t: &Tensor) -> Result<Self> {
        let t = if t.dtype().is_float() { t.to_dtype(DType::F32)? } else { t.clone() };
        Ok(Entry::Tensor(t.to_device(&Device::Cpu)?))
    }
}

impl safetensors::View for &Entry {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Entry::Tensor(t) => safetensors::View::dtype(&t),
            Entry::Raw { dtype, .. } => *dtype,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Entry::Tensor(t) => t.dims(),
            Entry::Raw { shape, .. } => shape,
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Entry::Tensor(t) => safetensors::View::data(t),
            Entry::Raw { data, .. } => data.into(),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Entry::Tensor(t) => safetensors::View::data_len(t),
            Entry::Raw { data, .. } => data.len(),
        }
    }
}

/// Serialises `entries` with `metadata` and the CRC-32 of the tensor data, atomically.
fn write_entries(path: &Path, entries: Vec<(String, Entry)>, metadata: &HashMap<String, String>) -> Result<()> {
    let serialise = |meta: &HashMap<String, String>| {
        safetensors::tensor::serialize(entries.iter().map(|(n, e)| (n.clone(), e)), Some(meta.clone())).map_err(|e| Error::file(path, format!("cannot serialise: {e}")))
    };
    // The data region does not depend on the header: checksum it, then write it with the sum.
    let first = serialise(metadata)?;
    let header_len = u64::from_le_bytes(first[..8].try_into().expect("eight bytes")) as usize;
    let mut meta = metadata.clone();
    meta.insert(CHECKSUM_KEY.to_string(), crc32(&first[8 + header_len..]));
    drop(first);
    write_atomic(path, &serialise(&meta)?)
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| Error::file(path, "not a file path"))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename itself must reach the disk.
        if let Ok(d) = fs::File::open(&dir) {
            d.sync_all().ok();
        }
        Ok(())
    })();
    result.map_err(|e| {
        fs::remove_file(&tmp).ok();
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respells_pairs_both_ways() {
        assert_eq!(respell("transformer.layers.layers.3.0.fn.to_q.weight", true), "transformer.layers.blocks.3.f.net.fn.to_q.weight");
        assert_eq!(respell("transformer.fn.layers.blocks.0.g.net.norm.bias", false), "transformer.fn.layers.layers.0.1.norm.bias");
        assert_eq!(respell("layers.blocks.1.f.net.fn.to_out.bias", true), "layers.blocks.1.f.net.fn.to_out.bias");
        assert_eq!(respell("pos_emb.weights_1", false), "pos_emb.weights.1");
        assert_eq!(respell("axial_pos_emb.weights.0", false), "pos_emb.weights.0");
        assert_eq!(respell("token_emb.weight", true), "token_emb.weight");
    }
}
