//! The GPU kernels, run by the CPU emulation, against the plain references: forward and
//! backward, float32 and bfloat16, with and without masks, across the shapes that exercise each
//! kernel's edge cases (partial chunks and tiles, buckets inside and across chunks, windows that
//! do not fill a tile).

use candle_core::{DType, Device, Tensor, Var};
use lat_gpu_emulator::{Buffer, Emulator};
use linear_attention_transformer::kernels::gpu::{Causal, Elem, Gpu, Linear, Local, CHUNK, MAX_DIM, THREADS, TILE};
use linear_attention_transformer::kernels::local::Windows;
use linear_attention_transformer::kernels::{causal_linear, linear, local};
use linear_attention_transformer::rng::Rng;

/// Deterministic pseudo-random normals.
fn randn(len: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.normal() as f32 * scale).collect()
}

/// Rounds through the element type, so that the reference sees what the kernel sees.
fn rounded(x: &[f32], elem: Elem) -> Vec<f32> {
    match elem {
        Elem::F32 => x.to_vec(),
        Elem::BF16 => x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
    }
}

fn tensor(x: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(x.to_vec(), shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// Largest absolute difference relative to the largest reference magnitude.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    got.iter().zip(want).fold(0f32, |m, (a, b)| if a.is_finite() { m.max((a - b).abs()) } else { f32::INFINITY }) / scale
}

fn tolerance(elem: Elem) -> f32 {
    match elem {
        Elem::F32 => 2e-5,
        Elem::BF16 => 2e-2,
    }
}

struct Case {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
    keep: Option<Vec<u8>>,
}

impl Case {
    fn new(nq: usize, nk: usize, nv: usize, ng: usize, mask: Option<(usize, usize)>, elem: Elem, seed: u64) -> Case {
        let keep = mask.map(|(b, n)| (0..b * n).map(|i| (i % 7 != 3 && i % 11 != 5) as u8).collect());
        Case { q: rounded(&randn(nq, 1.0, seed), elem), k: rounded(&randn(nk, 1.5, seed + 1), elem), v: rounded(&randn(nv, 1.0, seed + 2), elem), g: rounded(&randn(ng, 1.0, seed + 3), elem), keep }
    }
}

/// Reference output and gradients of `f` at (q, k, v) for the output gradient g.
fn reference(case: &Case, shapes: [&[usize]; 3], f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor) -> [Vec<f32>; 4] {
    let q = Var::from_tensor(&tensor(&case.q, shapes[0])).unwrap();
    let k = Var::from_tensor(&tensor(&case.k, shapes[1])).unwrap();
    let v = Var::from_tensor(&tensor(&case.v, shapes[2])).unwrap();
    let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor());
    let g = tensor(&case.g, out.dims());
    let grads = (out.clone() * g).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |x: &Var| values(grads.get(x.as_tensor()).unwrap());
    [values(&out), grad(&q), grad(&k), grad(&v)]
}

struct Inputs {
    q: Buffer,
    k: Buffer,
    v: Buffer,
    g: Buffer,
    keep: Option<Buffer>,
}

impl Inputs {
    fn new(case: &Case, elem: Elem) -> Inputs {
        Inputs {
            q: Buffer::from_f32(&case.q, elem),
            k: Buffer::from_f32(&case.k, elem),
            v: Buffer::from_f32(&case.v, elem),
            g: Buffer::from_f32(&case.g, elem),
            keep: case.keep.as_deref().map(Buffer::from_bytes),
        }
    }

    fn addrs(&self) -> (u64, u64, u64, u64) {
        let e = Emulator;
        (e.addr(&self.q), e.addr(&self.k), e.addr(&self.v), self.keep.as_ref().map_or(0, |m| e.addr(m)))
    }
}

fn check(what: &str, got: &[f32], want: &[f32], elem: Elem) {
    let err = rel_err(got, want);
    assert!(err <= tolerance(elem), "{what} ({elem:?}): relative error {err:e}");
}

fn causal_case(b: usize, n: usize, h: usize, e: usize, ev: usize, bucket: usize, masked: bool, elem: Elem) {
    let dims = Causal { b, n, h, e, ev, bucket };
    assert!(dims.supported());
    let case = Case::new(b * n * h * e, b * n * h * e, b * n * h * ev, b * n * h * ev, masked.then_some((b, n)), elem, (n * 31 + bucket) as u64);
    let mask = case.keep.as_ref().map(|m| Tensor::from_vec(m.clone(), (b, n), &Device::Cpu).unwrap());
    let want = reference(&case, [&[b, n, h, e], &[b, n, h, e], &[b, n, h, ev]], |q, k, v| causal_linear::reference(q, k, v, mask.as_ref(), bucket).unwrap());
    let inputs = Inputs::new(&case, elem);
    let (q, k, v, keep) = inputs.addrs();
    let flat = dims.forward(&Emulator, elem, q, k, v, keep).unwrap();
    let out_len = b * n * h * ev;
    let label = format!("causal b{b} n{n} h{h} e{e} ev{ev} bucket{bucket} masked {masked}");
    check(&format!("{label}: output"), &flat.to_f32(0, out_len), &want[0], elem);
    let grads = dims.backward(&Emulator, elem, q, k, v, keep, Emulator.addr(&flat), Emulator.addr(&inputs.g)).unwrap();
    let qk = b * n * h * e;
    check(&format!("{label}: dq"), &grads.to_f32(0, qk), &want[1], elem);
    check(&format!("{label}: dk"), &grads.to_f32(qk, qk), &want[2], elem);
    check(&format!("{label}: dv"), &grads.to_f32(2 * qk, out_len), &want[3], elem);
}

#[test]
fn causal_linear_attention_matches_the_reference() {
    for elem in [Elem::F32, Elem::BF16] {
        // Bucket 1, partial last chunk, different head dims.
        causal_case(2, 45, 2, 8, 6, 1, false, elem);
        causal_case(1, 70, 1, 16, 16, 1, true, elem);
        // Buckets inside a chunk, and spanning whole chunks.
        causal_case(1, 72, 2, 8, 8, 4, true, elem);
        causal_case(1, 96, 1, 8, 4, 32, false, elem);
        causal_case(2, 128, 1, 4, 8, 64, true, elem);
    }
    // The largest head dims the kernels take.
    causal_case(1, 40, 1, 64, 64, 1, true, Elem::F32);
}

#[test]
fn causal_linear_attention_stays_finite_for_large_keys() {
    // Keys around 100 overflow exp() in f32: the reference's own formula gives NaN, the kernel
    // must not. Compare with the reference on keys shifted down by 100, which leaves the result
    // unchanged wherever the denominator clamp does not act.
    let (b, n, h, e) = (1, 64, 1, 8);
    let dims = Causal { b, n, h, e, ev: e, bucket: 1 };
    let mut case = Case::new(b * n * h * e, b * n * h * e, b * n * h * e, b * n * h * e, None, Elem::F32, 5);
    let want = reference(&case, [&[b, n, h, e]; 3], |q, k, v| causal_linear::reference(q, k, v, None, 1).unwrap());
    case.k.iter_mut().for_each(|x| *x += 100.0);
    let inputs = Inputs::new(&case, Elem::F32);
    let (q, k, v, keep) = inputs.addrs();
    let flat = dims.forward(&Emulator, Elem::F32, q, k, v, keep).unwrap();
    check("shifted keys: output", &flat.to_f32(0, b * n * h * e), &want[0], Elem::F32);
}

fn linear_case(b: usize, n: usize, m: usize, h: usize, e: usize, ev: usize, masked: bool, elem: Elem) {
    let dims = Linear { b, n, m, h, e, ev };
    let case = Case::new(b * n * h * e, b * m * h * e, b * m * h * ev, b * n * h * ev, masked.then_some((b, m)), elem, (n * 7 + m) as u64);
    let mask = case.keep.as_ref().map(|x| Tensor::from_vec(x.clone(), (b, m), &Device::Cpu).unwrap());
    let want = reference(&case, [&[b, n, h, e], &[b, m, h, e], &[b, m, h, ev]], |q, k, v| linear::reference(q, k, v, mask.as_ref()).unwrap());
    let inputs = Inputs::new(&case, elem);
    let (q, k, v, keep) = inputs.addrs();
    let out = dims.forward(&Emulator, elem, q, k, v, keep).unwrap();
    let label = format!("linear b{b} n{n} m{m} h{h} e{e} ev{ev} masked {masked}");
    check(&format!("{label}: output"), &out.to_f32(0, b * n * h * ev), &want[0], elem);
    let grads = dims.backward(&Emulator, elem, q, k, v, keep, Emulator.addr(&inputs.g)).unwrap();
    let (nq, nk) = (b * n * h * e, b * m * h * e);
    check(&format!("{label}: dq"), &grads.to_f32(0, nq), &want[1], elem);
    check(&format!("{label}: dk"), &grads.to_f32(nq, nk), &want[2], elem);
    check(&format!("{label}: dv"), &grads.to_f32(nq + nk, b * m * h * ev), &want[3], elem);
}

#[test]
fn linear_attention_matches_the_reference() {
    for elem in [Elem::F32, Elem::BF16] {
        linear_case(2, 37, 37, 2, 8, 6, false, elem);
        linear_case(1, 50, 300, 1, 16, 8, true, elem);
    }
    linear_case(1, 33, 20, 1, 64, 64, true, Elem::F32);
}

fn local_case(b: usize, n: usize, h: usize, e: usize, window: usize, causal: bool, mask: Option<Vec<u8>>, elem: Elem) {
    let dims = Local { b, n, h, e, window, causal, dropout: false };
    let mut case = Case::new(b * n * h * e, b * n * h * e, b * n * h * e, b * n * h * e, None, elem, (n + window) as u64);
    case.keep = mask;
    let mask = case.keep.as_ref().map(|x| Tensor::from_vec(x.clone(), (b, n), &Device::Cpu).unwrap());
    let windows = Windows { size: window, causal };
    let shape: &[usize] = &[b, n, h, e];
    let want = reference(&case, [shape; 3], |q, k, v| local::reference(q, k, v, mask.as_ref(), windows, None).unwrap());
    let inputs = Inputs::new(&case, elem);
    let (q, k, v, keep) = inputs.addrs();
    let flat = dims.forward(&Emulator, elem, q, k, v, keep).unwrap();
    let len = b * n * h * e;
    let label = format!("local b{b} n{n} h{h} e{e} window{window} causal {causal} masked {}", case.keep.is_some());
    check(&format!("{label}: output"), &flat.to_f32(0, len), &want[0], elem);
    let grads = dims.backward(&Emulator, elem, q, k, v, keep, Emulator.addr(&flat), Emulator.addr(&inputs.g)).unwrap();
    check(&format!("{label}: dq"), &grads.to_f32(0, len), &want[1], elem);
    check(&format!("{label}: dk"), &grads.to_f32(len, len), &want[2], elem);
    check(&format!("{label}: dv"), &grads.to_f32(2 * len, len), &want[3], elem);
}

#[test]
fn local_attention_matches_the_reference() {
    let sparse = |b: usize, n: usize| Some((0..b * n).map(|i| (i % 5 != 2) as u8).collect::<Vec<u8>>());
    for elem in [Elem::F32, Elem::BF16] {
        for causal in [true, false] {
            local_case(2, 48, 2, 8, 16, causal, None, elem);
            local_case(1, 100, 1, 16, 20, causal, sparse(1, 100), elem);
        }
    }
    // Windows larger than a tile; the largest head dim.
    local_case(1, 128, 1, 64, 64, true, sparse(1, 128), Elem::F32);
    // A window whose every key is masked: rows average all their slots, pads included.
    let mut keep = vec![1u8; 40];
    keep[..20].fill(0);
    for causal in [true, false] {
        local_case(1, 40, 1, 8, 10, causal, Some(keep.clone()), Elem::F32);
    }
}

/// The launch plans size grids and shared memory from the Rust constants; the kernels index
/// with the C ones.
#[test]
fn kernel_and_launch_plan_constants_agree() {
    assert_eq!(lat_gpu_emulator::kernel_constants(), [THREADS, CHUNK as u32, MAX_DIM as u32, TILE as u32]);
}
