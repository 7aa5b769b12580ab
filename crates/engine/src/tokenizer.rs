//! Tokenizers: byte-level for the built-in model; Hugging Face `tokenizers` built from GGUF
//! metadata (gpt2-style BPE: tokens and merges) or loaded from `tokenizer.json`.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer as HfTokenizer};

use crate::error::EngineError;

/// A tokenizer of one of the supported kinds.
pub enum Tokenizer {
    /// One token per UTF-8 byte.
    Bytes,
    /// A Hugging Face tokenizer.
    Hf(Box<HfTokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => f.write_str("Tokenizer::Bytes"),
            Tokenizer::Hf(_) => f.write_str("Tokenizer::Hf"),
        }
    }
}

impl Tokenizer {
    /// Encodes text without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| EngineError::Tokenizer(format!("cannot encode text: {e}"))),
        }
    }

    /// Decodes ids to text (lossy for partial UTF-8).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Bytes => {
                String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<u8>>()).into_owned()
            }
            Tokenizer::Hf(t) => t.decode(ids, false).unwrap_or_default(),
        }
    }

    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tokenizer, EngineError> {
        HfTokenizer::from_file(path)
            .map(|t| Tokenizer::Hf(Box::new(t)))
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Builds a gpt2-style byte-level BPE tokenizer from GGUF vocabulary data.
    ///
    /// `pre` is `tokenizer.ggml.pre`: `smollm` (and other digit-splitting presets) split digits
    /// one by one before the byte-level regex, as llama.cpp does for them.
    pub fn from_gguf_bpe(
        tokens: Vec<String>,
        merges: Vec<String>,
        token_types: &[i32],
        pre: &str,
    ) -> Result<Tokenizer, EngineError> {
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| EngineError::Tokenizer(format!("bad merge rule {m:?} (expected two tokens)")))
            })
            .collect::<Result<_, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| EngineError::Tokenizer(format!("cannot build BPE: {e}")))?;
        let mut t = HfTokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre {
            // llama.cpp splits digits one by one for these presets before the gpt2 regex.
            "smollm" | "starcoder" | "refact" | "command-r" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            _ => byte_level.into(),
        };
        t.with_pre_tokenizer(Some(pre_tok));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole in text.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(token_types)
            .filter(|(_, &ty)| ty == 3 || ty == 4)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        t.add_special_tokens(&special);
        Ok(Tokenizer::Hf(Box::new(t)))
    }
}
