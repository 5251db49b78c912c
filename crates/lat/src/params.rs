//! Named parameters: layers ask a [`Builder`] for their tensors by the reference's
//! `state_dict` names, and get either fresh ones, initialised as PyTorch would, or loaded ones,
//! checked for presence and shape. The model keeps every name in creation order, which is the
//! order of the reference's `state_dict`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::kernels::decode::Packed;
use crate::quantize::Quantization;
use crate::rng::Rng;

/// How a fresh parameter is initialised.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Init {
    /// U(-bound, bound): PyTorch's default for linear layers is bound = 1 / sqrt(fan_in).
    Uniform(f64),
    /// N(0, std²).
    Normal(f64),
    Ones,
    Zeros,
}

/// A named tensor of a model: a trainable parameter or a persistent buffer.
#[derive(Clone, Debug)]
pub struct Param {
    /// The `state_dict` key.
    pub name: String,
    /// The tensor (a variable when trainable).
    pub tensor: Tensor,
    /// Buffers (the rotary tables) are saved with the model but never trained.
    pub trainable: bool,
    /// A linear layer's weight [out, in]: what quantization packs.
    pub linear: bool,
}

enum Source {
    Init(Rng),
    Load(HashMap<String, Tensor>),
    /// Shapes only: every parameter is a broadcast zero that allocates nothing (for counting).
    Shapes,
}

struct State {
    source: Source,
    device: Device,
    dtype: DType,
    /// Whether parameters are created as variables that record gradients.
    trainable: bool,
    /// Loading a quantized model file: linear weights come packed.
    quantization: Option<Quantization>,
    made: Vec<Param>,
    used: HashSet<String>,
}

/// Hands out parameters under a name prefix.
#[derive(Clone)]
pub(crate) struct Builder {
    state: Rc<RefCell<State>>,
    prefix: String,
}

impl Builder {
    /// Fresh parameters drawn from `seed`, as trainable variables.
    pub fn init(seed: u64, device: &Device, dtype: DType) -> Self {
        Self::new(Source::Init(Rng::new(seed)), device, dtype, true)
    }

    /// Parameters of the right shapes that allocate nothing, to count them.
    pub fn shapes() -> Self {
        Self::new(Source::Shapes, &Device::Cpu, DType::F32, false)
    }

    /// Parameters taken from `tensors` (by full name), converted to `dtype` on `device`.
    pub fn load(tensors: HashMap<String, Tensor>, device: &Device, dtype: DType, trainable: bool) -> Self {
        Self::new(Source::Load(tensors), device, dtype, trainable)
    }

    /// Parameters taken from a quantized model file's `tensors`, on the CPU in f32, every linear
    /// layer's weight kept packed (see [`Builder::matrix`]).
    pub fn load_quantized(tensors: HashMap<String, Tensor>, quantization: Quantization) -> Self {
        let b = Self::new(Source::Load(tensors), &Device::Cpu, DType::F32, false);
        b.state.borrow_mut().quantization = Some(quantization);
        b
    }

    fn new(source: Source, device: &Device, dtype: DType, trainable: bool) -> Self {
        let state = State { source, device: device.clone(), dtype, trainable, quantization: None, made: vec![], used: HashSet::new() };
        Self { state: Rc::new(RefCell::new(state)), prefix: String::new() }
    }

    /// The builder for a sub-module: names below it start with `prefix.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { state: self.state.clone(), prefix }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn device(&self) -> Device {
        self.state.borrow().device.clone()
    }

    pub fn dtype(&self) -> DType {
        self.state.borrow().dtype
    }

    /// The quantization of the file being loaded, if any.
    pub fn quantization(&self) -> Option<Quantization> {
        self.state.borrow().quantization
    }

    /// A linear layer's weight `name` [out, in]: as [`Builder::get`], or from a quantized file
    /// packed (int8 values `name` with scales `name.scale`, or bf16 `name`), with a tensor that
    /// has its shape and allocates nothing.
    pub fn matrix(&self, name: &str, shape: &[usize; 2], init: Init) -> Result<(Tensor, Option<Packed>)> {
        let Some(quantization) = self.quantization() else {
            let t = self.get(name, shape, init)?;
            self.state.borrow_mut().made.last_mut().expect("just made").linear = true;
            return Ok((t, None));
        };
        let full = self.full(name);
        let mut st = self.state.borrow_mut();
        let Source::Load(map) = &st.source else { unreachable!("only loading is quantized") };
        let t = map.get(&full).ok_or_else(|| Error::input(format!("missing tensor {full} of shape {shape:?}")))?;
        if t.dims() != shape {
            return Err(Error::input(format!("tensor {full} has shape {:?}, the configuration needs {shape:?}", t.dims())));
        }
        let scale_name = format!("{full}.scale");
        let packed = match (quantization, t.dtype()) {
            (Quantization::Bf16, DType::BF16) => Packed::Bf16(t.flatten_all()?.to_vec1::<half::bf16>()?.into_iter().map(half::bf16::to_bits).collect()),
            (Quantization::Int8, DType::U8) => {
                let scale = map.get(&scale_name).ok_or_else(|| Error::input(format!("missing tensor {scale_name}: the int8 weight {full} needs its scales")))?;
                if scale.dims() != [shape[0]] || scale.dtype() != DType::F32 {
                    return Err(Error::input(format!("tensor {scale_name} must be f32 [{}], got {:?} {:?}", shape[0], scale.dtype(), scale.dims())));
                }
                let scale = scale.to_vec1::<f32>()?;
                if let Some(bad) = scale.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                    return Err(Error::input(format!("tensor {scale_name} holds the scale {bad}; scales are positive and finite")));
                }
                let q = t.flatten_all()?.to_vec1::<u8>()?.into_iter().map(|b| b as i8).collect();
                Packed::Int8 { q, scale }
            }
            (q, dtype) => return Err(Error::input(format!("tensor {full} is {dtype:?}, but a model file quantized to {q} holds its linear weights as {}", q.dtype_name()))),
        };
        let tensor = Tensor::zeros((), DType::F32, &Device::Cpu)?.broadcast_as(shape.as_slice())?;
        st.used.insert(full.clone());
        st.used.insert(scale_name);
        st.made.push(Param { name: full, tensor: tensor.clone(), trainable: true, linear: true });
        Ok((tensor, Some(packed)))
    }

    /// The parameter `name` of shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let full = self.full(name);
        let mut st = self.state.borrow_mut();
        let (device, dtype, trainable) = (st.device.clone(), st.dtype, st.trainable);
        let tensor = match &mut st.source {
            Source::Init(rng) => {
                let n: usize = shape.iter().product();
                // The largest allocations a configuration asks for: a clear error, not an abort.
                let mut values: Vec<f32> = Vec::new();
                values.try_reserve_exact(n).map_err(|_| {
                    Error::input(format!("out of memory: cannot allocate {} for parameter {full} {shape:?}; the model is too large for this machine", crate::plan::human(n as u64 * 4)))
                })?;
                match init {
                    Init::Uniform(b) => values.extend((0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * b) as f32)),
                    Init::Normal(s) => values.extend((0..n).map(|_| (rng.normal() * s) as f32)),
                    Init::Ones => values.resize(n, 1.0),
                    Init::Zeros => values.resize(n, 0.0),
                }
                Tensor::from_vec(values, shape, &device)?.to_dtype(dtype)?
            }
            Source::Shapes => Tensor::zeros((), dtype, &device)?.broadcast_as(shape)?,
            Source::Load(map) => {
                let t = map.get(&full).ok_or_else(|| Error::input(format!("missing tensor {full} of shape {shape:?}")))?;
                if t.dims() != shape {
                    return Err(Error::input(format!("tensor {full} has shape {:?}, the configuration needs {shape:?}", t.dims())));
                }
                if !t.dtype().is_float() {
                    return Err(Error::input(format!("tensor {full} has dtype {:?}, expected a float", t.dtype())));
                }
                t.to_device(&device)?.to_dtype(dtype)?
            }
        };
        let tensor = if trainable { Var::from_tensor(&tensor)?.into_inner() } else { tensor };
        st.used.insert(full.clone());
        st.made.push(Param { name: full, tensor: tensor.clone(), trainable: true, linear: false });
        Ok(tensor)
    }

    /// A persistent, untrained buffer whose value is computed, not loaded. A loaded file may
    /// carry it (the reference saves it); its shape is checked and the computed value kept.
    pub fn buffer(&self, name: &str, value: Tensor) -> Result<Tensor> {
        let full = self.full(name);
        let mut st = self.state.borrow_mut();
        if let Source::Load(map) = &st.source {
            if let Some(t) = map.get(&full) {
                if t.dims() != value.dims() {
                    return Err(Error::input(format!("buffer {full} has shape {:?}, expected {:?}", t.dims(), value.dims())));
                }
            }
        }
        let value = value.to_device(&st.device)?.to_dtype(st.dtype)?;
        st.used.insert(full.clone());
        st.made.push(Param { name: full, tensor: value.clone(), trainable: false, linear: false });
        Ok(value)
    }

    /// The shape of tensor `name` in the loaded tensors, if loading and present.
    pub fn loaded_shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.state.borrow().source {
            Source::Load(map) => map.get(&self.full(name)).map(|t| t.dims().to_vec()),
            Source::Init(_) | Source::Shapes => None,
        }
    }

    /// A position in the list of parameters made so far.
    pub fn mark(&self) -> usize {
        self.state.borrow().made.len()
    }

    /// The trainable parameters made since `mark`.
    pub fn since(&self, mark: usize) -> Vec<Tensor> {
        self.state.borrow().made[mark..].iter().filter(|p| p.trainable).map(|p| p.tensor.clone()).collect()
    }

    /// Whether parameters are variables that record gradients.
    pub fn trainable(&self) -> bool {
        self.state.borrow().trainable
    }

    /// A loaded, untrained buffer that must be present (running statistics), as the model's
    /// dtype.
    pub fn loaded_buffer(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.loaded_raw(name)?;
        if t.dims() != shape {
            return Err(Error::input(format!("buffer {} has shape {:?}, expected {shape:?}", self.full(name), t.dims())));
        }
        let mut st = self.state.borrow_mut();
        let t = t.to_dtype(st.dtype)?;
        if let Some(last) = st.made.last_mut() {
            last.tensor = t.clone();
        }
        Ok(t)
    }

    /// A loaded tensor kept exactly as stored (counters), saved back but never trained.
    pub fn loaded_raw(&self, name: &str) -> Result<Tensor> {
        let full = self.full(name);
        let mut st = self.state.borrow_mut();
        let device = st.device.clone();
        let t = match &st.source {
            Source::Load(map) => map.get(&full).cloned().ok_or_else(|| Error::input(format!("missing tensor {full}")))?,
            Source::Init(_) | Source::Shapes => return Err(Error::input(format!("{full} can only be loaded"))),
        };
        let t = t.to_device(&device)?;
        st.used.insert(full.clone());
        st.made.push(Param { name: full, tensor: t.clone(), trainable: false, linear: false });
        Ok(t)
    }

    /// Builds a module with `build`, and returns it with every tensor it named (in order).
    pub fn build<T>(self, build: impl FnOnce(&Builder) -> Result<T>) -> Result<(T, Vec<Param>)> {
        let module = build(&self)?;
        Ok((module, self.finish()?))
    }

    /// Ends construction: every loaded tensor must have been used.
    fn finish(self) -> Result<Vec<Param>> {
        let mut st = self.state.borrow_mut();
        if let Source::Load(map) = &st.source {
            let mut extra: Vec<&String> = map.keys().filter(|k| !st.used.contains(*k)).collect();
            extra.sort();
            if let Some(first) = extra.first() {
                return Err(Error::input(format!("unexpected tensor {first}{} for this configuration", if extra.len() > 1 { format!(" (and {} more)", extra.len() - 1) } else { String::new() })));
            }
        }
        Ok(std::mem::take(&mut st.made))
    }
}

/// Linear-layer initialisation bound, PyTorch's kaiming-uniform with a = sqrt(5).
pub(crate) fn fan_in_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in.max(1) as f64).sqrt()
}
