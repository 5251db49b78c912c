//! `lat check [--device cpu|cuda]`: checks this build's kernels and model on a device against
//! the plain CPU reference, and `lat kernel-bench`: times one attention kernel, forward and
//! backward.
//!
//! `check` runs each attention form (causal linear, non-causal linear, local) forward and
//! backward on random inputs, in f32 and (on a GPU) bf16, against the plain version in f64 on
//! the CPU; then, on a GPU, a model's logits and a training step's gradients against the CPU.
//! It prints one line per check and fails if any is out of tolerance.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use linear_attention_transformer::kernels::local::Windows;
use linear_attention_transformer::kernels::{causal_linear, cross_entropy::cross_entropy_rows, linear, local};
use linear_attention_transformer::rng::Rng;
use linear_attention_transformer::train::Precision;
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};

use super::{device, usage, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    CausalLinear,
    Linear,
    Local,
}

/// One attention call: the form and its geometry.
#[derive(Clone, Copy, Debug)]
struct Attention {
    op: Op,
    b: usize,
    n: usize,
    h: usize,
    e: usize,
    bucket: usize,
    window: usize,
    causal: bool,
}

impl Attention {
    fn shape(&self) -> (usize, usize, usize, usize) {
        (self.b, self.n, self.h, self.e)
    }

    /// Through the dispatch the model uses: fused CPU kernels, GPU kernels, or plain ops.
    fn run(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let w = Windows { size: self.window, causal: self.causal };
        Ok(match self.op {
            Op::CausalLinear => causal_linear::causal_linear_attention(q, k, v, mask, self.bucket)?,
            Op::Linear => linear::linear_attention(q, k, v, mask)?,
            Op::Local => local::local_attention(q, k, v, mask, w, None)?,
        })
    }

    /// The plain version.
    fn reference(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let w = Windows { size: self.window, causal: self.causal };
        Ok(match self.op {
            Op::CausalLinear => causal_linear::reference(q, k, v, mask, self.bucket)?,
            Op::Linear => linear::reference(q, k, v, mask)?,
            Op::Local => local::reference(q, k, v, mask, w, None)?,
        })
    }
}

fn random(shape: (usize, usize, usize, usize), scale: f64, rng: &mut Rng) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Ok(Tensor::from_vec((0..n).map(|_| (rng.normal() * scale) as f32).collect::<Vec<_>>(), shape, &Device::Cpu)?)
}

/// Output and (q, k, v) gradients of `f` for the output gradient `g`.
fn with_grads(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    let (qv, kv, vv) = (Var::from_tensor(q)?, Var::from_tensor(k)?, Var::from_tensor(v)?);
    let out = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;
    let grads = (&out * g.to_dtype(out.dtype())?)?.sum_all()?.backward()?;
    let mut all = vec![out];
    for x in [&qv, &kv, &vv] {
        all.push(grads.get(x.as_tensor()).cloned().ok_or_else(|| usage("a kernel input got no gradient"))?);
    }
    Ok(all)
}

/// max |a - b| / max |b|, on the CPU in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(if diff.is_nan() { f64::INFINITY } else { diff / scale })
}

struct Report {
    failures: usize,
}

impl Report {
    fn line(&mut self, what: &str, err: f64, tol: f64) {
        let ok = err <= tol;
        self.failures += !ok as usize;
        println!("{} {what}: relative error {err:.2e} (tolerance {tol:.0e})", if ok { "ok  " } else { "FAIL" });
    }
}

fn check_attention(a: Attention, dtype: DType, dev: &Device, report: &mut Report) -> Result<()> {
    let mut rng = Rng::new(a.n as u64 * 31 + a.e as u64);
    let round = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?) };
    let kv_len = if a.op == Op::Linear { a.n + 37 } else { a.n };
    let kshape = (a.b, kv_len, a.h, a.e);
    let q = round(random(a.shape(), 1.0, &mut rng)?)?;
    let k = round(random(kshape, 1.5, &mut rng)?)?;
    let v = round(random(kshape, 1.0, &mut rng)?)?;
    let g = round(random(a.shape(), 1.0, &mut rng)?)?;
    let mask: Vec<u8> = (0..a.b * kv_len).map(|i| (i % 7 != 3) as u8).collect();
    let mask = Tensor::from_vec(mask, (a.b, kv_len), &Device::Cpu)?;
    let f64s = |t: &Tensor| t.to_dtype(DType::F64);
    let want = with_grads(&f64s(&q)?, &f64s(&k)?, &f64s(&v)?, &f64s(&g)?, |q, k, v| a.reference(q, k, v, Some(&mask)))?;
    let on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(dev)?.to_dtype(dtype)?) };
    let dmask = mask.to_device(dev)?;
    let got = with_grads(&on(&q)?, &on(&k)?, &on(&v)?, &on(&g)?, |q, k, v| a.run(q, k, v, Some(&dmask)))?;
    let tol = if dtype == DType::BF16 { 3e-2 } else { 1e-4 };
    for (name, (x, y)) in ["output", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
        let what = format!("{:?} {dtype:?} b{} n{} h{} e{} bucket {} window {} causal {}: {name}", a.op, a.b, a.n, a.h, a.e, a.bucket, a.window, a.causal);
        report.line(&what, rel_err(x, y)?, tol);
    }
    Ok(())
}

fn check_model(dev: &Device, report: &mut Report) -> Result<()> {
    let mut c = Config::new(256, 128, 2, 512);
    c.heads = 8;
    c.dim_head = Some(16);
    c.causal = true;
    c.blindspot_size = 64;
    c.n_local_attn_heads = LocalHeads::Uniform(4);
    c.local_attn_window_size = 64;
    c.reversible = true;
    c.ff_chunks = 2;
    let cpu = LinearAttentionTransformerLM::new(&c, 7, &Device::Cpu, DType::F32)?;
    let on_dev = LinearAttentionTransformerLM::new(&c, 7, dev, DType::F32)?;
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..2 * 512).map(|_| rng.below(256) as u32).collect();
    let targets: Vec<u32> = ids.iter().map(|&t| (t * 7 + 1) % 256).collect();
    let tokens = Tensor::from_vec(ids, (2, 512), &Device::Cpu)?;
    let step = |m: &LinearAttentionTransformerLM| -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let pass = Pass::eval();
        let logits = m.forward(&tokens.to_device(m.device())?, &Inputs::default(), &pass)?;
        let loss = cross_entropy_rows(&logits.reshape((2 * 512, 256))?, &targets)?.mean_all()?;
        let grads = loss.backward()?;
        let g = m.vars().into_iter().filter_map(|(name, var)| grads.get(var.as_tensor()).map(|g| (name, g.clone()))).collect();
        Ok((logits, g))
    };
    let (want, want_grads) = step(&cpu)?;
    let (got, got_grads) = step(&on_dev)?;
    report.line("model logits f32", rel_err(&got, &want)?, 1e-3);
    let worst = got_grads.iter().zip(&want_grads).map(|((_, a), (_, b))| rel_err(a, b)).collect::<Result<Vec<_>>>()?.into_iter().fold(0.0, f64::max);
    report.line(&format!("training gradients f32 (worst of {} parameters)", want_grads.len()), worst, 1e-3);
    if got_grads.len() != want_grads.len() {
        report.line("every parameter has a gradient", 1.0, 0.0);
    }
    let bf16 = on_dev.cast(DType::BF16)?.forward(&tokens.to_device(dev)?, &Inputs::default(), &Pass::eval())?;
    // bfloat16 keeps 8 bits of mantissa: through two layers the logits move by a few percent.
    report.line("model logits bf16", rel_err(&bf16, &want)?, 8e-2);
    Ok(())
}

#[derive(clap::Args)]
pub struct CheckArgs {
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn check(a: CheckArgs) -> Result<()> {
    let dev = device::parse(&a.device)?;
    let dtypes: &[DType] = if dev.is_cpu() { &[DType::F32] } else { &[DType::F32, DType::BF16] };
    let mut report = Report { failures: 0 };
    let shapes = [
        Attention { op: Op::CausalLinear, b: 2, n: 200, h: 3, e: 64, bucket: 1, window: 0, causal: true },
        Attention { op: Op::CausalLinear, b: 1, n: 256, h: 2, e: 64, bucket: 64, window: 0, causal: true },
        Attention { op: Op::CausalLinear, b: 1, n: 96, h: 2, e: 32, bucket: 8, window: 0, causal: true },
        Attention { op: Op::Linear, b: 2, n: 150, h: 2, e: 64, bucket: 1, window: 0, causal: false },
        Attention { op: Op::Local, b: 2, n: 256, h: 2, e: 64, bucket: 1, window: 128, causal: true },
        Attention { op: Op::Local, b: 1, n: 192, h: 2, e: 32, bucket: 1, window: 64, causal: false },
    ];
    for &dtype in dtypes {
        for a in shapes {
            check_attention(a, dtype, &dev, &mut report)?;
        }
    }
    // On the CPU the model would be compared with itself.
    if !dev.is_cpu() {
        check_model(&dev, &mut report)?;
    }
    if report.failures > 0 {
        return Err(usage(format!("{} checks failed", report.failures)));
    }
    println!("all checks passed on {}", a.device);
    Ok(())
}

#[derive(clap::Args)]
pub struct KernelBenchArgs {
    #[arg(long, value_enum)]
    op: Op,
    /// Batch sizes (comma-separated: every combination of the lists is timed).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "8")]
    heads: Vec<usize>,
    #[arg(long, value_delimiter = ',', required = true)]
    seq_len: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    dim_head: usize,
    /// Blind-spot bucket (causal-linear).
    #[arg(long, default_value_t = 1)]
    bucket: usize,
    /// Window (local).
    #[arg(long, default_value_t = 128)]
    window: usize,
    #[arg(long, default_value = "bf16")]
    precision: Precision,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Times forward, and forward plus backward, of one attention kernel for every combination of
/// sizes: medians in ms, one JSON line each.
pub fn kernel_bench(a: KernelBenchArgs) -> Result<()> {
    let dev = device::parse(&a.device)?;
    let dtype = a.precision.dtype();
    if a.steps == 0 || a.seq_len.contains(&0) || a.batch.contains(&0) || a.heads.contains(&0) {
        return Err(usage("--steps, --seq-len, --batch and --heads must be at least 1"));
    }
    for &b in &a.batch {
        for &h in &a.heads {
            for &n in &a.seq_len {
                let att = Attention { op: a.op, b, n, h, e: a.dim_head, bucket: a.bucket, window: a.window, causal: a.op != Op::Linear };
                let (fwd, both) = time_kernel(att, dtype, &dev, a.steps)?;
                println!(
                    "{}",
                    serde_json::json!({
                        "implementation": "lat",
                        "op": format!("{:?}", a.op),
                        "batch": b, "heads": h, "seq_len": n, "dim_head": a.dim_head,
                        "precision": if dtype == DType::BF16 { "bf16" } else { "f32" },
                        "forward_ms": fwd,
                        "forward_backward_ms": both,
                        "device": a.device,
                    })
                );
            }
        }
    }
    Ok(())
}

/// Median forward and forward+backward times in ms, after two untimed runs.
fn time_kernel(att: Attention, dtype: DType, dev: &Device, steps: usize) -> Result<(f64, f64)> {
    let mut rng = Rng::new(1);
    let mut input = |scale| -> Result<Var> { Ok(Var::from_tensor(&random(att.shape(), scale, &mut rng)?.to_device(dev)?.to_dtype(dtype)?)?) };
    let (q, k, v, g) = (input(1.0)?, input(1.0)?, input(1.0)?, input(1.0)?);
    // Reading one value back waits for the device.
    let sync = |t: &Tensor| -> Result<()> {
        t.flatten_all()?.narrow(0, 0, 1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(())
    };
    let (mut fwd, mut both) = (vec![], vec![]);
    for i in 0..steps + 2 {
        let t0 = Instant::now();
        let out = att.run(&q, &k, &v, None)?;
        sync(&out)?;
        let t1 = t0.elapsed().as_secs_f64();
        let grads = (&out * g.as_tensor().detach())?.sum_all()?.backward()?;
        sync(grads.get(&q).ok_or_else(|| usage("no gradient"))?)?;
        if i >= 2 {
            fwd.push(t1 * 1e3);
            both.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok((super::bench::median(fwd), super::bench::median(both)))
}
