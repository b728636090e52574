//! nlrw-core: the CPU hot paths of nlrw, as a plain Rust library.
//!
//! * [`topk`]: fused ReLU + top-k sparse encoding and the helpers around it
//!   (decode, re-apply top-k after replacing latents, per-latent statistics).
//! * [`quantile`]: per-latent quantile tables and quantile-normalization lookups
//!   `F_real⁻¹(F_sim(s))` (calibration of simulated activations).
//! * [`shards`]: streaming activation shards in the safetensors container with a
//!   checksummed manifest, atomic writes and a prefetching, shuffling reader.
//!
//! The Python bindings live in the separate `nlrw-python` crate, which only converts
//! types, releases the GIL and maps the typed errors below to Python exceptions.

pub mod quantile;
pub mod shards;
pub mod topk;
