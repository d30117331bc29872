//! A reader for exactly the subset of Python's pickle format that few-shot datasets use:
//! dicts, lists and tuples of strings, numbers and numpy arrays, in protocols 0 to 5.
//!
//! Numpy arrays are accepted in the three forms that numpy writes:
//! `numpy.core.multiarray._reconstruct` with a `BUILD` state (numpy 1, every protocol up
//! to 4, and Python 2's files), the same under `numpy._core` (numpy 2), and
//! `numpy.core.numeric._frombuffer` / `numpy._core.numeric._frombuffer` (protocol 5,
//! in-band buffers). Python 2's byte strings are read as latin1, as `pickle.load(f,
//! encoding='latin1')` does. Out-of-band buffers, arbitrary classes and other globals are
//! refused with a message that names them.
//!
//! `serde-pickle` cannot be used: it refuses `REDUCE` of globals other than a few builtins,
//! which is how every numpy array is pickled.
//!
//! The reader streams the file: an array's bytes are read once, straight into the buffer
//! that becomes the array, so loading takes about the memory of the data. Corrupt input is
//! an error, never a panic: lengths are checked against the bytes left, nesting is
//! bounded, and copies made by `GET`/`DUP` are counted against a budget.

use std::collections::HashMap;
use std::io::Read;
use std::rc::Rc;

/// A numpy element type, with its byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dtype {
    /// `b'u'` (unsigned), `b'i'` (signed), `b'f'` (float) or `b'b'` (bool).
    pub kind: u8,
    /// Bytes per element.
    pub size: usize,
    /// Big-endian (`>`).
    pub big_endian: bool,
}

impl Dtype {
    /// Parses a numpy type string such as `u1`, `<i8`, `|u1`, `>f4`, `uint8`, `float32`.
    pub fn parse(text: &str) -> Option<Dtype> {
        let (big_endian, rest) = match text.as_bytes().first()? {
            b'>' | b'!' => (true, &text[1..]),
            b'<' | b'|' | b'=' => (false, &text[1..]),
            _ => (false, text),
        };
        let named = match rest {
            "uint8" => Some((b'u', 1)),
            "int8" => Some((b'i', 1)),
            "uint16" => Some((b'u', 2)),
            "int16" => Some((b'i', 2)),
            "uint32" => Some((b'u', 4)),
            "int32" => Some((b'i', 4)),
            "uint64" => Some((b'u', 8)),
            "int64" => Some((b'i', 8)),
            "float32" => Some((b'f', 4)),
            "float64" => Some((b'f', 8)),
            "bool" => Some((b'b', 1)),
            _ => None,
        };
        let (kind, size) = match named {
            Some(n) => n,
            None => {
                let kind = *rest.as_bytes().first()?;
                let size: usize = rest.get(1..)?.parse().ok()?;
                (kind, size)
            }
        };
        let ok = matches!(
            (kind, size),
            (b'u' | b'i', 1 | 2 | 4 | 8) | (b'f', 4 | 8) | (b'b', 1)
        );
        ok.then_some(Dtype {
            kind,
            size,
            big_endian: big_endian && size > 1,
        })
    }

    /// The numpy name, e.g. `uint8`.
    pub fn name(&self) -> String {
        match self.kind {
            b'u' => format!("uint{}", self.size * 8),
            b'i' => format!("int{}", self.size * 8),
            b'f' => format!("float{}", self.size * 8),
            _ => "bool".into(),
        }
    }

    /// Element `i` of `data` as an integer, when this is an integer or bool type.
    pub fn int_at(&self, data: &[u8], i: usize) -> Option<i64> {
        let bytes = data.get(i * self.size..(i + 1) * self.size)?;
        let mut b = [0u8; 8];
        if self.big_endian {
            for (k, &v) in bytes.iter().rev().enumerate() {
                b[k] = v;
            }
        } else {
            b[..self.size].copy_from_slice(bytes);
        }
        match self.kind {
            b'u' | b'b' => i64::try_from(u64::from_le_bytes(b)).ok(),
            b'i' => {
                // Sign-extend.
                let shift = 64 - 8 * self.size as u32;
                Some((i64::from_le_bytes(b) << shift) >> shift)
            }
            _ => None,
        }
    }
}

/// A numpy array read from a pickle or `.npy` file (C order unless `fortran`).
#[derive(Clone, Debug)]
pub(crate) struct NpArray {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub fortran: bool,
    pub data: Rc<Vec<u8>>,
}

impl NpArray {
    /// Number of elements (`None` on overflow).
    pub fn len(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// Checks that the data holds exactly the elements of the shape.
    pub fn check(&self) -> Result<(), String> {
        let want = self
            .len()
            .and_then(|n| n.checked_mul(self.dtype.size))
            .ok_or_else(|| format!("array shape {:?} is too large", self.shape))?;
        if self.data.len() != want {
            return Err(format!(
                "array of shape {:?} and dtype {} needs {want} bytes, the file holds {}",
                self.shape,
                self.dtype.name(),
                self.data.len()
            ));
        }
        Ok(())
    }

    /// Takes the bytes out (without a copy when nothing else holds them).
    pub fn into_bytes(self) -> Vec<u8> {
        Rc::try_unwrap(self.data).unwrap_or_else(|shared| (*shared).clone())
    }
}

/// A value of the pickle subset.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A Python 3 `str`.
    Str(String),
    /// `bytes`, `bytearray` or a Python 2 `str` (read as latin1 where text is wanted).
    Bytes(Rc<Vec<u8>>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A global that may be called: `module.name`.
    Global(String, String),
    Dtype(Dtype),
    Array(NpArray),
    /// An array made by `_reconstruct`, waiting for its `BUILD` state.
    EmptyArray,
}

impl Value {
    /// The value's text, when it is a string (Python 2 strings read as latin1).
    pub fn text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Bytes(b) => Some(b.iter().map(|&c| char::from(c)).collect()),
            _ => None,
        }
    }

    /// The entry `key` of a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.text().as_deref() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Takes the entry `key` out of a dict with string keys (so that its arrays are not
    /// shared and can be moved out without a copy).
    pub fn take(&mut self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(items) => {
                let at = items
                    .iter()
                    .position(|(k, _)| k.text().as_deref() == Some(key))?;
                Some(items.swap_remove(at).1)
            }
            _ => None,
        }
    }

    /// The keys of a dict, as text.
    pub fn keys(&self) -> Vec<String> {
        match self {
            Value::Dict(items) => items.iter().filter_map(|(k, _)| k.text()).collect(),
            _ => Vec::new(),
        }
    }

    /// A short description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(_) => "a str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::List(l) => format!("a list of {}", l.len()),
            Value::Tuple(l) => format!("a tuple of {}", l.len()),
            Value::Dict(_) => format!("a dict with keys {:?}", self.keys()),
            Value::Global(m, n) => format!("the global {m}.{n}"),
            Value::Dtype(d) => format!("the dtype {}", d.name()),
            Value::Array(a) => format!(
                "a numpy array of shape {:?} and dtype {}",
                a.shape,
                a.dtype.name()
            ),
            Value::EmptyArray => "an unfinished numpy array".into(),
        }
    }

    /// Integers from a list or tuple of ints, or from an integer numpy array.
    pub fn ints(&self) -> Option<Vec<i64>> {
        match self {
            Value::List(items) | Value::Tuple(items) => items
                .iter()
                .map(|v| match v {
                    Value::Int(i) => Some(*i),
                    Value::Bool(b) => Some(i64::from(*b)),
                    _ => None,
                })
                .collect(),
            Value::Array(a) if a.check().is_ok() && a.dtype.kind != b'f' => {
                let n = a.len()?;
                (0..n).map(|i| a.dtype.int_at(&a.data, i)).collect()
            }
            _ => None,
        }
    }
}

/// Deepest nesting of containers accepted.
const MAX_DEPTH: usize = 64;

/// The reader's state: the input and how much of it is left.
struct Reader<R> {
    input: R,
    left: u64,
}

impl<R: Read> Reader<R> {
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        self.fill(&mut out)?;
        Ok(out)
    }

    fn fill(&mut self, out: &mut [u8]) -> Result<(), String> {
        if out.len() as u64 > self.left {
            return Err(format!(
                "truncated: {} bytes wanted, {} left",
                out.len(),
                self.left
            ));
        }
        self.input
            .read_exact(out)
            .map_err(|e| format!("truncated or unreadable: {e}"))?;
        self.left -= out.len() as u64;
        Ok(())
    }

    /// `n` bytes, refused before allocating when fewer are left.
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, String> {
        if n > self.left {
            return Err(format!("truncated: {n} bytes wanted, {} left", self.left));
        }
        let mut out = vec![0u8; n as usize];
        self.fill(&mut out)?;
        Ok(out)
    }

    /// A text line (protocol 0 opcodes), without its newline.
    fn line(&mut self) -> Result<String, String> {
        let mut out = Vec::new();
        loop {
            match self.byte()? {
                b'\n' => break,
                c => out.push(c),
            }
            if out.len() > 1 << 20 {
                return Err("text line longer than 1 MiB".into());
            }
        }
        String::from_utf8(out).map_err(|_| "text line is not UTF-8".into())
    }

    fn utf8(&mut self, n: u64) -> Result<String, String> {
        String::from_utf8(self.bytes(n)?).map_err(|_| "string is not valid UTF-8".into())
    }
}

/// How deep the containers of `v` nest, stopping at `MAX_DEPTH + 1`.
fn depth(v: &Value, limit: usize) -> usize {
    if limit == 0 {
        return 1;
    }
    let inner = |items: &mut dyn Iterator<Item = &Value>| {
        items.map(|x| depth(x, limit - 1)).max().unwrap_or(0) + 1
    };
    match v {
        Value::List(l) | Value::Tuple(l) => inner(&mut l.iter()),
        Value::Dict(d) => inner(&mut d.iter().flat_map(|(k, v)| [k, v])),
        _ => 0,
    }
}

/// Rough size of a value, for the copy budget (bytes are shared, not counted).
fn weight(v: &Value) -> usize {
    match v {
        Value::List(l) | Value::Tuple(l) => 1 + l.iter().map(weight).sum::<usize>(),
        Value::Dict(d) => 1 + d.iter().map(|(k, v)| weight(k) + weight(v)).sum::<usize>(),
        Value::Str(s) => 1 + s.len() / 8,
        _ => 1,
    }
}

/// Reads one pickle from `input`, which holds `size` bytes.
///
/// Errors (as a message) on corrupt or truncated input, and on what the subset leaves out.
pub(crate) fn read<R: Read>(input: R, size: u64) -> Result<Value, String> {
    let mut r = Reader { input, left: size };
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    // Copies (GET, DUP) may add this many values in all.
    let mut budget = 4 * size as usize + (1 << 20);

    macro_rules! pop {
        () => {
            stack.pop().ok_or("stack underflow")?
        };
    }
    let check_depth = |v: &Value| -> Result<(), String> {
        if depth(v, MAX_DEPTH) > MAX_DEPTH {
            return Err(format!("containers nested deeper than {MAX_DEPTH}"));
        }
        Ok(())
    };

    loop {
        let op = r.byte()?;
        match op {
            0x80 => {
                // PROTO
                let p = r.byte()?;
                if p > 5 {
                    return Err(format!(
                        "pickle protocol {p} is not supported (protocols 0 to 5 are)"
                    ));
                }
            }
            0x95 => {
                // FRAME: the frame's length only.
                r.array::<8>()?;
            }
            b'.' => {
                // STOP
                return match (stack.pop(), stack.is_empty()) {
                    (Some(v), true) => Ok(v),
                    (Some(_), false) => Err("values left on the stack at the end".into()),
                    (None, _) => Err("empty pickle".into()),
                };
            }
            b'(' => marks.push(stack.len()),
            b'0' => {
                pop!();
            }
            b'1' => {
                let m = marks.pop().ok_or("POP_MARK without a mark")?;
                stack.truncate(m);
            }
            b'2' => {
                let top = stack.last().ok_or("DUP on an empty stack")?.clone();
                budget = budget
                    .checked_sub(weight(&top))
                    .ok_or("too many copies (DUP)")?;
                stack.push(top);
            }
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(i64::from(i32::from_le_bytes(r.array()?)))),
            b'K' => stack.push(Value::Int(i64::from(r.byte()?))),
            b'M' => stack.push(Value::Int(i64::from(u16::from_le_bytes(r.array()?)))),
            0x8a | 0x8b => {
                // LONG1, LONG4: little-endian two's complement.
                let n = if op == 0x8a {
                    u64::from(r.byte()?)
                } else {
                    u64::from(u32::from_le_bytes(r.array()?))
                };
                let bytes = r.bytes(n)?;
                if bytes.len() > 8 {
                    return Err(format!("integer of {} bytes is too large", bytes.len()));
                }
                let mut b = [0u8; 8];
                b[..bytes.len()].copy_from_slice(&bytes);
                if bytes.last().is_some_and(|&x| x & 0x80 != 0) {
                    for x in &mut b[bytes.len()..] {
                        *x = 0xff;
                    }
                }
                stack.push(Value::Int(i64::from_le_bytes(b)));
            }
            b'I' | b'L' => {
                // INT, LONG (protocol 0)
                let line = r.line()?;
                let t = line.trim_end_matches('L');
                let v = match t {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => Value::Int(t.parse().map_err(|_| format!("bad integer {line:?}"))?),
                };
                stack.push(v);
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(r.array()?))),
            b'F' => {
                let line = r.line()?;
                stack.push(Value::Float(
                    line.parse().map_err(|_| format!("bad float {line:?}"))?,
                ));
            }
            0x8c => {
                let n = r.byte()?;
                stack.push(Value::Str(r.utf8(u64::from(n))?));
            }
            b'X' => {
                let n = u32::from_le_bytes(r.array()?);
                stack.push(Value::Str(r.utf8(u64::from(n))?));
            }
            0x8d => {
                let n = u64::from_le_bytes(r.array()?);
                stack.push(Value::Str(r.utf8(n)?));
            }
            b'U' | b'C' => {
                // SHORT_BINSTRING (Python 2 str), SHORT_BINBYTES
                let n = r.byte()?;
                stack.push(Value::Bytes(Rc::new(r.bytes(u64::from(n))?)));
            }
            b'T' | b'B' => {
                let n = u32::from_le_bytes(r.array()?);
                stack.push(Value::Bytes(Rc::new(r.bytes(u64::from(n))?)));
            }
            0x8e | 0x96 => {
                // BINBYTES8, BYTEARRAY8
                let n = u64::from_le_bytes(r.array()?);
                stack.push(Value::Bytes(Rc::new(r.bytes(n)?)));
            }
            b'S' => {
                // STRING (protocol 0): a quoted Python 2 str, plain ASCII only.
                let line = r.line()?;
                let inner = line
                    .strip_prefix('\'')
                    .and_then(|l| l.strip_suffix('\''))
                    .filter(|l| !l.contains('\\'))
                    .ok_or_else(|| format!("unsupported STRING literal {line:?}"))?;
                stack.push(Value::Bytes(Rc::new(inner.as_bytes().to_vec())));
            }
            0x97 | 0x98 => {
                return Err(
                    "out-of-band buffers (pickle protocol 5 with buffer_callback) are not \
                     supported; pickle without buffer_callback"
                        .into(),
                )
            }
            b')' => stack.push(Value::Tuple(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err("stack underflow (TUPLE)".into());
                }
                let items = stack.split_off(stack.len() - n);
                let t = Value::Tuple(items);
                check_depth(&t)?;
                stack.push(t);
            }
            b't' | b'l' | b'd' => {
                let m = marks.pop().ok_or("container without a mark")?;
                if m > stack.len() {
                    return Err("mark past the stack".into());
                }
                let items = stack.split_off(m);
                let v = match op {
                    b't' => Value::Tuple(items),
                    b'l' => Value::List(items),
                    _ => {
                        if !items.len().is_multiple_of(2) {
                            return Err("DICT with an odd number of items".into());
                        }
                        let mut it = items.into_iter();
                        let mut pairs = Vec::new();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            pairs.push((k, v));
                        }
                        Value::Dict(pairs)
                    }
                };
                check_depth(&v)?;
                stack.push(v);
            }
            b'a' => {
                let v = pop!();
                check_depth(&v)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err("APPEND to something that is not a list".into()),
                }
            }
            b'e' => {
                let m = marks.pop().ok_or("APPENDS without a mark")?;
                if m == 0 || m > stack.len() {
                    return Err("APPENDS without a list".into());
                }
                let items = stack.split_off(m);
                for v in &items {
                    check_depth(v)?;
                }
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err("APPENDS to something that is not a list".into()),
                }
            }
            b's' => {
                let v = pop!();
                let k = pop!();
                check_depth(&v)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => return Err("SETITEM on something that is not a dict".into()),
                }
            }
            b'u' => {
                let m = marks.pop().ok_or("SETITEMS without a mark")?;
                if m == 0 || m > stack.len() {
                    return Err("SETITEMS without a dict".into());
                }
                let items = stack.split_off(m);
                if !items.len().is_multiple_of(2) {
                    return Err("SETITEMS with an odd number of items".into());
                }
                for v in &items {
                    check_depth(v)?;
                }
                let mut it = items.into_iter();
                match stack.last_mut() {
                    Some(Value::Dict(d)) => {
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => return Err("SETITEMS on something that is not a dict".into()),
                }
            }
            b'q' | b'r' | 0x94 | b'p' => {
                let i = match op {
                    b'q' => u64::from(r.byte()?),
                    b'r' => u64::from(u32::from_le_bytes(r.array()?)),
                    0x94 => memo.len() as u64,
                    _ => {
                        let line = r.line()?;
                        line.parse().map_err(|_| format!("bad memo key {line:?}"))?
                    }
                };
                let v = stack.last().ok_or("PUT on an empty stack")?.clone();
                budget = budget
                    .checked_sub(weight(&v))
                    .ok_or("too many copies (PUT)")?;
                memo.insert(i, v);
            }
            b'h' | b'j' | b'g' => {
                let i = match op {
                    b'h' => u64::from(r.byte()?),
                    b'j' => u64::from(u32::from_le_bytes(r.array()?)),
                    _ => {
                        let line = r.line()?;
                        line.parse().map_err(|_| format!("bad memo key {line:?}"))?
                    }
                };
                let v = memo
                    .get(&i)
                    .ok_or_else(|| format!("memo entry {i} does not exist"))?
                    .clone();
                budget = budget
                    .checked_sub(weight(&v))
                    .ok_or("too many copies (GET)")?;
                stack.push(v);
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = pop!();
                let module = pop!();
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return Err("STACK_GLOBAL without two strings".into()),
                }
            }
            b'R' | 0x81 => {
                // REDUCE, NEWOBJ: callable(*args)
                let args = pop!();
                let callable = pop!();
                let Value::Tuple(args) = args else {
                    return Err("REDUCE arguments are not a tuple".into());
                };
                stack.push(call(callable, args)?);
            }
            b'b' => {
                let state = pop!();
                let target = stack.last_mut().ok_or("BUILD on an empty stack")?;
                build(target, state)?;
            }
            0x8f => stack.push(Value::List(Vec::new())), // EMPTY_SET, read as a list
            0x90 => {
                // ADDITEMS
                let m = marks.pop().ok_or("ADDITEMS without a mark")?;
                if m == 0 || m > stack.len() {
                    return Err("ADDITEMS without a set".into());
                }
                let items = stack.split_off(m);
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err("ADDITEMS to something that is not a set".into()),
                }
            }
            _ => {
                return Err(format!(
                    "opcode 0x{op:02x} is not supported (or the file is not a pickle)"
                ))
            }
        }
        if stack.len() > 1 << 24 {
            return Err("stack too deep".into());
        }
    }
}

/// Whether `module` is one of numpy's modules named `suffix`, in numpy 1 or numpy 2.
fn numpy_module(module: &str, suffix: &str) -> bool {
    module == format!("numpy.core.{suffix}") || module == format!("numpy._core.{suffix}")
}

/// `callable(*args)` for the callables numpy pickles use.
fn call(callable: Value, args: Vec<Value>) -> Result<Value, String> {
    let Value::Global(module, name) = callable else {
        return Err(format!("cannot call {}", callable.describe()));
    };
    let text = |v: &Value| v.text();
    match (module.as_str(), name.as_str()) {
        (m, "_reconstruct") if numpy_module(m, "multiarray") => Ok(Value::EmptyArray),
        ("numpy", "dtype") => {
            let descr = args
                .first()
                .and_then(text)
                .ok_or("numpy.dtype without a type string")?;
            Dtype::parse(&descr)
                .map(Value::Dtype)
                .ok_or_else(|| unsupported_dtype(&descr))
        }
        (m, "_frombuffer") if numpy_module(m, "numeric") => match args.as_slice() {
            [Value::Bytes(data), Value::Dtype(dtype), Value::Tuple(shape), order] => {
                let array = NpArray {
                    shape: dims(shape)?,
                    dtype: *dtype,
                    fortran: text(order).as_deref() == Some("F"),
                    data: Rc::clone(data),
                };
                array.check()?;
                Ok(Value::Array(array))
            }
            _ => Err("_frombuffer with unexpected arguments".into()),
        },
        (m, "scalar") if numpy_module(m, "multiarray") => match args.as_slice() {
            [Value::Dtype(dtype), Value::Bytes(data)] => {
                if dtype.kind == b'f' {
                    let v = match (dtype.size, data.len()) {
                        (8, 8) => f64::from_le_bytes(data[..8].try_into().expect("8 bytes")),
                        (4, 4) => {
                            f64::from(f32::from_le_bytes(data[..4].try_into().expect("4 bytes")))
                        }
                        _ => return Err("numpy float scalar of the wrong size".into()),
                    };
                    Ok(Value::Float(v))
                } else {
                    if data.len() != dtype.size {
                        return Err("numpy scalar of the wrong size".into());
                    }
                    dtype
                        .int_at(data, 0)
                        .map(Value::Int)
                        .ok_or_else(|| "numpy integer scalar out of range".into())
                }
            }
            _ => Err("numpy scalar with unexpected arguments".into()),
        },
        ("_codecs", "encode") => match args.as_slice() {
            // How Python 3 writes bytes in protocols 0 to 2.
            [Value::Str(s), ..] => s
                .chars()
                .map(|c| u8::try_from(u32::from(c)).ok())
                .collect::<Option<Vec<u8>>>()
                .map(|b| Value::Bytes(Rc::new(b)))
                .ok_or_else(|| "_codecs.encode of a string beyond latin1".into()),
            [] => Err("_codecs.encode without arguments".into()),
            [v, ..] => Ok(v.clone()),
        },
        ("builtins" | "__builtin__", "bytearray" | "bytes") => match args.as_slice() {
            [] => Ok(Value::Bytes(Rc::new(Vec::new()))),
            [v @ Value::Bytes(_), ..] => Ok(v.clone()),
            [Value::Str(s), ..] => s
                .chars()
                .map(|c| u8::try_from(u32::from(c)).ok())
                .collect::<Option<Vec<u8>>>()
                .map(|b| Value::Bytes(Rc::new(b)))
                .ok_or_else(|| "bytearray of a string beyond latin1".into()),
            _ => Err(format!("{module}.{name} with unexpected arguments")),
        },
        ("collections", "OrderedDict") if args.is_empty() => Ok(Value::Dict(Vec::new())),
        ("numpy", "ndarray") | ("numpy", "ndarray\n") => Ok(Value::EmptyArray),
        _ => Err(format!(
            "the pickle calls {module}.{name}, which is not a numpy array, dict, list or \
             plain value"
        )),
    }
}

fn unsupported_dtype(descr: &str) -> String {
    format!(
        "dtype {descr:?} is not supported (unsigned and signed integers, float32, float64 \
         and bool are)"
    )
}

/// Array dimensions from a tuple of ints.
fn dims(shape: &[Value]) -> Result<Vec<usize>, String> {
    shape
        .iter()
        .map(|d| match d {
            Value::Int(i) => usize::try_from(*i).map_err(|_| format!("negative dimension {i}")),
            _ => Err("array shape is not a tuple of ints".into()),
        })
        .collect()
}

/// `BUILD`: sets the state of an array made by `_reconstruct`, or of a dtype.
fn build(target: &mut Value, state: Value) -> Result<(), String> {
    match target {
        Value::EmptyArray => {
            let Value::Tuple(items) = state else {
                return Err("numpy array state is not a tuple".into());
            };
            // (version, shape, dtype, is_fortran, data) or, in old files, without version.
            let items = match items.as_slice() {
                [Value::Int(_), rest @ ..] if rest.len() == 4 => rest.to_vec(),
                _ if items.len() == 4 => items,
                _ => return Err("numpy array state of unexpected length".into()),
            };
            let [Value::Tuple(shape), Value::Dtype(dtype), fortran, data] = items.as_slice() else {
                return Err("numpy array state of unexpected form".into());
            };
            let data = match data {
                Value::Bytes(b) => Rc::clone(b),
                Value::Str(s) => Rc::new(
                    s.chars()
                        .map(|c| u8::try_from(u32::from(c)).ok())
                        .collect::<Option<Vec<u8>>>()
                        .ok_or("array data string beyond latin1")?,
                ),
                Value::List(_) => {
                    return Err(
                        "numpy array of Python objects (dtype object) is not supported".into(),
                    )
                }
                other => return Err(format!("numpy array data is {}", other.describe())),
            };
            let array = NpArray {
                shape: dims(shape)?,
                dtype: *dtype,
                fortran: matches!(fortran, Value::Bool(true) | Value::Int(1)),
                data,
            };
            array.check()?;
            *target = Value::Array(array);
            Ok(())
        }
        Value::Dtype(d) => {
            // (version, byte order, subdtype, names, fields, itemsize, alignment, flags)
            if let Value::Tuple(items) = &state {
                if let Some(order) = items.get(1).and_then(Value::text) {
                    d.big_endian = order == ">" && d.size > 1;
                }
                if items.get(3).is_some_and(|n| !matches!(n, Value::None)) {
                    return Err("structured dtypes (with fields) are not supported".into());
                }
            }
            Ok(())
        }
        Value::Dict(d) => match state {
            Value::Dict(items) => {
                d.extend(items);
                Ok(())
            }
            _ => Err("BUILD of a dict with a state that is not a dict".into()),
        },
        other => Err(format!("cannot set the state of {}", other.describe())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small numpy-2, protocol-2 pickle of `{'a': uint8 array [2]}` (as written by
    /// `pickle.dumps({'a': np.array([1, 2], np.uint8)}, 2)`), made by hand.
    fn tiny() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'X', 1, 0, 0, 0, b'a'];
        p.extend(b"cnumpy._core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85");
        p.extend(b"C\x01b\x87R(K\x01K\x02\x85cnumpy\ndtype\nX\x02\x00\x00\x00u1");
        p.extend(
            b"\x89\x88\x87R(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
        );
        p.extend(b"\x89C\x02\x01\x02tbs.");
        p
    }

    #[test]
    fn reads_a_hand_made_array() {
        let bytes = tiny();
        let v = read(&bytes[..], bytes.len() as u64).unwrap();
        let Some(Value::Array(a)) = v.get("a") else {
            panic!("{v:?}")
        };
        assert_eq!(a.shape, vec![2]);
        assert_eq!(a.dtype.name(), "uint8");
        assert_eq!(*a.data, vec![1, 2]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes: an error or a value, never a panic.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read(&bytes[..], bytes.len() as u64);
        }

        /// Every truncation and every one-byte corruption of a valid pickle.
        #[test]
        fn corrupted_pickles_never_panic(cut in 0usize..200, at in 0usize..200, byte in any::<u8>()) {
            let mut bytes = tiny();
            let cut = cut.min(bytes.len());
            let _ = read(&bytes[..cut], cut as u64);
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = read(&bytes[..], bytes.len() as u64);
        }

        /// Random opcodes from the supported set, with small arguments.
        #[test]
        fn random_opcode_streams_never_panic(ops in proptest::collection::vec(
            prop_oneof![
                Just(b'('), Just(b')'), Just(b']'), Just(b'}'), Just(b'a'), Just(b'e'),
                Just(b's'), Just(b'u'), Just(b't'), Just(b'l'), Just(b'd'), Just(b'2'),
                Just(b'0'), Just(b'1'), Just(b'R'), Just(b'b'), Just(0x85u8), Just(0x86),
                Just(0x87), Just(0x94), Just(b'N'), Just(b'h'), Just(b'q'), Just(b'K'),
                Just(0x93), Just(b'.'),
            ], 0..400)) {
            let mut bytes = Vec::new();
            for op in ops {
                bytes.push(op);
                if matches!(op, b'h' | b'q' | b'K') {
                    bytes.push(0);
                }
            }
            let _ = read(&bytes[..], bytes.len() as u64);
        }
    }
}
