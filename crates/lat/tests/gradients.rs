//! Finite-difference checks (float64) of the gradients a training step computes, through the
//! whole language model, for every kind of attention, reversible and sequential.

use candle_core::{DType, Device, Tensor, Var};
use linear_attention_transformer::kernels::cross_entropy::cross_entropy_rows;
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};

fn base() -> Config {
    let mut c = Config::new(20, 16, 2, 32);
    c.heads = 2;
    c.dim_head = Some(8);
    c.local_attn_window_size = 8;
    c
}

fn check(name: &str, c: &Config) {
    let (b, n) = (2, 12);
    let model = LinearAttentionTransformerLM::new(c, 5, &Device::Cpu, DType::F64).unwrap();
    let tokens: Vec<u32> = (0..b * n).map(|i| (i * 7 % c.num_tokens) as u32).collect();
    let targets: Vec<u32> = (0..b * n).map(|i| (i * 3 % c.num_tokens) as u32).collect();
    let tokens = Tensor::from_vec(tokens, (b, n), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec((0..b * n).map(|i| (i % n < n - 2 || i < n) as u8).collect::<Vec<_>>(), (b, n), &Device::Cpu).unwrap();
    let context = Tensor::from_vec((0..b * 5 * c.dim).map(|i| ((i * 37 % 17) as f64 - 8.0) / 8.0).collect::<Vec<_>>(), (b, 5, c.dim), &Device::Cpu).unwrap();
    let loss = |pass: &Pass| -> Tensor {
        let inputs = Inputs { input_mask: Some(&mask), context: c.receives_context.then_some(&context), context_mask: None };
        let logits = model.forward(&tokens, &inputs, pass).unwrap();
        cross_entropy_rows(&logits.reshape((b * n, c.num_tokens)).unwrap(), &targets).unwrap().mean_all().unwrap()
    };
    let pass = Pass::eval();
    let grads = loss(&pass).backward().unwrap();
    let mut checked = 0;
    for p in model.params().iter().filter(|p| p.trainable) {
        let var = Var::from_tensor(&p.tensor).unwrap();
        let g = grads.get(&p.tensor).unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name)).flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // A few coordinates of every parameter, largest gradients first.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&i, &j| g[j].abs().total_cmp(&g[i].abs()));
        for &i in order.iter().take(2) {
            let h = 1e-5;
            let mut v = base.clone();
            let mut at = |x: f64| -> f64 {
                v[i] = x;
                var.set(&Tensor::from_vec(v.clone(), var.dims(), &Device::Cpu).unwrap()).unwrap();
                loss(&Pass::eval()).to_scalar::<f64>().unwrap()
            };
            let fd = (at(base[i] + h) - at(base[i] - h)) / (2.0 * h);
            at(base[i]);
            let err = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1e-4);
            assert!(err < 1e-5, "{name}: {}[{i}]: finite difference {fd} vs backward {}", p.name, g[i]);
            checked += 1;
        }
    }
    assert!(checked > 20, "{name}: only {checked} coordinates checked");
}

#[test]
fn every_attention_kind_has_the_right_gradient() {
    for reversible in [false, true] {
        let mut c = base();
        c.reversible = reversible;
        c.causal = true;
        check("causal linear, bucket 1", &c);
        c.blindspot_size = 4;
        c.n_local_attn_heads = LocalHeads::Uniform(1);
        check("causal linear, bucket 4, with a local head", &c);
        c.n_local_attn_heads = LocalHeads::Uniform(2);
        c.shift_tokens = true;
        c.use_rotary_emb = true;
        check("causal local heads, shifted, rotary", &c);
        let mut nc = base();
        nc.reversible = reversible;
        check("non-causal linear", &nc);
        nc.n_local_attn_heads = LocalHeads::Uniform(1);
        nc.ff_glu = true;
        nc.emb_dim = Some(12);
        check("non-causal mixed heads, glu, factorised embedding", &nc);
        let mut ctx = base();
        ctx.reversible = reversible;
        ctx.receives_context = true;
        ctx.causal = true;
        check("cross-attention", &ctx);
    }
}

/// A reversible stack that keeps its activations skips the backward pass's recomputation; its
/// gradients must be the recomputing stack's (checked above by finite differences), with
/// dropout on (the same masks), a context, and every kind of block.
#[test]
fn keeping_activations_gives_the_recomputed_gradients() {
    let mut causal = base();
    causal.reversible = true;
    causal.causal = true;
    causal.blindspot_size = 4;
    causal.n_local_attn_heads = LocalHeads::Uniform(1);
    causal.shift_tokens = true;
    causal.ff_chunks = 2;
    causal.ff_dropout = 0.2;
    causal.attn_layer_dropout = 0.1;
    let mut context = base();
    context.reversible = true;
    context.receives_context = true;
    context.ff_glu = true;
    for (name, c) in [("causal, local head, shifted, chunked, dropout", causal), ("non-causal, cross-attention, glu", context)] {
        let (b, n) = (2, 12);
        let model = LinearAttentionTransformerLM::new(&c, 3, &Device::Cpu, DType::F64).unwrap();
        let tokens = Tensor::from_vec((0..b * n).map(|i| (i * 5 % c.num_tokens) as u32).collect::<Vec<_>>(), (b, n), &Device::Cpu).unwrap();
        let targets: Vec<u32> = (0..b * n).map(|i| (i * 11 % c.num_tokens) as u32).collect();
        let ctx = Tensor::from_vec((0..b * 5 * c.dim).map(|i| ((i * 29 % 13) as f64 - 6.0) / 6.0).collect::<Vec<_>>(), (b, 5, c.dim), &Device::Cpu).unwrap();
        let grads = |keep: bool| {
            let inputs = Inputs { input_mask: None, context: c.receives_context.then_some(&ctx), context_mask: None };
            let logits = model.forward(&tokens, &inputs, &Pass::train(7).keep_activations(keep)).unwrap();
            let loss = cross_entropy_rows(&logits.reshape((b * n, c.num_tokens)).unwrap(), &targets).unwrap().mean_all().unwrap();
            (loss.to_scalar::<f64>().unwrap(), loss.backward().unwrap())
        };
        let ((recomputed_loss, recomputed), (kept_loss, kept)) = (grads(false), grads(true));
        assert_eq!(recomputed_loss, kept_loss, "{name}: the forward pass changed");
        for p in model.params().iter().filter(|p| p.trainable) {
            let a = recomputed.get(&p.tensor).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let k = kept.get(&p.tensor).unwrap_or_else(|| panic!("{name}: no gradient for {} when keeping activations", p.name)).flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let scale = a.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
            let worst = a.iter().zip(&k).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            assert!(worst <= 1e-10 * scale, "{name}: {}: kept and recomputed gradients differ by {worst} (largest {scale})", p.name);
        }
    }
}
