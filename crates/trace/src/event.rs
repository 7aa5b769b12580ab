//! The events of trace format v1 and their JSON (de)serialization.
//!
//! Two events are defined: `stage_trace` (one traced row) and `run_meta` (how the trace was
//! made). Unknown fields are ignored and unknown events are skipped, so that other engines can add
//! their own. The full specification is `docs/trace-format.md`.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// The trace format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// One traced row: the value of `point` at position `pos_id` of prompt `prompt_id`, computed in
/// phase `phase`. Strings borrow from the input line when they hold no escapes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct StageTrace<'a> {
    /// Always `"stage_trace"` when written.
    #[serde(default = "stage_trace_name", skip_deserializing)]
    pub event: &'static str,
    /// Which prompt (any string; pairing is per prompt).
    #[serde(borrow)]
    pub prompt_id: Cow<'a, str>,
    /// How the row was computed: `prefill_last`, `decode0`, ...
    #[serde(borrow)]
    pub phase: Cow<'a, str>,
    /// Trace point name (see [`crate::Point`]); other names are allowed and compared as well.
    #[serde(borrow)]
    pub point: Cow<'a, str>,
    /// Layer index (by convention 0 for model-global points).
    pub layer: u32,
    /// Decode step: 0 for prefill, k for the k-th decode step.
    pub step: u64,
    /// Absolute token position of the row.
    pub pos_id: u64,
    /// Number of query rows in the forward call that computed it.
    pub seq_len: u64,
    /// xxh64 (seed 0) of the row in its storage dtype, little-endian.
    #[serde(deserialize_with = "de_hash")]
    pub hash: u64,
    /// Smallest finite element.
    #[serde(deserialize_with = "de_stat", serialize_with = "ser_stat")]
    pub min: f64,
    /// Largest finite element.
    #[serde(deserialize_with = "de_stat", serialize_with = "ser_stat")]
    pub max: f64,
    /// Mean of the finite elements.
    #[serde(deserialize_with = "de_stat", serialize_with = "ser_stat")]
    pub mean: f64,
    /// Storage dtype (`f32`, `bf16`, `f16`, ...).
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Cow<'a, str>>,
    /// Shape of the traced row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Vec<u64>>,
    /// Number of elements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numel: Option<u64>,
    /// Euclidean norm of the finite elements.
    #[serde(
        default,
        deserialize_with = "de_opt_stat",
        serialize_with = "ser_opt_stat",
        skip_serializing_if = "Option::is_none"
    )]
    pub l2: Option<f64>,
    /// Number of NaN elements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nan_count: Option<u64>,
    /// Number of ±Inf elements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inf_count: Option<u64>,
    /// Token id at `pos_id` (lets the analyzer check that both phases saw the same token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<u64>,
    /// Tensor-parallel rank that holds the row; part of the pairing key when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    /// Name of the tensor holding the row's values in a dump file next to the trace.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub tensor: Option<Cow<'a, str>>,
}

fn stage_trace_name() -> &'static str {
    "stage_trace"
}

impl StageTrace<'_> {
    /// Whether the event reports NaN or Inf values (in its counts or its statistics).
    pub fn has_non_finite(&self) -> bool {
        self.nan_count.unwrap_or(0) > 0
            || self.inf_count.unwrap_or(0) > 0
            || !self.min.is_finite()
            || !self.max.is_finite()
            || !self.mean.is_finite()
            || self.l2.is_some_and(|x| !x.is_finite())
    }
}

impl<'a> StageTrace<'a> {
    /// An event with empty names, zero values and no optional fields (a slot to parse into).
    pub fn empty() -> StageTrace<'a> {
        StageTrace {
            event: "stage_trace",
            prompt_id: Cow::Borrowed(""),
            phase: Cow::Borrowed(""),
            point: Cow::Borrowed(""),
            layer: 0,
            step: 0,
            pos_id: 0,
            seq_len: 0,
            hash: 0,
            min: 0.0,
            max: 0.0,
            mean: 0.0,
            dtype: None,
            shape: None,
            numel: None,
            l2: None,
            nan_count: None,
            inf_count: None,
            token_id: None,
            rank: None,
            tensor: None,
        }
    }
}

/// How a trace was made. Every field is optional; unknown fields are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RunMeta {
    /// Always `"run_meta"` when written.
    #[serde(default = "run_meta_name", skip_deserializing)]
    pub event: &'static str,
    /// Trace format version (1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_version: Option<u32>,
    /// Engine name and version, e.g. `driftscope-engine 0.1.0` or `vllm 0.9.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Model name or path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Number of layers of the model (lets the analyzer know what follows the last traced one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_layers: Option<u32>,
    /// Activation dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Device, e.g. `cpu`, `NVIDIA H100 80GB HBM3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Host description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Kernel profile, e.g. `fast` or `invariant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// When the trace was made (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    /// The command line that made the trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// How it was run, e.g. `single process`, `Single SSH Connection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_mode: Option<String>,
    /// The dtype the KV cache stores keys and values in, e.g. `f16`, `q8_0` (attention's
    /// precision: the analyzer judges attention's drift against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_dtype: Option<String>,
    /// The weights' type as the matmuls read them, e.g. `q4_1`, `f16`, `bf16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_dtype: Option<String>,
    /// What the matmuls convert their input activations to, e.g. `f32`, `f16`, `q8_1` (llama.cpp
    /// quantizes activations for quantized weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matmul_input_dtype: Option<String>,
    /// A bug injected on purpose, e.g. `kv_drop` (driftscope's `--inject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<String>,
    /// Every other field, kept as written.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn run_meta_name() -> &'static str {
    "run_meta"
}

impl Default for RunMeta {
    fn default() -> Self {
        RunMeta {
            event: run_meta_name(),
            format_version: None,
            engine: None,
            model: None,
            n_layers: None,
            dtype: None,
            device: None,
            host: None,
            profile: None,
            date: None,
            command: None,
            run_mode: None,
            kv_cache_dtype: None,
            weight_dtype: None,
            matmul_input_dtype: None,
            inject: None,
            extra: serde_json::Map::new(),
        }
    }
}

impl RunMeta {
    /// Parses a `run_meta` line (the `event` field itself is not kept in `extra`).
    pub fn from_json(line: &str) -> Result<RunMeta, serde_json::Error> {
        let mut meta: RunMeta = serde_json::from_str(line)?;
        meta.extra.remove("event");
        Ok(meta)
    }
}

/// The `hash` field: an unsigned 64-bit integer, with errors that say what is wrong with it.
fn de_hash<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct HashVisitor;
    impl Visitor<'_> for HashVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an unsigned 64-bit integer (0 ..= 18446744073709551615)")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format_args!("hash is negative ({v}); it must be an unsigned 64-bit integer")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            Err(if v >= 18_446_744_073_709_551_615.0 {
                E::custom("hash is above 2^64-1 (18446744073709551615)")
            } else if v < 0.0 {
                E::custom(format_args!("hash is negative ({v}); it must be an unsigned 64-bit integer"))
            } else if v.fract() != 0.0 {
                E::custom(format_args!("hash is fractional ({v}); it must be an unsigned 64-bit integer"))
            } else {
                E::custom(format_args!(
                    "hash is written with a fraction or exponent ({v}); write it as a plain integer so no bits are lost"
                ))
            })
        }
    }
    d.deserialize_any(HashVisitor)
}

/// A statistic: a JSON number, or one of the strings `"NaN"`, `"Infinity"`, `"-Infinity"`
/// (JSON has no literals for them).
fn de_stat<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    struct StatVisitor;
    impl Visitor<'_> for StatVisitor {
        type Value = f64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(r#"a number, or "NaN", "Infinity", "-Infinity""#)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            match v {
                "NaN" | "nan" => Ok(f64::NAN),
                "Infinity" | "inf" | "+Infinity" => Ok(f64::INFINITY),
                "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
    }
    d.deserialize_any(StatVisitor)
}

/// An optional statistic: `null` reads as absent, like every other optional field.
fn de_opt_stat<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    struct OptStat;
    impl<'de> Visitor<'de> for OptStat {
        type Value = Option<f64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(r#"null, a number, or "NaN", "Infinity", "-Infinity""#)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            de_stat(d).map(Some)
        }
    }
    d.deserialize_option(OptStat)
}

fn ser_stat<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_nan() {
        s.serialize_str("NaN")
    } else if v.is_infinite() {
        s.serialize_str(if *v > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        s.serialize_f64(*v)
    }
}

fn ser_opt_stat<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => ser_stat(v, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_LINE: &str = r#"{"event":"stage_trace","prompt_id":"p0_short","phase":"decode0","point":"attn_out","layer":0,"step":1,"pos_id":37,"seq_len":1,"hash":10153995460507501903,"min":-0.00519423,"max":0.00725079,"mean":-0.0000474128}"#;

    fn parse(line: &str) -> Result<StageTrace<'_>, serde_json::Error> {
        serde_json::from_str(line)
    }

    #[test]
    fn parses_seed_event_and_borrows_strings() {
        let ev = parse(SEED_LINE).unwrap();
        assert_eq!(ev.hash, 10153995460507501903);
        assert_eq!((ev.layer, ev.step, ev.pos_id, ev.seq_len), (0, 1, 37, 1));
        assert_eq!(ev.max, 0.00725079);
        assert!(matches!(ev.prompt_id, Cow::Borrowed("p0_short")));
        assert!(ev.dtype.is_none() && ev.l2.is_none());
        assert!(!ev.has_non_finite());
    }

    #[test]
    fn hash_limits() {
        let with = |h: &str| SEED_LINE.replace("10153995460507501903", h);
        assert_eq!(parse(&with("18446744073709551615")).unwrap().hash, u64::MAX);
        assert_eq!(parse(&with("0")).unwrap().hash, 0);
        let err = |h: &str| parse(&with(h)).unwrap_err().to_string();
        assert!(err("18446744073709551616").contains("above 2^64-1"), "{}", err("18446744073709551616"));
        assert!(err("-1").contains("negative"));
        assert!(err("1.5").contains("fractional"));
        assert!(err("5.0").contains("written with a fraction or exponent"));
        assert!(err("\"123\"").contains("unsigned 64-bit integer"));
        assert!(err("NaN").contains("expected value"));
    }

    #[test]
    fn stats_accept_non_finite_strings_only() {
        let line = SEED_LINE.replace("-0.00519423", "\"NaN\"");
        let ev = parse(&line).unwrap();
        assert!(ev.min.is_nan() && ev.has_non_finite());
        assert!(parse(&SEED_LINE.replace("-0.00519423", "\"abc\"")).is_err());
        assert!(parse(&SEED_LINE.replace("-0.00519423", "null")).is_err());
        assert!(parse(&SEED_LINE.replace("-0.00519423", "Infinity")).is_err());
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let e = parse(&SEED_LINE.replace(r#""pos_id":37,"#, "")).unwrap_err().to_string();
        assert!(e.contains("missing field `pos_id`"), "{e}");
        let e = parse(&SEED_LINE.replace(r#""layer":0"#, r#""layer":"0""#)).unwrap_err().to_string();
        assert!(e.contains("invalid type: string \"0\", expected u32"), "{e}");
    }

    #[test]
    fn unknown_fields_are_ignored_and_optional_fields_read() {
        let line = SEED_LINE.replace(
            r#""mean":-0.0000474128"#,
            r#""mean":-0.0000474128,"dtype":"bf16","shape":[576],"numel":576,"l2":0.5,"nan_count":0,"inf_count":0,"token_id":314,"rank":1,"vendor_field":{"x":[1,2]}"#,
        );
        let ev = parse(&line).unwrap();
        assert_eq!(ev.dtype.as_deref(), Some("bf16"));
        assert_eq!(ev.shape.as_deref(), Some(&[576u64][..]));
        assert_eq!((ev.l2, ev.token_id, ev.rank), (Some(0.5), Some(314), Some(1)));
    }

    #[test]
    fn serializes_back_with_exact_hash_and_string_non_finite() {
        let mut ev = parse(SEED_LINE).unwrap();
        ev.l2 = Some(f64::INFINITY);
        let out = serde_json::to_string(&ev).unwrap();
        assert!(out.starts_with(r#"{"event":"stage_trace","prompt_id":"p0_short""#), "{out}");
        assert!(out.contains(r#""hash":10153995460507501903"#));
        assert!(out.contains(r#""l2":"Infinity""#));
        let back = parse(&out).unwrap();
        assert_eq!(back.hash, ev.hash);
        assert_eq!(back.mean, ev.mean);
    }

    #[test]
    fn optional_fields_accept_null() {
        let line =
            SEED_LINE.replace(r#""mean":-0.0000474128"#, r#""mean":-0.0000474128,"l2":null,"dtype":null,"rank":null"#);
        let ev = parse(&line).unwrap();
        assert_eq!((ev.l2, ev.dtype, ev.rank), (None, None, None));
        let line = SEED_LINE.replace(r#""mean":-0.0000474128"#, r#""mean":-0.0000474128,"l2":"NaN""#);
        assert!(parse(&line).unwrap().l2.unwrap().is_nan());
    }

    #[test]
    fn run_meta_keeps_unknown_fields() {
        let m = RunMeta::from_json(r#"{"event":"run_meta","engine":"x","n_layers":30,"gpu_clock":1980}"#).unwrap();
        assert_eq!(m.engine.as_deref(), Some("x"));
        assert_eq!(m.n_layers, Some(30));
        assert_eq!(m.extra.get("gpu_clock"), Some(&serde_json::json!(1980)));
        let out = serde_json::to_string(&m).unwrap();
        assert!(out.contains(r#""gpu_clock":1980"#) && out.starts_with(r#"{"event":"run_meta""#));
        assert_eq!(out.matches("\"event\"").count(), 1, "{out}");
    }
}
