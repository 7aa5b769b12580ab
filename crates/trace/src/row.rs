//! Row hashing and statistics: what an engine computes for each traced row.
//!
//! The hash is specified so that any engine can emit it: **xxh64 with seed 0 of the row's bytes in
//! its storage dtype, little-endian, contiguous**. A bf16 row of 576 elements is hashed as its
//! 1152 bytes. Statistics are computed in f64 over the row's values as stored.

use half::{bf16, f16};
use xxhash_rust::xxh64::{xxh64, Xxh64};

/// The storage dtype of a traced row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// The name written in traces (`f32`, `f16`, `bf16`; PyTorch's `float32` etc. also parse).
    pub const fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parses `f32`/`float32`, `f16`/`float16`/`half`, `bf16`/`bfloat16`.
    pub fn parse(name: &str) -> Option<DType> {
        match name.trim_start_matches("torch.") {
            "f32" | "float32" | "float" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// xxh64 (seed 0) of raw bytes.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    xxh64(bytes, 0)
}

/// Hashes a row through its little-endian byte image without allocating.
fn hash_le<T: Copy, const N: usize>(row: &[T], to_le: impl Fn(T) -> [u8; N]) -> u64 {
    let mut hasher = Xxh64::new(0);
    let mut buf = [0u8; 1024];
    for chunk in row.chunks(1024 / N) {
        let mut used = 0;
        for &x in chunk {
            buf[used..used + N].copy_from_slice(&to_le(x));
            used += N;
        }
        hasher.update(&buf[..used]);
    }
    hasher.digest()
}

/// Hash of an f32 row.
pub fn hash_f32(row: &[f32]) -> u64 {
    hash_le(row, f32::to_le_bytes)
}

/// Hash of a bf16 row.
pub fn hash_bf16(row: &[bf16]) -> u64 {
    hash_le(row, |x: bf16| x.to_bits().to_le_bytes())
}

/// Hash of an f16 row.
pub fn hash_f16(row: &[f16]) -> u64 {
    hash_le(row, |x: f16| x.to_bits().to_le_bytes())
}

/// Summary statistics of one row, as carried by a `stage_trace` event.
///
/// `min`, `max`, `mean` and `l2` are taken over the finite elements (NaN when there are none);
/// non-finite elements are counted in `nan_count` and `inf_count` instead, so that one NaN does
/// not hide the magnitude of the rest of the row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowStats {
    /// Smallest finite element.
    pub min: f64,
    /// Largest finite element.
    pub max: f64,
    /// Mean of the finite elements, accumulated in f64.
    pub mean: f64,
    /// Euclidean norm of the finite elements, accumulated in f64.
    pub l2: f64,
    /// Number of NaN elements.
    pub nan_count: u64,
    /// Number of ±Inf elements.
    pub inf_count: u64,
    /// Number of elements.
    pub numel: u64,
}

impl RowStats {
    /// Statistics of values given as f64 (the widening of any storage dtype is exact).
    pub fn of_values(values: impl IntoIterator<Item = f64>) -> RowStats {
        let (mut min, mut max, mut sum, mut sq) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0.0);
        let (mut finite, mut nan_count, mut inf_count, mut numel) = (0u64, 0u64, 0u64, 0u64);
        for x in values {
            numel += 1;
            if x.is_nan() {
                nan_count += 1;
            } else if x.is_infinite() {
                inf_count += 1;
            } else {
                finite += 1;
                min = min.min(x);
                max = max.max(x);
                sum += x;
                sq += x * x;
            }
        }
        if finite == 0 {
            (min, max, sum, sq) = (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
        }
        RowStats { min, max, mean: sum / finite.max(1) as f64, l2: sq.sqrt(), nan_count, inf_count, numel }
    }

    /// Statistics of an f32 row.
    pub fn of_f32(row: &[f32]) -> RowStats {
        Self::of_values(row.iter().map(|&x| f64::from(x)))
    }

    /// Statistics of a bf16 row.
    pub fn of_bf16(row: &[bf16]) -> RowStats {
        Self::of_values(row.iter().map(|&x| x.to_f64()))
    }

    /// Statistics of an f16 row.
    pub fn of_f16(row: &[f16]) -> RowStats {
        Self::of_values(row.iter().map(|&x| x.to_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_xxh64_of_little_endian_bytes() {
        let row = [1.0f32, -2.5, 0.0, 3.25e-7];
        let mut bytes = Vec::new();
        for x in row {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(hash_f32(&row), xxh64(&bytes, 0));
        // A published xxh64 test vector: the empty input with seed 0.
        assert_eq!(hash_bytes(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(hash_f32(&[]), 0xEF46_DB37_51D8_E999);
    }

    /// The worked example of docs/trace-format.md, checked there against an independent xxh64.
    #[test]
    fn documented_worked_example() {
        let row = [1.0f32, -2.5, 0.0, 0.125];
        assert_eq!(hash_f32(&row), 7090992677395812351);
        let bf: Vec<bf16> = row.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(hash_bf16(&bf), 3795356799443189753);
    }

    #[test]
    fn chunked_hash_equals_one_shot_on_long_rows() {
        let row: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(hash_f32(&row), hash_bytes(&bytes));
        let bf: Vec<bf16> = row.iter().map(|&x| bf16::from_f32(x)).collect();
        let bytes: Vec<u8> = bf.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        assert_eq!(hash_bf16(&bf), hash_bytes(&bytes));
        let hf: Vec<f16> = row.iter().map(|&x| f16::from_f32(x)).collect();
        let bytes: Vec<u8> = hf.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        assert_eq!(hash_f16(&hf), hash_bytes(&bytes));
    }

    #[test]
    fn one_ulp_changes_the_hash_and_negative_zero_too() {
        let a = [0.1f32, 0.2, 0.3];
        let b = [0.1f32, f32::from_bits(0.2f32.to_bits() + 1), 0.3];
        assert_ne!(hash_f32(&a), hash_f32(&b));
        assert_ne!(hash_f32(&[0.0]), hash_f32(&[-0.0]));
    }

    #[test]
    fn stats_skip_non_finite_and_count_them() {
        let s = RowStats::of_f32(&[1.0, -3.0, f32::NAN, f32::INFINITY, 2.0]);
        assert_eq!((s.min, s.max), (-3.0, 2.0));
        assert_eq!(s.mean, 0.0);
        assert!((s.l2 - 14f64.sqrt()).abs() < 1e-15);
        assert_eq!((s.nan_count, s.inf_count, s.numel), (1, 1, 5));
        let all_nan = RowStats::of_f32(&[f32::NAN]);
        assert!(all_nan.min.is_nan() && all_nan.mean.is_nan());
    }

    #[test]
    fn dtype_names() {
        assert_eq!(DType::parse("torch.bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("f16"), Some(DType::F16));
        assert_eq!(DType::parse("int8"), None);
        assert_eq!(DType::BF16.size(), 2);
    }
}
