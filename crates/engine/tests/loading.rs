//! Loading models from GGUF and safetensors files written here from the built-in model, and the
//! errors for files that are corrupt, truncated, incomplete or of another architecture.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use driftscope_engine::load::{load_gguf, load_hf};
use driftscope_engine::synthetic::default_model;
use driftscope_engine::{KvCache, Loaded, Matrix, Model, Profile, Run};
use driftscope_trace::DType;

fn qt(data: &[f32], shape: &[usize], dtype: GgmlDType) -> QTensor {
    let t = Tensor::from_slice(data, shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

/// Writes the built-in model as a llama GGUF, matrices in `dtype`, leaving out `skip`.
fn write_gguf(path: &Path, model: &Model, arch: &str, dtype: GgmlDType, skip: Option<&str>) {
    write_gguf_edit(path, model, arch, dtype, skip, |_| {});
}

/// [`write_gguf`] with `edit` applied to the metadata first.
fn write_gguf_edit(
    path: &Path,
    model: &Model,
    arch: &str,
    dtype: GgmlDType,
    skip: Option<&str>,
    edit: impl FnOnce(&mut Vec<(String, Value)>),
) {
    let c = &model.config;
    let w = &model.weights;
    let u = |v: usize| Value::U32(v as u32);
    // Printable ASCII tokens stand for themselves (the byte-level alphabet keeps them as is).
    let tokens: Vec<Value> = (0..c.vocab)
        .map(|i| {
            Value::String(if (33..127).contains(&i) { char::from(i as u8).to_string() } else { format!("<t{i}>") })
        })
        .collect();
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("tiny".into())),
        (format!("{arch}.block_count"), u(c.n_layers)),
        (format!("{arch}.embedding_length"), u(c.hidden)),
        (format!("{arch}.feed_forward_length"), u(c.ffn)),
        (format!("{arch}.attention.head_count"), u(c.n_heads)),
        (format!("{arch}.attention.head_count_kv"), u(c.n_kv_heads)),
        (format!("{arch}.rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(c.rms_eps)),
        (format!("{arch}.context_length"), u(c.max_context)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
    ];
    let mut meta = meta;
    edit(&mut meta);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mat = |name: String, m: &Matrix, dt: GgmlDType| (name, qt(&m.values(), &[m.rows, m.cols], dt));
    tensors.push(mat("token_embd.weight".into(), &w.embed, GgmlDType::F32));
    for (i, l) in w.layers.iter().enumerate() {
        // As llama.cpp's converter writes them: q/k rows permuted for adjacent-pair RoPE.
        let (wq, wk) = (converter_permute(&l.wq, c.head_dim), converter_permute(&l.wk, c.head_dim));
        for (n, m) in [("attn_q", &wq), ("attn_k", &wk), ("attn_v", &l.wv), ("attn_output", &l.wo)] {
            tensors.push(mat(format!("blk.{i}.{n}.weight"), m, dtype));
        }
        for (n, m) in [("ffn_gate", &l.w_gate), ("ffn_up", &l.w_up), ("ffn_down", &l.w_down)] {
            tensors.push(mat(format!("blk.{i}.{n}.weight"), m, dtype));
        }
        tensors.push((format!("blk.{i}.attn_norm.weight"), qt(&l.attn_norm, &[c.hidden], GgmlDType::F32)));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), qt(&l.mlp_norm, &[c.hidden], GgmlDType::F32)));
    }
    tensors.push(("output_norm.weight".into(), qt(&w.final_norm, &[c.hidden], GgmlDType::F32)));
    if let Some(head) = &w.lm_head {
        tensors.push(("output.weight".into(), qt(&head.values(), &[head.rows, head.cols], dtype)));
    }
    tensors.retain(|(n, _)| Some(n.as_str()) != skip);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// llama.cpp's converter permutation of q/k rows: within each head of `d` rows, Hugging Face row
/// `i` (first half) goes to `2i` and row `i + d/2` to `2i + 1`.
fn converter_permute(m: &Matrix, d: usize) -> Matrix {
    let (v, mut out) = (m.values(), m.values().into_owned());
    for head in 0..m.rows / d {
        for i in 0..d / 2 {
            for (src, dst) in [(i, 2 * i), (i + d / 2, 2 * i + 1)] {
                let (s, t) = ((head * d + src) * m.cols, (head * d + dst) * m.cols);
                out[t..t + m.cols].copy_from_slice(&v[s..s + m.cols]);
            }
        }
    }
    Matrix::new(m.rows, m.cols, out)
}

/// The loader undoes the converter's permutation: the weights come back in Hugging Face's order
/// bit for bit, with the halves RoPE layout.
#[test]
fn gguf_f32_round_trips_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let model = default_model();
    write_gguf(&path, &model, "llama", GgmlDType::F32, None);
    let loaded = load_gguf(&path).unwrap();
    assert_eq!(loaded.model.config.rope_layout, driftscope_engine::RopeLayout::Halves);
    assert_ne!(converter_permute(&model.weights.layers[0].wq, model.config.head_dim), model.weights.layers[0].wq);
    assert_eq!(loaded.model.weights, model.weights);
    let (a, b) = (&loaded.model.config, &model.config);
    assert_eq!(
        (a.n_layers, a.hidden, a.ffn, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab),
        (b.n_layers, b.hidden, b.ffn, b.n_heads, b.n_kv_heads, b.head_dim, b.vocab)
    );
    assert_eq!(loaded.tokenizer.encode("hi!").unwrap(), [104, 105, 33]);
}

#[test]
fn gguf_16_bit_and_block_types_dequantize_close_to_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let model = default_model();
    // Relative error budgets of one rounding (f16, bf16), of 8-bit blocks (Q8_0) and of 4- and
    // 5-bit ones (Q4_1, Q5_0).
    let cases = [
        (GgmlDType::F16, 1e-3),
        (GgmlDType::BF16, 8e-3),
        (GgmlDType::Q8_0, 1e-2),
        (GgmlDType::Q4_1, 0.15),
        (GgmlDType::Q5_0, 0.1),
    ];
    for (dtype, budget) in cases {
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &model, "llama", dtype, None);
        let loaded = load_gguf(&path).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        // F16 and BF16 stay 16-bit in memory, Q4_1 and Q8_0 stay blocks; other quantized types
        // are dequantized to f32.
        let kept = match dtype {
            GgmlDType::F16 => "f16",
            GgmlDType::BF16 => "bf16",
            GgmlDType::Q4_1 => "q4_1",
            GgmlDType::Q8_0 => "q8_0",
            _ => "f32",
        };
        assert_eq!(loaded.model.weights.layers[2].w_up.data.type_name(), kept, "{dtype:?}");
        assert_eq!(loaded.model.weights.layers[2].wq.data.type_name(), kept, "{dtype:?}: q (un-permuted) too");
        let (got, want) = (&loaded.model.weights.layers[2].w_up, &model.weights.layers[2].w_up);
        let (got, want) = (got.values(), want.values());
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(want.iter()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(err > 0.0 && err < budget, "{dtype:?}: relative error {err}");
        // And the model runs.
        let mut cache = KvCache::new(&loaded.model.config);
        let mut run =
            Run { kernels: Profile::Fast.kernels(), dtype: DType::F32, trace_rows: vec![], tracer: None, fault: None };
        let logits = loaded.model.forward(&[1, 2, 3], &mut cache, &mut run);
        assert!(logits.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn gguf_errors_name_the_file_and_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = default_model();
    let path = dir.path().join("m.gguf");

    write_gguf(&path, &model, "gpt2", GgmlDType::F32, None);
    let e = load_gguf(&path).unwrap_err().to_string();
    assert!(e.contains("m.gguf: architecture `gpt2` is not supported"), "{e}");

    write_gguf(&path, &model, "llama", GgmlDType::F32, Some("blk.1.attn_q.weight"));
    let e = load_gguf(&path).unwrap_err().to_string();
    assert!(e.contains("m.gguf: tensor `blk.1.attn_q.weight`: missing from the file"), "{e}");

    write_gguf(&path, &model, "llama", GgmlDType::F32, None);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 4096]).unwrap();
    let e = load_gguf(&path).unwrap_err().to_string();
    assert!(
        e.contains("m.gguf: tensor `") && e.contains("at offset") && e.contains("run past the end of the file"),
        "{e}"
    );

    std::fs::write(&path, &bytes[..100]).unwrap();
    let e = load_gguf(&path).unwrap_err().to_string();
    assert!(e.contains("m.gguf: not a readable GGUF file"), "{e}");

    // A q matrix with rows shorter than the config's hidden size (f32, and blocks): an error
    // naming the tensor and both shapes, not a panic in the un-permutation.
    let mut narrow = model.clone();
    let (rows, cols) = (model.weights.layers[1].wq.rows, model.config.hidden / 2);
    narrow.weights.layers[1].wq = Matrix::new(rows, cols, vec![0.5; rows * cols]);
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0] {
        write_gguf(&path, &narrow, "llama", dtype, None);
        let e = load_gguf(&path).unwrap_err().to_string();
        let want =
            format!("tensor `blk.1.attn_q.weight`: shape [{rows}, {cols}], expected [{rows}, {}]", model.config.hidden);
        assert!(e.contains("m.gguf") && e.contains(&want), "{dtype:?}: {e}");
    }

    std::fs::write(&path, b"not a gguf at all").unwrap();
    assert!(load_gguf(&path).unwrap_err().to_string().contains("not a readable GGUF file"));
    let missing = dir.path().join("none.gguf");
    assert!(load_gguf(&missing).unwrap_err().to_string().contains("none.gguf"));
}

/// Writes the built-in model as a Hugging Face checkpoint with weights in `dtype`.
fn write_hf(dir: &Path, model: &Model, dtype: safetensors::Dtype) {
    write_hf_shards(dir, model, dtype, 1);
}

/// [`write_hf`] in `shards` files with a `model.safetensors.index.json` when more than one, as
/// `transformers` writes large checkpoints.
fn write_hf_shards(dir: &Path, model: &Model, dtype: safetensors::Dtype, shards: usize) {
    let c = &model.config;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": c.hidden, "intermediate_size": c.ffn, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_eps, "max_position_embeddings": c.max_context,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let enc = |v: &[f32]| -> Vec<u8> {
        match dtype {
            safetensors::Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            safetensors::Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    };
    let w = &model.weights;
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        ("model.embed_tokens.weight".into(), vec![c.vocab, c.hidden], enc(&w.embed.values())),
        ("model.norm.weight".into(), vec![c.hidden], enc(&w.final_norm)),
        ("lm_head.weight".into(), vec![c.vocab, c.hidden], enc(&w.lm_head().values())),
    ];
    for (i, l) in w.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        for (n, m) in [
            ("self_attn.q_proj", &l.wq),
            ("self_attn.k_proj", &l.wk),
            ("self_attn.v_proj", &l.wv),
            ("self_attn.o_proj", &l.wo),
            ("mlp.gate_proj", &l.w_gate),
            ("mlp.up_proj", &l.w_up),
            ("mlp.down_proj", &l.w_down),
        ] {
            named.push((p(n), vec![m.rows, m.cols], enc(&m.values())));
        }
        named.push((p("input_layernorm"), vec![c.hidden], enc(&l.attn_norm)));
        named.push((p("post_attention_layernorm"), vec![c.hidden], enc(&l.mlp_norm)));
    }
    let per = named.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (k, part) in named.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", k + 1)
        };
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = part
            .iter()
            .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for (n, _, _) in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// A sharded checkpoint (`model.safetensors.index.json` and its shards) loads to the same model
/// as a single file; an index naming a missing shard, or placing a tensor in the wrong one, is
/// an error naming the tensor and the file (issue 16).
#[test]
fn sharded_safetensors_checkpoints_load() {
    let model = default_model();
    let one = tempfile::tempdir().unwrap();
    write_hf(one.path(), &model, safetensors::Dtype::F32);
    let dir = tempfile::tempdir().unwrap();
    write_hf_shards(dir.path(), &model, safetensors::Dtype::F32, 3);
    // A stray file beside the shards is not read: the index names the files.
    std::fs::write(dir.path().join("stale.safetensors"), b"garbage").unwrap();
    let (a, b) = (load_hf(one.path()).unwrap().model, load_hf(dir.path()).unwrap().model);
    assert_eq!(forward_bits(&a, Profile::Invariant), forward_bits(&b, Profile::Invariant));
    assert_eq!(a.weights.layers[3].w_down, b.weights.layers[3].w_down);

    let index_path = dir.path().join("model.safetensors.index.json");
    let index = std::fs::read_to_string(&index_path).unwrap();
    std::fs::write(&index_path, index.replace("model-00002-of-00003", "model-00009-of-00003")).unwrap();
    let e = load_hf(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("shard `model-00009-of-00003.safetensors` is missing"),
        "{e}"
    );
    let moved = index.replacen("model-00001-of-00003", "model-00003-of-00003", 1);
    std::fs::write(&index_path, moved).unwrap();
    let e = load_hf(dir.path()).unwrap_err().to_string();
    assert!(e.contains("places it in `model-00003-of-00003.safetensors`, which does not hold it"), "{e}");
}

#[test]
fn safetensors_f32_checkpoint_computes_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let model = default_model();
    write_hf(dir.path(), &model, safetensors::Dtype::F32);
    let loaded = load_hf(dir.path()).unwrap();
    assert_eq!(loaded.model.weights.embed, model.weights.embed);
    let logits = |m: &Model| {
        let mut cache = KvCache::new(&m.config);
        let mut run = Run {
            kernels: Profile::Invariant.kernels(),
            dtype: DType::F32,
            trace_rows: vec![],
            tracer: None,
            fault: None,
        };
        m.forward(&[10, 20, 30, 40], &mut cache, &mut run).iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(logits(&loaded.model), logits(&model), "same weights, same RoPE layout (halves): same bits");

    write_hf(dir.path(), &model, safetensors::Dtype::BF16);
    let loaded = load_hf(dir.path()).unwrap();
    let (a, b) = (loaded.model.weights.layers[0].wq.values(), model.weights.layers[0].wq.values());
    assert!(a.iter().zip(b.iter()).all(|(x, y)| *x == half::bf16::from_f32(*y).to_f32()));
}

/// The logits' bits of a five-token prefill and one decode step under `profile`.
fn forward_bits(m: &Model, profile: Profile) -> Vec<u32> {
    let mut cache = KvCache::new(&m.config);
    let mut run = Run { kernels: profile.kernels(), dtype: DType::F32, trace_rows: vec![], tracer: None, fault: None };
    let mut out: Vec<u32> =
        m.forward(&[10, 20, 30, 40, 50], &mut cache, &mut run).iter().map(|x| x.to_bits()).collect();
    out.extend(m.forward(&[60], &mut cache, &mut run).iter().map(|x| x.to_bits()));
    out
}

/// Q4_1 and Q8_0 matrices kept as blocks hold the values candle's reader dequantizes, bit for
/// bit (q and k rows after the loader's un-permutation too), take their blocks' bytes, and a
/// model computes exactly what it computes with those values in f32: prefill and decode, both
/// profiles.
#[test]
fn block_weights_stay_packed_and_compute_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let model = default_model();
    for (dtype, name, block_bytes) in [(GgmlDType::Q4_1, "q4_1", 20), (GgmlDType::Q8_0, "q8_0", 34)] {
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &model, "llama", dtype, None);
        let packed = load_gguf(&path).unwrap().model;
        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let mut candle = |tensor: &str| -> Vec<f32> {
            let q = content.tensor(&mut file, tensor, &Device::Cpu).unwrap();
            q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        let l = &packed.weights.layers[1];
        for (tensor, m) in [("blk.1.ffn_up.weight", &l.w_up), ("blk.1.ffn_down.weight", &l.w_down)] {
            assert_eq!(m.data.type_name(), name);
            assert_eq!(m.bytes(), m.rows * m.cols / 32 * block_bytes);
            let (got, want) = (m.values(), candle(tensor));
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} {tensor}");
        }
        let wq = candle("blk.1.attn_q.weight");
        let back = converter_permute(&l.wq.to_f32(), packed.config.head_dim);
        assert_eq!(
            back.values().iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            wq.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let wide = Model { weights: packed.weights.to_f32(), config: packed.config.clone() };
        for profile in [Profile::Fast, Profile::Invariant] {
            assert_eq!(forward_bits(&packed, profile), forward_bits(&wide, profile), "{name}, {}", profile.as_str());
        }
    }
}

/// 16-bit weights stay 16-bit in memory (half the bytes) and compute exactly what the same
/// values held in f32 compute: prefill and decode, both profiles.
#[test]
fn sixteen_bit_weights_stay_packed_and_compute_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let model = default_model();
    for (st, name) in [(safetensors::Dtype::BF16, "bf16"), (safetensors::Dtype::F16, "f16")] {
        write_hf(dir.path(), &model, st);
        let packed = load_hf(dir.path()).unwrap().model;
        let wq = &packed.weights.layers[0].wq;
        assert_eq!(wq.data.type_name(), name);
        assert_eq!(wq.bytes(), wq.rows * wq.cols * 2);
        let wide = Model { weights: packed.weights.to_f32(), config: packed.config.clone() };
        assert_eq!(wide.weights.layers[0].wq.data.type_name(), "f32");
        for profile in [Profile::Fast, Profile::Invariant] {
            assert_eq!(forward_bits(&packed, profile), forward_bits(&wide, profile), "{name}, {}", profile.as_str());
        }
    }
}

#[test]
fn safetensors_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = default_model();
    write_hf(dir.path(), &model, safetensors::Dtype::F32);
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.replace("\"hidden_size\":128", "\"hidden_size\":64")).unwrap();
    let e = load_hf(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tensor `model.embed_tokens.weight`: shape [256, 128], expected [256, 64]"), "{e}");
    std::fs::write(dir.path().join("config.json"), cfg.replace("LlamaForCausalLM", "GPT2LMHeadModel")).unwrap();
    let e = load_hf(dir.path()).unwrap_err().to_string();
    assert!(e.contains("architecture `GPT2LMHeadModel` is not supported"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{").unwrap();
    let e = load_hf(dir.path()).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    // Counts far beyond any model are refused before anything is sized from them (issue 16).
    for n in ["1000000000000", "18446744073709551615"] {
        let layers = cfg.replace("\"num_hidden_layers\":4", &format!("\"num_hidden_layers\":{n}"));
        assert_ne!(layers, cfg);
        std::fs::write(dir.path().join("config.json"), layers).unwrap();
        let e = load_hf(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("n_layers {n} is above the limit of 1024")), "{e}");
    }
    let scaled =
        cfg.replace("\"rope_theta\"", "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0},\"rope_theta\"");
    assert_ne!(scaled, cfg);
    std::fs::write(dir.path().join("config.json"), scaled).unwrap();
    let e = load_hf(dir.path()).unwrap_err().to_string();
    assert!(e.contains("`rope_scaling`: RoPE scaling") && e.contains("llama3"), "{e}");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    let e = load_hf(dir.path()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

/// GGUF llama weights pair RoPE dimensions (2i, 2i+1); Hugging Face weights pair (i, i + d/2).
/// Permuting the q/k rows of a halves-layout model the way llama.cpp's converter does, and
/// switching the layout, must compute the same function.
#[test]
fn rope_layouts_agree_after_the_converter_permutation() {
    use driftscope_engine::RopeLayout;
    let halves = default_model();
    let mut inter = halves.clone();
    inter.config.rope_layout = RopeLayout::Interleaved;
    let d = halves.config.head_dim;
    for l in &mut inter.weights.layers {
        l.wq = converter_permute(&l.wq, d);
        l.wk = converter_permute(&l.wk, d);
    }
    let logits = |m: &Model| {
        let mut cache = KvCache::new(&m.config);
        let mut run = Run {
            kernels: Profile::Reference.kernels(),
            dtype: DType::F32,
            trace_rows: vec![],
            tracer: None,
            fault: None,
        };
        m.forward(&[3, 1, 4, 1, 5, 9, 2, 6], &mut cache, &mut run)
    };
    let (a, b) = (logits(&halves), logits(&inter));
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(err < 1e-5, "relative difference {err}");
    // Without the permutation the layouts disagree: the test can tell them apart.
    let mut wrong = halves.clone();
    wrong.config.rope_layout = RopeLayout::Interleaved;
    let c = logits(&wrong);
    let err = a.iter().zip(&c).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(err > 1e-3, "layouts should matter ({err})");
}

/// A checkpoint directory with `tokenizer.json` gets that tokenizer.
#[test]
fn safetensors_checkpoint_reads_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = default_model();
    write_hf(dir.path(), &model, safetensors::Dtype::F32);
    // Build a tokenizer through the GGUF path and save it as tokenizer.json.
    let gguf = dir.path().join("t.gguf");
    write_gguf(&gguf, &model, "llama", GgmlDType::F32, None);
    let Loaded { tokenizer, .. } = load_gguf(&gguf).unwrap();
    let driftscope_engine::Tokenizer::Hf(t) = tokenizer else { panic!("GGUF gives a BPE tokenizer") };
    t.save(dir.path().join("tokenizer.json"), false).unwrap();
    let loaded = load_hf(dir.path()).unwrap();
    assert_eq!(loaded.tokenizer.encode("hi!").unwrap(), [104, 105, 33]);
    std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
    let e = load_hf(dir.path()).unwrap_err().to_string();
    assert!(e.starts_with("tokenizer: ") && e.contains("tokenizer.json"), "{e}");
}

/// In a GGUF file's bytes, the tensor info after the name of tensor `name`: `[n_dims u32, dims
/// u64..., type u32, offset u64]`.
fn tensor_info<'a>(bytes: &'a mut [u8], name: &str) -> &'a mut [u8] {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes.windows(key.len()).position(|w| w == key.as_slice()).expect("tensor info in the header");
    &mut bytes[at + key.len()..]
}

/// Hostile GGUF headers are errors that name the file, the key or the tensor, and the limit hit,
/// before anything is allocated from them (issue 16: a panic, an abort, or a silent misread).
#[test]
fn hostile_gguf_headers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = default_model();
    let path = dir.path().join("h.gguf");
    let cases: [(&str, Value, &str); 5] = [
        ("general.alignment", Value::U32(0), "h.gguf: not a readable GGUF file: general.alignment is 0"),
        ("general.alignment", Value::U32(48), "general.alignment is 48: it must be a power of two"),
        ("llama.rope.freq_base", Value::F32(f32::INFINITY), "rope_theta inf must be finite and positive"),
        ("llama.block_count", Value::U32(u32::MAX), "n_layers 4294967295 is above the limit of 1024"),
        ("llama.rope.scaling.type", Value::String("yarn".into()), "RoPE scaling `yarn` is not supported"),
    ];
    for (key, value, want) in cases {
        write_gguf_edit(&path, &model, "llama", GgmlDType::F32, None, |meta| {
            meta.retain(|(k, _)| k != key);
            meta.push((key.to_string(), value));
        });
        let e = load_gguf(&path).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }

    // A dimension of 2^62 (its product with the other wraps to 0 in u64).
    write_gguf(&path, &model, "llama", GgmlDType::F32, None);
    let clean = std::fs::read(&path).unwrap();
    let mut bytes = clean.clone();
    let info = tensor_info(&mut bytes, "blk.0.attn_v.weight");
    assert_eq!(u32::from_le_bytes(info[..4].try_into().unwrap()), 2);
    info[4..12].copy_from_slice(&(1u64 << 62).to_le_bytes());
    info[12..20].copy_from_slice(&(4u64).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = load_gguf(&path).unwrap_err().to_string();
    assert!(
        e.contains("h.gguf: tensor `blk.0.attn_v.weight`: dimensions") && e.contains("hold more values than a file"),
        "{e}"
    );

    // A Q8_0 matrix retyped to F32 would read its neighbours' bytes: its range overlaps theirs.
    write_gguf(&path, &model, "llama", GgmlDType::Q8_0, None);
    let mut bytes = std::fs::read(&path).unwrap();
    let info = tensor_info(&mut bytes, "blk.0.attn_q.weight");
    let n_dims = u32::from_le_bytes(info[..4].try_into().unwrap()) as usize;
    let ty = 4 + 8 * n_dims;
    assert_eq!(u32::from_le_bytes(info[ty..ty + 4].try_into().unwrap()), 8, "Q8_0");
    info[ty..ty + 4].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = load_gguf(&path).unwrap_err().to_string();
    assert!(e.contains("h.gguf: tensor `") && (e.contains("overlap") || e.contains("past the end")), "{e}");

    // Llama 3.1's RoPE frequency factors: refused, not ignored.
    let mut bytes = clean;
    let name = b"output_norm.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    bytes[at..at + name.len()].copy_from_slice(b"rope_freqs.weight\0");
    std::fs::write(&path, &bytes).unwrap();
    let e = load_gguf(&path).unwrap_err().to_string();
    assert!(e.contains("h.gguf: tensor `rope_freqs.weight`: RoPE frequency factors"), "{e}");
}
