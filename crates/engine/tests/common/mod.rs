//! Helpers shared by the engine's integration tests.

#![allow(dead_code)]

use std::collections::BTreeMap;

use driftscope_engine::{KvCache, Model, Profile, Run, Tracer};
use driftscope_trace::{DType, Point};

/// Captures every traced row.
#[derive(Default)]
pub struct Capture {
    pub rows: BTreeMap<(u32, usize), Vec<u32>>,
}

impl Tracer for Capture {
    fn wants(&self, _: Point, _: u32) -> bool {
        true
    }
    fn record(&mut self, point: Point, layer: u32, _: usize, row: &[f32], _: DType) {
        self.rows.insert((layer, point.index()), row.iter().map(|x| x.to_bits()).collect());
    }
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// prefill_last: prefill all tokens, trace the last; returns (traced rows, logits bits).
pub fn prefill_last(model: &Model, tokens: &[u32], profile: Profile, dtype: DType) -> (Capture, Vec<u32>) {
    let mut cap = Capture::default();
    let mut cache = KvCache::new(&model.config);
    let mut run = Run {
        kernels: profile.kernels(),
        dtype,
        trace_rows: vec![tokens.len() - 1],
        tracer: Some(&mut cap),
        fault: None,
    };
    let logits = model.forward(tokens, &mut cache, &mut run);
    (cap, bits(&logits))
}

/// decode0: prefill all but the last token, decode the last; returns (traced rows, logits bits).
pub fn decode0(model: &Model, tokens: &[u32], profile: Profile, dtype: DType) -> (Capture, Vec<u32>) {
    let n = tokens.len();
    let mut cache = KvCache::new(&model.config);
    if n > 1 {
        let mut run = Run { kernels: profile.kernels(), dtype, trace_rows: vec![], tracer: None, fault: None };
        model.forward(&tokens[..n - 1], &mut cache, &mut run);
    }
    let mut cap = Capture::default();
    let mut run = Run { kernels: profile.kernels(), dtype, trace_rows: vec![0], tracer: Some(&mut cap), fault: None };
    let logits = model.forward(&tokens[n - 1..], &mut cache, &mut run);
    (cap, bits(&logits))
}

/// Deterministic token ids below `vocab`.
pub fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}
