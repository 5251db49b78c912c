//! The recurrent form: after a parallel prefill, every decoding step must give the logits of a
//! full forward pass over the sequence so far (max abs difference <= 1e-4 in f32), for causal
//! models with every combination of local heads, blind spots, positions and token shifting.

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::generate::{generate, Sampling};
use linear_attention_transformer::rng::Rng;
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};

fn base() -> Config {
    let mut c = Config::new(40, 32, 2, 64);
    c.heads = 4;
    c.dim_head = Some(8);
    c.causal = true;
    c.local_attn_window_size = 8;
    c
}

fn check(name: &str, c: &Config, prefix: usize) {
    let model = LinearAttentionTransformerLM::new(c, 7, &Device::Cpu, DType::F32).unwrap();
    let n = 45;
    let mut rng = Rng::new(3);
    let seq: Vec<u32> = (0..n).map(|_| rng.below(c.num_tokens as u64) as u32).collect();
    let full = model.forward(&Tensor::from_slice(&seq, (1, n), &Device::Cpu).unwrap(), &Inputs::default(), &Pass::eval()).unwrap();
    let full = full.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let (first, mut state) = model.prefill(&seq[..prefix]).unwrap();
    let mut got = first.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    for i in prefix - 1..n {
        let worst = got.iter().zip(&full[i]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4, "{name}: prefix {prefix}, position {i}: max abs difference {worst}");
        if i + 1 < n {
            got = model.step(&[seq[i + 1]], &mut state).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        }
    }
}

fn variants() -> Vec<(&'static str, Config)> {
    let mut out = vec![];
    for (lname, local) in [("global", 0), ("mixed", 2), ("all-local", 4)] {
        for bucket in [1, 4] {
            let mut c = base();
            c.n_local_attn_heads = LocalHeads::Uniform(local);
            c.blindspot_size = bucket;
            out.push((lname, c.clone()));
            let mut r = c.clone();
            r.reversible = true;
            r.shift_tokens = true;
            out.push(("reversible+shift", r));
            let mut a = c.clone();
            a.use_axial_pos_emb = false;
            a.emb_dim = Some(16);
            out.push(("absolute+emb_dim", a));
            let mut rot = c;
            rot.use_rotary_emb = true;
            rot.shift_tokens = true;
            out.push(("rotary+shift", rot));
        }
    }
    let mut per_layer = base();
    per_layer.depth = 3;
    per_layer.n_local_attn_heads = LocalHeads::PerLayer(vec![0, 2, 4]);
    per_layer.blindspot_size = 2;
    per_layer.ff_glu = true;
    out.push(("per-layer+glu", per_layer));
    out
}

#[test]
fn steps_match_the_full_forward() {
    for (name, c) in variants() {
        for prefix in [1, 5, 8, 16] {
            check(name, &c, prefix);
        }
    }
}

#[test]
fn large_keys_stay_finite_and_exact_over_long_contexts() {
    // Scaled-up key projections make exp(k) overflow f32 in the reference's formula.
    let mut c = base();
    c.max_seq_len = 512;
    let model = LinearAttentionTransformerLM::new(&c, 11, &Device::Cpu, DType::F32).unwrap();
    for p in model.params() {
        if p.name.ends_with("to_k.weight") {
            let big = (&p.tensor * 60.0).unwrap();
            candle_core::Var::from_tensor(&p.tensor).unwrap().set(&big).unwrap();
        }
    }
    let n = 300;
    let mut rng = Rng::new(5);
    let seq: Vec<u32> = (0..n).map(|_| rng.below(40) as u32).collect();
    let full = model.forward(&Tensor::from_slice(&seq, (1, n), &Device::Cpu).unwrap(), &Inputs::default(), &Pass::eval()).unwrap();
    let full = full.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    assert!(full.iter().flatten().all(|x| x.is_finite()));
    let (_, mut state) = model.prefill(&seq[..10]).unwrap();
    for i in 10..n {
        let got = model.step(&[seq[i]], &mut state).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let worst = got.iter().zip(&full[i]).fold(0f32, |m, (a, b)| m.max((a - b).abs() / b.abs().max(1.0)));
        assert!(worst <= 1e-4, "position {i}: {worst}");
    }
}

#[test]
fn greedy_generation_is_identical_with_and_without_the_cache() {
    let mut c = base();
    c.n_local_attn_heads = LocalHeads::Uniform(2);
    c.blindspot_size = 4;
    c.max_seq_len = 48;
    let model = LinearAttentionTransformerLM::new(&c, 21, &Device::Cpu, DType::F32).unwrap();
    let prompts = vec![vec![1, 2, 3, 4, 5], vec![7, 8], vec![9; 20]];
    // 40 new tokens: the last rows outgrow max_seq_len, where both slide the reference's window.
    let cached = generate(&model, &prompts, 40, &Sampling::greedy(), 0, None, true, &mut |_, _| {}).unwrap();
    let uncached = generate(&model, &prompts, 40, &Sampling::greedy(), 0, None, false, &mut |_, _| {}).unwrap();
    assert_eq!(cached, uncached);
    // A row of a batch generates what it generates alone.
    let alone = generate(&model, &prompts[1..2], 40, &Sampling::greedy(), 0, None, true, &mut |_, _| {}).unwrap();
    assert_eq!(alone[0], cached[1]);
    // Sampling with a seed is reproducible, and eos ends a row.
    let s = Sampling { temperature: 1.0, top_k: Some(10), top_p: Some(0.9) };
    let a = generate(&model, &prompts, 30, &s, 9, Some(3), true, &mut |_, _| {}).unwrap();
    let b = generate(&model, &prompts, 30, &s, 9, Some(3), true, &mut |_, _| {}).unwrap();
    assert_eq!(a, b);
    for row in &a {
        if let Some(i) = row.iter().position(|&t| t == 3) {
            assert_eq!(i + 1, row.len(), "nothing follows eos");
        }
    }
}

#[test]
fn state_snapshots_resume_generation() {
    let mut c = base();
    c.n_local_attn_heads = LocalHeads::Uniform(1);
    let model = LinearAttentionTransformerLM::new(&c, 1, &Device::Cpu, DType::F32).unwrap();
    let (_, mut state) = model.prefill(&[1, 2, 3]).unwrap();
    model.step(&[4], &mut state).unwrap();
    let snapshot = state.clone();
    let a = model.step(&[5], &mut state).unwrap().to_vec2::<f32>().unwrap();
    let mut resumed = snapshot;
    let b = model.step(&[5], &mut resumed).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(a, b);
    assert_eq!(resumed.positions(), &[5]);
    // Non-causal models cannot decode.
    let mut nc = base();
    nc.causal = false;
    let m = LinearAttentionTransformerLM::new(&nc, 1, &Device::Cpu, DType::F32).unwrap();
    assert!(m.prefill(&[1, 2]).is_err());
}
