"""transformers interop: safetensors directories and name/layout mapping tables."""
