//! Quantized model files: `checkpoint::quantize` writes int8 (a scale per output channel) or
//! bf16 linear weights; the model built from one computes what the same weights dequantized to
//! f32 compute, decodes (greedy) the same tokens, stays within the quantisation error of the
//! f32 model, and refuses what it cannot do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::generate::{generate, Sampling};
use linear_attention_transformer::quantize::QUANTIZATION_KEY;
use linear_attention_transformer::{checkpoint, Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass, Quantization};

fn config() -> Config {
    let mut c = Config::new(256, 64, 2, 128);
    c.heads = 4;
    c.causal = true;
    c.n_local_attn_heads = LocalHeads::Uniform(2);
    c.local_attn_window_size = 16;
    c.ff_glu = true;
    c
}

struct Files {
    _dir: tempfile::TempDir,
    f32: PathBuf,
    int8: PathBuf,
    bf16: PathBuf,
}

fn files(config: &Config) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let model = LinearAttentionTransformerLM::new(config, 3, &Device::Cpu, DType::F32).unwrap();
    let f32 = dir.path().join("model.safetensors");
    checkpoint::save(&model, &f32, &HashMap::new()).unwrap();
    let (int8, bf16) = (dir.path().join("int8.safetensors"), dir.path().join("bf16.safetensors"));
    checkpoint::quantize(&f32, Quantization::Int8, &int8).unwrap();
    checkpoint::quantize(&f32, Quantization::Bf16, &bf16).unwrap();
    Files { _dir: dir, f32, int8, bf16 }
}

/// The quantized file's weights dequantized to f32 by hand (int8 · scale, bf16 widened).
fn dequantized(path: &Path, config: &Config) -> LinearAttentionTransformerLM {
    let raw = checkpoint::read_tensors(path).unwrap();
    let mut tensors = HashMap::new();
    for (name, t) in &raw {
        if name.ends_with(".scale") {
            continue;
        }
        let t = match raw.get(&format!("{name}.scale")) {
            Some(scale) => {
                let q: Vec<f32> = t.flatten_all().unwrap().to_vec1::<u8>().unwrap().into_iter().map(|b| b as i8 as f32).collect();
                let q = Tensor::from_vec(q, t.dims(), &Device::Cpu).unwrap();
                q.broadcast_mul(&scale.unsqueeze(1).unwrap()).unwrap()
            }
            None => t.to_dtype(DType::F32).unwrap(),
        };
        tensors.insert(name.clone(), t);
    }
    LinearAttentionTransformerLM::from_tensors(config, tensors, &Device::Cpu, DType::F32, false).unwrap()
}

fn tokens(n: usize, seed: u32) -> Tensor {
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + seed * 11 + 5) % 256).collect();
    Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn quantized_files_are_smaller_and_say_what_they_hold() {
    let c = config();
    let f = files(&c);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
    let (full, int8, bf16) = (size(&f.f32), size(&f.int8), size(&f.bf16));
    // The linear weights are most of this model: bf16 halves them, int8 quarters them.
    assert!(bf16 < 0.6 * full && int8 < 0.35 * full, "sizes {full} {bf16} {int8}");
    for (path, q) in [(&f.int8, Quantization::Int8), (&f.bf16, Quantization::Bf16)] {
        let (config, metadata) = checkpoint::peek(path).unwrap();
        assert_eq!(config, c);
        assert_eq!(metadata.get(QUANTIZATION_KEY).map(String::as_str), Some(q.to_string().as_str()));
        let model = checkpoint::load(path, &Device::Cpu, false).unwrap();
        assert_eq!(model.quantization(), Some(q));
        assert_eq!(model.num_parameters(), LinearAttentionTransformerLM::count_parameters(&c).unwrap() as usize);
    }
    let raw = checkpoint::read_tensors(&f.int8).unwrap();
    let name = "transformer.layers.layers.0.0.fn.to_q.weight";
    assert_eq!(raw[name].dtype(), DType::U8, "int8 values read back as their bits");
    assert_eq!(raw[&format!("{name}.scale")].dims(), &[256], "a scale per output channel");
    assert_eq!(checkpoint::read_tensors(&f.bf16).unwrap()[name].dtype(), DType::BF16);
    assert_eq!(checkpoint::read_tensors(&f.bf16).unwrap()["token_emb.weight"].dtype(), DType::F32, "embeddings stay f32");
}

#[test]
fn quantized_models_compute_what_their_dequantized_weights_compute() {
    let c = config();
    let f = files(&c);
    let full = checkpoint::load(&f.f32, &Device::Cpu, false).unwrap();
    let x = tokens(40, 1);
    let want = full.forward(&x, &Inputs::default(), &Pass::eval()).unwrap();
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    // bf16 keeps 8 bits of mantissa, int8 about 7 bits of the largest weight of each row.
    for (path, tolerance) in [(&f.bf16, 0.03), (&f.int8, 0.06)] {
        let quantized = checkpoint::load(path, &Device::Cpu, false).unwrap();
        let got = quantized.forward(&x, &Inputs::default(), &Pass::eval()).unwrap();
        let same_weights = dequantized(path, &c).forward(&x, &Inputs::default(), &Pass::eval()).unwrap();
        let rounding = max_abs(&got, &same_weights);
        assert!(rounding < 1e-4 * scale, "{}: {rounding} from the dequantized f32 model", path.display());
        let error = max_abs(&got, &want);
        assert!(error > 0.0 && error < tolerance * scale, "{}: {error} from the f32 model (logits up to {scale})", path.display());
    }
}

#[test]
fn greedy_decoding_from_a_quantized_file_equals_its_weights_in_f32() {
    let c = config();
    let f = files(&c);
    let prompts: Vec<Vec<u32>> = (0..3).map(|s| tokens(5 + 7 * s, s as u32).flatten_all().unwrap().to_vec1::<u32>().unwrap()).collect();
    for path in [&f.int8, &f.bf16] {
        let quantized = checkpoint::load(path, &Device::Cpu, false).unwrap();
        let f32_weights = dequantized(path, &c);
        let run = |m: &LinearAttentionTransformerLM, prompts: &[Vec<u32>]| generate(m, prompts, 60, &Sampling::greedy(), 0, None, true, &mut |_, _| {}).unwrap();
        let want = run(&f32_weights, &prompts);
        assert_eq!(run(&quantized, &prompts), want, "{}: a batch of three", path.display());
        assert_eq!(run(&quantized, &prompts[1..2]), want[1..2], "{}: one stream alone", path.display());
    }
}

#[test]
fn quantized_models_refuse_what_needs_f32_weights() {
    let c = config();
    let f = files(&c);
    let err = |r: linear_attention_transformer::Result<()>| r.unwrap_err().to_string();
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again.safetensors");
    let e = err(checkpoint::quantize(&f.int8, Quantization::Bf16, &again).map(drop));
    assert!(e.contains("already quantized (int8)"), "{e}");
    assert!(!again.exists(), "nothing written");
    let e = "fp4".parse::<Quantization>().unwrap_err().to_string();
    assert!(e.contains("unknown quantization \"fp4\"") && e.contains("int8") && e.contains("bf16"), "{e}");
    let e = err(checkpoint::load(&f.int8, &Device::Cpu, true).map(drop));
    assert!(e.contains("cannot be trained"), "{e}");
    let model = checkpoint::load(&f.bf16, &Device::Cpu, false).unwrap();
    let e = err(checkpoint::save(&model, dir.path().join("m.safetensors"), &HashMap::new()));
    assert!(e.contains("quantized to bf16") && e.contains("cannot be saved"), "{e}");
    let e = err(checkpoint::export(&model, &dir.path().join("m.pt")).map(drop));
    assert!(e.contains("cannot be exported"), "{e}");
    let e = err(model.cast(DType::BF16).map(drop));
    assert!(e.contains("cannot be cast"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no file half-written");
}

#[test]
fn damaged_quantized_files_are_refused_with_what_is_wrong() {
    let c = config();
    let f = files(&c);
    let dir = tempfile::tempdir().unwrap();
    let name = "transformer.layers.layers.1.1.fn.fn.w2.weight";
    let rewrite = |edit: &dyn Fn(&mut HashMap<String, Tensor>, &mut HashMap<String, String>)| -> String {
        let (_, mut meta) = checkpoint::peek(&f.int8).unwrap();
        meta.insert(checkpoint::CONFIG_KEY.into(), c.to_json());
        let mut tensors = checkpoint::read_tensors(&f.int8).unwrap();
        edit(&mut tensors, &mut meta);
        meta.remove(checkpoint::CHECKSUM_KEY);
        let path = dir.path().join("bad.safetensors");
        let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
        checkpoint::write_safetensors(&path, &list, &meta).unwrap();
        checkpoint::load(&path, &Device::Cpu, false).expect_err("a damaged file is refused").to_string()
    };
    let e = rewrite(&|t, _| {
        t.remove(&format!("{name}.scale"));
    });
    assert!(e.contains(&format!("missing tensor {name}.scale")), "{e}");
    let e = rewrite(&|t, _| {
        let w = t[name].clone();
        t.insert(name.into(), w.to_dtype(DType::F32).unwrap());
    });
    assert!(e.contains(&format!("tensor {name} is F32")) && e.contains("quantized to int8"), "{e}");
    let e = rewrite(&|t, _| {
        let s = t[&format!("{name}.scale")].clone();
        t.insert(format!("{name}.scale"), s.zeros_like().unwrap());
    });
    assert!(e.contains("scales are positive and finite"), "{e}");
    let e = rewrite(&|_, m| {
        m.insert(QUANTIZATION_KEY.into(), "int4".into());
    });
    assert!(e.contains("unknown quantization \"int4\""), "{e}");
}
