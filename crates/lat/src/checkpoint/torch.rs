//! A reader for the files `torch.save` writes that executes no code and trusts no size: the zip
//! archive of PyTorch 1.6 and later (`<name>/data.pkl` plus one entry `<name>/data/<key>` per
//! storage) and the older stream (`_use_new_zipfile_serialization=False`: a few small pickles,
//! the main pickle, the list of storage keys, then each storage's element count and bytes).
//!
//! The pickles are interpreted by a small machine that knows the opcodes `torch.save` writes and
//! builds only plain values (numbers, strings, tuples, lists, dictionaries, tensors): it accepts
//! no global except the handful that tensors need (`collections.OrderedDict`, the tensor
//! rebuilders, the typed storages) and refuses anything else, such as a pickled module or a
//! call of `os.system`. Every length is checked against the bytes that are actually there before
//! anything is allocated, every tensor's view against its storage, and storages must be stored
//! uncompressed (as PyTorch writes them), so a file can never make the reader allocate more than
//! its own size. Only the tensors of the state dict that is asked for are read.

use std::collections::HashMap;
use std::io::{Cursor, Read, Seek};

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
    Bytes,
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
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self { data, pos, stack: vec![], memo: HashMap::new() }
    }

    fn bad(&self, what: impl std::fmt::Display) -> Error {
        Error::input(format!("not a PyTorch checkpoint the importer understands ({what} at byte {} of the pickle)", self.pos))
    }

    /// A global outside the few that tensors need: code the importer will not run.
    fn refused(&self, module: &str, name: &str) -> Error {
        let what = if module.starts_with("torch.nn") { "a pickled module" } else { "an object the importer will not build" };
        self.bad(format!("the global {module}.{name}, which is refused: {what}; save model.state_dict() with torch.save and import that"))
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

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("eight bytes")))
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

    /// The key, value pairs down to the last mark (of SETITEMS, or a DICT's items).
    fn pop_pairs(&mut self) -> Result<Vec<(Value, Value)>> {
        let items = self.pop_mark()?;
        if items.len() % 2 != 0 {
            return Err(self.bad("an odd number of dict items"));
        }
        let mut it = items.into_iter();
        let mut pairs = Vec::with_capacity(it.len() / 2);
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Ok(pairs)
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| Error::input("not a PyTorch checkpoint the importer understands (an empty stack)"))
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
            other => Err(self.bad(format!("a call of {other:?}, which a checkpoint of tensors does not contain"))),
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
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| self.bad("a string longer than memory"))?;
                    let v = self.text(n)?;
                    self.push(v)?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.push(Value::Bytes)?
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    self.take(n)?;
                    self.push(Value::Bytes)?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?
                }
                b'd' => {
                    let pairs = self.pop_pairs()?;
                    self.push(Value::Dict(pairs))?
                }
                b'c' => {
                    let (module, name) = (self.line()?, self.line()?);
                    let g = global(&module, &name).ok_or_else(|| self.refused(&module, &name))?;
                    self.push(g)?
                }
                0x93 => {
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (Value::Str(module), Value::Str(name)) = (module, name) else { return Err(self.bad("a global without a name")) };
                    let g = global(&module, &name).ok_or_else(|| self.refused(&module, &name))?;
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
                    let pairs = self.pop_pairs()?;
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
                    // A persistent id: ('storage', storage class, key, location, numel), and in
                    // the legacy format a sixth item, the view (None since PyTorch 0.4).
                    let pid = self.pop()?;
                    let Value::Tuple(items) = pid else { return Err(self.bad("a persistent id that is not a tuple")) };
                    let storage = match items.as_slice() {
                        [Value::Str(kind), Value::Storage { dtype, .. }, Value::Str(key), _, numel] | [Value::Str(kind), Value::Storage { dtype, .. }, Value::Str(key), _, numel, Value::None]
                            if kind == "storage" =>
                        {
                            let numel = Self::int(numel).and_then(|x| usize::try_from(x).ok()).ok_or_else(|| self.bad("a bad storage size"))?;
                            Value::Storage { dtype: *dtype, key: key.clone(), numel }
                        }
                        _ => return Err(self.bad("a persistent id that is not a storage")),
                    };
                    self.push(storage)?
                }
                b'b' => {
                    // BUILD sets an object's state; the only state a checkpoint's dictionaries
                    // carry is a state dict's `_metadata`, which the import does not need.
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

/// Interprets one pickle alone and returns how many tensors its top-level dictionary names (for
/// fuzzing the interpreter without the archive around it).
pub fn parse_pickle(data: &[u8]) -> Result<usize> {
    match Machine::new(data, 0).run()? {
        Value::Dict(items) => Ok(items.iter().filter(|(_, v)| matches!(v, Value::Tensor(_))).count()),
        _ => Err(Error::input("the pickle holds no dictionary")),
    }
}

/// The second to the thirteenth byte of every legacy file: the pickled magic number
/// 0x1950a86a20f9469cfc6c (after the protocol opcode).
const LEGACY_MAGIC: [u8; 12] = [0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Whether `bytes` start like a `torch.save` file (zip archive or legacy stream).
pub fn looks_like_torch(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || is_legacy(bytes)
}

fn is_legacy(bytes: &[u8]) -> bool {
    bytes.len() >= 15 && bytes[0] == 0x80 && bytes[2..14] == LEGACY_MAGIC && bytes[14] == b'.'
}

/// Where a file's storages are.
enum Storages<'a> {
    Zip { archive: zip::ZipArchive<Cursor<&'a [u8]>>, prefix: String },
    Legacy(HashMap<String, &'a [u8]>),
}

impl Storages<'_> {
    fn bytes(&mut self, key: &str, file_len: u64) -> Result<Vec<u8>> {
        match self {
            Storages::Zip { archive, prefix } => {
                let name = format!("{prefix}data/{key}");
                let index = archive.index_for_name(&name).ok_or_else(|| Error::input(format!("its storage {name} is missing")))?;
                read_entry(archive, index, file_len)
            }
            Storages::Legacy(map) => map.get(key).map(|b| b.to_vec()).ok_or_else(|| Error::input(format!("its storage {key} is missing"))),
        }
    }
}

/// The object a `torch.save` file holds, and its storages.
fn open(bytes: &[u8]) -> Result<(Value, Storages<'_>)> {
    if is_legacy(bytes) {
        return legacy(bytes);
    }
    let file_len = bytes.len() as u64;
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| Error::input(format!("not a PyTorch checkpoint (not a zip archive, nor the format before PyTorch 1.6): {e}")))?;
    let pkl = (0..archive.len())
        .filter_map(|i| archive.name_for_index(i).map(|n| (i, n.to_string())))
        .find(|(_, n)| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| Error::input("not a PyTorch checkpoint: a zip archive without data.pkl"))?;
    let prefix = pkl.1.trim_end_matches("data.pkl").to_string();
    let pickle = read_entry(&mut archive, pkl.0, file_len)?;
    let root = Machine::new(&pickle, 0).run()?;
    Ok((root, Storages::Zip { archive, prefix }))
}

/// The legacy stream: the magic number, the protocol version (1001), the system's facts, the
/// object, the sorted list of storage keys, then per key its element count (8 bytes) and bytes.
fn legacy(bytes: &[u8]) -> Result<(Value, Storages<'_>)> {
    let mut pos = 15;
    let mut next = || -> Result<Value> {
        let mut m = Machine::new(bytes, pos);
        let v = m.run()?;
        pos = m.pos;
        Ok(v)
    };
    if !matches!(next()?, Value::Int(1001)) {
        return Err(Error::input("a PyTorch checkpoint of the format before 1.6 with an unknown protocol version"));
    }
    let Value::Dict(info) = next()? else { return Err(Error::input("a legacy PyTorch checkpoint without its system information")) };
    let little = info.iter().any(|(k, v)| matches!((k, v), (Value::Str(k), Value::Bool(true)) if k == "little_endian"));
    if !little {
        return Err(Error::input("a PyTorch checkpoint saved on a big-endian machine, which the importer does not read"));
    }
    let root = next()?;
    let Value::List(keys) = next()? else { return Err(Error::input("a legacy PyTorch checkpoint without its list of storages")) };
    // Each storage's element size comes from the tensors that use it.
    let mut declared: HashMap<String, (DType, usize)> = HashMap::new();
    visit_tensors(&root, &mut |t| {
        declared.insert(t.key.clone(), (t.dtype, t.numel));
    });
    let mut storages = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else { return Err(Error::input("a storage key that is not a string")) };
        let (dtype, numel) = *declared.get(&key).ok_or_else(|| Error::input(format!("the storage {key} belongs to no tensor")))?;
        let rest = &bytes[pos.min(bytes.len())..];
        if rest.len() < 8 {
            return Err(Error::input(format!("the file ends before storage {key}")));
        }
        let count = u64::from_le_bytes(rest[..8].try_into().expect("eight bytes"));
        if count != numel as u64 {
            return Err(Error::input(format!("storage {key} holds {count} elements where its tensors declare {numel}")));
        }
        let len = numel.checked_mul(size_of(dtype)).filter(|&l| l <= rest.len() - 8).ok_or_else(|| Error::input(format!("storage {key} claims more bytes than the file has")))?;
        storages.insert(key, &rest[8..8 + len]);
        pos += 8 + len;
    }
    Ok((root, Storages::Legacy(storages)))
}

/// Calls `f` on every tensor inside `v`.
fn visit_tensors(v: &Value, f: &mut dyn FnMut(&TensorRef)) {
    match v {
        Value::Tensor(t) => f(t),
        Value::Tuple(items) | Value::List(items) => items.iter().for_each(|i| visit_tensors(i, f)),
        Value::Dict(items) => items.iter().for_each(|(k, v)| {
            visit_tensors(k, f);
            visit_tensors(v, f);
        }),
        _ => {}
    }
}

/// Where training checkpoints usually keep the model's state dict, in the order tried.
pub const USUAL_KEYS: [&str; 9] = ["state_dict", "model_state_dict", "model", "module", "net", "network", "model_state", "weights", "params"];

/// The named tensors of `v` when it is a dictionary of them (a state dict).
fn tensor_dict(v: &Value) -> Option<Vec<(String, TensorRef)>> {
    let Value::Dict(items) = v else { return None };
    let named: Vec<(String, TensorRef)> = items
        .iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
            _ => None,
        })
        .collect();
    (!named.is_empty() && named.len() == items.len()).then_some(named)
}

/// A short description of what a value is, for errors.
fn describe(v: &Value) -> String {
    match v {
        Value::Dict(items) => {
            let keys: Vec<String> = items
                .iter()
                .take(8)
                .map(|(k, _)| match k {
                    Value::Str(s) => format!("\"{s}\""),
                    Value::Int(i) => i.to_string(),
                    _ => "?".into(),
                })
                .collect();
            let tensors = items.iter().filter(|(_, v)| matches!(v, Value::Tensor(_))).count();
            format!("a dictionary of {} entries ({} tensors), keys {}{}", items.len(), tensors, keys.join(", "), if items.len() > 8 { ", …" } else { "" })
        }
        Value::Tensor(_) => "a single tensor".into(),
        Value::List(l) | Value::Tuple(l) => format!("a sequence of {} items", l.len()),
        _ => "a plain value".into(),
    }
}

/// The state dict inside `root`: `root` itself, its entry `key`, or the first of the usual keys
/// that holds one.
fn locate(root: &Value, key: Option<&str>) -> Result<Vec<(String, TensorRef)>> {
    let entry = |name: &str| -> Option<&Value> {
        match root {
            Value::Dict(items) => items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == name)).map(|(_, v)| v),
            _ => None,
        }
    };
    if let Some(name) = key {
        let v = entry(name).ok_or_else(|| Error::input(format!("--key {name}: the file holds {}, with no entry {name}", describe(root))))?;
        return tensor_dict(v).ok_or_else(|| Error::input(format!("--key {name}: the entry holds {}, not a state dict of named tensors", describe(v))));
    }
    if let Some(sd) = tensor_dict(root) {
        return Ok(sd);
    }
    if let Some(sd) = USUAL_KEYS.iter().filter_map(|k| entry(k)).find_map(tensor_dict) {
        return Ok(sd);
    }
    // Say which entries do hold tensors, so that the user can name one.
    let holders: Vec<String> = match root {
        Value::Dict(items) => items
            .iter()
            .filter_map(|(k, v)| match (k, tensor_dict(v)) {
                (Value::Str(k), Some(t)) => Some(format!("\"{k}\" holds {} tensors", t.len())),
                _ => None,
            })
            .collect(),
        _ => vec![],
    };
    let hint = match holders.first() {
        Some(_) => format!("{}; name the model's with --key", holders.join(", ")),
        None => format!("none of its entries is a state dict (looked at the file itself and under {}); save model.state_dict() with torch.save", USUAL_KEYS.join(", ")),
    };
    Err(Error::input(format!("no state dict found: the file holds {}; {hint}", describe(root))))
}

/// The state dict in the bytes of a `torch.save` file (the zip archive or the legacy format):
/// the dictionary of tensors itself, or the one inside a training checkpoint under `key` or one
/// of the [`USUAL_KEYS`]. Only its tensors are read.
pub fn state_dict(bytes: &[u8], key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let (root, mut storages) = open(bytes)?;
    let mut out = HashMap::new();
    for (name, t) in locate(&root, key)? {
        let tensor = materialise(&mut storages, &t, bytes.len() as u64).map_err(|e| Error::input(format!("tensor {name}: {e}")))?;
        out.insert(name, tensor);
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

fn materialise(storages: &mut Storages, t: &TensorRef, file_len: u64) -> Result<Tensor> {
    let bytes = storages.bytes(&t.key, file_len)?;
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

/// The storage class PyTorch names for `dtype`.
fn storage_class(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "FloatStorage",
        DType::F64 => "DoubleStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
        DType::U8 => "ByteStorage",
        other => return Err(Error::input(format!("PyTorch has no storage for {other:?} tensors"))),
    })
}

/// Writes the pickle opcodes `torch.save` uses for a state dict.
struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: usize) {
        match v {
            0..=0xff => self.0.extend_from_slice(&[b'K', v as u8]),
            0x100..=0xffff => {
                self.0.push(b'M');
                self.0.extend_from_slice(&(v as u16).to_le_bytes());
            }
            _ if v <= i32::MAX as usize => {
                self.0.push(b'J');
                self.0.extend_from_slice(&(v as i32).to_le_bytes());
            }
            _ => {
                self.0.extend_from_slice(&[0x8a, 8]);
                self.0.extend_from_slice(&(v as i64).to_le_bytes());
            }
        }
    }

    fn tuple(&mut self, items: &[usize]) {
        self.0.push(b'(');
        items.iter().for_each(|&i| self.int(i));
        self.0.push(b't');
    }

    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R");
    }
}

/// The bytes of a `torch.save(state_dict)` file (the zip archive of PyTorch 1.6 and later) of
/// `tensors`, in order, each with its own storage: what `torch.load(..., weights_only=True)`
/// reads. The archive is the same for the same tensors (no dates).
pub fn write_state_dict(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut p = Pickle(vec![0x80, 2]);
    p.ordered_dict();
    p.0.push(b'(');
    let mut storages = Vec::with_capacity(tensors.len());
    for (i, (name, t)) in tensors.iter().enumerate() {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let dims = t.dims().to_vec();
        let strides: Vec<usize> = (0..dims.len()).map(|d| dims[d + 1..].iter().product()).collect();
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.0.push(b'(');
        p.0.push(b'(');
        p.str("storage");
        p.global("torch", storage_class(t.dtype())?);
        p.str(&i.to_string());
        p.str("cpu");
        p.int(t.elem_count());
        p.0.extend_from_slice(b"tQ");
        p.int(0);
        p.tuple(&dims);
        p.tuple(&strides);
        p.0.push(0x89);
        p.ordered_dict();
        p.0.extend_from_slice(b"tR");
        storages.push(raw_bytes(&t)?);
    }
    p.0.extend_from_slice(b"u.");
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default())
        .large_file(storages.iter().any(|s| s.len() as u64 >= u32::MAX as u64))
        .with_alignment(64);
    let mut entry = |name: String, bytes: &[u8]| -> Result<()> {
        zip.start_file(name, options).map_err(|e| Error::input(format!("cannot write the archive: {e}")))?;
        std::io::Write::write_all(&mut zip, bytes).map_err(|e| Error::input(format!("cannot write the archive: {e}")))
    };
    entry("archive/data.pkl".into(), &p.0)?;
    entry("archive/byteorder".into(), b"little")?;
    for (i, bytes) in storages.iter().enumerate() {
        entry(format!("archive/data/{i}"), bytes)?;
    }
    entry("archive/version".into(), b"3\n")?;
    Ok(zip.finish().map_err(|e| Error::input(format!("cannot write the archive: {e}")))?.into_inner())
}

/// The little-endian bytes of a contiguous CPU tensor.
fn raw_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::F32 => t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => t.flatten_all()?.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.flatten_all()?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.flatten_all()?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => t.flatten_all()?.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U8 => t.flatten_all()?.to_vec1::<u8>()?,
        other => return Err(Error::input(format!("PyTorch has no storage for {other:?} tensors"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_code_and_bad_sizes() {
        let run = |data: &[u8]| Machine::new(data, 0).run().map(|_| ());
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

    #[test]
    fn written_archives_read_back() {
        let tensors = vec![
            ("a.weight".to_string(), Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap()),
            ("b".to_string(), Tensor::new(&[7i64], &Device::Cpu).unwrap().reshape(()).unwrap()),
            ("c".to_string(), Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap()),
        ];
        let bytes = write_state_dict(&tensors).unwrap();
        assert_eq!(bytes, write_state_dict(&tensors).unwrap(), "the same tensors give the same bytes");
        let back = state_dict(&bytes, None).unwrap();
        for (name, t) in &tensors {
            let got = &back[name];
            assert_eq!((got.dims(), got.dtype()), (t.dims(), t.dtype()), "{name}");
            assert_eq!(got.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(), t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap());
        }
    }
}
