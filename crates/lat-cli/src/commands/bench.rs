//! `lat bench (--preset seed | --config CONFIG.json) --mode forward|train|generate --seq-len N
//! [--batch B] [--steps K] [--precision f32|bf16] [--device cpu|cuda] [--json]`
//!
//! Times one configuration in this process: `forward` (inference), `train` (forward,
//! cross-entropy, backward and an AdamW step, like the reference's training step) or `generate`
//! (a prompt of `--seq-len` tokens, then `--new-tokens` tokens). Prints the median over
//! `--steps` timed repetitions after `--warmup` untimed ones, and the process's peak RSS; for
//! `generate` also the time to the first new token and the time per token after it. Every
//! record carries the FLOPs of the step's matrix products and this machine's measured FMA peak,
//! so that a step's sustained fraction of the peak can be read off.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use linear_attention_transformer::generate::{generate, Sampling};
use linear_attention_transformer::kernels::cross_entropy::cross_entropy_rows;
use linear_attention_transformer::plan::Workload;
use linear_attention_transformer::rng::Rng;
use linear_attention_transformer::train::optim::{AdamW, AdamWConfig};
use linear_attention_transformer::train::Precision;
use linear_attention_transformer::{checkpoint, Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};

use super::{device, usage, Result};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Forward,
    Train,
    Generate,
}

#[derive(clap::Args)]
pub struct Args {
    /// A named configuration: `seed` (the reference's benchmark model), `tiny`, or `default`
    /// (the training default).
    #[arg(long, conflicts_with_all = ["config", "model"])]
    preset: Option<String>,
    /// The model's keyword arguments as JSON (random weights).
    #[arg(long, conflicts_with = "model")]
    config: Option<PathBuf>,
    /// A model file (its weights and configuration).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Sequence length (the prompt length for generate).
    #[arg(long)]
    seq_len: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed repetitions.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// New tokens per generation.
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    /// Generate the reference's way, re-running the whole sequence per token.
    #[arg(long)]
    no_cache: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// bf16: forward in bfloat16; train in mixed precision (bfloat16 compute, f32 weights).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Train: a reversible stack keeps every block's activations instead of recomputing them in
    /// the backward pass (faster, for a sequential stack's memory).
    #[arg(long)]
    keep_activations: bool,
    #[command(flatten)]
    memory: super::memory::MemoryArgs,
}

/// The named configurations, with `max_seq_len` set to the benchmark length.
pub fn preset(name: &str, seq_len: usize) -> Result<Config> {
    let round = |n: usize, unit: usize| n.div_ceil(unit) * unit;
    let c = match name {
        "seed" => {
            let mut c = Config::new(256, 512, 6, round(seq_len, 128));
            c.heads = 8;
            c.dim_head = Some(64);
            c.causal = true;
            c.blindspot_size = 64;
            c.n_local_attn_heads = LocalHeads::Uniform(4);
            c.local_attn_window_size = 128;
            c.reversible = true;
            c.ff_chunks = 2;
            c
        }
        "tiny" => {
            let mut c = Config::new(256, 128, 2, round(seq_len, 128));
            c.heads = 4;
            c.dim_head = Some(32);
            c.causal = true;
            c.n_local_attn_heads = LocalHeads::Uniform(2);
            c
        }
        "default" => {
            let mut c = linear_attention_transformer::train::default_model();
            c.max_seq_len = round(seq_len, c.local_attn_window_size);
            c
        }
        other => return Err(usage(format!("unknown preset \"{other}\": seed, tiny or default"))),
    };
    Ok(c)
}

/// Peak resident memory of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(a: Args) -> Result<()> {
    let dev = device::parse(&a.device)?;
    if a.seq_len == 0 || a.batch == 0 || a.steps == 0 {
        return Err(usage("--seq-len, --batch and --steps must be at least 1"));
    }
    let trainable = a.mode == Mode::Train;
    let config = match (&a.preset, &a.config, &a.model) {
        (Some(p), _, _) => preset(p, a.seq_len + if a.mode == Mode::Generate { a.new_tokens } else { 0 })?,
        (_, Some(c), _) => Config::from_file(c)?,
        (_, _, Some(m)) => checkpoint::peek(m)?.0,
        _ => return Err(usage("give --preset, --config or --model")),
    };
    let work = match a.mode {
        Mode::Train => Workload::Train { batch: a.batch, seq_len: a.seq_len, bytes_per_value: a.precision.dtype().size_in_bytes(), keep_activations: a.keep_activations },
        Mode::Forward => Workload::Forward { batch: a.batch, seq_len: a.seq_len },
        Mode::Generate => Workload::Generate { streams: a.batch, prompt_len: a.seq_len },
    };
    a.memory.check(&super::plan::inference_plan(&config, work)?, |_| "lower --batch or --seq-len".to_string())?;
    let model = match &a.model {
        Some(m) => checkpoint::load(m, &dev, trainable)?,
        None => LinearAttentionTransformerLM::new(&config, 0, &dev, DType::F32)?,
    };
    let v = model.config().num_tokens;
    let mut rng = Rng::new(1);
    let mut tokens = |n: usize| -> Result<Tensor> {
        let ids: Vec<u32> = (0..a.batch * n).map(|_| rng.below(v as u64) as u32).collect();
        Ok(Tensor::from_vec(ids, (a.batch, n), &dev)?)
    };
    let mut opt = if trainable { Some(AdamW::new(model.vars(), AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 })?) } else { None };
    let bf16 = a.precision == Precision::Bf16;
    if bf16 && a.mode == Mode::Generate {
        return Err(usage("--precision bf16 applies to forward and train"));
    }
    let inference = model.cast(a.precision.dtype())?;
    let mut times = Vec::with_capacity(a.steps);
    // Generation: time to the first new token (reading the prompt) and per token after it.
    let (mut first_token, mut per_token) = (Vec::new(), Vec::new());
    for i in 0..a.warmup + a.steps {
        let x = tokens(a.seq_len)?;
        let t0 = Instant::now();
        match a.mode {
            Mode::Forward => {
                let logits = inference.forward(&x, &Inputs::default(), &Pass::eval())?;
                // Wait for the result (asynchronous devices).
                logits.narrow(1, 0, 1)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            }
            Mode::Train => {
                let y: Vec<u32> = x.flatten_all()?.to_vec1::<u32>()?.iter().map(|&t| (t + 1) % v as u32).collect();
                let pass = Pass::train(i as u64).keep_activations(a.keep_activations);
                // Mixed precision: a bfloat16 copy of the f32 weights per step, as `lat train` does.
                let step_model = model.cast(a.precision.dtype())?;
                let logits = step_model.forward(&x, &Inputs::default(), &pass)?.to_dtype(DType::F32)?;
                let (b, n, _) = logits.dims3()?;
                let loss = cross_entropy_rows(&logits.reshape((b * n, v))?, &y)?.mean_all()?;
                let grads = model.grads_from(&step_model, loss.backward()?)?;
                opt.as_mut().expect("training mode has an optimizer").step(&grads, 1e-4, 1.0)?;
                loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            }
            Mode::Generate => {
                let prompts: Vec<Vec<u32>> = x.to_vec2::<u32>()?;
                let mut stamps = Vec::with_capacity(a.new_tokens);
                generate(&model, &prompts, a.new_tokens, &Sampling::greedy(), 0, None, !a.no_cache, &mut |row, _| {
                    if row == 0 {
                        stamps.push(t0.elapsed().as_secs_f64());
                    }
                })?;
                if let (true, Some(&first), Some(&last)) = (i >= a.warmup, stamps.first(), stamps.last()) {
                    first_token.push(first);
                    if stamps.len() > 1 {
                        per_token.push((last - first) / (stamps.len() - 1) as f64 * 1e3);
                    }
                }
            }
        }
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let med = median(times.clone());
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let produced = match a.mode {
        Mode::Generate => a.batch * a.new_tokens,
        _ => a.batch * a.seq_len,
    };
    // The products' FLOPs per step: 2 per weight per token forward; a training step adds the
    // two products of the backward pass, and a reversible stack recomputes the forward unless
    // it keeps its activations.
    let weights: usize = model.params().iter().filter(|p| p.linear).map(|p| p.tensor.elem_count()).sum();
    let passes = match a.mode {
        Mode::Train => 3 + usize::from(linear_attention_transformer::pass::recomputes(model.config().reversible, a.keep_activations)),
        Mode::Forward | Mode::Generate => 1,
    };
    let flops = 2.0 * weights as f64 * produced as f64 * passes as f64;
    let record = serde_json::json!({
        "mode": match a.mode { Mode::Forward => "forward", Mode::Train => "train", Mode::Generate => "generate" },
        "seq_len": a.seq_len,
        "batch": a.batch,
        "steps": a.steps,
        "median_s": med,
        "min_s": min,
        "tokens_per_s": produced as f64 / med,
        "peak_rss_mib": peak_rss_mib(),
        "parameters": model.num_parameters(),
        "new_tokens": if a.mode == Mode::Generate { Some(a.new_tokens) } else { None },
        "cache": if a.mode == Mode::Generate { Some(!a.no_cache) } else { None },
        "first_token_s": (!first_token.is_empty()).then(|| median(first_token)),
        "per_token_ms": (!per_token.is_empty()).then(|| median(per_token)),
        "kernels": kernel_kind(&dev, if bf16 { DType::BF16 } else { DType::F32 })?,
        "matrix_kernels": linear_attention_transformer::kernels::matrix_isa(),
        "quantization": model.quantization().map(|q| q.to_string()),
        "product_gflops_per_s": flops / med / 1e9,
        "fma_peak_gflops_per_s": dev.is_cpu().then(fma_peak_gflops),
        "precision": if bf16 { "bf16" } else { "f32" },
        "keep_activations": a.mode == Mode::Train && a.keep_activations,
        "threads": rayon_threads(),
        "device": a.device,
    });
    if a.json {
        println!("{record}");
    } else {
        println!(
            "{} seq_len {} batch {}: median {:.4} s ({:.0} tokens/s), min {:.4} s, peak RSS {:.0} MiB",
            record["mode"].as_str().unwrap_or_default(),
            a.seq_len,
            a.batch,
            med,
            produced as f64 / med,
            min,
            peak_rss_mib()
        );
    }
    Ok(())
}

/// This machine's f32 FMA peak with every thread of the pool: each thread runs independent
/// chains of fused multiply-adds (enough to hide their latency) for a tenth of a second.
pub fn fma_peak_gflops() -> f64 {
    const ROUNDS: usize = 2_000_000;
    let start = Instant::now();
    let per_thread = rayon::broadcast(|_| fma_chains(ROUNDS));
    let seconds = start.elapsed().as_secs_f64();
    per_thread.iter().sum::<f64>() / seconds / 1e9
}

/// FLOPs done by `rounds` rounds of 12 chains of FMAs as wide as the matrix products' (16 lanes
/// where they use AVX-512, whose units are twice as wide on some CPUs, 8 with AVX2, else
/// scalar).
fn fma_chains(rounds: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if linear_attention_transformer::kernels::matrix_isa() == "avx512" {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { fma_chains_avx512(rounds) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { fma_chains_avx2(rounds) };
    }
    let mut acc = [1f32; 12];
    for _ in 0..rounds {
        for a in &mut acc {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    (rounds * 12 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(rounds: usize) -> f64 {
    use std::arch::x86_64::*;
    let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..rounds {
        for a in &mut acc {
            *a = _mm256_fmadd_ps(*a, m, c);
        }
    }
    std::hint::black_box(acc);
    (rounds * 12 * 8 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_avx512(rounds: usize) -> f64 {
    use std::arch::x86_64::*;
    let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); 12];
    for _ in 0..rounds {
        for a in &mut acc {
            *a = _mm512_fmadd_ps(*a, m, c);
        }
    }
    std::hint::black_box(acc);
    (rounds * 12 * 16 * 2) as f64
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Which attention kernels run: the fused CPU ones, the GPU ones, or the plain reference ops.
fn kernel_kind(dev: &candle_core::Device, dtype: DType) -> Result<&'static str> {
    use linear_attention_transformer::kernels::{use_fused, use_gpu};
    let probe = Tensor::zeros(1, dtype, dev)?;
    Ok(if use_fused(&probe) {
        "fused"
    } else if use_gpu(&probe) {
        "gpu"
    } else {
        "reference"
    })
}
