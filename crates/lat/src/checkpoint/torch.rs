//! A reader for `torch.save(state_dict)` files that executes no code and trusts no size.
//!
//! The file is a zip archive: `<name>/data.pkl`, a pickle describing the dictionary, and one
//! entry `<name>/data/<key>` per tensor storage. The pickle is interpreted by a small machine
//! that knows the opcodes `torch.save` writes and builds only plain values: it accepts no
//! global except the handful a state dict names (`collections.OrderedDict`, the tensor
//! rebuilders, the typed storages) and refuses anything else. Every length is checked against
//! the bytes that are actually there before anything is allocated, every tensor's view against
//! its storage, and storages must be stored uncompressed (as PyTorch writes them), so a file can
//! never make the reader allocate more than its own size.

use std::collections::HashMap;
use std::io::{Read, Seek};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Deepest the machine's stack may grow.
const MAX_STACK: usize = 1 << 20;

#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(&'static str),
    Storage { dtype: DType, key: String, numel: usize },
    Tensor(TensorRef),
    Mark,
}

#[derive(Clone, Debug)]
struct TensorRef {
    dtype: DType,
    key: String,
    /// Elements of the storage, as the pickle declares.
    numel: usize,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// The globals a state dict may name, and the dtype of each storage class.
fn global(module: &str, name: &str) -> Option<Value> {
    let storage = |d| Some(Value::Storage { dtype: d, key: String::new(), numel: 0 });
    match (module, name) {
        ("collections", "OrderedDict") => Some(Value::Global("OrderedDict")),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Value::Global("rebuild_tensor")),
        ("torch._utils", "_rebuild_parameter") => Some(Value::Global("rebuild_parameter")),
        ("torch", "FloatStorage") => storage(DType::F32),
        ("torch", "DoubleStorage") => storage(DType::F64),
        ("torch", "HalfStorage") => storage(DType::F16),
        ("torch", "BFloat16Storage") => storage(DType::BF16),
        ("torch", "LongStorage") => storage(DType::I64),
        ("torch", "IntStorage") => storage(DType::I32),
        ("torch", "ByteStorage" | "BoolStorage") => storage(DType::U8),
        _ => None,
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn bad(&self, what: impl std::fmt::Display) -> Error {
        Error::input(format!("not a PyTorch state dict the importer understands ({what} at byte {} of data.pkl)", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return Err(self.bad(format!("{n} bytes announced, {} left", self.data.len() - self.pos)));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("two bytes")))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("four bytes")))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&c| c == b'\n').ok_or_else(|| self.bad("unterminated line"))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| self.bad("a name that is not UTF-8"))?.to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?;
        Ok(Value::Str(std::str::from_utf8(bytes).map_err(|_| self.bad("a string that is not UTF-8"))?.to_string()))
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.bad("a stack deeper than any state dict needs"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| self.bad("an empty stack"))
    }

    /// Everything above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or_else(|| self.bad("a missing mark"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| Error::input("not a PyTorch state dict the importer understands (an empty stack)"))
    }

    fn memo_get(&self, k: u32) -> Result<Value> {
        self.memo.get(&k).cloned().ok_or_else(|| self.bad(format!("an unknown memo entry {k}")))
    }

    fn memo_put(&mut self, k: u32) -> Result<()> {
        let v = self.stack.last().cloned().ok_or_else(|| self.bad("an empty stack"))?;
        if self.memo.len() >= MAX_STACK {
            return Err(self.bad("too many memo entries"));
        }
        self.memo.insert(k, v);
        Ok(())
    }

    fn int(v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    fn sizes(&self, v: &Value) -> Result<Vec<usize>> {
        match v {
            Value::Tuple(items) => items.iter().map(|i| Self::int(i).and_then(|x| usize::try_from(x).ok()).ok_or_else(|| self.bad("a negative or non-integer size"))).collect(),
            _ => Err(self.bad("sizes that are not a tuple")),
        }
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value> {
        let Value::Tuple(args) = args else { return Err(self.bad("arguments that are not a tuple")) };
        match callable {
            Value::Global("OrderedDict") => Ok(Value::Dict(vec![])),
            Value::Global("rebuild_tensor") => {
                let (storage, offset, size, stride) = match args.as_slice() {
                    [s, o, size, stride, ..] => (s, o, size, stride),
                    _ => return Err(self.bad("a tensor with too few arguments")),
                };
                let Value::Storage { dtype, key, numel } = storage else { return Err(self.bad("a tensor without storage")) };
                let offset = Self::int(offset).and_then(|x| usize::try_from(x).ok()).ok_or_else(|| self.bad("a bad storage offset"))?;
                let (size, stride) = (self.sizes(size)?, self.sizes(stride)?);
                if size.len() != stride.len() {
                    return Err(self.bad("sizes and strides of different ranks"));
                }
                Ok(Value::Tensor(TensorRef { dtype: *dtype, key: key.clone(), numel: *numel, offset, size, stride }))
            }
            Value::Global("rebuild_parameter") => match args.into_iter().next() {
                Some(t @ Value::Tensor(_)) => Ok(t),
                _ => Err(self.bad("a parameter without a tensor")),
            },
            other => Err(self.bad(format!("a call of {other:?}, which a state dict does not contain"))),
        }
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.push(Value::Mark)?,
                b'}' => self.push(Value::Dict(vec![]))?,
                b']' => self.push(Value::List(vec![]))?,
                b')' => self.push(Value::Tuple(vec![]))?,
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return Err(self.bad("an integer wider than 64 bits"));
                    }
                    let mut buf = if bytes.last().is_some_and(|&b| b & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Float)?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.push(v)?
                }
                b'c' => {
                    let (module, name) = (self.line()?, self.line()?);
                    let g = global(&module, &name).ok_or_else(|| self.bad(format!("the global {module}.{name}, which is refused")))?;
                    self.push(g)?
                }
                0x93 => {
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (Value::Str(module), Value::Str(name)) = (module, name) else { return Err(self.bad("a global without a name")) };
                    let g = global(&module, &name).ok_or_else(|| self.bad(format!("the global {module}.{name}, which is refused")))?;
                    self.push(g)?
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    let v = self.memo_get(k)?;
                    self.push(v)?
                }
                b'j' => {
                    let k = self.u32()?;
                    let v = self.memo_get(k)?;
                    self.push(v)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.bad("a tuple of missing items"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    if items.iter().any(|v| matches!(v, Value::Mark)) {
                        return Err(self.bad("a mark inside a tuple"));
                    }
                    self.push(Value::Tuple(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err(self.bad("an append to something that is not a list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err(self.bad("an append to something that is not a list")),
                    }
                }
                b's' => {
                    let (v, k) = (self.pop()?, self.pop()?);
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err(self.bad("an item set on something that is not a dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.bad("an odd number of dict items"));
                    }
                    let mut it = items.into_iter();
                    let mut pairs = vec![];
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top()? {
                        Value::Dict(d) => d.extend(pairs),
                        _ => return Err(self.bad("items set on something that is not a dict")),
                    }
                }
                b'R' => {
                    let (args, callable) = (self.pop()?, self.pop()?);
                    let v = self.reduce(callable, args)?;
                    self.push(v)?
                }
                b'Q' => {
                    // A persistent id: ('storage', storage class, key, location, numel).
                    let pid = self.pop()?;
                    let Value::Tuple(items) = pid else { return Err(self.bad("a persistent id that is not a tuple")) };
                    let storage = match items.as_slice() {
                        [Value::Str(kind), Value::Storage { dtype, .. }, Value::Str(key), _, numel] if kind == "storage" => {
                            let numel = Self::int(numel).and_then(|x| usize::try_from(x).ok()).ok_or_else(|| self.bad("a bad storage size"))?;
                            Value::Storage { dtype: *dtype, key: key.clone(), numel }
                        }
                        _ => return Err(self.bad("a persistent id that is not a storage")),
                    };
                    self.push(storage)?
                }
                b'b' => {
                    // BUILD sets an object's state; the only state a state dict carries is its
                    // `_metadata`, which the import does not need.
                    self.pop()?;
                    if !matches!(self.top()?, Value::Dict(_)) {
                        return Err(self.bad("a state set on something that is not a dict"));
                    }
                }
                other => return Err(self.bad(format!("the pickle opcode 0x{other:02x}, which a state dict does not use"))),
            }
        }
    }
}

fn size_of(dtype: DType) -> usize {
    dtype.size_in_bytes()
}

/// Interprets a state dict's `data.pkl` alone and returns how many tensors it names (for
/// fuzzing the interpreter without the archive around it).
pub fn parse_pickle(data: &[u8]) -> Result<usize> {
    let mut m = Machine { data, pos: 0, stack: vec![], memo: HashMap::new() };
    match m.run()? {
        Value::Dict(items) => Ok(items.iter().filter(|(_, v)| matches!(v, Value::Tensor(_))).count()),
        _ => Err(Error::input("the pickle holds no dictionary")),
    }
}

/// Reads every tensor of a `torch.save(state_dict)` archive.
pub fn read<R: Read + Seek>(reader: R, file_len: u64) -> Result<HashMap<String, Tensor>> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| Error::input(format!("not a PyTorch file (a zip archive): {e}")))?;
    let pkl = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(|n| (i, n.to_string())))
        .find(|(_, n)| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| Error::input("not a PyTorch file: no data.pkl in the archive (files saved by torch.save before 1.6 are not supported)"))?;
    let prefix = pkl.1.trim_end_matches("data.pkl").to_string();
    let bytes = read_entry(&mut zip, pkl.0, file_len)?;
    let mut m = Machine { data: &bytes, pos: 0, stack: vec![], memo: HashMap::new() };
    let root = m.run()?;
    let Value::Dict(items) = root else { return Err(Error::input("the file holds no dictionary of tensors (a whole pickled model?): save model.state_dict()")) };
    let mut out = HashMap::new();
    for (k, v) in items {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else { return Err(Error::input("the dictionary holds entries that are not named tensors")) };
        let tensor = materialise(&mut zip, &prefix, &t, file_len).map_err(|e| Error::input(format!("tensor {name}: {e}")))?;
        out.insert(name, tensor);
    }
    if out.is_empty() {
        return Err(Error::input("the state dict holds no tensors"));
    }
    Ok(out)
}

/// The bytes of an uncompressed entry, never more than the archive holds.
fn read_entry<R: Read + Seek>(zip: &mut zip::ZipArchive<R>, index: usize, file_len: u64) -> Result<Vec<u8>> {
    let entry = zip.by_index(index).map_err(|e| Error::input(format!("unreadable archive entry: {e}")))?;
    if entry.compression() != zip::CompressionMethod::Stored {
        return Err(Error::input(format!("the entry {} is compressed; PyTorch stores its entries uncompressed", entry.name())));
    }
    let size = entry.size();
    if size > file_len {
        return Err(Error::input(format!("the entry {} claims {size} bytes in a file of {file_len}", entry.name())));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry.take(size).read_to_end(&mut bytes).map_err(|e| Error::input(format!("unreadable archive entry: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(Error::input("an archive entry is shorter than it claims"));
    }
    Ok(bytes)
}

fn materialise<R: Read + Seek>(zip: &mut zip::ZipArchive<R>, prefix: &str, t: &TensorRef, file_len: u64) -> Result<Tensor> {
    let name = format!("{prefix}data/{}", t.key);
    let index = zip.index_for_name(&name).ok_or_else(|| Error::input(format!("its storage {name} is missing")))?;
    let bytes = read_entry(zip, index, file_len)?;
    let item = size_of(t.dtype);
    if t.numel.checked_mul(item) != Some(bytes.len()) {
        return Err(Error::input(format!("its storage declares {} elements but holds {} bytes", t.numel, bytes.len())));
    }
    let numel = t.numel;
    // The view must lie inside the storage: its last element at offset + Σ (size - 1) · stride.
    let count = t.size.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).ok_or_else(|| Error::input("an impossible size"))?;
    if count > 0 {
        let last = t.size.iter().zip(&t.stride).try_fold(t.offset, |a, (&s, &st)| (s - 1).checked_mul(st).and_then(|x| a.checked_add(x)));
        if last.is_none_or(|l| l >= numel) {
            return Err(Error::input(format!("its view (offset {}, size {:?}, stride {:?}) exceeds its storage of {numel} elements", t.offset, t.size, t.stride)));
        }
    }
    // Gather the elements in row-major order (any strides).
    let mut data = Vec::with_capacity(count * item);
    let mut idx = vec![0usize; t.size.len()];
    for _ in 0..count {
        let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        data.extend_from_slice(&bytes[at * item..(at + 1) * item]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Tensor::from_raw_buffer(&data, t.dtype, &t.size, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_code_and_bad_sizes() {
        let run = |data: &[u8]| Machine { data, pos: 0, stack: vec![], memo: HashMap::new() }.run().map(|_| ());
        // GLOBAL os.system: refused before anything runs.
        let err = run(b"\x80\x02cos\nsystem\nq\x00.").unwrap_err().to_string();
        assert!(err.contains("os.system") && err.contains("refused"), "{err}");
        // A string claiming 4 GB in a file of a few bytes.
        let err = run(b"\x80\x02X\xff\xff\xff\xffabc").unwrap_err().to_string();
        assert!(err.contains("announced"), "{err}");
        let err = run(b"\x80\x02\xffabc").unwrap_err().to_string();
        assert!(err.contains("opcode 0xff"), "{err}");
        assert!(run(b"").is_err());
        assert!(run(b"\x80\x02t.").is_err());
    }
}
