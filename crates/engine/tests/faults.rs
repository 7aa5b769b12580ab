//! The injected decode-path bugs (`--inject`) compute exactly what they claim: the decode step's
//! attention over the keys and values the bug leaves it, checked bit for bit against the kernel
//! run by hand over those rows, taken from a correct prefill (under `invariant` the prefill's
//! cache rows are the decode path's, bit for bit). And a fault never touches a prefill.

mod common;

use std::collections::BTreeMap;

use common::tokens;
use driftscope_engine::kernels::AttnShape;
use driftscope_engine::model::RopeTable;
use driftscope_engine::runner::{run_phase, Phase, Prompt, RunSpec};
use driftscope_engine::synthetic::default_model;
use driftscope_engine::{Fault, KvCache, Model, Profile, Run, Tracer};
use driftscope_trace::{DType, Point};

/// Every traced row of layer 0, by (point, row of the call).
#[derive(Default)]
struct Rows(BTreeMap<(Point, usize), Vec<f32>>);

impl Tracer for Rows {
    fn wants(&self, _: Point, layer: u32) -> bool {
        layer == 0
    }
    fn record(&mut self, point: Point, _: u32, which: usize, row: &[f32], _: DType) {
        self.0.insert((point, which), row.to_vec());
    }
}

impl Rows {
    fn get(&self, p: Point, which: usize) -> &[f32] {
        &self.0[&(p, which)]
    }
}

const PROFILE: Profile = Profile::Invariant;

/// The layer-0 rows of a correct prefill of all `toks` (every row traced).
fn prefill(model: &Model, toks: &[u32]) -> Rows {
    let mut rows = Rows::default();
    let mut cache = KvCache::new(&model.config);
    let mut run = Run {
        kernels: PROFILE.kernels(),
        dtype: DType::F32,
        trace_rows: (0..toks.len()).collect(),
        tracer: Some(&mut rows),
        fault: None,
    };
    model.forward(toks, &mut cache, &mut run);
    rows
}

/// The layer-0 rows of a decode step of the last token, after a correct prefill of the others.
fn decode(model: &Model, toks: &[u32], fault: Option<Fault>) -> Rows {
    let n = toks.len();
    let mut cache = KvCache::new(&model.config);
    if n > 1 {
        model.forward(&toks[..n - 1], &mut cache, &mut Run::quiet(PROFILE.kernels(), DType::F32));
    }
    let mut rows = Rows::default();
    let mut run =
        Run { kernels: PROFILE.kernels(), dtype: DType::F32, trace_rows: vec![0], tracer: Some(&mut rows), fault };
    model.forward(&toks[n - 1..], &mut cache, &mut run);
    rows
}

/// Rows `which` of a point, concatenated (`[len(which), width]`).
fn stack(rows: &Rows, p: Point, which: impl IntoIterator<Item = usize>) -> Vec<f32> {
    which.into_iter().flat_map(|w| rows.get(p, w).to_vec()).collect()
}

#[test]
fn each_fault_attends_to_the_keys_it_claims() {
    let model = default_model();
    let c = &model.config;
    let shape = AttnShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
    let attention = |q: &[f32], pos0: usize, k: &[f32], v: &[f32]| {
        let mut out = vec![0.0f32; c.q_dim()];
        PROFILE.kernels().attention(q, 1, pos0, k, v, shape, &mut out);
        out
    };
    for n in [2, 40, 97] {
        let toks = tokens(n, c.vocab);
        let full = prefill(&model, &toks);
        let last = n - 1;
        let q = full.get(Point::QRope, last).to_vec();
        let (k, v) = (Point::KRope, Point::V);
        let cases: [(Fault, Vec<f32>); 3] = [
            (Fault::KvDrop, attention(&q, 0, &stack(&full, k, [last]), &stack(&full, v, [last]))),
            (Fault::CacheOffByOne, {
                let keep: Vec<usize> = (0..n).filter(|&i| i != last - 1).collect();
                attention(&q, last - 1, &stack(&full, k, keep.clone()), &stack(&full, v, keep))
            }),
            (Fault::MaskOffByOne, attention(&q, last - 1, &stack(&full, k, 0..last), &stack(&full, v, 0..last))),
        ];
        let right = decode(&model, &toks, None);
        assert_eq!(right.get(Point::AttnCtx, 0), full.get(Point::AttnCtx, last), "n={n}: invariant without a fault");
        for (fault, want) in cases {
            let got = decode(&model, &toks, Some(fault));
            assert_eq!(got.get(Point::QRope, 0), &q[..], "{fault} n={n}: the step's own q is untouched");
            assert_eq!(got.get(Point::KRope, 0), full.get(k, last), "{fault} n={n}: and its own key");
            assert_eq!(got.get(Point::AttnCtx, 0), &want[..], "{fault} n={n}: attention over the keys it leaves");
            assert_ne!(got.get(Point::AttnCtx, 0), full.get(Point::AttnCtx, last), "{fault} n={n}: differs");
        }
        // kv_drop attends to its own key only: its context is its own value, per query head.
        let own = decode(&model, &toks, Some(Fault::KvDrop));
        let group = c.n_heads / c.n_kv_heads;
        let ctx = own.get(Point::AttnCtx, 0);
        let value = own.get(Point::V, 0);
        for h in 0..c.n_heads {
            let (a, b) = (h * c.head_dim, (h / group) * c.head_dim);
            assert_eq!(&ctx[a..a + c.head_dim], &value[b..b + c.head_dim], "kv_drop n={n}: head {h}");
        }
    }
}

#[test]
fn rope_pos_rotates_one_position_late() {
    let model = default_model();
    let c = &model.config;
    for n in [1, 33] {
        let toks = tokens(n, c.vocab);
        let got = decode(&model, &toks, Some(Fault::RopePos));
        let right = decode(&model, &toks, None);
        assert_eq!(got.get(Point::Q, 0), right.get(Point::Q, 0), "n={n}: q is computed before RoPE");
        for (point, raw, heads) in [(Point::QRope, Point::Q, c.n_heads), (Point::KRope, Point::K, c.n_kv_heads)] {
            let mut want = got.get(raw, 0).to_vec();
            RopeTable::new(1, c.head_dim, n, c.rope_theta).apply(&mut want, heads, c.rope_layout);
            assert_eq!(got.get(point, 0), &want[..], "n={n}: {point} rotated at position {n}, not {}", n - 1);
            assert_ne!(got.get(point, 0), right.get(point, 0), "n={n}: {point}");
        }
    }
}

#[test]
fn mask_off_by_one_leaves_the_first_token_no_key() {
    let model = default_model();
    let toks = tokens(1, model.config.vocab);
    let got = decode(&model, &toks, Some(Fault::MaskOffByOne));
    assert!(got.get(Point::AttnCtx, 0).iter().all(|&x| x == 0.0), "no key to attend to: a zero context");
    // kv_drop and cache_off_by_one have nothing to drop at position 0.
    let right = decode(&model, &toks, None);
    for fault in [Fault::KvDrop, Fault::CacheOffByOne] {
        assert_eq!(decode(&model, &toks, Some(fault)).0, right.0, "{fault} at position 0");
    }
}

#[test]
fn faults_reach_decode_steps_and_never_a_prefill() {
    let model = default_model();
    let prompt = Prompt { id: "p".into(), tokens: tokens(70, model.config.vocab) };
    let trace = |phase: Phase, fault: Option<Fault>| {
        let spec = RunSpec { profile: PROFILE, dtype: DType::BF16, layers: None, points: None, fault };
        let mut out = Vec::new();
        run_phase(&model, &prompt, phase, &spec, &mut out, None).unwrap();
        out
    };
    for fault in Fault::ALL {
        for phase in [Phase::PrefillLast, Phase::Chunked(16), Phase::PrefixCache, Phase::Batch(3)] {
            assert_eq!(trace(phase, Some(fault)), trace(phase, None), "{fault} must not touch {}", phase.name());
        }
        for phase in [Phase::Decode0, Phase::DecodeK(3)] {
            let (bad, good) = (trace(phase, Some(fault)), trace(phase, None));
            let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
            // Every decode step's layer-0 attention differs; the prefill of the sampled tokens
            // (prefill_decodeK) that decodeK also writes sees the tokens the buggy steps chose.
            let ctx = |t: &str| -> Vec<String> {
                t.lines().filter(|l| l.contains(r#""point":"attn_ctx","layer":0,"#)).map(String::from).collect()
            };
            let (b, g) = (text(&bad), text(&good));
            let steps = |t: &str| ctx(t).into_iter().filter(|l| l.contains(r#""phase":"decode"#)).collect::<Vec<_>>();
            let (sb, sg) = (steps(&b), steps(&g));
            assert_eq!(sb.len(), sg.len());
            assert!(!sb.is_empty() && sb.iter().zip(&sg).all(|(x, y)| x != y), "{fault} {}", phase.name());
        }
    }
}
