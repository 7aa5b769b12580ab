//! driftscope's reference engine: a Llama-family transformer with a prefill path and a decode
//! path over a KV cache, named trace points, and two kernel profiles (`fast`, `invariant`).
//!
//! It exists so that driftscope's main job runs anywhere, on real models, with no GPU: `fast`
//! shows the drift production kernels cause, `invariant` its cure. It never writes files or
//! formats traces itself: a [`Tracer`] observes the trace points.

pub mod config;
pub mod error;
pub mod fault;
pub mod kernels;
pub mod load;
pub mod model;
pub mod prompts;
pub mod runner;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use config::{Config, RopeLayout};
pub use error::EngineError;
pub use fault::Fault;
pub use kernels::{Kernels, Profile};
pub use load::{load, Loaded};
pub use model::{KvCache, Model, Run, Seq, Tracer};
pub use tokenizer::Tokenizer;
pub use weights::{LayerWeights, Matrix, Storage, Weights};
