//! Training a language model over bytes or a tokenizer's tokens: the run configuration (model
//! plus training settings, one TOML file), the optimisation step, evaluation in bits per byte
//! of text, and checkpoints that resume exactly.
//!
//! Every random choice of step `s` (its data windows, its dropout masks) is drawn from a seed
//! derived from the run's seed and `s`, so a resumed run repeats the uninterrupted one.

pub mod copy_task;
pub mod data;
pub mod horizon;
pub mod optim;
pub mod token_cache;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, write_safetensors};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::generate::{generate, Sampling};
use crate::kernels::cross_entropy::cross_entropy_rows;
use crate::model::{Inputs, LinearAttentionTransformerLM};
use crate::pass::Pass;
use crate::rng::{derive, Rng};
use crate::text::{Codec, MIN_BPE_VOCABULARY};
use data::{eval_windows, random_windows, Corpus, Split, Tokens};
use horizon::Horizon;
use optim::{schedule, AdamW, AdamWConfig};

/// Training settings (the `[train]` table of a run configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Tokens per training window.
    pub seq_len: usize,
    /// Windows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps of the whole run; the learning rate decays to `min_lr` over them, or
    /// over the steps the time limit allows when that is fewer.
    pub max_steps: u64,
    /// The run's time, across resumes, from start to the model file, e.g. "15m", "1h30m",
    /// "90s"; empty for none. The schedule ends with it (see [`horizon`]).
    pub time_limit: String,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: u64,
    /// Decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// AdamW's first-moment decay.
    pub beta1: f64,
    /// AdamW's second-moment decay.
    pub beta2: f64,
    /// Gradients are rescaled to at most this global L2 norm (0 = no clipping).
    pub grad_clip: f64,
    /// Seed of the weights, the data windows and the dropout masks.
    pub seed: u64,
    /// Steps between progress records in the metrics log.
    pub log_every: u64,
    /// Steps between validations (0 = only at the end).
    pub eval_every: u64,
    /// Validation windows per periodic evaluation (the final one uses the whole split).
    pub eval_windows: usize,
    /// Steps between printed samples (0 = none).
    pub sample_every: u64,
    /// Tokens per sample.
    pub sample_len: usize,
    /// What samples continue.
    pub sample_prompt: String,
    /// Steps between checkpoints (0 = only at the end).
    pub checkpoint_every: u64,
    /// Consecutive steps with a non-finite loss or gradient before the run stops.
    pub max_bad_steps: u32,
    /// What the training steps compute in (the weights and optimizer state stay f32).
    pub precision: Precision,
    /// A reversible model keeps every block's activations for the backward pass instead of
    /// recomputing them there: a quarter less work per step, a sequential model's memory (see
    /// [`Pass::keep_activations`]). No effect on sequential models.
    pub keep_activations: bool,
    /// The run's tokens: `bytes` (or empty), `bpe:N` (a byte-level BPE of N ids learned from
    /// the corpus's training split when the run starts), or a `tokenizer.json`; see
    /// [`TokenizerSetting`].
    pub tokenizer: String,
}

/// What `train.tokenizer` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSetting {
    /// `bytes` (or empty): token `b` is the byte `b`.
    Bytes,
    /// `bpe:N`: a byte-level BPE of N ids, learned from the corpus's training split when a new
    /// run starts and kept in the run folder (which resumes and evaluations read).
    Learned(usize),
    /// Anything else: the `tokenizer.json` at this path.
    File(PathBuf),
}

impl TokenizerSetting {
    /// Reads a `train.tokenizer` value.
    pub fn parse(value: &str) -> Result<Self> {
        let value = value.trim();
        if value.is_empty() || value == "bytes" {
            return Ok(Self::Bytes);
        }
        match value.strip_prefix("bpe:") {
            Some(n) => match n.trim().parse::<usize>() {
                Ok(n) if n >= MIN_BPE_VOCABULARY => Ok(Self::Learned(n)),
                _ => Err(Error::config("tokenizer", format!("\"{value}\": bpe:N learns a byte-level BPE of N ids, N a number of at least {MIN_BPE_VOCABULARY} (256 bytes and the end-of-text token)"))),
            },
            None => Ok(Self::File(PathBuf::from(value))),
        }
    }
}

/// The vocabulary of the built-in run's tokenizer: at the main job's budget on two cores a
/// BPE of this size beat bytes and larger vocabularies on the validation split (see the
/// README's search).
pub const DEFAULT_VOCABULARY: usize = 1024;

/// Arithmetic of the training steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 throughout.
    #[default]
    F32,
    /// Mixed precision: forward and backward in bfloat16 against a bfloat16 copy of the f32
    /// master weights, loss in f32, gradients accumulated into the f32 weights. bfloat16 has
    /// float32's exponent range, so no loss scaling is needed.
    Bf16,
}

impl Precision {
    /// The dtype the steps compute in.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision `{s}`: use f32 or bf16")),
        }
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            seq_len: 256,
            batch_size: 4,
            grad_accum: 1,
            max_steps: 20_000,
            time_limit: "15m".into(),
            lr: 3e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            grad_clip: 1.0,
            seed: 0,
            log_every: 10,
            eval_every: 200,
            eval_windows: 64,
            sample_every: 250,
            sample_len: 200,
            sample_prompt: "\n".into(),
            checkpoint_every: 250,
            max_bad_steps: 5,
            precision: Precision::F32,
            keep_activations: false,
            tokenizer: "bytes".into(),
        }
    }
}

impl TrainSettings {
    /// What `tokenizer` names.
    pub fn tokenizer_setting(&self) -> Result<TokenizerSetting> {
        TokenizerSetting::parse(&self.tokenizer)
    }
}

/// The default model: sized to learn the bundled corpus on two CPU cores in fifteen minutes,
/// for the matrix kernels this machine runs ([`crate::kernels::matrix_isa`]).
pub fn default_model() -> Config {
    default_model_for(crate::kernels::matrix_isa())
}

/// The default model where the matrix products run on `isa`'s kernels: 4 heads of `dim / 4`,
/// dim 160 with gemm's AVX-512 kernels and 128 elsewhere. Each width won its machine's search on
/// the validation split (the README's tables): with the faster products a wider model learns
/// more in the time, with the slower ones the extra steps of a narrower one count for more.
pub fn default_model_for(isa: &str) -> Config {
    let dim = if isa == "avx512" { 160 } else { 128 };
    let mut c = Config::new(DEFAULT_VOCABULARY, dim, 4, 512);
    c.heads = 4;
    c.dim_head = Some(dim / 4);
    c.causal = true;
    c.n_local_attn_heads = crate::config::LocalHeads::Uniform(3);
    c.local_attn_window_size = 64;
    c.blindspot_size = 1;
    c
}

/// A run configuration: `[model]` (the model's keyword arguments) and `[train]`.
///
/// ```
/// use linear_attention_transformer::train::RunConfig;
///
/// let mut run = RunConfig::from_toml("[model]\nnum_tokens = 256\ndim = 128\ndepth = 2\nmax_seq_len = 256\ncausal = true\n")?;
/// run.set("train.lr=1e-3")?;
/// run.set("model.n_local_attn_heads=[2, 4]")?;
/// run.validate()?;
/// assert_eq!(run.train.lr, 1e-3);
/// # Ok::<(), linear_attention_transformer::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The model's keyword arguments (`[model]`).
    pub model: Config,
    #[serde(default)]
    /// The training settings (`[train]`).
    pub train: TrainSettings,
}

/// The built-in run: the default model over a BPE of [`DEFAULT_VOCABULARY`] ids learned from
/// the corpus. (A `[train]` table that leaves out `tokenizer` trains on bytes.)
impl Default for RunConfig {
    fn default() -> Self {
        let train = TrainSettings { tokenizer: format!("bpe:{DEFAULT_VOCABULARY}"), ..TrainSettings::default() };
        Self { model: default_model(), train }
    }
}

impl RunConfig {
    /// Parses and validates a run configuration.
    pub fn from_toml(text: &str) -> Result<Self> {
        let run = Self::parse(text)?;
        run.validate()?;
        Ok(run)
    }

    fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::config("toml", e.to_string()))
    }

    /// The configuration as TOML (what `config.toml` holds).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a run configuration always serialises")
    }

    /// Sets one field from `section.field=value` (e.g. `model.depth=6`, `train.lr=1e-3`); the
    /// value is TOML (`true`, `6`, `1e-3`, `[2, 2]`, or a bare string). Only the type is checked
    /// here: call [`RunConfig::validate`] once every field is set.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment.split_once('=').ok_or_else(|| Error::input(format!("--set {assignment}: expected section.field=value")))?;
        let (section, field) = key.trim().split_once('.').ok_or_else(|| Error::input(format!("--set {assignment}: the field must be model.NAME or train.NAME")))?;
        let value = value.trim();
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}")).ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut doc: toml::Table = toml::from_str(&self.to_toml()).expect("own TOML parses");
        let table = doc.get_mut(section).and_then(toml::Value::as_table_mut).ok_or_else(|| Error::input(format!("--set {assignment}: unknown section \"{section}\" (model or train)")))?;
        table.insert(field.to_string(), parsed);
        let text = toml::to_string(&doc).expect("a table serialises");
        *self = Self::parse(&text).map_err(|e| Error::input(format!("--set {assignment}: {e}")))?;
        Ok(())
    }

    /// Checks the model and the training settings together.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let t = &self.train;
        match self.train.tokenizer_setting()? {
            TokenizerSetting::Bytes if self.model.num_tokens != 256 => {
                return Err(Error::config("num_tokens", "byte-level training needs num_tokens = 256 (or set train.tokenizer)"));
            }
            TokenizerSetting::Learned(n) if self.model.num_tokens < n => {
                return Err(Error::config(
                    "num_tokens",
                    format!("the model has {} token ids but train.tokenizer learns a BPE of {n}; raise model.num_tokens to at least {n} (left out, it is {n})", self.model.num_tokens),
                ));
            }
            _ => {}
        }
        if !self.model.causal {
            return Err(Error::config("causal", "a language model trained to predict the next token must be causal; set causal = true"));
        }
        if self.model.return_embeddings || self.model.receives_context {
            return Err(Error::config("model", "language-model training needs logits: turn off return_embeddings and receives_context"));
        }
        for (field, v) in [("seq_len", t.seq_len), ("batch_size", t.batch_size), ("grad_accum", t.grad_accum)] {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1"));
            }
        }
        if t.seq_len > self.model.max_positions() {
            return Err(Error::config("seq_len", format!("{} exceeds the model's {} positions; raise model.max_seq_len", t.seq_len, self.model.max_positions())));
        }
        if !(t.lr > 0.0 && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return Err(Error::config("lr", "need lr > 0 and 0 <= min_lr <= lr"));
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            return Err(Error::config("beta1", "beta1 and beta2 must be in [0, 1)"));
        }
        if t.weight_decay < 0.0 || t.grad_clip < 0.0 {
            return Err(Error::config("weight_decay", "weight_decay and grad_clip must not be negative"));
        }
        time_limit(&t.time_limit)?;
        Ok(())
    }

    /// The time limit, if any.
    pub fn time_limit(&self) -> Option<std::time::Duration> {
        time_limit(&self.train.time_limit).ok().flatten()
    }
}

/// Reads a time limit: "90s", "15m", "1h30m" (any duration `humantime` reads, or a bare number
/// of seconds); "" or "none" means none.
fn time_limit(s: &str) -> Result<Option<std::time::Duration>> {
    let s = s.trim();
    if s.is_empty() || s == "none" {
        return Ok(None);
    }
    match s.parse::<f64>() {
        Ok(secs) if secs >= 0.0 && secs.is_finite() => Ok(Some(std::time::Duration::from_secs_f64(secs))),
        _ => humantime::parse_duration(s).map(Some).map_err(|e| Error::config("time_limit", format!("cannot read the duration \"{s}\" ({e}): use e.g. 90s, 15m, 1h30m"))),
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The step just completed (1-based).
    pub step: u64,
    /// Mean cross-entropy in nats.
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Global L2 norm of the gradient (before clipping).
    pub grad_norm: f64,
    /// The update was skipped because the loss or a gradient was not finite.
    pub skipped: bool,
    /// Tokens trained on so far.
    pub tokens: u64,
}

/// Loss on a split.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Evaluation {
    /// Mean cross-entropy in nats per token.
    pub loss: f64,
    /// Bits per byte of the text (per character, for a byte model): the loss per token over the
    /// split's bytes per token, comparable across tokenizers.
    pub bpc: f64,
    /// Tokens predicted.
    pub tokens: usize,
}

/// Mean cross-entropy of `logits` [b, n, V] against `targets` (b·n ids) over the positions
/// where `weights` (b·n, 0 or 1) is 1: returns (sum, count) as a scalar tensor and a number.
fn summed_loss(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (b, n, v) = logits.dims3()?;
    Ok(cross_entropy_rows(&logits.reshape((b * n, v))?, targets)?.sum_all()?)
}

/// Mean loss of `model` on the windows of `data` starting at `starts`, `batch` at a time.
pub fn evaluate(model: &LinearAttentionTransformerLM, data: Tokens, seq_len: usize, batch: usize, max_windows: Option<usize>) -> Result<Evaluation> {
    let starts = eval_windows(data.len(), seq_len, max_windows);
    if starts.is_empty() {
        return Err(Error::input("the evaluation split is too small: it needs at least two tokens"));
    }
    let len = seq_len.min(data.len() - 1);
    // Consecutive windows may overlap at the end of the data: count each target once.
    let mut counted_to = 0usize;
    let (mut total, mut count) = (0f64, 0usize);
    for group in starts.chunks(batch.max(1)) {
        let mut x = Vec::with_capacity(group.len() * len);
        let mut y = Vec::with_capacity(group.len() * len);
        for &s in group {
            x.extend(data.ids(s..s + len));
            for (i, t) in data.ids(s + 1..s + len + 1).into_iter().enumerate() {
                let position = s + 1 + i;
                let fresh = max_windows.is_some() || position > counted_to;
                y.push(if fresh { t } else { crate::kernels::cross_entropy::IGNORE });
                count += fresh as usize;
            }
            counted_to = counted_to.max(s + len);
        }
        let tokens = Tensor::from_vec(x, (group.len(), len), model.device())?;
        let logits = model.forward(&tokens, &Inputs::default(), &Pass::eval())?;
        total += summed_loss(&logits, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    let loss = total / count as f64;
    Ok(Evaluation { loss, bpc: loss / std::f64::consts::LN_2 / data.bytes_per_token(), tokens: count })
}

/// Refuses a model with fewer token ids than `codec` produces.
pub fn check_vocabulary(model: &Config, codec: &Codec) -> Result<()> {
    let vocab = codec.vocab_size();
    if model.num_tokens < vocab {
        let what = match codec {
            Codec::Bytes => "bytes take 256".to_string(),
            Codec::Tokenizer { path, .. } => format!("the tokenizer {} has {vocab}", path.display()),
        };
        return Err(Error::config(
            "num_tokens",
            format!("the model has {} token ids but {what}; raise model.num_tokens to at least {vocab} (left out, it defaults to the tokenizer's vocabulary)", model.num_tokens),
        ));
    }
    Ok(())
}

/// Where a run keeps its files.
pub struct RunFiles {
    /// The run folder.
    pub dir: PathBuf,
}

impl RunFiles {
    /// Model, optimizer state and position: what `--resume` reads.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    /// The model file (the run folder is also a model directory: see [`crate::checkpoint`]).
    pub fn model(&self) -> PathBuf {
        self.dir.join(checkpoint::MODEL_FILE)
    }
    /// The model's keyword arguments, as the reference takes them.
    pub fn model_config(&self) -> PathBuf {
        self.dir.join(checkpoint::CONFIG_FILE)
    }
    /// The tokenizer of a token-level model.
    pub fn tokenizer(&self) -> PathBuf {
        self.dir.join(checkpoint::TOKENIZER_FILE)
    }
    /// The corpus tokenized (see [`token_cache`]).
    pub fn token_cache(&self) -> PathBuf {
        self.dir.join("tokens.bin")
    }
    /// The metrics log.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    /// The loss plot.
    pub fn plot(&self) -> PathBuf {
        self.dir.join("loss.svg")
    }
    /// The configuration.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    /// Where a compressed corpus is unpacked.
    pub fn corpus_cache(&self) -> PathBuf {
        self.dir.join("corpus.bin")
    }
}

const RUN_KEY: &str = "lat.run";
const STEP_KEY: &str = "lat.step";
const TOKENS_KEY: &str = "lat.tokens";
const ELAPSED_KEY: &str = "lat.elapsed";
const HORIZON_KEY: &str = "lat.horizon";

/// The state saved in a checkpoint besides the tensors.
pub struct Resumed {
    /// The run configuration.
    pub run: RunConfig,
    /// Optimizer steps done.
    pub step: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Seconds of training so far.
    pub elapsed: f64,
    /// The schedule's length when it was saved.
    pub horizon: Option<Horizon>,
}

/// Reads the run configuration and position of a checkpoint, without loading it.
pub fn peek_checkpoint(path: &Path) -> Result<Resumed> {
    let file = checkpoint::read(path)?;
    let get = |k: &str| file.metadata.get(k).ok_or_else(|| Error::file(path, format!("not a training checkpoint: no \"{k}\"")));
    let run: RunConfig = serde_json::from_str(get(RUN_KEY)?).map_err(|e| Error::file(path, format!("bad run configuration: {e}")))?;
    let num = |k: &str| -> Result<f64> { get(k)?.parse::<f64>().map_err(|_| Error::file(path, format!("bad value for {k}"))) };
    let horizon = file.metadata.get(HORIZON_KEY).map(|h| serde_json::from_str(h).map_err(|e| Error::file(path, format!("bad {HORIZON_KEY}: {e}")))).transpose()?;
    Ok(Resumed { run, step: num(STEP_KEY)? as u64, tokens: num(TOKENS_KEY)? as u64, elapsed: num(ELAPSED_KEY)?, horizon })
}

/// A training run in progress.
pub struct Trainer {
    /// The run configuration.
    pub run: RunConfig,
    /// The model being trained.
    pub model: LinearAttentionTransformerLM,
    opt: AdamW,
    corpus: Corpus,
    /// Where the run keeps its files.
    pub files: RunFiles,
    /// Optimizer steps completed.
    pub step: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Seconds spent in earlier sessions of this run.
    pub elapsed_before: f64,
    /// The length of the learning-rate schedule.
    pub horizon: Horizon,
    /// Measured seconds per evaluated window and per save: what the end of the run will take.
    eval_s_per_window: Option<f64>,
    save_s: f64,
    /// Windows of the final evaluation (the whole validation split).
    final_windows: usize,
    bad_steps: u32,
}

impl Trainer {
    /// Starts a run in `dir` on `corpus`, or resumes the one saved there.
    pub fn start(run: RunConfig, corpus: Corpus, dir: &Path, resume: bool, device: &Device) -> Result<Self> {
        run.validate()?;
        if (run.train.tokenizer_setting()? == TokenizerSetting::Bytes) != corpus.codec().is_bytes() {
            return Err(Error::config("tokenizer", format!("train.tokenizer is \"{}\" but the corpus is read as {}", run.train.tokenizer, if corpus.codec().is_bytes() { "bytes" } else { "tokens" })));
        }
        check_vocabulary(&run.model, corpus.codec())?;
        let files = RunFiles { dir: dir.to_path_buf() };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // Temporary files of writes that a crash interrupted are garbage.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().contains(".tmp-") {
                    std::fs::remove_file(e.path()).ok();
                }
            }
        }
        let adam = AdamWConfig { beta1: run.train.beta1, beta2: run.train.beta2, eps: 1e-8, weight_decay: run.train.weight_decay };
        let (model, opt, step, tokens, elapsed, horizon) = if resume {
            let path = files.checkpoint();
            if !path.exists() {
                return Err(Error::file(&path, "nothing to resume: no checkpoint here"));
            }
            let saved = peek_checkpoint(&path)?;
            if saved.run.model != run.model {
                return Err(Error::file(&path, "the checkpoint's model configuration differs from the requested one; resume without changing [model]"));
            }
            let mut file = checkpoint::read(&path)?;
            let mut params = HashMap::new();
            let mut moments = HashMap::new();
            for (k, t) in file.tensors.drain() {
                if let Some(name) = k.strip_prefix("model.") {
                    params.insert(name.to_string(), t);
                } else if let Some(name) = k.strip_prefix("adam.") {
                    moments.insert(name.to_string(), t);
                }
            }
            let model = LinearAttentionTransformerLM::from_tensors(&run.model, params, device, DType::F32, true).map_err(|e| Error::file(&path, e.to_string()))?;
            let mut opt = AdamW::new(model.vars(), adam)?;
            opt.load_state(&moments, saved.step).map_err(|e| Error::file(&path, e.to_string()))?;
            let horizon = saved.horizon.unwrap_or_else(|| Horizon::new(run.train.max_steps));
            (model, opt, saved.step, saved.tokens, saved.elapsed, horizon)
        } else {
            // A tokenizer left by an earlier run that failed would be read as this byte model's.
            if corpus.codec().is_bytes() && files.tokenizer().exists() {
                std::fs::remove_file(files.tokenizer()).map_err(|e| Error::io(files.tokenizer(), e))?;
            }
            let model = LinearAttentionTransformerLM::new(&run.model, derive(run.train.seed, 0x1417), device, DType::F32)?;
            let opt = AdamW::new(model.vars(), adam)?;
            (model, opt, 0, 0, 0.0, Horizon::new(run.train.max_steps))
        };
        let train = corpus.split(Split::Train).len();
        if train < run.train.seq_len + 1 {
            return Err(Error::file(&corpus.source, format!("the training split has {train} tokens, fewer than seq_len + 1; use more data or a smaller seq_len")));
        }
        let final_windows = eval_windows(corpus.split(Split::Validation).len(), run.train.seq_len, None).len();
        Ok(Self { run, model, opt, corpus, files, step, tokens, elapsed_before: elapsed, horizon, eval_s_per_window: None, save_s: 0.0, final_windows, bad_steps: 0 })
    }

    /// The corpus trained on.
    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    /// Bits per byte of text of a training loss (nats per token).
    pub fn bits_per_byte(&self, loss: f64) -> f64 {
        loss / std::f64::consts::LN_2 / self.corpus.split(Split::Train).bytes_per_token()
    }

    /// Learning rate of the next step.
    pub fn lr(&self) -> f64 {
        let t = &self.run.train;
        schedule(self.step, t.lr, t.min_lr, t.warmup_steps, self.horizon.total)
    }

    /// Re-estimates the schedule's length `elapsed` seconds into the run (all its sessions),
    /// keeping back what the final evaluation and save are expected to take: as measured, or
    /// before the first evaluation a forward pass per window at a third of a training step's.
    pub fn observe(&mut self, elapsed: f64) {
        let t = &self.run.train;
        let per_window = self.eval_s_per_window.or_else(|| self.horizon.seconds_per_step(self.step, elapsed).map(|s| s / (3 * t.batch_size * t.grad_accum) as f64));
        // A fifth more and a hundredth of the limit besides: a shared machine slows down
        // unannounced, and the process's start and exit lie outside this clock.
        let limit = self.time_limit_s().unwrap_or(0.0);
        self.horizon.reserve_s = 1.2 * (per_window.unwrap_or(0.0) * self.final_windows as f64 + self.save_s) + 0.01 * limit;
        self.horizon.observe(self.step, elapsed, self.time_limit_s(), t.max_steps, t.warmup_steps);
    }

    /// Whether the time limit leaves no room for another step before the end of the run.
    pub fn out_of_time(&self, elapsed: f64) -> bool {
        self.horizon.out_of_time(self.step, elapsed, self.time_limit_s())
    }

    fn time_limit_s(&self) -> Option<f64> {
        self.run.time_limit().map(|d| d.as_secs_f64())
    }

    /// One optimizer step (all its micro-batches).
    pub fn train_step(&mut self) -> Result<StepReport> {
        let t = self.run.train.clone();
        let lr = self.lr();
        let data = self.corpus.split(Split::Train);
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut loss_sum = 0.0;
        let mut finite = true;
        let model = self.model.cast(t.precision.dtype())?;
        for micro in 0..t.grad_accum as u64 {
            let index = self.step * t.grad_accum as u64 + micro;
            let mut rng = Rng::new(derive(t.seed, index));
            let (x, y) = random_windows(data, t.batch_size, t.seq_len, &mut rng)?;
            let tokens = Tensor::from_vec(x, (t.batch_size, t.seq_len), self.model.device())?;
            let pass = Pass::train(derive(t.seed ^ 0xD50F, index)).keep_activations(t.keep_activations);
            let logits = model.forward(&tokens, &Inputs::default(), &pass)?.to_dtype(DType::F32)?;
            let loss = (summed_loss(&logits, &y)? / (t.batch_size * t.seq_len) as f64)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            loss_sum += value;
            if !value.is_finite() {
                finite = false;
                break;
            }
            let g = self.model.grads_from(&model, loss.backward()?)?;
            grads = Some(match grads.take() {
                None => g,
                Some(mut acc) => {
                    for (_, var) in self.model.vars() {
                        if let (Some(a), Some(b)) = (acc.remove(&var), g.get(&var)) {
                            acc.insert(&var, (a + b)?);
                        }
                    }
                    acc
                }
            });
        }
        let loss = loss_sum / t.grad_accum as f64;
        let mut norm = f64::NAN;
        if let (true, Some(g)) = (finite, &grads) {
            norm = self.opt.grad_norm(g)? / t.grad_accum as f64;
            finite = norm.is_finite();
        }
        self.step += 1;
        self.tokens += (t.batch_size * t.seq_len * t.grad_accum) as u64;
        if !finite {
            self.bad_steps += 1;
            if self.bad_steps >= t.max_bad_steps.max(1) {
                return Err(Error::input(format!(
                    "training stopped at step {}: {} consecutive steps had a non-finite loss or gradient; the last checkpoint is intact; try a lower lr",
                    self.step, self.bad_steps
                )));
            }
            return Ok(StepReport { step: self.step, loss, lr, grad_norm: norm, skipped: true, tokens: self.tokens });
        }
        self.bad_steps = 0;
        let clip = if t.grad_clip > 0.0 && norm > t.grad_clip { t.grad_clip / norm } else { 1.0 };
        self.opt.step(grads.as_ref().expect("finite gradients exist"), lr, clip / t.grad_accum as f64)?;
        Ok(StepReport { step: self.step, loss, lr, grad_norm: norm, skipped: false, tokens: self.tokens })
    }

    /// Loss on a split: `max_windows` evenly spread windows, or the whole split.
    pub fn evaluate(&mut self, split: Split, max_windows: Option<usize>) -> Result<Evaluation> {
        let started = std::time::Instant::now();
        let data = self.corpus.split(split);
        let e = evaluate(&self.model, data, self.run.train.seq_len, self.run.train.batch_size, max_windows)?;
        let windows = eval_windows(data.len(), self.run.train.seq_len, max_windows).len();
        self.eval_s_per_window = Some(started.elapsed().as_secs_f64() / windows.max(1) as f64);
        Ok(e)
    }

    /// A text sample continuing `prompt`.
    pub fn sample(&self, prompt: &str, len: usize, seed: u64) -> Result<String> {
        let codec = self.corpus.codec();
        let prompt = codec.encode(if prompt.is_empty() { b"\n" } else { prompt.as_bytes() })?;
        let sampling = Sampling { temperature: 0.8, top_k: None, top_p: Some(0.95) };
        let out = generate(&self.model, &[prompt], len, &sampling, seed, codec.end_of_text(), true, &mut |_, _| {})?;
        Ok(codec.decode(&out[0]))
    }

    /// Writes the checkpoint (model, optimizer, position, schedule) and the model file, each
    /// atomically.
    pub fn save(&mut self, elapsed: f64) -> Result<()> {
        let started = std::time::Instant::now();
        self.write(elapsed)?;
        self.save_s = started.elapsed().as_secs_f64();
        Ok(())
    }

    fn write(&self, elapsed: f64) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self.model.params().iter().map(|p| (format!("model.{}", p.name), p.tensor.clone())).collect();
        tensors.extend(self.opt.state()?.into_iter().map(|(k, t)| (format!("adam.{k}"), t)));
        let meta = HashMap::from([
            (checkpoint::CONFIG_KEY.to_string(), self.run.model.to_json()),
            (RUN_KEY.to_string(), serde_json::to_string(&self.run).expect("run serialises")),
            (STEP_KEY.to_string(), self.step.to_string()),
            (TOKENS_KEY.to_string(), self.tokens.to_string()),
            (ELAPSED_KEY.to_string(), format!("{elapsed:.3}")),
            (HORIZON_KEY.to_string(), serde_json::to_string(&self.horizon).expect("the horizon serialises")),
        ]);
        write_safetensors(&self.files.checkpoint(), &tensors, &meta)?;
        let info = HashMap::from([(STEP_KEY.to_string(), self.step.to_string()), ("lat.seq_len".to_string(), self.run.train.seq_len.to_string())]);
        checkpoint::save(&self.model, self.files.model(), &info)?;
        checkpoint::write_atomic(&self.files.model_config(), self.run.model.to_json().as_bytes())?;
        if let Codec::Tokenizer { json, .. } = self.corpus.codec() {
            checkpoint::write_atomic(&self.files.tokenizer(), json)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(time_limit("15m").unwrap().unwrap().as_secs(), 900);
        assert_eq!(time_limit("1h30m").unwrap().unwrap().as_secs(), 5400);
        assert_eq!(time_limit("90").unwrap().unwrap().as_secs(), 90);
        assert_eq!(time_limit("").unwrap(), None);
        assert!(time_limit("5x").is_err());
    }

    #[test]
    fn tokenizer_settings_read_and_size_the_model() {
        assert_eq!(TokenizerSetting::parse("").unwrap(), TokenizerSetting::Bytes);
        assert_eq!(TokenizerSetting::parse("bytes").unwrap(), TokenizerSetting::Bytes);
        assert_eq!(TokenizerSetting::parse("bpe:1024").unwrap(), TokenizerSetting::Learned(1024));
        assert_eq!(TokenizerSetting::parse("runs/t.json").unwrap(), TokenizerSetting::File("runs/t.json".into()));
        for bad in ["bpe:", "bpe:256", "bpe:-3", "bpe:1e3"] {
            assert!(TokenizerSetting::parse(bad).is_err(), "{bad}");
        }
        // The built-in run learns its tokenizer; a file that names none trains bytes.
        let built_in = RunConfig::default();
        assert_eq!(built_in.train.tokenizer_setting().unwrap(), TokenizerSetting::Learned(DEFAULT_VOCABULARY));
        assert_eq!(built_in.model.num_tokens, DEFAULT_VOCABULARY);
        built_in.validate().unwrap();
        // Its width follows the machine's matrix kernels.
        assert_eq!(built_in.model, default_model_for(crate::kernels::matrix_isa()));
        for (isa, dim) in [("avx512", 160), ("avx2", 128), ("neon", 128), ("scalar", 128)] {
            let run = RunConfig { model: default_model_for(isa), ..RunConfig::default() };
            assert_eq!((run.model.dim, run.model.dim_head, run.model.heads), (dim, Some(dim / 4), 4), "{isa}");
            run.validate().unwrap();
        }
        let file = RunConfig::from_toml("[model]\nnum_tokens = 256\ndim = 32\ndepth = 1\nmax_seq_len = 64\ncausal = true\n[train]\nseq_len = 32\n").unwrap();
        assert_eq!(file.train.tokenizer_setting().unwrap(), TokenizerSetting::Bytes);
        let mut run = file.clone();
        run.set("train.tokenizer=bpe:300").unwrap();
        assert!(run.validate().unwrap_err().to_string().contains("at least 300"));
        run.set("model.num_tokens=300").unwrap();
        run.validate().unwrap();
        run.set("train.tokenizer=bytes").unwrap();
        assert!(run.validate().is_err());
    }

    #[test]
    fn settings_override_from_the_command_line() {
        let mut run = RunConfig::default();
        run.set("model.depth=3").unwrap();
        run.set("train.lr=5e-4").unwrap();
        run.set("train.time_limit=1h").unwrap();
        run.set("model.n_local_attn_heads=[1, 1, 2]").unwrap();
        assert_eq!(run.model.depth, 3);
        assert_eq!(run.train.lr, 5e-4);
        assert_eq!(run.train.time_limit, "1h");
        assert!(run.set("model.nope=1").is_err());
        assert!(run.set("model.depth=many").is_err());
        assert!(run.set("depth=3").is_err());
        run.set("train.seq_len=0").unwrap();
        assert!(run.validate().is_err());
        run.set("train.seq_len=256").unwrap();
        let text = run.to_toml();
        assert_eq!(RunConfig::from_toml(&text).unwrap(), run);
    }
}
