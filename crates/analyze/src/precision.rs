//! The precision each op computes in, and how large a rounding drift it can make.
//!
//! A drift is judged against the *lowest* precision its op computes in, not only the dtype its
//! row is stored in: attention reads a KV cache that may be 16-bit or quantized while its output
//! is stored in f32, and llama.cpp's matmuls quantize their input activations to 8 bits for
//! quantized weights. Each is known from the trace's `run_meta` (`kv_cache_dtype`,
//! `matmul_input_dtype`, `weight_dtype`, `dtype`), from the events' `dtype`, or, where the
//! trace is silent, from the magnitudes ([`infer_storage`], and the systematic excess of
//! [`crate::gross`]).

use driftscope_trace::DType;
use half::f16;

use crate::collect::Side;

/// A precision an op can compute or store in, from finest to coarsest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Precision {
    /// 32-bit float (or finer).
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit integers with a block scale (ggml's q8_0, q8_1, q8_K; int8).
    Int8,
    /// 5- and 6-bit integers with a block scale (q5_0, q5_1, q5_K, q6_K).
    Int5,
    /// 8-bit float (e4m3, e5m2): 2 or 3 mantissa bits.
    Fp8,
    /// 4 bits or fewer with a block scale (q4_0, q4_1, iq4_nl, K-quants below 5 bits).
    Int4,
}

impl Precision {
    /// Every precision, finest first.
    pub const ALL: [Precision; 7] = [
        Precision::F32,
        Precision::F16,
        Precision::BF16,
        Precision::Int8,
        Precision::Int5,
        Precision::Fp8,
        Precision::Int4,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::BF16 => "bf16",
            Precision::Int8 => "8-bit quantized",
            Precision::Int5 => "5/6-bit quantized",
            Precision::Fp8 => "fp8",
            Precision::Int4 => "4-bit quantized",
        }
    }

    /// The precision of a dtype name as traces write it (`f32`, `float16`, `torch.bfloat16`,
    /// `q8_1`, `Q4_1`, `fp8_e4m3`, ...); `None` for a name it does not know.
    pub fn parse(name: &str) -> Option<Precision> {
        let n = name.trim().to_ascii_lowercase();
        let n = n.strip_prefix("torch.").unwrap_or(&n);
        Some(match n {
            "f32" | "fp32" | "float32" | "float" | "f64" | "fp64" | "float64" | "double" => Precision::F32,
            "f16" | "fp16" | "float16" | "half" => Precision::F16,
            "bf16" | "bfloat16" => Precision::BF16,
            "int8" | "i8" | "uint8" | "u8" => Precision::Int8,
            "int4" | "i4" | "uint4" | "u4" => Precision::Int4,
            _ if n.starts_with("fp8") || n.starts_with("f8") || n.starts_with("float8") || n.starts_with("e4m3") => {
                Precision::Fp8
            }
            _ if n.starts_with("e5m2") => Precision::Fp8,
            _ if n.starts_with("q8") || n.starts_with("iq8") => Precision::Int8,
            _ if n.starts_with("q5") || n.starts_with("q6") || n.starts_with("iq5") || n.starts_with("iq6") => {
                Precision::Int5
            }
            _ if ["q4", "q3", "q2", "iq4", "iq3", "iq2", "iq1", "tq1", "tq2", "mxfp4", "nvfp4"]
                .iter()
                .any(|p| n.starts_with(p)) =>
            {
                Precision::Int4
            }
            _ => return None,
        })
    }

    /// The precision of a traced storage dtype.
    pub fn of(dtype: DType) -> Precision {
        match dtype {
            DType::F32 => Precision::F32,
            DType::F16 => Precision::F16,
            DType::BF16 => Precision::BF16,
        }
    }

    /// Whether it is a block-quantized integer format (whose matmuls llama.cpp feeds with 8-bit
    /// activations).
    pub fn is_quantized(self) -> bool {
        matches!(self, Precision::Int8 | Precision::Int5 | Precision::Int4)
    }

    /// The rounding floor: the largest relative difference that one op computing in this
    /// precision makes between two paths whose inputs agree, with margin. With dumped rows it
    /// bounds the relative L2 difference; from statistics it bounds the relative move of the
    /// row's min, max or mean (or l2), which in a 16-bit dtype moves by whole rounding steps of a
    /// single element (2^-8 to 2^-7 of it in bf16). Measured for f32, f16 and bf16
    /// (docs/tolerances.md, "Bugs and rounding"); the quantized ones are scaled from bf16 by
    /// their step size.
    pub fn floor(self, from_dump: bool) -> f64 {
        let (dump, stats) = match self {
            Precision::F32 => (1e-4, 1e-4),
            Precision::F16 => (5e-3, 2e-2),
            Precision::BF16 => (1e-2, 5e-2),
            Precision::Int8 => (2e-2, 1e-1),
            Precision::Int5 => (8e-2, 2e-1),
            Precision::Fp8 => (8e-2, 2e-1),
            Precision::Int4 => (1.5e-1, 4e-1),
        };
        if from_dump {
            dump
        } else {
            stats
        }
    }
}

/// How a precision became known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Stated by the trace: the events' `dtype` or a `run_meta` field (named).
    Stated(&'static str),
    /// Derived from another field: matmul inputs from `weight_dtype`.
    Derived(String),
    /// Inferred from the magnitudes, with the evidence in words.
    Inferred(String),
    /// Assumed for want of any evidence.
    Assumed(String),
}

impl Known {
    /// `(stated in run_meta.kv_cache_dtype)`, `(inferred: ...)`.
    pub fn describe(&self) -> String {
        match self {
            Known::Stated(field) => format!("stated by `{field}`"),
            Known::Derived(why) | Known::Inferred(why) | Known::Assumed(why) => why.clone(),
        }
    }
}

/// The storage dtype of a trace whose events and `run_meta` name none, inferred from the values
/// of its statistics; `None` when they give no evidence.
///
/// First the values themselves: the minima and maxima of rows are elements of the rows, so when
/// every one of them is a bf16 value (or an f16 one) the rows are stored in that dtype. Being f32
/// values says little (any decimal of up to 7 digits reads back as one, and engines that compute
/// in bf16 often hand out f32 rows), so otherwise the drift tells: a row's extreme value that
/// moved by less than a 16-bit rounding step (2^-12 relative) can only come from f32, one that
/// moved by less than bf16's step (2^-9) from f16 or finer, and when no extreme anywhere moved by
/// less, the rows are judged as bf16.
///
/// `pairs`: the (baseline, candidate) events of the complete pairs, as indices into `sides`.
pub fn infer_storage(sides: &[Side], pairs: impl Iterator<Item = (u32, u32)>) -> Option<(DType, String)> {
    /// Values enough to call a representability test conclusive.
    const LEAST: usize = 8;
    /// Values read at most.
    const MOST: usize = 4096;
    let undated = sides.iter().filter(|s| s.dtype().is_none());
    let values: Vec<f64> =
        undated.flat_map(|s| [s.min, s.max]).filter(|v| v.is_finite() && *v != 0.0).take(MOST).collect();
    if values.len() >= LEAST {
        let fits = |test: fn(f64) -> bool| values.iter().all(|&v| test(v));
        let n = values.len();
        if fits(is_bf16) {
            return Some((DType::BF16, format!("inferred: all {n} minima and maxima read are bf16 values")));
        }
        if fits(is_f16) {
            return Some((DType::F16, format!("inferred: all {n} minima and maxima read are f16 values")));
        }
    }
    // The smallest relative move of a drifting row's min or max.
    let mut least = f64::INFINITY;
    for (b, x) in pairs {
        let (b, x) = (&sides[b as usize], &sides[x as usize]);
        if b.hash == x.hash || b.dtype().is_some() {
            continue;
        }
        for (u, v) in [(b.min, x.min), (b.max, x.max)] {
            let scale = u.abs().max(v.abs());
            if u != v && u.is_finite() && v.is_finite() && scale > 0.0 {
                least = least.min((u - v).abs() / scale);
            }
        }
    }
    let moved = |dtype: DType, why: &str| {
        Some((dtype, format!("inferred: the smallest move of a drifting row's min or max is {least:.2e}, {why}")))
    };
    if least < 2f64.powi(-12) {
        moved(DType::F32, "finer than any 16-bit rounding step")
    } else if least < 2f64.powi(-9) {
        moved(DType::F16, "finer than bf16's rounding step")
    } else if least.is_finite() {
        moved(DType::BF16, "no finer than bf16's rounding step")
    } else {
        None
    }
}

/// Whether a statistic, as read back from JSON, is an f32 value (written exactly, or as the
/// shortest decimal that reads back as one).
fn as_f32(v: f64) -> Option<f32> {
    let x = v as f32;
    (f64::from(x) == v || format!("{x}").parse::<f64>().ok() == Some(v)).then_some(x)
}

fn is_bf16(v: f64) -> bool {
    as_f32(v).is_some_and(|x| x.to_bits() & 0xFFFF == 0)
}

fn is_f16(v: f64) -> bool {
    as_f32(v).is_some_and(|x| f16::from_f32(x).to_f32() == x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_to_precisions() {
        for (name, want) in [
            ("f32", Precision::F32),
            ("torch.float32", Precision::F32),
            ("FP16", Precision::F16),
            ("bfloat16", Precision::BF16),
            ("q8_1", Precision::Int8),
            ("Q8_K", Precision::Int8),
            ("q6_K", Precision::Int5),
            ("q4_1", Precision::Int4),
            ("iq4_nl", Precision::Int4),
            ("fp8_e4m3", Precision::Fp8),
            ("e5m2", Precision::Fp8),
        ] {
            assert_eq!(Precision::parse(name), Some(want), "{name}");
        }
        assert_eq!(Precision::parse("q4_1+q8_0"), Some(Precision::Int4), "the first type of a mix");
        assert_eq!(Precision::parse("complex64"), None);
        for dump in [true, false] {
            let floors: Vec<f64> = Precision::ALL.iter().map(|p| p.floor(dump)).collect();
            assert!(floors.windows(2).all(|w| w[0] <= w[1]), "coarser precisions have higher floors: {floors:?}");
        }
    }

    #[test]
    fn representability_of_written_statistics() {
        assert!(as_f32(0.1f32 as f64).is_some() && as_f32(0.1).is_some(), "exact and shortest-decimal f32 values");
        assert!(as_f32(0.1000001234567).is_none(), "a decimal no f32 reads back as");
        let b = half::bf16::from_f32(0.0052).to_f32();
        assert!(is_bf16(f64::from(b)) && is_bf16(format!("{b}").parse().unwrap()) && is_bf16(1.5));
        assert!(!is_bf16(1.0 + 2f64.powi(-10)) && !is_bf16(0.0052));
        assert!(is_f16(1.0 + 2f64.powi(-10)) && !is_f16(1.0 + 2f64.powi(-12)) && !is_f16(1e6));
    }
}
