"""unijax: unified multimodal autoregressive models (Janus-Pro style) in JAX / Flax NNX."""
