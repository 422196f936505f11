"""Foreign checkpoint formats, at the edge: Hugging Face folders (read and write) and GGUF
files (read). One small module per model family (hf_bert, hf_gpt2, hf_llama, hf_bart, hf_t5)
holds its config translation and tensor-name table; `hf` holds the shared Hugging Face
machinery and `tables` applies the tensor-name tables for every converter.
Converting between formats (`lmkit.loading.convert`) sits above this package."""

from lmkit.convert.gguf import load_gguf
from lmkit.convert.hf import load_hf, registry, save_hf

__all__ = ["load_gguf", "load_hf", "registry", "save_hf"]
