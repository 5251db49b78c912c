//! The checkpoints users keep (tests/fixtures/checkpoints/, written by the reference's own
//! `torch.save` through tools/reference/make_checkpoint_fixtures.py): every form imports and
//! reproduces the reference's logits; the forms that cannot be imported are refused with a
//! message that says what was found; the export round trip; the reference's
//! AutoregressiveWrapper on fixed inputs.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::checkpoint::{self, read_state_dict};
use linear_attention_transformer::train::copy_task::CopyTask;
use linear_attention_transformer::{AutoregressiveWrapper, Config, GenerateArgs, Inputs, LinearAttentionTransformerLM, Pass};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/checkpoints").join(name)
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    checkpoint::read_tensors(fixture(name)).unwrap()
}

fn config(name: &str) -> Config {
    Config::from_file(fixture(name)).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn import(name: &str, key: Option<&str>) -> linear_attention_transformer::Result<LinearAttentionTransformerLM> {
    checkpoint::import(fixture(name), key, &config("model.json"), &Device::Cpu, false)
}

#[test]
fn every_form_of_checkpoint_imports_with_the_reference_logits() {
    let d = tensors("logits.safetensors");
    let cases: [(&str, Option<&str>); 10] = [
        ("legacy.pt", None),
        ("dataparallel.pt", None),
        ("compiled.pt", None),
        ("training.pt", None),
        ("tutorial.pt", None),
        ("legacy_training.pt", None),
        ("custom_key.pt", Some("ema_weights")),
        ("state_dict.safetensors", None),
        ("wrapper.pt", None),
        ("export.pt", None),
    ];
    for (name, key) in cases {
        let model = import(name, key).unwrap_or_else(|e| panic!("{name}: {e}"));
        let logits = model.forward(&d["tokens"], &Inputs::default(), &Pass::eval()).unwrap();
        let err = max_rel(&logits, &d["logits"]);
        assert!(err < 1e-4, "{name}: relative error {err}");
    }
}

#[test]
fn what_cannot_be_imported_says_what_was_found() {
    let cases = [
        ("custom_key.pt", None, vec!["ema_weights", "--key"]),
        ("training.pt", Some("optimizer"), vec!["--key optimizer", "not a state dict"]),
        ("training.pt", Some("missing"), vec!["no entry missing", "\"model\""]),
        ("whole_module.pt", None, vec!["torch.nn.modules", "refused"]),
        ("code.pt", None, vec!["posix.system", "refused"]),
        ("no_state_dict.pt", None, vec!["no state dict found", "\"step\"", "torch.save"]),
        ("model.json", None, vec!["neither a PyTorch checkpoint", "safetensors"]),
        ("state_dict.safetensors", Some("model"), vec!["leave --key out"]),
    ];
    for (name, key, needles) in cases {
        let err = import(name, key).err().unwrap_or_else(|| panic!("{name} imported")).to_string();
        for n in needles {
            assert!(err.contains(n), "{name}: {err:?} lacks {n:?}");
        }
    }
    // A state dict of another configuration names what it holds.
    let mut other = config("model.json");
    other.depth = 3;
    let err = checkpoint::import(fixture("legacy.pt"), None, &other, &Device::Cpu, false).err().unwrap().to_string();
    assert!(err.contains("missing tensor") && err.contains("tensors are named"), "{err}");
}

#[test]
fn exports_load_in_the_reference_and_read_back() {
    let model = import("legacy.pt", None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The .pt archive is the one the reference loaded with strict=True (export_roundtrip.py).
    let pt = dir.path().join("m.pt");
    let kwargs = checkpoint::export(&model, &pt).unwrap();
    assert_eq!(std::fs::read(&pt).unwrap(), std::fs::read(fixture("export.pt")).unwrap(), "the export changed: rerun tools/reference/export_roundtrip.py --write-fixture");
    assert_eq!(Config::from_json_str(&kwargs).unwrap(), *model.config());
    let reference = tensors("export_reference.safetensors");
    let logits = model.forward(&reference["tokens"], &Inputs::default(), &Pass::eval()).unwrap();
    assert!(max_rel(&logits, &reference["logits"]) < 1e-5);
    // Both formats hold exactly the model's tensors, by the reference's names.
    let st = dir.path().join("m.safetensors");
    checkpoint::export(&model, &st).unwrap();
    for path in [&pt, &st] {
        let back = read_state_dict(path, None).unwrap();
        assert_eq!(back.len(), model.params().len());
        for p in model.params() {
            let t = &back[&p.name];
            assert_eq!((t.dims(), t.dtype()), (p.tensor.dims(), p.tensor.dtype()), "{}", p.name);
            assert_eq!(max_rel(&t.to_dtype(DType::F32).unwrap(), &p.tensor.to_dtype(DType::F32).unwrap()), 0.0, "{}", p.name);
        }
    }
    assert!(checkpoint::export(&model, &dir.path().join("m.bin2")).is_err());
}

#[test]
fn the_wrapper_matches_the_reference() {
    let d = tensors("wrapper.safetensors");
    let net = checkpoint::import(fixture("wrapper.pt"), None, &config("model.json"), &Device::Cpu, false).unwrap();
    let wrapper = AutoregressiveWrapper::new(net);
    let close = |got: Tensor, want: &Tensor, what: &str| {
        let (g, w) = (got.to_scalar::<f32>().unwrap(), want.to_vec1::<f32>().unwrap()[0]);
        assert!((g - w).abs() <= 1e-5 * w.abs(), "{what}: {g} vs the reference's {w}");
    };
    close(wrapper.loss(&d["x"], None, None, None, &Pass::eval()).unwrap(), &d["loss"], "loss");
    close(wrapper.loss(&d["x"], Some(&d["mask"]), None, None, &Pass::eval()).unwrap(), &d["loss_masked"], "loss with an input mask");
    close(wrapper.loss(&d["ignored"], None, None, None, &Pass::eval()).unwrap(), &d["loss_ignored"], "loss with ignored targets");
    let rows = |t: &Tensor| -> Vec<Vec<u32>> { t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap() };
    let thres = d["greedy_thres"].to_vec1::<f64>().unwrap()[0];
    let greedy = GenerateArgs { filter_thres: thres, ..GenerateArgs::default() };
    let start = rows(&d["start"]);
    for use_cache in [true, false] {
        let args = GenerateArgs { use_cache, ..greedy.clone() };
        assert_eq!(wrapper.generate(&start, 30, &args).unwrap(), rows(&d["generated"]), "greedy generation (cache {use_cache})");
        let eos = d["eos"].to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap()[0];
        let until = wrapper.generate(&start[..1], 40, &GenerateArgs { eos_token: Some(eos), ..args }).unwrap();
        assert_eq!(until, rows(&d["until_eos"]), "stops at eos (cache {use_cache})");
    }
    // Sampling with the reference's default (top-k, thres 0.9) is reproducible from a seed.
    let sample = |seed| wrapper.generate(&start, 5, &GenerateArgs { seed, ..GenerateArgs::default() }).unwrap();
    assert_eq!(sample(3), sample(3));
    assert_eq!((sample(4).len(), sample(4)[0].len()), (2, 5));
}

#[test]
fn decoders_generate_from_a_context_with_and_without_the_state() {
    let d = tensors("decoder.safetensors");
    let net = checkpoint::import(fixture("decoder.pt"), None, &config("decoder.json"), &Device::Cpu, false).unwrap();
    let wrapper = AutoregressiveWrapper::new(net);
    let start = d["start"].to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let want = d["generated"].to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    for use_cache in [true, false] {
        let args = GenerateArgs { context: Some(&d["context"]), use_cache, ..GenerateArgs::greedy(48) };
        assert_eq!(wrapper.generate(&start, 20, &args).unwrap(), want, "cache {use_cache}");
    }
}

#[test]
fn the_copy_task_model_generates_its_copies() {
    let task = CopyTask { steps: 300, eval_sequences: 64, ..CopyTask::default() };
    let model = task.train(&Device::Cpu, &mut |_, _| {}).unwrap();
    let src = Tensor::from_vec((0..4 * 16).map(|i| (i * 7 % 16) as u32).collect::<Vec<_>>(), (4, 16), &Device::Cpu).unwrap();
    let copies = task.copies(&model, &src).unwrap();
    assert_eq!(copies, src.to_vec2::<u32>().unwrap());
    assert!(task.evaluate(&model, &Device::Cpu).unwrap().sequences >= 0.95);
}
