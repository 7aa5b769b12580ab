//! Every kernel against the reference, on odd shapes; the invariance property of `invariant`
//! and the shape dependence of `fast`.

use super::*;
use crate::weights::Matrix;

/// Deterministic patterned data (no RNG): values in about [-1, 1].
fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.7311 + seed as f32 * 1.37).sin() * 0.9 + (i % 7) as f32 * 0.01).collect()
}

fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// f32 kernels may differ from the f64 oracle by rounding only: this budget is about 50 ulps of
/// the largest output, for reductions of a few hundred terms.
const F32_BUDGET: f32 = 50.0 * f32::EPSILON;

const PROFILES: [&dyn Kernels; 2] = [&Fast, &Invariant];

#[test]
fn matmul_matches_reference_on_odd_shapes() {
    for (rows, k, n) in [(1, 5, 3), (1, 67, 13), (3, 64, 7), (7, 130, 33), (33, 11, 65), (2, 576, 40)] {
        let (x, w) = (data(rows * k, 1), Matrix::new(n, k, data(n * k, 2)));
        let mut want = vec![0.0; rows * n];
        Reference.matmul(&x, rows, &w, &mut want);
        for kern in PROFILES {
            let mut got = vec![f32::NAN; rows * n];
            kern.matmul(&x, rows, &w, &mut got);
            let e = max_rel_err(&got, &want);
            assert!(e < F32_BUDGET, "matmul({},rows={rows},k={k},n={n}): rel err {e}", kern.name());
        }
    }
}

#[test]
fn rmsnorm_matches_reference_on_odd_shapes() {
    for (rows, n) in [(1, 5), (1, 129), (31, 64), (32, 64), (40, 257)] {
        let (x, g) = (data(rows * n, 3), data(n, 4));
        let mut want = vec![0.0; rows * n];
        Reference.rmsnorm(&x, rows, &g, 1e-5, &mut want);
        for kern in PROFILES {
            let mut got = vec![f32::NAN; rows * n];
            kern.rmsnorm(&x, rows, &g, 1e-5, &mut got);
            let e = max_rel_err(&got, &want);
            assert!(e < F32_BUDGET, "rmsnorm({},rows={rows},n={n}): rel err {e}", kern.name());
        }
    }
}

fn attn_case(rows: usize, pos0: usize, shape: AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let ctx = pos0 + rows;
    let kv = shape.n_kv_heads * shape.head_dim;
    (data(rows * shape.n_heads * shape.head_dim, 5), data(ctx * kv, 6), data(ctx * kv, 7))
}

#[test]
fn attention_matches_reference_on_odd_shapes() {
    let shapes = [
        AttnShape { n_heads: 1, n_kv_heads: 1, head_dim: 2 },
        AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 6 },
        AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 16 },
    ];
    for shape in shapes {
        for (rows, pos0) in [(1, 0), (1, 64), (1, 200), (5, 0), (7, 60), (33, 97)] {
            let (q, k, v) = attn_case(rows, pos0, shape);
            let mut want = vec![0.0; q.len()];
            Reference.attention(&q, rows, pos0, &k, &v, shape, &mut want);
            for kern in PROFILES {
                let mut got = vec![f32::NAN; q.len()];
                kern.attention(&q, rows, pos0, &k, &v, shape, &mut got);
                let e = max_rel_err(&got, &want);
                assert!(e < F32_BUDGET, "attention({},{shape:?},rows={rows},pos0={pos0}): rel err {e}", kern.name());
            }
        }
    }
}

/// The property `invariant` exists for: a row's result does not depend on how many rows share
/// the call, nor does a query's attention depend on the query length.
#[test]
fn invariant_is_bitwise_independent_of_row_count_and_query_length() {
    let (k, n, rows) = (130, 45, 37);
    let (x, w) = (data(rows * k, 8), Matrix::new(n, k, data(n * k, 9)));
    let mut all = vec![0.0; rows * n];
    Invariant.matmul(&x, rows, &w, &mut all);
    let mut all_norm = vec![0.0; rows * k];
    Invariant.rmsnorm(&x, rows, &data(k, 10), 1e-5, &mut all_norm);
    for r in [0, 1, 17, rows - 1] {
        let mut one = vec![0.0; n];
        Invariant.matmul(&x[r * k..(r + 1) * k], 1, &w, &mut one);
        assert_eq!(bits(&one), bits(&all[r * n..(r + 1) * n]), "matmul row {r}");
        let mut one = vec![0.0; k];
        Invariant.rmsnorm(&x[r * k..(r + 1) * k], 1, &data(k, 10), 1e-5, &mut one);
        assert_eq!(bits(&one), bits(&all_norm[r * k..(r + 1) * k]), "rmsnorm row {r}");
    }
    let shape = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 8 };
    let (q, kc, vc) = attn_case(300, 0, shape);
    let mut prefill = vec![0.0; q.len()];
    Invariant.attention(&q, 300, 0, &kc, &vc, shape, &mut prefill);
    let width = shape.n_heads * shape.head_dim;
    for p in [0, 1, 63, 64, 65, 127, 128, 255, 256, 299] {
        let mut dec = vec![0.0; width];
        Invariant.attention(&q[p * width..(p + 1) * width], 1, p, &kc, &vc, shape, &mut dec);
        assert_eq!(bits(&dec), bits(&prefill[p * width..(p + 1) * width]), "attention at position {p}");
    }
}

/// `fast` really is shape-dependent: one row and many rows reduce in different orders, so some
/// outputs differ in their last bits (otherwise it could not reproduce engine drift).
#[test]
fn fast_differs_between_one_row_and_many() {
    let (k, n, rows) = (576, 64, 4);
    let (x, w) = (data(rows * k, 11), Matrix::new(n, k, data(n * k, 12)));
    let mut many = vec![0.0; rows * n];
    Fast.matmul(&x, rows, &w, &mut many);
    let mut one = vec![0.0; n];
    Fast.matmul(&x[..k], 1, &w, &mut one);
    assert_ne!(bits(&one), bits(&many[..n]), "GEMV and GEMM orders should not agree bitwise");
    let shape = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 8 };
    let (q, kc, vc) = attn_case(200, 0, shape);
    let mut prefill = vec![0.0; q.len()];
    Fast.attention(&q, 200, 0, &kc, &vc, shape, &mut prefill);
    let width = shape.n_heads * shape.head_dim;
    let differing = (64..200)
        .filter(|&p| {
            let mut dec = vec![0.0; width];
            Fast.attention(&q[p * width..(p + 1) * width], 1, p, &kc, &vc, shape, &mut dec);
            bits(&dec) != bits(&prefill[p * width..(p + 1) * width])
        })
        .count();
    assert!(differing > 0, "split-KV decode should differ from tiled prefill somewhere");
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The register-blocked GEMM gives every element exactly `dot_blocked`'s bits, whatever the
/// remainders (rows not a multiple of MR, outputs not a multiple of NR, k not a multiple of 4 or
/// 64, tiles cut short).
#[test]
fn blocked_gemm_is_bitwise_dot_blocked() {
    use super::reduce::{par_matmul, par_matmul_blocked, DotOrder};
    for (rows, k, n) in [
        (1, 5, 3),
        (1, 576, 64),
        (3, 64, 7),
        (4, 63, 2),
        (5, 130, 33),
        (9, 259, 65),
        (33, 11, 1),
        (8, 576, 40),
        (4, 67, 4),
    ] {
        let (x, w) = (data(rows * k, 3), Matrix::new(n, k, data(n * k, 4)));
        let (mut want, mut got) = (vec![0.0; rows * n], vec![f32::NAN; rows * n]);
        par_matmul(&x, rows, &w, &mut want, DotOrder::Blocked);
        par_matmul_blocked(&x, rows, &w, &mut got);
        let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rows={rows} k={k} n={n}");
    }
}

/// Dot products that read f16 weights in place give the bits of the f32 functions on the same
/// (widened) values, for both orders and lengths around the lane and block sizes.
#[test]
fn f16_dot_products_are_bitwise_the_f32_ones() {
    use super::reduce::DotOrder;
    use half::f16;
    for n in [0, 1, 3, 4, 7, 8, 9, 63, 64, 65, 130, 576, 1537] {
        let a = data(n, 5);
        let w: Vec<f16> = data(n, 6).iter().map(|&v| f16::from_f32(v)).collect();
        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        for order in [DotOrder::Lanes8, DotOrder::Blocked] {
            assert_eq!(order.f16(&a, &w).to_bits(), order.f32(&a, &wide).to_bits(), "{order:?}, n={n}");
        }
    }
}

/// The four-row GEMV kernels give each row the bits of the one-row dot product, f32 and f16
/// rows (f16: the AVX-512 kernel where the CPU has it, and the 256-bit one), both orders,
/// lengths around the lane size.
#[test]
fn four_row_dot_products_are_bitwise_one_row() {
    use super::reduce::DotOrder;
    use half::f16;
    for n in [0, 1, 7, 8, 9, 64, 130, 576, 1537] {
        let a = data(n, 13);
        let rows: Vec<Vec<f32>> = (0..4).map(|r| data(n, 14 + r)).collect();
        let half_rows: Vec<Vec<f16>> = rows.iter().map(|r| r.iter().map(|&v| f16::from_f32(v)).collect()).collect();
        for order in [DotOrder::Lanes8, DotOrder::Blocked] {
            let got = order.f32_x4(&a, std::array::from_fn(|j| rows[j].as_slice()));
            let got16 = order.f16_x4(&a, std::array::from_fn(|j| half_rows[j].as_slice()));
            let got16_256 = order.f16_x4_256(&a, std::array::from_fn(|j| half_rows[j].as_slice()));
            for j in 0..4 {
                assert_eq!(got[j].to_bits(), order.f32(&a, &rows[j]).to_bits(), "{order:?} f32 n={n} row {j}");
                let want16 = order.f16(&a, &half_rows[j]).to_bits();
                assert_eq!(got16[j].to_bits(), want16, "{order:?} f16 n={n} row {j}");
                assert_eq!(got16_256[j].to_bits(), want16, "{order:?} f16, 256-bit, n={n} row {j}");
            }
        }
    }
}

/// Random Q4_1 and Q8_0 blocks: every nibble and byte value, scales and minima of both signs
/// and of very different sizes.
fn blocks(n: usize, seed: u32) -> (Vec<crate::weights::BlockQ4_1>, Vec<crate::weights::BlockQ8_0>) {
    use crate::weights::{BlockQ4_1, BlockQ8_0};
    use half::f16;
    let v = data(n * 36, seed);
    let byte = |x: f32| (x.to_bits() >> 7) as u8;
    let scale = |x: f32, y: f32| f16::from_f32(x * 10f32.powi((y * 6.0) as i32 - 3));
    let q4 = (0..n)
        .map(|b| BlockQ4_1 {
            d: scale(v[36 * b], v[36 * b + 1]),
            m: scale(v[36 * b + 2], v[36 * b + 3]),
            qs: std::array::from_fn(|j| byte(v[36 * b + 4 + j])),
        })
        .collect();
    let q8 = (0..n)
        .map(|b| BlockQ8_0 {
            d: scale(v[36 * b], v[36 * b + 1]),
            qs: std::array::from_fn(|j| byte(v[36 * b + 4 + j]) as i8),
        })
        .collect();
    (q4, q8)
}

/// Matrices kept as Q4_1 and Q8_0 blocks give every kernel, GEMV and GEMM, both profiles, the
/// bits of the same matrices dequantized to f32 (as they were at load before blocks were kept).
#[test]
fn block_matrices_compute_the_bits_of_their_dequantized_values() {
    use crate::weights::Storage;
    // Rows of 1 to 48 blocks: an odd number of 64-value blocks, and one ggml block alone at the
    // end (the GEMM order's 64-value blocks are two ggml blocks).
    for (n, k) in [(1, 32), (5, 64), (17, 576), (33, 96), (70, 160), (9, 224), (13, 1536)] {
        let (q4, q8) = blocks(n * k / 32, n as u32);
        for packed in [Storage::Q4_1(q4), Storage::Q8_0(q8)] {
            let name = packed.type_name();
            let w = Matrix::from_storage(n, k, packed);
            let wide = w.to_f32();
            // The buffered GEMV of CPUs without AVX-512, whatever this CPU has.
            let x = data(k, 78);
            for order in [super::reduce::DotOrder::Lanes8, super::reduce::DotOrder::Blocked] {
                let got = super::reduce::gemv_widened(&x, &w, (0, n), order);
                let mut want = vec![f32::NAN; n];
                super::reduce::par_matmul(&x, 1, &wide, &mut want, order);
                assert_eq!(bits(&got), bits(&want), "{name} buffered GEMV {order:?} n={n} k={k}");
            }
            for rows in [1, 3, 7] {
                let x = data(rows * k, 77);
                for kern in [&Fast as &dyn Kernels, &Invariant] {
                    let (mut got, mut want) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows * n]);
                    kern.matmul(&x, rows, &w, &mut got);
                    kern.matmul(&x, rows, &wide, &mut want);
                    assert_eq!(bits(&got), bits(&want), "{name} {} rows={rows} n={n} k={k}", kern.name());
                }
            }
        }
    }
}

/// The attention's value accumulation gives the plain loop's bits, for head sizes around the
/// register widths (8 and 16) and the 64 and 128 values held in registers.
#[test]
fn value_accumulation_is_bitwise_the_plain_loop() {
    use super::reduce::{accumulate_values, accumulate_values_avx};
    for d in [1, 7, 8, 9, 16, 33, 48, 64, 72, 112, 128, 130, 250, 300] {
        let values: Vec<Vec<f32>> = (0..37).map(|j| data(d, 20 + j)).collect();
        let ps = data(37, 19);
        let mut want = data(d, 18);
        let mut got = want.clone();
        for (p, v) in ps.iter().zip(&values) {
            for (a, x) in want.iter_mut().zip(v) {
                *a += p * x;
            }
        }
        let mut avx = got.clone();
        accumulate_values(&mut got, &ps, |j| &values[j]);
        assert_eq!(bits(&got), bits(&want), "d={d}");
        accumulate_values_avx(&mut avx, &ps, |j| &values[j]);
        assert_eq!(bits(&avx), bits(&want), "AVX, d={d}");
    }
}

/// The vector kernels (whatever this CPU runs) give the bits of the plain functions that define
/// the orders: one row, four rows, f16 rows, and the GEMM block with partial blocks.
#[test]
fn vector_kernels_match_the_plain_orders() {
    use super::reduce::{dot_blocked, dot_lanes8, par_matmul_blocked, par_matmul_blocked_4x4, DotOrder};
    use half::f16;
    for n in [0, 1, 3, 4, 7, 8, 63, 64, 65, 130, 576, 1537] {
        let a = data(n, 30);
        let rows: Vec<Vec<f32>> = (0..4).map(|r| data(n, 31 + r)).collect();
        let half_rows: Vec<Vec<f16>> = rows.iter().map(|r| r.iter().map(|&v| f16::from_f32(v)).collect()).collect();
        let wide: Vec<Vec<f32>> = half_rows.iter().map(|r| r.iter().map(|v| v.to_f32()).collect()).collect();
        for (order, plain) in
            [(DotOrder::Lanes8, dot_lanes8 as fn(&[f32], &[f32]) -> f32), (DotOrder::Blocked, dot_blocked)]
        {
            let four = order.f32_x4(&a, std::array::from_fn(|j| rows[j].as_slice()));
            let four16 = order.f16_x4(&a, std::array::from_fn(|j| half_rows[j].as_slice()));
            for j in 0..4 {
                let want = plain(&a, &rows[j]).to_bits();
                assert_eq!(order.f32(&a, &rows[j]).to_bits(), want, "{order:?} one row n={n}");
                assert_eq!(four[j].to_bits(), want, "{order:?} four rows n={n}");
                assert_eq!(four16[j].to_bits(), plain(&a, &wide[j]).to_bits(), "{order:?} f16 n={n}");
            }
        }
    }
    // Attention scores of one to three query heads with four keys read once, both widths.
    for n in [1, 7, 8, 9, 16, 64, 67, 128] {
        let qs: Vec<Vec<f32>> = (0..3).map(|h| data(n, 50 + h)).collect();
        let keys: Vec<Vec<f32>> = (0..4).map(|r| data(n, 60 + r)).collect();
        for heads in 1..=3 {
            let q: Vec<&[f32]> = qs[..heads].iter().map(|q| q.as_slice()).collect();
            for wide in [false, true] {
                let got = super::reduce::dots_lanes8_group_in(&q, std::array::from_fn(|r| keys[r].as_slice()), wide);
                for (h, r) in (0..heads).flat_map(|h| (0..4).map(move |r| (h, r))) {
                    let want = dot_lanes8(&qs[h], &keys[r]).to_bits();
                    assert_eq!(got[h][r].to_bits(), want, "grouped scores n={n} heads={heads} wide={wide} ({h}, {r})");
                }
            }
        }
    }
    // Both GEMM kernels (the dispatcher picks AVX-512's 6 × 16 blocks where the CPU has them),
    // around their block sizes: rows past a multiple of 4 and of 6, outputs past 4, 16 and a
    // tile of 32, k with tails of 1 to 3 and short last blocks.
    let shapes = [(4, 576, 8), (5, 130, 7), (3, 67, 2), (9, 64, 13), (6, 576, 16), (7, 131, 17), (13, 259, 33)];
    let more = [(2, 64, 48), (12, 1537, 35), (1, 8, 1), (6, 3, 5), (19, 200, 70)];
    for (rows, k, n) in shapes.into_iter().chain(more) {
        let x = data(rows * k, 40);
        let values = data(n * k, 41);
        // Weights stored in f32, f16 and bf16 (the GEMM packs each from its storage).
        let half: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        let brain: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let stored = [
            ("f32", Matrix::new(n, k, values)),
            ("f16", Matrix::from_storage(n, k, crate::weights::Storage::F16(half))),
            ("bf16", Matrix::from_storage(n, k, crate::weights::Storage::BF16(brain))),
        ];
        for ((name, gemm), (dtype, w)) in [
            ("dispatch", par_matmul_blocked as fn(&[f32], usize, &Matrix, &mut [f32])),
            ("4x4", par_matmul_blocked_4x4),
        ]
        .into_iter()
        .flat_map(|g| stored.iter().map(move |s| (g, s)))
        {
            let name = format!("{name} {dtype}");
            let mut got = vec![f32::NAN; rows * n];
            gemm(&x, rows, w, &mut got);
            for r in 0..rows {
                for o in 0..n {
                    let want = dot_blocked(&x[r * k..(r + 1) * k], &w.rows_f32(o, o + 1));
                    let at = format!("{name} rows={rows} k={k} n={n} at ({r}, {o})");
                    assert_eq!(got[r * n + o].to_bits(), want.to_bits(), "{at}");
                }
            }
        }
    }
}

/// Attention of many query rows (blocks of rows sharing transposed key chunks where the CPU has
/// AVX-512), and of one row (the query heads of a KV head sharing each key, splits in
/// parallel), gives every row and head the bits of its own walk: both plans, head sizes around
/// the eight lanes and the sixteen-value registers, one to seven query heads per KV head (blocks
/// of three and four heads and their remainders), chunk sizes around the four- and sixteen-key
/// groups, and cached prefixes.
#[test]
fn blocked_attention_is_bitwise_each_row_alone() {
    use super::reduce::{par_attention_plan, KvHead, KvPlan};
    let shapes = [(64, 9, 3), (67, 2, 1), (5, 4, 4), (16, 2, 2), (80, 8, 2), (33, 5, 1), (48, 14, 2), (128, 7, 1)];
    for (d, heads, kv_heads) in shapes {
        let shape = AttnShape { n_heads: heads, n_kv_heads: kv_heads, head_dim: d };
        for plan in [KvPlan::Tiles(32), KvPlan::Splits(64), KvPlan::Tiles(7), KvPlan::Splits(17), KvPlan::Splits(4)] {
            for (rows, pos0) in [(2, 0), (17, 0), (40, 5), (3, 37), (1, 0), (1, 6), (1, 63), (1, 64), (1, 130)] {
                let (q, k, v) = attn_case(rows, pos0, shape);
                let mut got = vec![f32::NAN; rows * heads * d];
                par_attention_plan(&q, rows, pos0, &k, &v, shape, plan, &mut got);
                let (stride, scale) = (kv_heads * d, 1.0 / (d as f32).sqrt());
                for r in 0..rows {
                    for h in 0..heads {
                        let kv = KvHead { k: &k, v: &v, stride, off: (h / (heads / kv_heads)) * d };
                        let mut want = vec![0.0; d];
                        plan.attend(&q[(r * heads + h) * d..][..d], &kv, pos0 + r + 1, scale, &mut want);
                        let at = format!("{plan:?} d={d} rows={rows} pos0={pos0} row {r} head {h}");
                        assert_eq!(bits(&got[(r * heads + h) * d..][..d]), bits(&want), "{at}");
                    }
                }
            }
        }
    }
}
