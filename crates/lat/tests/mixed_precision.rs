//! bfloat16 mixed precision: the gradients that reach the f32 master weights through a
//! bfloat16 copy agree with the f32 gradients, for every parameter, in sequential and
//! reversible stacks; and a mixed-precision training run learns.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::kernels::cross_entropy::cross_entropy_rows;
use linear_attention_transformer::train::data::Corpus;
use linear_attention_transformer::train::{RunConfig, Trainer};
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};

fn grads(model: &LinearAttentionTransformerLM, compute: &LinearAttentionTransformerLM, tokens: &Tensor, targets: &[u32]) -> HashMap<String, Vec<f32>> {
    let pass = Pass::eval();
    let logits = compute.forward(tokens, &Inputs::default(), &pass).unwrap().to_dtype(DType::F32).unwrap();
    let (b, n, v) = logits.dims3().unwrap();
    let loss = cross_entropy_rows(&logits.reshape((b * n, v)).unwrap(), targets).unwrap().mean_all().unwrap();
    let store = model.grads_from(compute, loss.backward().unwrap()).unwrap();
    model
        .vars()
        .into_iter()
        .map(|(name, var)| {
            let g = store.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient reached {name} (computing in {:?})", compute.dtype()));
            assert_eq!(g.dtype(), DType::F32, "{name}: the master gradient is f32");
            (name, g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

#[test]
fn bf16_gradients_reach_every_f32_weight_and_agree() {
    for reversible in [false, true] {
        let mut c = Config::new(64, 32, 2, 64);
        c.heads = 4;
        c.dim_head = Some(8);
        c.causal = true;
        c.n_local_attn_heads = LocalHeads::Uniform(2);
        c.local_attn_window_size = 16;
        c.reversible = reversible;
        c.ff_glu = true;
        let model = LinearAttentionTransformerLM::new(&c, 3, &Device::Cpu, DType::F32).unwrap();
        let ids: Vec<u32> = (0..2 * 48).map(|i| (i * 37 % 64) as u32).collect();
        let targets: Vec<u32> = ids.iter().map(|&t| (t + 1) % 64).collect();
        let tokens = Tensor::from_vec(ids, (2, 48), &Device::Cpu).unwrap();
        let exact = grads(&model, &model, &tokens, &targets);
        let mixed = grads(&model, &model.cast(DType::BF16).unwrap(), &tokens, &targets);
        assert_eq!(exact.len(), mixed.len());
        for (name, g) in &exact {
            let similarity = cosine(g, &mixed[name]);
            assert!(similarity > 0.99, "reversible {reversible}, {name}: cosine similarity {similarity}");
        }
    }
}

#[test]
fn a_mixed_precision_run_learns() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..300).map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog.\n")).collect();
    let data = dir.path().join("corpus.txt");
    std::fs::write(&data, text).unwrap();
    let mut run = RunConfig::default();
    for s in [
        "train.tokenizer=bytes",
        "model.num_tokens=256",
        "model.dim=32",
        "model.depth=1",
        "model.heads=2",
        "model.dim_head=16",
        "model.max_seq_len=32",
        "model.local_attn_window_size=8",
        "model.n_local_attn_heads=1",
        "train.seq_len=32",
        "train.batch_size=4",
        "train.max_steps=40",
        "train.warmup_steps=5",
        "train.lr=0.01",
        "train.precision=bf16",
    ] {
        run.set(s).unwrap();
    }
    let mut trainer = Trainer::start(run, Corpus::map(&data).unwrap(), &dir.path().join("out"), false, &Device::Cpu).unwrap();
    let first = trainer.train_step().unwrap().loss;
    let mut last = first;
    for _ in 1..40 {
        let report = trainer.train_step().unwrap();
        assert!(!report.skipped && report.loss.is_finite());
        last = report.loss;
    }
    assert!(last < first * 0.7, "loss {first} -> {last}");
    assert!(trainer.model.params().iter().all(|p| p.tensor.dtype() == DType::F32), "master weights stay f32");
}
