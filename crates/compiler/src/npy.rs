//! A reader for NumPy `.npy` files (format versions 1.0, 2.0 and 3.0), little-endian `f4`/`f8`
//! arrays in C order only. Spec: <https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>.
//!
//! ```text
//! magic "\x93NUMPY" | major u8 | minor u8 | header_len (u16 LE in v1, u32 LE in v2/v3)
//! | header: a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
//! | data: product(shape) elements
//! ```

/// Most elements an `.npy` file may hold (64 Mi floats = 256 MiB of f32).
pub(crate) const MAX_ELEMENTS: usize = 64 << 20;

/// A parsed array: its shape and its values converted to f32.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NpyArray {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<f32>,
}

fn take(bytes: &[u8], at: usize, len: usize) -> Result<&[u8], String> {
    at.checked_add(len).and_then(|end| bytes.get(at..end)).ok_or_else(|| "truncated .npy file".to_owned())
}

/// The value of `'key': value` in the header dict (value up to the next top-level comma).
fn field<'a>(header: &'a str, key: &str) -> Result<&'a str, String> {
    let pat_single = format!("'{key}'");
    let pat_double = format!("\"{key}\"");
    let start = header
        .find(&pat_single)
        .map(|i| i + pat_single.len())
        .or_else(|| header.find(&pat_double).map(|i| i + pat_double.len()))
        .ok_or_else(|| format!(".npy header has no '{key}'"))?;
    let rest = header.get(start..).unwrap_or("").trim_start();
    let rest = rest.strip_prefix(':').ok_or_else(|| format!(".npy header: no ':' after '{key}'"))?.trim_start();
    if rest.starts_with('(') {
        let end = rest.find(')').ok_or_else(|| ".npy header: unterminated shape tuple".to_owned())?;
        return Ok(rest.get(..=end).unwrap_or(""));
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Ok(rest.get(..end).unwrap_or("").trim())
}

/// Parses an `.npy` file.
pub(crate) fn parse(bytes: &[u8]) -> Result<NpyArray, String> {
    if take(bytes, 0, 6)? != b"\x93NUMPY" {
        return Err("not an .npy file (bad magic)".to_owned());
    }
    let version = take(bytes, 6, 2)?;
    let (header_len, header_at) = match version.first() {
        Some(1) => {
            let b = take(bytes, 8, 2)?;
            (usize::from(u16::from_le_bytes([b.first().copied().unwrap_or(0), b.get(1).copied().unwrap_or(0)])), 10)
        }
        Some(2 | 3) => {
            let b: [u8; 4] = take(bytes, 8, 4)?.try_into().map_err(|_| "truncated .npy file".to_owned())?;
            (usize::try_from(u32::from_le_bytes(b)).map_err(|_| "header too long".to_owned())?, 12)
        }
        _ => return Err(format!("unsupported .npy version {version:?}")),
    };
    let header = std::str::from_utf8(take(bytes, header_at, header_len)?).map_err(|_| ".npy header is not text")?;
    let descr = field(header, "descr")?.trim_matches(|c| c == '\'' || c == '"');
    let width = match descr {
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(format!(
                "unsupported .npy dtype {other:?}: only little-endian float32 (<f4) and float64 (<f8)"
            ));
        }
    };
    if field(header, "fortran_order")? != "False" {
        return Err("Fortran-ordered .npy arrays are not supported; save with np.ascontiguousarray".to_owned());
    }
    let shape_text = field(header, "shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!(".npy header: bad shape {shape_text:?}"))?;
    let mut shape = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        shape.push(part.parse::<usize>().map_err(|_| format!(".npy header: bad dimension {part:?}"))?);
    }
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&c| c <= MAX_ELEMENTS)
        .ok_or_else(|| format!(".npy array of shape {shape:?} is larger than {MAX_ELEMENTS} elements"))?;
    let data_at = header_at + header_len;
    let body = take(bytes, data_at, count * width)?;
    if bytes.len() != data_at + count * width {
        return Err("trailing bytes after the .npy data".to_owned());
    }
    let data = if width == 4 {
        body.chunks_exact(4).map(|c| <[u8; 4]>::try_from(c).map_or(f32::NAN, f32::from_le_bytes)).collect()
    } else {
        body.chunks_exact(8)
            .map(|c| <[u8; 8]>::try_from(c).map_or(f32::NAN, |b| f64::from_le_bytes(b) as f32))
            .collect()
    };
    Ok(NpyArray { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes an .npy file the way `numpy.save` does (v1, header padded to 64 bytes).
    fn write(shape: &[usize], data: &[f64], f8: bool, version: u8) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let tuple = if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
        let descr = if f8 { "<f8" } else { "<f4" };
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
        let pre = if version == 1 { 10 } else { 12 };
        while (pre + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend([version, 0]);
        if version == 1 {
            out.extend((header.len() as u16).to_le_bytes());
        } else {
            out.extend((header.len() as u32).to_le_bytes());
        }
        out.extend(header.as_bytes());
        for v in data {
            if f8 {
                out.extend(v.to_le_bytes());
            } else {
                out.extend((*v as f32).to_le_bytes());
            }
        }
        out
    }

    proptest! {
        #[test]
        fn roundtrips(shape in proptest::collection::vec(1usize..5, 0..4), f8: bool, v2: bool, seed in -1000.0f64..1000.0) {
            let n: usize = shape.iter().product();
            let data: Vec<f64> = (0..n).map(|i| seed * (i as f64 + 0.5)).collect();
            let parsed = parse(&write(&shape, &data, f8, if v2 { 2 } else { 1 })).unwrap();
            prop_assert_eq!(&parsed.shape, &shape);
            let want: Vec<f32> = data.iter().map(|v| *v as f32).collect();
            prop_assert_eq!(parsed.data, want);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
            let mut with_magic = b"\x93NUMPY\x01\x00".to_vec();
            with_magic.extend(&bytes);
            let _ = parse(&with_magic);
        }

        #[test]
        fn truncation_is_an_error(cut in 0usize..100) {
            let full = write(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], false, 1);
            let cut = cut.min(full.len() - 1);
            prop_assert!(parse(&full[..cut]).is_err());
        }
    }

    #[test]
    fn refuses_big_endian_ints_fortran_and_huge_shapes() {
        let ok = write(&[2], &[1.0, 2.0], false, 1);
        let swap = |from: &str, to: &str| {
            let at = ok.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
            let mut out = ok[..at].to_vec();
            out.extend(to.as_bytes());
            out.extend(&ok[at + from.len()..]);
            out
        };
        assert!(parse(&swap("<f4", ">f4")).unwrap_err().contains("dtype"));
        assert!(parse(&swap("<f4", "<i8")).unwrap_err().contains("dtype"));
        assert!(parse(&swap("False", "True ")).unwrap_err().contains("Fortran"));
        assert!(parse(&swap("(2,)", "(99999999999,)")).is_err());
    }
}
