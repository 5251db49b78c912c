//! The model inside a plain candle program: every parameter's gradient comes out of candle's own
//! `backward()`, so `candle_nn`'s optimizer trains the whole model, whatever its layers.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, LinformerSettings, LocalHeads, Pass};

fn base() -> Config {
    let mut c = Config::new(32, 16, 2, 32);
    c.heads = 2;
    c.dim_head = Some(8);
    c.local_attn_window_size = 8;
    c
}

/// Trains `c` for a few steps with candle_nn's AdamW and checks that every parameter moved.
fn every_parameter_trains(name: &str, c: &Config) {
    let device = Device::Cpu;
    let model = LinearAttentionTransformerLM::new(c, 1, &device, DType::F32).unwrap();
    let (b, n) = (2, 16);
    let tokens = Tensor::from_vec((0..b * n).map(|i| (i * 5 % c.num_tokens) as u32).collect::<Vec<_>>(), (b, n), &device).unwrap();
    let targets = Tensor::from_vec((0..b * n).map(|i| (i * 3 % c.num_tokens) as u32).collect::<Vec<_>>(), b * n, &device).unwrap();
    let context = Tensor::randn(0f32, 1.0, (b, 5, c.dim), &device).unwrap();
    let inputs = Inputs { context: c.receives_context.then_some(&context), ..Inputs::default() };
    let vars = model.vars();
    let before: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), ParamsAdamW { lr: 1e-2, ..ParamsAdamW::default() }).unwrap();
    let mut losses = vec![];
    for step in 0..4 {
        let logits = model.forward(&tokens, &inputs, &Pass::train(step)).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &targets).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    for ((param, var), old) in vars.iter().zip(&before) {
        let moved = (var.as_tensor() - old).unwrap().abs().unwrap().flatten_all().unwrap().max(D::Minus1).unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 0.0, "{name}: {param} did not move");
    }
    assert!(losses[3] < losses[0], "{name}: the loss did not fall: {losses:?}");
}

#[test]
fn candle_nn_trains_every_parameter() {
    for reversible in [false, true] {
        let mut c = base();
        c.reversible = reversible;
        c.causal = true;
        c.n_local_attn_heads = LocalHeads::Uniform(1);
        c.shift_tokens = true;
        c.ff_chunks = 2;
        c.ff_glu = true;
        every_parameter_trains("causal, mixed heads, shift, glu", &c);
        let mut x = base();
        x.reversible = reversible;
        x.causal = true;
        x.receives_context = true;
        x.attend_axially = true;
        x.pkm_layers = vec![1];
        every_parameter_trains("cross-attention, axial, product-key memory", &x);
        let mut l = base();
        l.reversible = reversible;
        l.linformer_settings = Some(LinformerSettings { k: 8 });
        every_parameter_trains("Linformer", &l);
    }
}
