"""Export formats other than the default safetensors checkpoint (mi_opt.export): GGUF for llama.cpp."""
