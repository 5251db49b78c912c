//! The recurrent form: from the empty state or after a parallel prefill, every decoding step must
//! give the logits of a full forward pass over the sequence so far (max abs difference <= 1e-4 in
//! f32), for causal models with every combination of local heads, blind spots, positions and
//! token shifting.

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
    let close = |i: usize, got: &Tensor| {
        let got = got.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let worst = got.iter().zip(&full[i]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4, "{name}: prefix {prefix}, position {i}: max abs difference {worst}");
    };
    // Prefix 0: from the empty state, every position stepped (as prompts are read).
    let mut state = if prefix == 0 {
        model.start_with(&Inputs::default()).unwrap()
    } else {
        let (first, state) = model.prefill(&seq[..prefix]).unwrap();
        close(prefix - 1, &first);
        state
    };
    for i in prefix..n {
        close(i, &model.step(&[seq[i]], &mut state).unwrap());
    }
    // Read in pieces, as prompts are (a local head attends a piece's positions in one window at
    // once where they advance one state; an axial layer's follow each other through its states).
    if prefix == 0 {
        let mut state = model.start_with(&Inputs::default()).unwrap();
        let mut read = 0;
        for piece in seq.chunks(7) {
            read += piece.len();
            close(read - 1, &model.extend(piece, &mut state).unwrap());
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
    // Every query head reads one key/value head: one decoding task serves several heads.
    for local in [0, 2, 4] {
        let mut shared = base();
        shared.one_kv_head = true;
        shared.n_local_attn_heads = LocalHeads::Uniform(local);
        shared.use_rotary_emb = true;
        out.push(("one key/value head", shared));
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
        for prefix in [0, 1, 5, 8, 16] {
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
    assert!(m.start_with(&Inputs::default()).is_err());
}

#[test]
fn axial_and_cross_attention_layers_decode_recurrently() {
    let mut axial = base();
    axial.attend_axially = true;
    axial.n_local_attn_heads = LocalHeads::Uniform(2);
    for prefix in [0, 1, 5, 8, 16] {
        check("axial", &axial, prefix);
    }
    let mut r = axial.clone();
    r.reversible = true;
    r.shift_tokens = true;
    check("axial, reversible, shift", &r, 9);

    // A decoder's cross-attention: the state keeps the context's summary.
    for linformer in [false, true] {
        let mut c = base();
        c.receives_context = true;
        c.n_local_attn_heads = LocalHeads::Uniform(1);
        if linformer {
            c.context_linformer_settings = Some(linear_attention_transformer::LinformerContextSettings { seq_len: 12, k: 4 });
        }
        let model = LinearAttentionTransformerLM::new(&c, 3, &Device::Cpu, DType::F32).unwrap();
        let context = Tensor::randn(0f32, 1.0, (1, 7, c.dim), &Device::Cpu).unwrap();
        let context_mask = Tensor::from_vec(vec![1u8, 1, 1, 0, 1, 1, 0], (1, 7), &Device::Cpu).unwrap();
        let inputs = Inputs { context: Some(&context), context_mask: Some(&context_mask), ..Inputs::default() };
        let n = 30;
        let seq: Vec<u32> = (0..n).map(|i| (i * 7 % 40) as u32).collect();
        let full = model.forward(&Tensor::from_slice(&seq, (1, n), &Device::Cpu).unwrap(), &inputs, &Pass::eval()).unwrap();
        let full = full.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let close = |prefix: usize, i: usize, got: &Tensor| {
            let got = got.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            let worst = got.iter().zip(&full[i]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= 1e-4, "cross-attention (linformer {linformer}, prefix {prefix}), position {i}: max abs difference {worst}");
        };
        // After a parallel prefill of 4 positions, and from the empty state; every position.
        for prefix in [4, 0] {
            let mut state = match prefix {
                0 => model.start_with(&inputs).unwrap(),
                _ => {
                    let (first, state) = model.prefill_with(&seq[..prefix], &inputs).unwrap();
                    close(prefix, prefix - 1, &first);
                    state
                }
            };
            for i in prefix..n {
                close(prefix, i, &model.step(&[seq[i]], &mut state).unwrap());
            }
        }
        assert!(model.prefill(&seq[..4]).is_err(), "a decoder with cross-attention needs its context");
        assert!(model.start_with(&Inputs::default()).is_err(), "a decoder with cross-attention needs its context");
    }
}

#[test]
fn batched_steps_and_extensions_equal_one_stream_at_a_time() {
    let mut c = base();
    c.n_local_attn_heads = LocalHeads::Uniform(2);
    c.blindspot_size = 4;
    c.shift_tokens = true;
    c.use_rotary_emb = true;
    let model = LinearAttentionTransformerLM::new(&c, 5, &Device::Cpu, DType::F32).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4; 11], vec![9, 8, 7, 6, 5, 4, 3]];
    let next: Vec<Vec<u32>> = (0..3).map(|r| (0..6).map(|i| ((r * 13 + i * 5) % 40) as u32).collect()).collect();
    // Alone.
    let mut alone = vec![];
    for (p, toks) in prompts.iter().zip(&next) {
        let (_, mut s) = model.prefill(p).unwrap();
        let rows: Vec<Vec<f32>> = toks.iter().map(|&t| model.step(&[t], &mut s).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap()).collect();
        alone.push(rows);
    }
    // Together, each stream its own state.
    let mut states: Vec<_> = prompts.iter().map(|p| model.prefill(p).unwrap().1).collect();
    for i in 0..6 {
        let toks: Vec<u32> = next.iter().map(|t| t[i]).collect();
        let mut refs: Vec<&mut _> = states.iter_mut().collect();
        let logits = model.step_streams(&toks, &mut refs).unwrap().to_vec2::<f32>().unwrap();
        // To the bit: the decoding products sum each row alone.
        for (r, row) in logits.iter().enumerate() {
            assert_eq!(row, &alone[r][i], "stream {r}, step {i}");
        }
    }
    // A prompt read in pieces ends where reading it whole does.
    let whole: Vec<u32> = prompts[1].iter().chain(&next[1]).copied().collect();
    let (expected, _) = model.prefill(&whole).unwrap();
    for first in [5, 0] {
        let mut s = match first {
            0 => model.start_with(&Inputs::default()).unwrap(),
            _ => model.prefill(&whole[..first]).unwrap().1,
        };
        model.extend(&whole[first..9], &mut s).unwrap();
        let got = model.extend(&whole[9..], &mut s).unwrap();
        let worst = got.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().zip(expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4, "extend after {first} positions: {worst}");
        assert_eq!(s.positions(), vec![whole.len()]);
        assert!(s.bytes() > 0);
    }
    // Reading a prompt is the same pieces wherever it is read: equal to the bit.
    let (a, sa) = model.read_prompt(&whole, &Inputs::default()).unwrap();
    let mut sb = model.start_with(&Inputs::default()).unwrap();
    let b = model.extend(&whole, &mut sb).unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    assert_eq!(sa.positions(), sb.positions());
}

#[test]
fn a_state_never_holds_more_than_its_bound() {
    let mut configs = vec![];
    for (local, bucket) in [(2, 4), (4, 1), (0, 8)] {
        let mut c = base();
        c.max_seq_len = 128;
        c.n_local_attn_heads = LocalHeads::Uniform(local);
        c.blindspot_size = bucket;
        c.shift_tokens = true;
        configs.push(c);
    }
    let mut axial = base();
    axial.attend_axially = true;
    configs.push(axial);
    for c in configs {
        let model = LinearAttentionTransformerLM::new(&c, 2, &Device::Cpu, DType::F32).unwrap();
        let bound = model.max_state_bytes();
        assert!(model.start_with(&Inputs::default()).unwrap().bytes() <= bound);
        let (_, mut state) = model.prefill(&[1, 2, 3]).unwrap();
        let mut most = state.bytes();
        for i in 0..60 {
            model.step(&[i % 40], &mut state).unwrap();
            most = most.max(state.bytes());
            assert!(state.bytes() <= bound, "{c:?}: {} bytes at position {} beyond the bound {bound}", state.bytes(), i + 4);
        }
        // Long prompts keep only what the next position sees, read whole or in pieces.
        let prompt: Vec<u32> = (0..60).map(|i| i % 40).collect();
        assert!(model.prefill(&prompt).unwrap().1.bytes() <= bound);
        assert!(model.read_prompt(&prompt, &Inputs::default()).unwrap().1.bytes() <= bound);
        assert!(most * 2 > bound, "the bound {bound} is far above the most seen ({most})");
    }
}

#[test]
fn a_prompt_of_several_pieces_reads_as_the_full_forward() {
    // 300 tokens: three pieces of at most 128, each crossing windows and blind-spot buckets.
    let mut c = base();
    c.max_seq_len = 320;
    c.n_local_attn_heads = LocalHeads::Uniform(2);
    c.blindspot_size = 4;
    let model = LinearAttentionTransformerLM::new(&c, 11, &Device::Cpu, DType::F32).unwrap();
    let mut rng = Rng::new(5);
    let prompt: Vec<u32> = (0..300).map(|_| rng.below(c.num_tokens as u64) as u32).collect();
    let full = model.forward(&Tensor::from_slice(&prompt, (1, 300), &Device::Cpu).unwrap(), &Inputs::default(), &Pass::eval()).unwrap();
    let last = full.squeeze(0).unwrap().to_vec2::<f32>().unwrap().pop().unwrap();
    let (logits, state) = model.read_prompt(&prompt, &Inputs::default()).unwrap();
    let got = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    let worst = got.iter().zip(&last).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-4, "max abs difference {worst}");
    assert_eq!(state.positions(), vec![300]);
}
