//! Model configuration: the keyword arguments of the Python reference, with the same names and
//! defaults, readable from JSON and TOML.
//!
//! [`Config`] describes a [`crate::LinearAttentionTransformerLM`]; [`TransformerConfig`] the bare
//! [`crate::LinearAttentionTransformer`] stack, whose only difference in defaults is `dim_head`
//! (`None`, i.e. `dim / heads`, instead of 64).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How many of each layer's heads are local (windowed softmax) heads: one number for every
/// layer, or one per layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LocalHeads {
    /// The same number in every layer.
    Uniform(usize),
    /// One number per layer.
    PerLayer(Vec<usize>),
}

impl Default for LocalHeads {
    fn default() -> Self {
        LocalHeads::Uniform(0)
    }
}

impl LocalHeads {
    /// Local heads of layer `layer` (0-based).
    pub fn at(&self, layer: usize) -> usize {
        match self {
            LocalHeads::Uniform(n) => *n,
            LocalHeads::PerLayer(v) => v.get(layer).copied().unwrap_or(0),
        }
    }

    fn any(&self) -> bool {
        match self {
            LocalHeads::Uniform(n) => *n > 0,
            LocalHeads::PerLayer(v) => v.iter().any(|&n| n > 0),
        }
    }
}

/// `LinformerSettings(k)`: Linformer self-attention that projects keys and values to `k`
/// positions. Written `{"k": 64}` or, as Python's JSON writes the namedtuple, `[64]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LinformerSettingsRepr")]
pub struct LinformerSettings {
    /// Positions keys and values are projected to.
    pub k: usize,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LinformerSettingsRepr {
    Named { k: usize },
    Tuple((usize,)),
}

impl From<LinformerSettingsRepr> for LinformerSettings {
    fn from(r: LinformerSettingsRepr) -> Self {
        match r {
            LinformerSettingsRepr::Named { k } | LinformerSettingsRepr::Tuple((k,)) => Self { k },
        }
    }
}

/// `LinformerContextSettings(seq_len, k)`: Linformer cross-attention over contexts of at most
/// `seq_len` positions. Written `{"seq_len": 512, "k": 64}` or `[512, 64]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LinformerContextSettingsRepr")]
pub struct LinformerContextSettings {
    /// Longest context.
    pub seq_len: usize,
    /// Positions keys and values are projected to.
    pub k: usize,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LinformerContextSettingsRepr {
    Named { seq_len: usize, k: usize },
    Tuple((usize, usize)),
}

impl From<LinformerContextSettingsRepr> for LinformerContextSettings {
    fn from(r: LinformerContextSettingsRepr) -> Self {
        match r {
            LinformerContextSettingsRepr::Named { seq_len, k } | LinformerContextSettingsRepr::Tuple((seq_len, k)) => Self { seq_len, k },
        }
    }
}

fn default_heads() -> usize {
    8
}
fn default_lm_dim_head() -> Option<usize> {
    Some(64)
}
fn one() -> usize {
    1
}
fn default_window() -> usize {
    128
}
fn default_pkm_num_keys() -> usize {
    128
}
fn yes() -> bool {
    true
}
fn default_bucket_size() -> usize {
    64
}

/// The keyword arguments that `LinearAttentionTransformerLM` passes on to its
/// `LinearAttentionTransformer`: every argument of the stack except `dim_head`, whose default
/// differs between the two, and the unused `bucket_size`. [`Config`] and [`TransformerConfig`]
/// both hold one and dereference to it, so `config.heads` reads like the Python keyword.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StackArgs {
    /// Width of the residual stream inside the transformer.
    pub dim: usize,
    /// Number of main layers.
    pub depth: usize,
    /// Sizes the positional embeddings (and Linformer projections).
    pub max_seq_len: usize,
    #[serde(default = "default_heads")]
    /// Attention heads per layer.
    pub heads: usize,
    #[serde(default)]
    /// Autoregressive: a position sees only itself and earlier positions.
    pub causal: bool,
    #[serde(default)]
    /// RevNet coupling: the backward pass reconstructs activations instead of storing them.
    pub reversible: bool,
    #[serde(default = "one")]
    /// Feed-forward layers run in this many pieces along the sequence (memory only).
    pub ff_chunks: usize,
    #[serde(default)]
    /// Gated feed-forward layers (`gelu(a) * v`); here in every layer, unlike the reference.
    pub ff_glu: bool,
    #[serde(default)]
    /// Dropout on the feed-forward hidden activations.
    pub ff_dropout: f64,
    #[serde(default)]
    /// Dropout on each attention layer's output.
    pub attn_layer_dropout: f64,
    #[serde(default)]
    /// Dropout on the local heads' attention probabilities (and Linformer's).
    pub attn_dropout: f64,
    #[serde(default = "one")]
    /// Causal global heads see only complete buckets of this many earlier positions (1 = every earlier position and itself).
    pub blindspot_size: usize,
    #[serde(default)]
    /// How many heads of each layer are local (windowed softmax) heads.
    pub n_local_attn_heads: LocalHeads,
    #[serde(default = "default_window", alias = "local_attn_window")]
    /// Window of the local heads; also the axial positions' factor and the axial fold.
    pub local_attn_window_size: usize,
    #[serde(default)]
    /// Add a cross-attention layer after each layer, attending to the `context` input.
    pub receives_context: bool,
    #[serde(default)]
    /// 1-based layers whose feed-forward layer is a product-key memory.
    pub pkm_layers: Vec<usize>,
    /// Accepted for compatibility; the reference ignores it (product-key memories always have
    /// 128 keys per half).
    #[serde(default = "default_pkm_num_keys")]
    pub pkm_num_keys: usize,
    #[serde(default)]
    /// Add an axial (strided) attention layer after each layer.
    pub attend_axially: bool,
    #[serde(default)]
    /// Replace self-attention by Linformer attention (non-causal only).
    pub linformer_settings: Option<LinformerSettings>,
    #[serde(default)]
    /// Replace cross-attention by Linformer attention.
    pub context_linformer_settings: Option<LinformerContextSettings>,
    #[serde(default)]
    /// Shift segments of the features by one position before attention and feed-forward.
    pub shift_tokens: bool,
    /// One key/value head shared by the local heads and one by the global heads (the
    /// reference's releases before 0.17). Written only when set, so that the JSON stays valid
    /// keyword arguments for 0.19.1.
    #[serde(default, skip_serializing_if = "is_false")]
    pub one_kv_head: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The arguments of `LinearAttentionTransformerLM`. Field names and defaults are the reference's;
/// the arguments it shares with the stack are in [`StackArgs`], which this dereferences to.
///
/// ```
/// use linear_attention_transformer::Config;
///
/// // The JSON object of the Python keyword arguments; omitted ones take the reference's defaults.
/// let config = Config::from_json_str(r#"{"num_tokens": 256, "dim": 512, "depth": 6, "max_seq_len": 4096,
///     "causal": true, "n_local_attn_heads": [4, 4, 4, 4, 4, 4], "blindspot_size": 64}"#)?;
/// assert_eq!((config.heads, config.dim_head), (8, Some(64)));
/// // Invalid combinations are refused with the field to change.
/// let err = Config::from_json_str(r#"{"num_tokens": 256, "dim": 512, "depth": 2, "max_seq_len": 4096,
///     "causal": true, "linformer_settings": [64]}"#).unwrap_err();
/// assert!(err.to_string().contains("linformer_settings"));
/// # Ok::<(), linear_attention_transformer::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ConfigFields")]
pub struct Config {
    /// Vocabulary size: rows of the token embedding and width of the logits.
    pub num_tokens: usize,
    /// Per-head width; `None` means `dim / heads`.
    pub dim_head: Option<usize>,
    /// Embedding width when it differs from `dim` (factorised embeddings).
    pub emb_dim: Option<usize>,
    /// Return the final normalised embeddings instead of logits.
    pub return_embeddings: bool,
    /// Axial positional embedding (else learned absolute positions).
    pub use_axial_pos_emb: bool,
    /// Rotary embeddings on queries and keys, plus a fixed sinusoid on the tokens.
    pub use_rotary_emb: bool,
    /// The arguments passed on to the transformer stack.
    #[serde(flatten)]
    pub stack: StackArgs,
}

/// What a [`Config`] is read from: its fields, and any others, which are refused.
#[derive(Deserialize)]
struct ConfigFields {
    num_tokens: usize,
    #[serde(default = "default_lm_dim_head")]
    dim_head: Option<usize>,
    #[serde(default)]
    emb_dim: Option<usize>,
    #[serde(default)]
    return_embeddings: bool,
    #[serde(default = "yes")]
    use_axial_pos_emb: bool,
    #[serde(default)]
    use_rotary_emb: bool,
    #[serde(flatten)]
    stack: StackArgs,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

impl TryFrom<ConfigFields> for Config {
    type Error = String;

    fn try_from(f: ConfigFields) -> std::result::Result<Self, String> {
        no_unknown_fields(&f.unknown)?;
        let ConfigFields { num_tokens, dim_head, emb_dim, return_embeddings, use_axial_pos_emb, use_rotary_emb, stack, .. } = f;
        Ok(Self { num_tokens, dim_head, emb_dim, return_embeddings, use_axial_pos_emb, use_rotary_emb, stack })
    }
}

fn no_unknown_fields(unknown: &BTreeMap<String, serde::de::IgnoredAny>) -> std::result::Result<(), String> {
    match unknown.keys().next() {
        Some(field) => Err(format!("unknown field `{field}`")),
        None => Ok(()),
    }
}

impl std::ops::Deref for Config {
    type Target = StackArgs;
    fn deref(&self) -> &StackArgs {
        &self.stack
    }
}

impl std::ops::DerefMut for Config {
    fn deref_mut(&mut self) -> &mut StackArgs {
        &mut self.stack
    }
}

/// The arguments of `LinearAttentionTransformer`, the stack without embeddings and head; it
/// dereferences to its [`StackArgs`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TransformerConfigFields")]
pub struct TransformerConfig {
    /// Per-head width; `None` (the default here) means `dim / heads`.
    pub dim_head: Option<usize>,
    /// Accepted for compatibility; unused by the reference too.
    pub bucket_size: usize,
    /// The other arguments, shared with [`Config`].
    #[serde(flatten)]
    pub stack: StackArgs,
}

#[derive(Deserialize)]
struct TransformerConfigFields {
    #[serde(default)]
    dim_head: Option<usize>,
    #[serde(default = "default_bucket_size")]
    bucket_size: usize,
    #[serde(flatten)]
    stack: StackArgs,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

impl TryFrom<TransformerConfigFields> for TransformerConfig {
    type Error = String;

    fn try_from(f: TransformerConfigFields) -> std::result::Result<Self, String> {
        no_unknown_fields(&f.unknown)?;
        Ok(Self { dim_head: f.dim_head, bucket_size: f.bucket_size, stack: f.stack })
    }
}

impl std::ops::Deref for TransformerConfig {
    type Target = StackArgs;
    fn deref(&self) -> &StackArgs {
        &self.stack
    }
}

impl std::ops::DerefMut for TransformerConfig {
    fn deref_mut(&mut self) -> &mut StackArgs {
        &mut self.stack
    }
}

impl StackArgs {
    /// The reference's defaults for every optional argument.
    pub fn new(dim: usize, depth: usize, max_seq_len: usize) -> Self {
        Self {
            dim,
            depth,
            max_seq_len,
            heads: default_heads(),
            causal: false,
            reversible: false,
            ff_chunks: 1,
            ff_glu: false,
            ff_dropout: 0.0,
            attn_layer_dropout: 0.0,
            attn_dropout: 0.0,
            blindspot_size: 1,
            n_local_attn_heads: LocalHeads::Uniform(0),
            local_attn_window_size: default_window(),
            receives_context: false,
            pkm_layers: vec![],
            pkm_num_keys: default_pkm_num_keys(),
            attend_axially: false,
            linformer_settings: None,
            context_linformer_settings: None,
            shift_tokens: false,
            one_kv_head: false,
        }
    }

    /// Local heads of layer `layer` (0-based).
    pub fn local_heads(&self, layer: usize) -> usize {
        self.n_local_attn_heads.at(layer)
    }

    /// Sequence lengths must be a multiple of this; shorter remainders are padded (and masked)
    /// the way the reference's `Autopadder` does.
    pub fn pad_to_multiple(&self) -> usize {
        let bucket = if self.causal { self.blindspot_size } else { 1 };
        // The reference forgets the axial fold here; without it, attend_axially fails on lengths
        // that are not a multiple of the window.
        let window = if self.n_local_attn_heads.any() || self.attend_axially { self.local_attn_window_size } else { 1 };
        lcm(bucket, window)
    }

    /// Checks every argument and combination for heads of width `dim_head` (None: dim / heads);
    /// the error names the argument and what to change.
    fn validate(&self, dim_head: Option<usize>) -> Result<()> {
        for (field, v) in [("dim", self.dim), ("depth", self.depth), ("max_seq_len", self.max_seq_len), ("heads", self.heads)] {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1"));
            }
        }
        match dim_head {
            Some(0) => return Err(Error::config("dim_head", "must be at least 1 (or null for dim / heads)")),
            None if !self.dim.is_multiple_of(self.heads) => {
                return Err(Error::config("dim_head", format!("is unset, so dim ({}) must be divisible by heads ({}); set dim_head or change heads", self.dim, self.heads)))
            }
            _ => {}
        }
        if self.ff_chunks == 0 {
            return Err(Error::config("ff_chunks", "must be at least 1"));
        }
        if self.blindspot_size == 0 {
            return Err(Error::config("blindspot_size", "must be at least 1 (1 means no blind spot)"));
        }
        if self.local_attn_window_size == 0 {
            return Err(Error::config("local_attn_window_size", "must be at least 1"));
        }
        for (field, p) in [("ff_dropout", self.ff_dropout), ("attn_layer_dropout", self.attn_layer_dropout), ("attn_dropout", self.attn_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(field, format!("must be in [0, 1), got {p}")));
            }
        }
        if let LocalHeads::PerLayer(v) = &self.n_local_attn_heads {
            if v.len() != self.depth {
                return Err(Error::config("n_local_attn_heads", format!("has {} entries but depth is {}; give one per layer", v.len(), self.depth)));
            }
        }
        for layer in 0..self.depth {
            let l = self.local_heads(layer);
            if l > self.heads {
                return Err(Error::config("n_local_attn_heads", format!("layer {} asks for {l} local heads but there are only {} heads", layer + 1, self.heads)));
            }
        }
        if self.shift_tokens {
            let segments = if self.causal { 2 } else { 3 };
            if self.dim < segments {
                return Err(Error::config("shift_tokens", format!("needs dim >= {segments} to split features into shifted segments")));
            }
        }
        if self.causal && self.linformer_settings.is_some() {
            return Err(Error::config("linformer_settings", "Linformer self-attention cannot be causal; set causal = false or drop linformer_settings"));
        }
        if let Some(s) = self.linformer_settings {
            if s.k == 0 {
                return Err(Error::config("linformer_settings", "k must be at least 1"));
            }
            if !self.dim.is_multiple_of(self.heads) {
                return Err(Error::config("linformer_settings", format!("Linformer needs dim ({}) divisible by heads ({})", self.dim, self.heads)));
            }
        }
        if self.attend_axially && !self.dim.is_multiple_of(self.heads) {
            return Err(Error::config("attend_axially", format!("axial attention uses dim / heads per head, so dim ({}) must be divisible by heads ({})", self.dim, self.heads)));
        }
        for &layer in &self.pkm_layers {
            if layer == 0 || layer > self.depth {
                return Err(Error::config("pkm_layers", format!("layer {layer} does not exist; layers are numbered 1..={}", self.depth)));
            }
        }
        if let Some(ctx) = self.context_linformer_settings {
            if !self.receives_context {
                return Err(Error::config("context_linformer_settings", "only has an effect with receives_context = true"));
            }
            if ctx.k == 0 || ctx.seq_len == 0 {
                return Err(Error::config("context_linformer_settings", "seq_len and k must be at least 1"));
            }
        }
        Ok(())
    }
}

impl Config {
    /// A configuration with the reference's defaults for every optional argument.
    pub fn new(num_tokens: usize, dim: usize, depth: usize, max_seq_len: usize) -> Self {
        Self { num_tokens, dim_head: default_lm_dim_head(), emb_dim: None, return_embeddings: false, use_axial_pos_emb: true, use_rotary_emb: false, stack: StackArgs::new(dim, depth, max_seq_len) }
    }

    /// Parses the JSON object of keyword arguments and validates it.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(s).map_err(|e| Error::config("json", e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Parses a TOML table of keyword arguments and validates it.
    pub fn from_toml_str(s: &str) -> Result<Self> {
        let c: Self = toml::from_str(s).map_err(|e| Error::config("toml", e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads a `.json` or `.toml` file of keyword arguments.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let parsed = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Self::from_toml_str(&text),
            _ => Self::from_json_str(&text),
        };
        parsed.map_err(|e| Error::file(path, e.to_string()))
    }

    /// The JSON object of keyword arguments, as stored in model files.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Config always serialises")
    }

    /// Embedding width: `emb_dim`, or `dim` when unset.
    pub fn emb_dim(&self) -> usize {
        self.emb_dim.unwrap_or(self.dim)
    }

    /// The transformer stack inside this language model.
    pub fn transformer(&self) -> TransformerConfig {
        TransformerConfig { dim_head: self.dim_head, bucket_size: default_bucket_size(), stack: self.stack.clone() }
    }

    /// The longest sequence the positional embedding covers (after padding).
    pub fn max_positions(&self) -> usize {
        if self.use_axial_pos_emb && !self.use_rotary_emb {
            self.max_seq_len.div_ceil(self.local_attn_window_size) * self.local_attn_window_size
        } else {
            self.max_seq_len
        }
    }

    /// Checks every argument and combination; the error names the argument and what to change.
    pub fn validate(&self) -> Result<()> {
        if self.num_tokens == 0 {
            return Err(Error::config("num_tokens", "must be at least 1"));
        }
        if self.emb_dim == Some(0) {
            return Err(Error::config("emb_dim", "must be at least 1 (or unset to use dim)"));
        }
        self.stack.validate(self.dim_head)?;
        if self.n_local_attn_heads.any() && !self.max_seq_len.is_multiple_of(self.local_attn_window_size) {
            return Err(Error::config("max_seq_len", format!("{} must be a multiple of local_attn_window_size {} when there are local heads", self.max_seq_len, self.local_attn_window_size)));
        }
        if self.use_rotary_emb {
            let dh = self.transformer().dim_head();
            if !dh.is_multiple_of(2) {
                return Err(Error::config("dim_head", format!("rotary embeddings need an even head width, got {dh}")));
            }
            if !self.emb_dim().is_multiple_of(2) {
                return Err(Error::config("emb_dim", format!("rotary embeddings need an even embedding width, got {}", self.emb_dim())));
            }
            if self.attend_axially {
                return Err(Error::config("use_rotary_emb", "rotary embeddings cannot be combined with attend_axially (the reference crashes on it); turn one off"));
            }
        }
        Ok(())
    }
}

impl TransformerConfig {
    /// A configuration with the reference's defaults for every optional argument.
    pub fn new(dim: usize, depth: usize, max_seq_len: usize) -> Self {
        Self { dim_head: None, bucket_size: default_bucket_size(), stack: StackArgs::new(dim, depth, max_seq_len) }
    }

    /// Per-head width of the main attention.
    pub fn dim_head(&self) -> usize {
        self.dim_head.unwrap_or(self.dim / self.heads.max(1))
    }

    /// Checks every argument and combination; the error names the argument and what to change.
    pub fn validate(&self) -> Result<()> {
        self.stack.validate(self.dim_head)
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub(crate) fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_reference() {
        let c = Config::from_json_str(r#"{"num_tokens": 256, "dim": 64, "depth": 2, "max_seq_len": 256}"#).unwrap();
        assert_eq!(c, Config::new(256, 64, 2, 256));
        assert_eq!(c.heads, 8);
        assert_eq!(c.dim_head, Some(64));
        assert_eq!(c.local_attn_window_size, 128);
        assert!(c.use_axial_pos_emb);
        assert_eq!(TransformerConfig::new(64, 2, 256).dim_head(), 8);
    }

    #[test]
    fn json_round_trip_and_python_spellings() {
        let json = r#"{"num_tokens": 20000, "dim": 512, "heads": 8, "depth": 12, "max_seq_len": 8192,
            "causal": true, "blindspot_size": 64, "n_local_attn_heads": [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4],
            "local_attn_window": 128, "dim_head": null, "linformer_settings": null}"#;
        let c = Config::from_json_str(json).unwrap();
        assert_eq!(c.dim_head, None);
        assert_eq!(c.transformer().dim_head(), 64);
        assert_eq!(c.local_attn_window_size, 128);
        assert_eq!(c.n_local_attn_heads.at(11), 4);
        assert_eq!(Config::from_json_str(&c.to_json()).unwrap(), c);
        let ctx: Config = serde_json::from_str(
            r#"{"num_tokens": 4, "dim": 8, "depth": 1, "max_seq_len": 8, "linformer_settings": [16],
                "context_linformer_settings": {"seq_len": 32, "k": 8}}"#,
        )
        .unwrap();
        assert_eq!(ctx.linformer_settings, Some(LinformerSettings { k: 16 }));
        assert_eq!(ctx.context_linformer_settings, Some(LinformerContextSettings { seq_len: 32, k: 8 }));
    }

    #[test]
    fn toml_is_accepted() {
        let c = Config::from_toml_str("num_tokens = 256\ndim = 32\ndepth = 1\nmax_seq_len = 64\ncausal = true\n").unwrap();
        assert!(c.causal);
    }

    #[test]
    fn pad_to_multiple_is_the_lcm_of_bucket_and_window() {
        let mut c = Config::new(256, 64, 2, 256);
        c.causal = true;
        c.blindspot_size = 4;
        c.local_attn_window_size = 6;
        assert_eq!(c.transformer().pad_to_multiple(), 4);
        c.n_local_attn_heads = LocalHeads::PerLayer(vec![0, 1]);
        assert_eq!(c.transformer().pad_to_multiple(), 12);
        c.causal = false;
        assert_eq!(c.transformer().pad_to_multiple(), 6);
    }

    fn rejects(json: &str, field: &str) {
        match Config::from_json_str(json) {
            Err(Error::Config { field: f, message }) => {
                assert_eq!(f, field, "{message}");
                assert!(!message.is_empty());
            }
            other => panic!("expected a config error on {field}, got {other:?}"),
        }
    }

    #[test]
    fn invalid_configurations_are_rejected_with_the_field_named() {
        let base = r#""num_tokens": 256, "dim": 64, "depth": 2, "max_seq_len": 256"#;
        rejects(&format!("{{{base}, \"n_local_attn_heads\": 9}}"), "n_local_attn_heads");
        rejects(&format!("{{{base}, \"n_local_attn_heads\": [1, 2, 3]}}"), "n_local_attn_heads");
        rejects(&format!("{{{base}, \"n_local_attn_heads\": 1, \"local_attn_window_size\": 100}}"), "max_seq_len");
        rejects(&format!("{{{base}, \"dim_head\": 0}}"), "dim_head");
        rejects(&format!("{{{base}, \"dim_head\": null, \"heads\": 7}}"), "dim_head");
        rejects(&format!("{{{base}, \"causal\": true, \"linformer_settings\": [8]}}"), "linformer_settings");
        rejects(&format!("{{{base}, \"ff_dropout\": 1.0}}"), "ff_dropout");
        rejects(&format!("{{{base}, \"blindspot_size\": 0}}"), "blindspot_size");
        rejects(&format!("{{{base}, \"use_rotary_emb\": true, \"dim_head\": 7}}"), "dim_head");
        rejects(&format!("{{{base}, \"use_rotary_emb\": true, \"attend_axially\": true}}"), "use_rotary_emb");
        rejects(&format!("{{{base}, \"pkm_layers\": [3]}}"), "pkm_layers");
        rejects(&format!("{{{base}, \"heads\": 0}}"), "heads");
        rejects(&format!("{{{base}, \"ff_chunks\": 0}}"), "ff_chunks");
        rejects(r#"{"num_tokens": 0, "dim": 64, "depth": 2, "max_seq_len": 256}"#, "num_tokens");
        rejects(&format!("{{{base}, \"typo_field\": 1}}"), "json");
        rejects(r#"{"dim": 64}"#, "json");
    }
}
