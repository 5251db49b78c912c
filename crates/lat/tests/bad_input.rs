//! Bad input gets a typed error that says what is wrong: never a panic.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::{Config, Error, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};

fn model(c: &Config) -> LinearAttentionTransformerLM {
    LinearAttentionTransformerLM::new(c, 0, &Device::Cpu, DType::F32).unwrap()
}

fn small() -> Config {
    let mut c = Config::new(10, 16, 1, 32);
    c.heads = 2;
    c.dim_head = Some(8);
    c.local_attn_window_size = 8;
    c.causal = true;
    c.n_local_attn_heads = LocalHeads::Uniform(1);
    c
}

fn input_error(r: linear_attention_transformer::Result<Tensor>, needle: &str) {
    match r {
        Err(Error::Input(m)) => assert!(m.contains(needle), "message {m:?} lacks {needle:?}"),
        Err(e) => panic!("expected an input error about {needle:?}, got {e}"),
        Ok(_) => panic!("expected an input error about {needle:?}, got a result"),
    }
}

#[test]
fn bad_tokens_and_masks_are_rejected() {
    let m = model(&small());
    let dev = Device::Cpu;
    let run = |t: &Tensor, mask: Option<&Tensor>| m.forward(t, &Inputs::masked(mask), &Pass::eval());
    input_error(run(&Tensor::new(&[[1u32, 2, 10]], &dev).unwrap(), None), "token id 10 is out of range");
    input_error(run(&Tensor::new(&[[1i64, -1]], &dev).unwrap(), None), "token id -1");
    input_error(run(&Tensor::new(&[[1f32, 2.0]], &dev).unwrap(), None), "integers");
    input_error(run(&Tensor::new(&[1u32, 2], &dev).unwrap(), None), "[batch, n]");
    input_error(run(&Tensor::zeros((1, 0), DType::U32, &dev).unwrap(), None), "non-empty");
    input_error(run(&Tensor::zeros((2, 3), DType::U32, &dev).unwrap(), Some(&Tensor::ones((2, 4), DType::U8, &dev).unwrap())), "input_mask has shape");
    input_error(run(&Tensor::zeros((1, 33), DType::U32, &dev).unwrap(), None), "positions");
    let context = Tensor::zeros((1, 4, 16), DType::F32, &dev).unwrap();
    input_error(m.forward(&Tensor::zeros((1, 3), DType::U32, &dev).unwrap(), &Inputs { context: Some(&context), ..Inputs::default() }, &Pass::eval()), "does not receive context");
    let mut with_ctx = small();
    with_ctx.receives_context = true;
    let mc = model(&with_ctx);
    input_error(mc.forward(&Tensor::zeros((1, 3), DType::U32, &dev).unwrap(), &Inputs::default(), &Pass::eval()), "pass a context");
    let wrong = Tensor::zeros((1, 4, 8), DType::F32, &dev).unwrap();
    input_error(mc.forward(&Tensor::zeros((1, 3), DType::U32, &dev).unwrap(), &Inputs { context: Some(&wrong), ..Inputs::default() }, &Pass::eval()), "context has shape");
}

#[test]
fn bad_weights_are_rejected() {
    let c = small();
    let good: HashMap<String, Tensor> = model(&c).params().iter().map(|p| (p.name.clone(), p.tensor.detach())).collect();
    let load = |t: HashMap<String, Tensor>| LinearAttentionTransformerLM::from_tensors(&c, t, &Device::Cpu, DType::F32, false).map(|_| Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap());
    let mut missing = good.clone();
    missing.remove("norm.weight");
    input_error(load(missing), "missing tensor norm.weight");
    let mut extra = good.clone();
    extra.insert("surprise".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    input_error(load(extra), "unexpected tensor surprise");
    let mut shaped = good.clone();
    shaped.insert("out.bias".into(), Tensor::zeros(11, DType::F32, &Device::Cpu).unwrap());
    input_error(load(shaped), "out.bias has shape [11]");
    let mut ints = good;
    ints.insert("out.bias".into(), Tensor::zeros(10, DType::U32, &Device::Cpu).unwrap());
    input_error(load(ints), "expected a float");
}

#[test]
fn generation_refuses_what_it_cannot_do() {
    let m = model(&small());
    input_error(m.prefill(&[]).map(|r| r.0), "empty");
    input_error(m.prefill(&[1, 11]).map(|r| r.0), "out of range");
    input_error(m.prefill(&[1; 40]).map(|r| r.0), "positions");
    let (_, mut st) = m.prefill(&[1, 2]).unwrap();
    input_error(m.step(&[1, 2], &mut st), "batch of 1");
    let none = Inputs::default();
    input_error(m.read_prompt(&[], &none).map(|r| r.0), "empty");
    input_error(m.read_prompt(&[1, 11], &none).map(|r| r.0), "out of range");
    // Refused before any of it is read.
    input_error(m.read_prompt(&[1; 40], &none).map(|r| r.0), "the prompt has 40 tokens, more than");
    input_error(m.step_streams(&[], &mut []), "no stream");
    let mut nc = small();
    nc.causal = false;
    input_error(model(&nc).prefill(&[1, 2]).map(|r| r.0), "causal");
    input_error(model(&nc).read_prompt(&[1, 2], &none).map(|r| r.0), "causal");
    input_error(model(&nc).read_prompt(&[], &none).map(|r| r.0), "causal");
}
