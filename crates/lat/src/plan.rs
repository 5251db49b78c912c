//! Memory plans: what a command will need, computed from the configuration alone before anything
//! large is allocated, so that what cannot fit is refused with the setting to change instead of
//! dying half-way (or taking the machine's memory from everything else).
//!
//! The plan counts what the code keeps: the parameters (and for training their gradients and
//! AdamW's two moments, and with bf16 the compute copy), the activations a step keeps for its
//! backward pass (every block's for a sequential stack; for a reversible one the two streams
//! plus one block's, whatever the depth, or every block's when it keeps them), the largest
//! transient of a backward pass, the logits and their gradient, and for decoding the per-stream
//! state (at its bound) and the peak of reading a prompt piece. Tests hold it to within 25 % of
//! the peak a counting allocator measures.

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::layers::feed_forward::FeedForward;
use crate::LinearAttentionTransformerLM;

/// One line of a plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Item {
    /// What it is.
    pub what: String,
    /// Bytes.
    pub bytes: u64,
}

/// What a workload needs, line by line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// The workload, in words.
    pub workload: String,
    /// The lines.
    pub items: Vec<Item>,
    /// Their sum.
    pub total: u64,
}

impl Plan {
    fn new(workload: String, items: Vec<(String, u64)>) -> Self {
        let items: Vec<Item> = items.into_iter().filter(|(_, b)| *b > 0).map(|(what, bytes)| Item { what, bytes }).collect();
        let total = items.iter().map(|i| i.bytes).sum();
        Self { workload, items, total }
    }

    /// The plan as a table.
    pub fn table(&self) -> String {
        let width = self.items.iter().map(|i| i.what.len()).max().unwrap_or(0).max(5);
        let mut out = format!("memory plan: {}\n", self.workload);
        for i in &self.items {
            out.push_str(&format!("  {:<width$}  {:>10}\n", i.what, human(i.bytes)));
        }
        out.push_str(&format!("  {:<width$}  {:>10}\n", "total", human(self.total)));
        out
    }
}

/// Bytes as KiB, MiB or GiB.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1048575 => format!("{:.1} KiB", b / 1024.0),
        1048576..=1073741823 => format!("{:.1} MiB", b / 1048576.0),
        _ => format!("{:.2} GiB", b / 1073741824.0),
    }
}

/// What runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Workload {
    /// Training steps on `batch` windows of `seq_len` tokens, computing in `bytes_per_value`
    /// (4 for f32, 2 for bf16 mixed precision).
    Train {
        /// Windows per micro-batch.
        batch: usize,
        /// Tokens per window.
        seq_len: usize,
        /// 4 (f32) or 2 (bf16).
        bytes_per_value: usize,
        /// Whether a reversible stack keeps every block's activations (see
        /// [`crate::Pass::keep_activations`]).
        keep_activations: bool,
    },
    /// Inference over `batch` sequences of `seq_len` tokens (eval, logits).
    Forward {
        /// Sequences per pass.
        batch: usize,
        /// Tokens per sequence.
        seq_len: usize,
    },
    /// Generation of `streams` rows after prompts of `prompt_len` tokens.
    Generate {
        /// Rows decoded together.
        streams: usize,
        /// Tokens per prompt.
        prompt_len: usize,
    },
}

/// The shapes the plan is made of.
struct Shape {
    /// Rows of one pass: batch × padded length.
    rows: u64,
    /// Bytes per activation value.
    f: u64,
    d: u64,
    vocab: u64,
    emb: u64,
}

/// Bytes a block keeps for its backward pass, the most it holds at once when recomputed just
/// before its backward pass (a reversible stack: feed-forward layers go piece by piece), and the
/// most its backward pass adds.
struct BlockCost {
    kept: u64,
    at_once: u64,
    backward: u64,
}

/// What each block of `config`'s stack keeps for `rows` rows of `batch` sequences: on the fused
/// CPU kernels (f32), or where candle's autograd differentiates the plain versions (bf16 on the
/// CPU), whose graph keeps every intermediate and whose attention is quadratic in the window
/// (local heads) or the length (causal global heads).
fn blocks(config: &Config, s: &Shape, batch: u64) -> Vec<BlockCost> {
    if s.f == 2 {
        return autograd_blocks(config, s, batch);
    }
    let c = config.transformer();
    let (rows, f, d) = (s.rows, s.f, s.d);
    let n = rows / batch.max(1);
    let he = (c.heads * c.dim_head()) as u64;
    let heads = c.heads as u64;
    // The normalised input and the residual stream after the block.
    let around = 2 * rows * d * f;
    let attention = |he: u64| {
        // qkv, the kernel's outputs with two statistics per row and head.
        let kept = around + rows * (3 * he + he) * f + batch * heads * n * 2 * f;
        // The output's gradient through to_out, d qkv, and the input gradient.
        BlockCost { kept, at_once: kept, backward: rows * (he + 3 * he + 2 * d) * f }
    };
    let hidden = (4 * config.dim) as u64;
    let pieces = FeedForward::pieces(c.ff_chunks, batch as usize, n as usize);
    let piece_rows = batch * pieces.iter().map(|&(_, len)| len as u64).max().unwrap_or(0);
    let cut = if pieces.len() > 1 { 1 } else { 0 };
    // Pre-activations and activations (with GLU: twice the pre-activations, the gate's, the gate
    // and the value), the dropout factors, and the input rows when cut in pieces.
    let per_row = hidden * if config.ff_glu { 6 } else { 2 } + if config.ff_dropout > 0.0 { hidden } else { 0 } + cut * d;
    let feed_forward = BlockCost { kept: around + rows * per_row * f, at_once: around + piece_rows * per_row * f, backward: (rows * 2 * d + piece_rows * 2 * hidden) * f };
    // Queries (1024 wide), their norm, 2 × 4 × 128 sub-key scores, 4 × 32² candidate scores, and
    // the candle graph around them.
    let pkm_kept = around + rows * (3 * 1024 + 1024 + 4096) * f;
    let pkm = BlockCost { kept: pkm_kept, at_once: pkm_kept, backward: rows * (2 * 1024 + 4096 + 2 * d) * f };
    let mut out = vec![];
    for layer in 0..c.depth {
        out.push(match c.linformer_settings {
            Some(l) => {
                let kept = around + rows * (3 * he) * f + batch * heads * n * l.k as u64 * 3 * f;
                BlockCost { kept, at_once: kept, backward: rows * (3 * he + 2 * d) * f }
            }
            None => attention(he),
        });
        out.push(if c.pkm_layers.contains(&(layer + 1)) { pkm.clone_cost() } else { feed_forward.clone_cost() });
        if c.attend_axially {
            // The folded copies of the input and the output beside the attention's.
            let axial = attention((c.heads * (c.dim / c.heads)) as u64);
            let kept = axial.kept + 2 * rows * d * f;
            out.push(BlockCost { kept, at_once: kept, backward: axial.backward + 2 * rows * d * f });
            out.push(feed_forward.clone_cost());
        }
        if c.receives_context {
            let kept = around + rows * 2 * he * f;
            out.push(BlockCost { kept, at_once: kept, backward: rows * (2 * he + 2 * d) * f });
            out.push(feed_forward.clone_cost());
        }
    }
    out
}

/// [`blocks`] through candle's autograd and the plain kernels.
fn autograd_blocks(config: &Config, s: &Shape, batch: u64) -> Vec<BlockCost> {
    let c = config.transformer();
    let (rows, f, d) = (s.rows, s.f, s.d);
    let n = rows / batch.max(1);
    let he = (c.heads * c.dim_head()) as u64;
    let hidden = (4 * config.dim) as u64 * if config.ff_glu { 2 } else { 1 };
    let slots = if c.causal { 2 } else { 3 } * c.local_attn_window_size as u64;
    let ff_kept = rows * (2 * d + 8 * hidden) * f;
    let feed_forward = BlockCost { kept: ff_kept, at_once: ff_kept, backward: rows * (3 * hidden + 2 * d) * f };
    let mut out = vec![];
    for layer in 0..c.depth {
        let local = c.local_heads(layer) as u64;
        let global = c.heads as u64 - local;
        // Scores, weights and their products; the local heads' visibility (bytes), dropout
        // factors (f64 and cast) and masked scores.
        let quadratic = if c.causal { batch * global * n * n * 3 * f + n * n * (4 + f) } else { 0 };
        let windows = batch * local * n * slots * (5 * f + 9);
        let kept = rows * (2 * d + 10 * he) * f + quadratic + windows;
        out.push(BlockCost { kept, at_once: kept, backward: rows * (4 * he + 2 * d) * f + quadratic + windows });
        out.push(feed_forward.clone_cost());
        if c.attend_axially || c.receives_context {
            let kept = rows * (2 * d + 10 * he) * f;
            out.push(BlockCost { kept, at_once: kept, backward: rows * (4 * he + 2 * d) * f });
            out.push(feed_forward.clone_cost());
        }
    }
    out
}

impl BlockCost {
    fn clone_cost(&self) -> BlockCost {
        BlockCost { kept: self.kept, at_once: self.at_once, backward: self.backward }
    }
}

/// The plan of running `model` (or, before it exists, a model of `config`) on `work`.
pub fn plan(config: &Config, parameters: u64, work: Workload) -> Result<Plan> {
    config.validate()?;
    let unit = config.pad_to_multiple();
    let padded = |n: usize| n.div_ceil(unit) * unit;
    let p4 = parameters * 4;
    let d = config.dim as u64;
    let vocab = if config.return_embeddings { config.emb_dim() as u64 } else { config.num_tokens as u64 };
    let shape = |batch: usize, len: usize, f: u64| Shape { rows: (batch * padded(len)) as u64, f, d, vocab, emb: config.emb_dim() as u64 };
    Ok(match work {
        Workload::Train { batch, seq_len, bytes_per_value, keep_activations } => {
            let s = shape(batch, seq_len, bytes_per_value as u64);
            let costs = blocks(config, &s, batch as u64);
            let recomputes = crate::pass::recomputes(config.reversible, keep_activations);
            let activations = if recomputes {
                // The two streams and their gradients, the pair being recomputed, and one
                // block's kept activations.
                6 * s.rows * d * s.f + costs.iter().map(|c| c.at_once).max().unwrap_or(0)
            } else {
                // A reversible stack's two streams and their gradients come on top.
                costs.iter().map(|c| c.kept).sum::<u64>() + if config.reversible { 4 * s.rows * d * s.f } else { 0 }
            };
            let backward = costs.iter().map(|c| c.backward).max().unwrap_or(0);
            let head = head_bytes(&s) + s.rows * s.vocab * 4;
            let mut items = vec![("parameters (f32)".to_string(), p4), ("gradients".to_string(), p4), ("AdamW moments".to_string(), 2 * p4)];
            if bytes_per_value == 2 {
                items.push(("bf16 copy of the weights and its gradients".to_string(), 2 * parameters * 2));
            }
            items.push((
                format!(
                    "activations kept for the backward pass ({}, {} blocks)",
                    match (config.reversible, recomputes) {
                        (true, true) => "reversible: one block's",
                        (true, false) => "reversible, kept: every block's",
                        _ => "sequential: every block's",
                    },
                    costs.len()
                ),
                activations,
            ));
            items.push(("the largest backward transient".to_string(), backward));
            items.push(("embeddings, logits, loss and their gradients".to_string(), head));
            Plan::new(format!("training, batch {batch} × {seq_len} tokens, {}", if bytes_per_value == 2 { "bf16" } else { "f32" }), items)
        }
        Workload::Forward { batch, seq_len } => {
            let s = shape(batch, seq_len, 4);
            // Inference keeps nothing between blocks but the residual streams (two, reversibly);
            // the largest of one block's intermediates and the head's comes on top.
            let streams = if config.reversible { 2 } else { 1 };
            let transient = inference_block(config, &s, batch as u64).max(head_bytes(&s));
            Plan::new(
                format!("forward, batch {batch} × {seq_len} tokens"),
                vec![
                    ("parameters (f32)".to_string(), p4),
                    ("residual streams".to_string(), streams * s.rows * d * 4),
                    ("the largest intermediates (a block's, or the logits')".to_string(), transient),
                ],
            )
        }
        Workload::Generate { streams, prompt_len } => {
            let s = shape(1, prompt_len.min(crate::PROMPT_CHUNK), 4);
            let one_block = blocks(config, &s, 1).iter().map(|c| c.kept).max().unwrap_or(0);
            let state = LinearAttentionTransformerLM::state_bound(config)?;
            Plan::new(
                format!("generation, {streams} stream{} after {prompt_len} prompt tokens", if streams == 1 { "" } else { "s" }),
                vec![
                    ("parameters (f32)".to_string(), p4),
                    (format!("decoding states ({streams} × {})", human(state)), streams as u64 * state),
                    ("reading a prompt piece".to_string(), 2 * s.rows * d * 4 + one_block + head_bytes(&s)),
                    ("one decoding step".to_string(), streams as u64 * (8 * d + 2 * vocab) * 4),
                ],
            )
        }
    })
}

/// The most one block holds at once in inference: the attention's projections and outputs, or
/// the feed-forward layer's pre-activations and activations.
fn inference_block(config: &Config, s: &Shape, batch: u64) -> u64 {
    let c = config.transformer();
    let he = (c.heads * c.dim_head()) as u64;
    let n = s.rows / batch.max(1);
    let attention = s.rows * (4 * he + s.d) * s.f + batch * c.heads as u64 * n * 2 * s.f;
    let hidden = (4 * config.dim) as u64;
    let feed_forward = s.rows * (hidden * if config.ff_glu { 6 } else { 2 } + s.d) * s.f;
    attention.max(feed_forward) + s.rows * s.d * s.f
}

/// The embeddings and positions, the final norm and the logits of one pass.
fn head_bytes(s: &Shape) -> u64 {
    s.rows * (2 * s.emb + 2 * s.d + s.vocab) * s.f
}

/// Memory the system can give this process: the cgroup's limit (less what the cgroup already
/// uses) where one is set, else `MemAvailable`; None where neither can be read.
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("MemAvailable:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).map(|kb| kb * 1024)));
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let cgroup = match (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        (Some(max), used) => Some(max.saturating_sub(used.unwrap_or(0))),
        _ => read("/sys/fs/cgroup/memory/memory.limit_in_bytes").filter(|&l| l < 1 << 60).map(|l| l.saturating_sub(read("/sys/fs/cgroup/memory/memory.usage_in_bytes").unwrap_or(0))),
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Refuses a plan that needs more than `limit` (or, without one, what [`available`] says),
/// with one line: the estimate, what is available, and `advice` on what to change.
pub fn check(plan: &Plan, limit: Option<u64>, advice: &str) -> Result<()> {
    let Some(have) = limit.or_else(available) else { return Ok(()) };
    if plan.total <= have {
        return Ok(());
    }
    Err(Error::input(format!(
        "{} needs about {} of memory but {} is available{}; {advice} (or pass --force to run anyway)",
        plan.workload,
        human(plan.total),
        human(have),
        if limit.is_some() { " under --max-memory" } else { "" },
    )))
}
