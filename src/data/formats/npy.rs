//! numpy's `.npy` format (versions 1 to 3) and `.npz` archives of them.
//!
//! The header is a Python dict literal with three keys (`descr`, `fortran_order`,
//! `shape`); this reads exactly that, and streams the data into the array's buffer.
//! (`ndarray-npy` and `npyz` would do the same job, but the first needs another ndarray
//! version than ours and both pull a general Python-literal parser.)

use std::io::Read;
use std::rc::Rc;

use super::pickle::{Dtype, NpArray};

/// Reads one `.npy` array from `input`, which holds `size` bytes.
pub(crate) fn read<R: Read>(mut input: R, size: u64) -> Result<NpArray, String> {
    let mut magic = [0u8; 8];
    input
        .read_exact(&mut magic)
        .map_err(|_| "truncated: shorter than the .npy magic".to_string())?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let header_len = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            input
                .read_exact(&mut b)
                .map_err(|_| "truncated header length".to_string())?;
            u64::from(u16::from_le_bytes(b))
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            input
                .read_exact(&mut b)
                .map_err(|_| "truncated header length".to_string())?;
            u64::from(u32::from_le_bytes(b))
        }
        v => {
            return Err(format!(
                ".npy format version {v} is not supported (1 to 3 are)"
            ))
        }
    };
    let prefix = if magic[6] == 1 { 10 } else { 12 };
    if header_len > 1 << 20 || prefix + header_len > size {
        return Err(format!(
            "header of {header_len} bytes does not fit the file"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    input
        .read_exact(&mut header)
        .map_err(|_| "truncated header".to_string())?;
    let header = String::from_utf8(header).map_err(|_| "header is not text".to_string())?;
    let (dtype, fortran, shape) = parse_header(&header)?;
    let len = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size))
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let left = size - prefix - header_len;
    if len as u64 != left {
        return Err(format!(
            "array of shape {shape:?} and dtype {} needs {len} bytes, the file holds {left}",
            dtype.name()
        ));
    }
    let mut data = vec![0u8; len];
    input
        .read_exact(&mut data)
        .map_err(|e| format!("truncated data: {e}"))?;
    Ok(NpArray {
        shape,
        dtype,
        fortran,
        data: Rc::new(data),
    })
}

/// `{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3), }` → its three values.
fn parse_header(header: &str) -> Result<(Dtype, bool, Vec<usize>), String> {
    let bad = || format!("unexpected .npy header {header:?}");
    let value_of = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = value_of("descr").ok_or_else(bad)?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| format!("unsupported dtype description in {header:?}"))?;
    let dtype = Dtype::parse(descr).ok_or_else(|| {
        format!("dtype {descr:?} is not supported (integers, float32, float64 and bool are)")
    })?;
    let fortran = value_of("fortran_order")
        .ok_or_else(bad)?
        .starts_with("True");
    let shape = value_of("shape").ok_or_else(bad)?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(bad)?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| bad()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((dtype, fortran, shape))
}
