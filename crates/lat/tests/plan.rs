//! The memory plan against what the code really allocates: for every kind of workload
//! (training, f32 and bf16, sequential and reversible, reversible keeping its activations, with
//! and without local heads, blind spots
//! of 1 and 64; a forward pass; generation), the plan must be within 25 % of the peak heap a
//! counting allocator measures (this file is its own test binary and runs its cases one after
//! another).

#[path = "common/counting.rs"]
mod counting;

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::kernels::cross_entropy::cross_entropy_rows;
use linear_attention_transformer::plan::{plan, Workload};
use linear_attention_transformer::train::optim::{AdamW, AdamWConfig};
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};

fn config(dim: usize, depth: usize, local: usize, bucket: usize, reversible: bool) -> Config {
    let mut c = Config::new(256, dim, depth, 1024);
    c.heads = 4;
    c.dim_head = Some(dim / 4);
    c.causal = true;
    c.n_local_attn_heads = LocalHeads::Uniform(local);
    c.local_attn_window_size = 64;
    c.blindspot_size = bucket;
    c.reversible = reversible;
    c
}

/// Builds the model and its optimizer and runs one training step.
fn train_peak(c: &Config, work: Workload) -> u64 {
    let Workload::Train { batch, seq_len: n, bytes_per_value, keep_activations } = work else { unreachable!("a training workload") };
    let dtype = if bytes_per_value == 2 { DType::BF16 } else { DType::F32 };
    counting::peak_of(|| {
        let model = LinearAttentionTransformerLM::new(c, 0, &Device::Cpu, DType::F32).unwrap();
        let mut opt = AdamW::new(model.vars(), AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 }).unwrap();
        let ids: Vec<u32> = (0..(batch * n) as u32).map(|i| i * 7 % 256).collect();
        let tokens = Tensor::from_vec(ids.clone(), (batch, n), &Device::Cpu).unwrap();
        let compute = model.cast(dtype).unwrap();
        let logits = compute.forward(&tokens, &Inputs::default(), &Pass::train(1).keep_activations(keep_activations)).unwrap().to_dtype(DType::F32).unwrap();
        let loss = cross_entropy_rows(&logits.reshape((batch * n, 256)).unwrap(), &ids).unwrap().mean_all().unwrap();
        let grads = model.grads_from(&compute, loss.backward().unwrap()).unwrap();
        opt.step(&grads, 1e-3, 1.0).unwrap();
    })
}

/// A model without gradients (as every inference command loads one).
fn inference_model(c: &Config) -> LinearAttentionTransformerLM {
    let trained = LinearAttentionTransformerLM::new(c, 0, &Device::Cpu, DType::F32).unwrap();
    let tensors = trained.params().iter().map(|p| (p.name.clone(), p.tensor.detach().copy().unwrap())).collect();
    LinearAttentionTransformerLM::from_tensors(c, tensors, &Device::Cpu, DType::F32, false).unwrap()
}

fn forward_peak(c: &Config, batch: usize, n: usize) -> u64 {
    counting::peak_of(|| {
        let model = inference_model(c);
        let tokens = Tensor::from_vec((0..(batch * n) as u32).map(|i| i % 256).collect::<Vec<_>>(), (batch, n), &Device::Cpu).unwrap();
        model.forward(&tokens, &Inputs::default(), &Pass::eval()).unwrap();
    })
}

fn generate_peak(c: &Config, streams: usize, prompt: usize) -> u64 {
    counting::peak_of(|| {
        let model = inference_model(c);
        let mut states: Vec<_> = (0..streams).map(|s| model.read_prompt(&(0..prompt as u32).map(|i| (i + s as u32) % 256).collect::<Vec<_>>(), &Inputs::default()).unwrap().1).collect();
        let mut refs: Vec<&mut _> = states.iter_mut().collect();
        for t in 0..200 {
            model.step_streams(&vec![t % 256; streams], &mut refs).unwrap();
        }
    })
}

fn check(name: &str, c: &Config, work: Workload, measured: u64) {
    let params = LinearAttentionTransformerLM::count_parameters(c).unwrap();
    let p = plan(c, params, work).unwrap();
    let ratio = p.total as f64 / measured as f64;
    println!("{name}: plan {:.1} MiB, measured {:.1} MiB, ratio {ratio:.2}\n{}", p.total as f64 / 1048576.0, measured as f64 / 1048576.0, p.table());
    if !(0.75..=1.25).contains(&ratio) {
        FAILURES.lock().unwrap().push(format!("{name}: the plan ({} bytes) is {ratio:.2}x the measured peak ({measured} bytes)", p.total));
    }
}

static FAILURES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

#[test]
fn plans_are_within_a_quarter_of_the_measured_peak() {
    let work = |batch: usize, seq_len: usize, dtype: DType| Workload::Train { batch, seq_len, bytes_per_value: dtype.size_in_bytes(), keep_activations: false };
    let train = |c: &Config, batch: usize, n: usize, dtype: DType| (train_peak(c, work(batch, n, dtype)), work(batch, n, dtype));
    let kept = |c: &Config, batch: usize, n: usize| {
        let w = Workload::Train { batch, seq_len: n, bytes_per_value: 4, keep_activations: true };
        (train_peak(c, w), w)
    };
    let cases: Vec<(&str, Config, (u64, Workload))> = vec![
        ("sequential, local heads, bucket 64", config(128, 3, 2, 64, false), train(&config(128, 3, 2, 64, false), 4, 512, DType::F32)),
        ("sequential, global heads, bucket 1", config(128, 3, 0, 1, false), train(&config(128, 3, 0, 1, false), 4, 512, DType::F32)),
        ("reversible, local heads, bucket 64", config(128, 6, 2, 64, true), train(&config(128, 6, 2, 64, true), 4, 512, DType::F32)),
        ("reversible, global heads, bucket 1", config(128, 6, 0, 1, true), train(&config(128, 6, 0, 1, true), 2, 1024, DType::F32)),
        ("sequential, bf16", config(128, 3, 2, 1, false), train(&config(128, 3, 2, 1, false), 4, 512, DType::BF16)),
        ("reversible, bf16, bucket 64", config(128, 4, 2, 64, true), train(&config(128, 4, 2, 64, true), 4, 512, DType::BF16)),
        ("reversible keeping activations, local heads, bucket 64", config(128, 6, 2, 64, true), kept(&config(128, 6, 2, 64, true), 4, 512)),
        ("reversible keeping activations, global heads, bucket 1", config(128, 6, 0, 1, true), kept(&config(128, 6, 0, 1, true), 2, 1024)),
    ];
    for (name, c, (measured, work)) in &cases {
        check(&format!("training, {name}"), c, *work, *measured);
    }
    let c = config(128, 4, 2, 64, false);
    check("forward", &c, Workload::Forward { batch: 8, seq_len: 512 }, forward_peak(&c, 8, 512));
    let r = config(128, 4, 0, 1, true);
    check("forward, reversible", &r, Workload::Forward { batch: 4, seq_len: 1024 }, forward_peak(&r, 4, 1024));
    check("generation, 16 streams", &c, Workload::Generate { streams: 16, prompt_len: 300 }, generate_peak(&c, 16, 300));
    let mut glu = config(192, 2, 2, 64, true);
    glu.ff_glu = true;
    glu.ff_chunks = 4;
    glu.max_seq_len = 2048;
    check("training, reversible, GLU in 4 chunks, 2048 tokens", &glu, work(2, 2048, DType::F32), train_peak(&glu, work(2, 2048, DType::F32)));
    let mut shifted = config(96, 2, 1, 1, false);
    shifted.shift_tokens = true;
    shifted.ff_dropout = 0.1;
    check("training, sequential, shifted, dropout", &shifted, work(8, 256, DType::F32), train_peak(&shifted, work(8, 256, DType::F32)));
    let failures = FAILURES.lock().unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
}
