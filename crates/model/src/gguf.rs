//! GGUF v2/v3 reader: header, metadata key/values, tensor infos and aligned tensor data.
//!
//! The file is memory-mapped; tensor bytes are borrowed from the map, so loading never holds a
//! second copy of a quantized tensor. Every length and offset is checked against the file size so
//! that a truncated or corrupt file is a clear error, never a panic.

use super::quant::GgmlType;
use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) if v >= 0 => Some(v as u64),
            Self::I16(v) if v >= 0 => Some(v as u64),
            Self::I32(v) if v >= 0 => Some(v as u64),
            Self::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the contiguous (fastest) axis.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the tensor data in the file.
    pub offset: usize,
    pub len: usize,
}

impl GgufTensorInfo {
    pub(crate) fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
    /// Shape in row-major order as Hugging Face writes it (`[rows, cols]` for a matrix).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: BTreeMap<String, GgufTensorInfo>,
    /// The whole file: a read-only map of it, or its bytes in memory.
    bytes: Box<dyn AsRef<[u8]> + Send + Sync>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            bail!(
                "file truncated: needed {n} bytes at offset {}, file has {}",
                self.pos,
                self.buf.len()
            );
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        ensure!(
            n < 1 << 32,
            "implausible string length {n} at offset {}",
            self.pos
        );
        let bytes = self.take(n as usize)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>()?[0]),
            1 => GgufValue::I8(self.arr::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr()?)),
            7 => GgufValue::Bool(self.arr::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                ensure!(depth < 4, "metadata arrays nested too deeply");
                let elem_ty = self.u32()?;
                let n = self.u64()?;
                ensure!(
                    n <= (self.buf.len() - self.pos) as u64,
                    "implausible array length {n}"
                );
                // Grown as elements are read: a length is a claim until they are there.
                let mut items = Vec::with_capacity((n as usize).min(4096));
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr()?)),
            other => bail!("unknown metadata value type {other} at offset {}", self.pos),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; a file changed underneath us is the user's doing and at
        // worst yields wrong weights, which the loader's shape checks catch in most cases.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(path, Box::new(mmap))
            .with_context(|| format!("{} is not a valid GGUF file", path.display()))
    }

    /// Parses a GGUF file held in memory (`path` only names it in messages).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path, Box::new(bytes))
            .with_context(|| format!("{} is not a valid GGUF file", path.display()))
    }

    fn parse(path: &Path, bytes: Box<dyn AsRef<[u8]> + Send + Sync>) -> Result<Self> {
        let file: &[u8] = (*bytes).as_ref();
        let mut c = Cursor { buf: file, pos: 0 };
        let magic = c.take(4)?;
        ensure!(
            magic == b"GGUF",
            "bad magic {:?} (expected \"GGUF\")",
            String::from_utf8_lossy(magic)
        );
        let version = c.u32()?;
        ensure!(
            version == 2 || version == 3,
            "unsupported GGUF version {version} (2 and 3 are supported)"
        );
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        ensure!(
            n_tensors < 1 << 24 && n_kv < 1 << 24,
            "implausible header counts ({n_tensors} tensors, {n_kv} keys)"
        );

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c
                .value(ty, 0)
                .with_context(|| format!("reading metadata key {key}"))?;
            metadata.insert(key, value);
        }

        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()?;
            ensure!(n_dims <= 4, "tensor {name} has {n_dims} dimensions");
            let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            ensure!(
                dims.iter().all(|&d| d <= u32::MAX as u64),
                "tensor {name} has implausible dimensions {dims:?}"
            );
            let ty = GgmlType::from_id(c.u32()?).with_context(|| format!("tensor {name}"))?;
            let rel = c.u64()?;
            infos.push((name, dims, ty, rel));
        }

        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        ensure!(
            alignment > 0 && alignment.is_power_of_two(),
            "invalid alignment {alignment}"
        );
        let data_start = c.pos.div_ceil(alignment) * alignment;

        let mut tensors = BTreeMap::new();
        for (name, dims, ty, rel) in infos {
            let n = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .filter(|&n| n <= file.len() as u64 * 8)
                .with_context(|| format!("tensor {name} has implausible dimensions {dims:?}"))?;
            let len = ty
                .bytes_for(n as usize)
                .with_context(|| format!("tensor {name}"))?;
            let offset = data_start.saturating_add(rel as usize);
            ensure!(
                offset.checked_add(len).is_some_and(|end| end <= file.len()),
                "tensor {name} ({len} bytes at offset {offset}) runs past the end of the file ({} bytes): the file is truncated",
                file.len()
            );
            tensors.insert(
                name.clone(),
                GgufTensorInfo {
                    name,
                    dims,
                    ty,
                    offset,
                    len,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
    pub(crate) fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }
    pub(crate) fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(GgufValue::as_u64)
    }
    pub(crate) fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(GgufValue::as_f64)
    }
    pub(crate) fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)
            .with_context(|| format!("GGUF metadata key {key} is missing"))
    }
    pub(crate) fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
            .context("GGUF metadata key general.architecture is missing")
    }

    pub(crate) fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &(*self.bytes).as_ref()[info.offset..info.offset + info.len]
    }

    /// Dequantized f32 values of a tensor, row-major in [`GgufTensorInfo::shape`] order.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self
            .tensors
            .get(name)
            .with_context(|| format!("tensor {name} is missing from {}", self.path.display()))?;
        let values = super::quant::dequantize(info.ty, self.tensor_bytes(info), info.n_elements())
            .with_context(|| format!("tensor {name}"))?;
        Ok((values, info.shape()))
    }
}
