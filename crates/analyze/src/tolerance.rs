//! Tolerances: when a pair that is not bitwise equal still counts as equal enough.
//!
//! A pair is WITHIN_TOL when its largest element-wise difference satisfies
//! `max |Δ| <= abs + rel * scale`, where `scale` is the largest magnitude in the baseline row
//! (max(|min|, |max|)). With dumped rows `max |Δ|` is exact; without, the statistics only give a
//! lower bound on it, so WITHIN_TOL then means "no evidence beyond tolerance" and the report says
//! which it used.
//!
//! Tolerances are data: built-in defaults per dtype, overridable from a TOML file:
//!
//! ```toml
//! [default]                      # per storage dtype: f32, bf16, f16, or `any` (dtype not traced)
//! f32 = { rel = 1e-5 }
//! bf16 = { rel = 2e-2, abs = 1e-6 }
//!
//! [point.logits]                 # per trace point, per dtype (or `any`)
//! bf16 = { rel = 5e-2 }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use driftscope_trace::{DType, Point};
use serde::Deserialize;

use crate::file_error::FileError;

/// One tolerance: `max |Δ| <= abs + rel * scale`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Tolerance {
    /// Relative part, times the baseline row's largest magnitude.
    pub rel: f64,
    /// Absolute part.
    pub abs: f64,
}

impl Tolerance {
    /// Whether a difference of `max_abs` in a row of largest magnitude `scale` is within.
    pub fn admits(&self, max_abs: f64, scale: f64) -> bool {
        max_abs <= self.abs + self.rel * scale
    }
}

/// Built-in defaults: a few rounding steps of each dtype (f32 ε ≈ 1.2e-7, f16 ε ≈ 9.8e-4,
/// bf16 ε ≈ 7.8e-3), generous enough for reduction-order differences in long reductions.
pub const DEFAULTS: [(Option<DType>, Tolerance); 4] = [
    (Some(DType::F32), Tolerance { rel: 1e-5, abs: 0.0 }),
    (Some(DType::F16), Tolerance { rel: 4e-3, abs: 0.0 }),
    (Some(DType::BF16), Tolerance { rel: 2e-2, abs: 0.0 }),
    (None, Tolerance { rel: 2e-2, abs: 0.0 }),
];

/// The tolerances in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Tolerances {
    defaults: Vec<(Option<DType>, Tolerance)>,
    points: Vec<(Point, Option<DType>, Tolerance)>,
    /// Where they came from (`None`: the built-in defaults).
    pub source: Option<PathBuf>,
}

impl Default for Tolerances {
    fn default() -> Self {
        Tolerances { defaults: DEFAULTS.to_vec(), points: vec![], source: None }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    rel: f64,
    #[serde(default)]
    abs: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    default: BTreeMap<String, Spec>,
    #[serde(default)]
    point: BTreeMap<String, BTreeMap<String, Spec>>,
}

impl Tolerances {
    /// Reads a TOML tolerance file; its entries override the built-in defaults.
    pub fn from_file(path: &Path) -> Result<Tolerances, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Io { path: path.into(), source })?;
        Self::from_toml(&text, path)
    }

    /// Parses tolerance TOML (`path` only names the source in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Tolerances, FileError> {
        let bad = |message: String| FileError::Bad { path: path.into(), message };
        let spec: FileSpec = toml::from_str(text).map_err(|e| bad(e.to_string().trim_end().replace('\n', " ")))?;
        let dtype = |key: &str, at: &str| -> Result<Option<DType>, FileError> {
            match key {
                "any" => Ok(None),
                k => DType::parse(k)
                    .map(Some)
                    .ok_or_else(|| bad(format!("`{at}.{k}`: unknown dtype (use f32, bf16, f16 or any)"))),
            }
        };
        let tol = |s: &Spec, at: String| -> Result<Tolerance, FileError> {
            for (name, v) in [("rel", s.rel), ("abs", s.abs)] {
                if !v.is_finite() || v < 0.0 {
                    return Err(bad(format!("`{at}.{name}` = {v}: must be a finite number >= 0")));
                }
            }
            Ok(Tolerance { rel: s.rel, abs: s.abs })
        };
        let mut t = Tolerances { source: Some(path.into()), ..Tolerances::default() };
        for (k, s) in &spec.default {
            let d = dtype(k, "default")?;
            let value = tol(s, format!("default.{k}"))?;
            match t.defaults.iter_mut().find(|(x, _)| *x == d) {
                Some(entry) => entry.1 = value,
                None => t.defaults.push((d, value)),
            }
        }
        for (name, by_dtype) in &spec.point {
            let point: Point = name.parse().map_err(|e| bad(format!("`point.{name}`: {e}")))?;
            for (k, s) in by_dtype {
                let d = dtype(k, &format!("point.{name}"))?;
                t.points.push((point, d, tol(s, format!("point.{name}.{k}"))?));
            }
        }
        Ok(t)
    }

    /// The tolerance for a point (by name) in a dtype: a point entry for that dtype, else the
    /// point's `any` entry, else the dtype default, else the `any` default.
    pub fn for_pair(&self, point: Option<Point>, dtype: Option<DType>) -> Tolerance {
        let by_point =
            |d: Option<DType>| point.and_then(|p| self.points.iter().find(|(q, x, _)| *q == p && *x == d).map(|e| e.2));
        let by_default = |d: Option<DType>| self.defaults.iter().find(|(x, _)| *x == d).map(|e| e.1);
        dtype
            .and_then(|d| by_point(Some(d)))
            .or_else(|| by_point(None))
            .or_else(|| dtype.and_then(|d| by_default(Some(d))))
            .or_else(|| by_default(None))
            .unwrap_or(Tolerance { rel: 0.0, abs: 0.0 })
    }
}

/// What FAIL means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Any pair that is not bitwise equal fails.
    #[default]
    Bitwise,
    /// Only pairs beyond tolerance (and numeric faults, misaligned or missing pairs) fail.
    Tolerance,
}

/// A pair's class under the tolerances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TolClass {
    /// Hashes equal.
    Bitwise,
    /// Hashes differ, by no more than the tolerance.
    WithinTol,
    /// Hashes differ, by more than the tolerance.
    Drift,
    /// NaN or Inf on one side only.
    NumericFault,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Tolerances, String> {
        Tolerances::from_toml(text, Path::new("tol.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        let t = Tolerances::default();
        assert_eq!(t.for_pair(Some(Point::Q), Some(DType::F32)).rel, 1e-5);
        assert_eq!(t.for_pair(None, None).rel, 2e-2);
        let t = parse("[default]\nf32 = { rel = 1e-6, abs = 1e-9 }\n[point.logits]\nbf16 = { rel = 5e-2 }\nany = { rel = 1e-3 }\n").unwrap();
        assert_eq!(t.for_pair(Some(Point::Q), Some(DType::F32)), Tolerance { rel: 1e-6, abs: 1e-9 });
        assert_eq!(t.for_pair(Some(Point::Logits), Some(DType::BF16)).rel, 5e-2);
        assert_eq!(
            t.for_pair(Some(Point::Logits), Some(DType::F32)).rel,
            1e-3,
            "the point's `any` beats the dtype default"
        );
        assert_eq!(t.for_pair(Some(Point::Q), Some(DType::BF16)).rel, 2e-2, "untouched defaults stay");
        assert!(Tolerance { rel: 1e-2, abs: 0.0 }.admits(0.01, 1.0));
        assert!(!Tolerance { rel: 1e-2, abs: 0.0 }.admits(0.0101, 1.0));
    }

    #[test]
    fn bad_files_say_what_and_where() {
        for (text, want) in [
            ("[default]\nf32 = { rel = -1.0 }\n", "tol.toml: `default.f32.rel` = -1: must be a finite number >= 0"),
            ("[default]\nf32 = { rel = nan }\n", "`default.f32.rel` = NaN"),
            ("[default]\nf64 = { rel = 1.0 }\n", "`default.f64`: unknown dtype"),
            ("[point.attn]\nf32 = { rel = 1.0 }\n", "`point.attn`: unknown trace point `attn`"),
            ("[default]\nf32 = { rel = \"big\" }\n", "invalid type: string \"big\", expected f64"),
            ("[default]\nf32 = { rell = 1.0 }\n", "unknown field `rell`"),
            ("[defaults]\n", "unknown field `defaults`"),
            ("[default\n", "tol.toml: "),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = Tolerances::from_file(Path::new("missing-tolerances.toml")).unwrap_err().to_string();
        assert!(e.starts_with("missing-tolerances.toml: "), "{e}");
    }
}
