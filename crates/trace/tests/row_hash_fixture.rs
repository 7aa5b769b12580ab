//! The shared row-hash fixture (`tests/fixtures/row-hashes.json` at the repository root): the
//! same rows hashed here and by the PyTorch adapter (`python/tests/test_hashing.py`) must give
//! the same u64, and the same statistics, bit for bit. The fixture's layout is in its `comment`.

use driftscope_trace::{hash_bf16, hash_f16, hash_f32, RowStats};
use half::{bf16, f16};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/row-hashes.json");
    let text = std::fs::read_to_string(path).expect("the shared fixture exists");
    serde_json::from_str(&text).expect("the fixture is JSON")
}

/// A statistic of the fixture: a number, or "NaN" / "Infinity" / "-Infinity".
fn stat(v: &Value) -> f64 {
    match v.as_str() {
        Some("NaN") => f64::NAN,
        Some("Infinity") => f64::INFINITY,
        Some("-Infinity") => f64::NEG_INFINITY,
        Some(other) => panic!("unexpected statistic {other}"),
        None => v.as_f64().expect("a number"),
    }
}

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b
}

#[test]
fn rust_hashes_and_stats_match_the_shared_fixture() {
    let f = fixture();
    let rows = f["rows"].as_array().expect("rows");
    assert!(rows.len() >= 20, "the fixture covers f32, bf16 and f16 rows");
    let mut seen = std::collections::BTreeSet::new();
    for row in rows {
        let name = row["name"].as_str().unwrap();
        let bits: Vec<u64> = row["bits"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
        let dtype = row["dtype"].as_str().unwrap();
        seen.insert(dtype.to_string());
        let (hash, stats, values): (u64, RowStats, Vec<f64>) = match dtype {
            "f32" => {
                let r: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b as u32)).collect();
                (hash_f32(&r), RowStats::of_f32(&r), r.iter().map(|&x| f64::from(x)).collect())
            }
            "bf16" => {
                let r: Vec<bf16> = bits.iter().map(|&b| bf16::from_bits(b as u16)).collect();
                (hash_bf16(&r), RowStats::of_bf16(&r), r.iter().map(|x| x.to_f64()).collect())
            }
            "f16" => {
                let r: Vec<f16> = bits.iter().map(|&b| f16::from_bits(b as u16)).collect();
                (hash_f16(&r), RowStats::of_f16(&r), r.iter().map(|x| x.to_f64()).collect())
            }
            other => panic!("{name}: unknown dtype {other}"),
        };
        assert_eq!(hash, row["hash"].as_u64().unwrap(), "{name}: hash");
        // The values the fixture lists are the bit patterns' values.
        for (got, want) in values.iter().zip(row["values"].as_array().unwrap()) {
            let want = stat(want);
            let sign_ok = got.is_nan() || got.is_sign_negative() == want.is_sign_negative();
            assert!(same(*got, want) && sign_ok, "{name}: {got} vs {want}");
        }
        let s = &row["stats"];
        assert_eq!(stats.numel, s["numel"].as_u64().unwrap(), "{name}: numel");
        assert_eq!(
            (stats.nan_count, stats.inf_count),
            (s["nan_count"].as_u64().unwrap(), s["inf_count"].as_u64().unwrap())
        );
        for (field, got) in [("min", stats.min), ("max", stats.max), ("mean", stats.mean), ("l2", stats.l2)] {
            assert!(same(got, stat(&s[field])), "{name}: {field} {got} vs {}", s[field]);
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["bf16", "f16", "f32"]);
}
