"""Foreign checkpoint formats, at the edge: Hugging Face folders (read and write) and GGUF
files (read). One small module per model family (hf_bert, hf_gpt2, hf_llama, hf_bart, hf_t5)
holds its config translation and tensor-name table; `hf` holds the shared machinery."""

from lmkit.convert.hf import convert, load_hf, registry, save_hf

__all__ = ["convert", "load_gguf", "load_hf", "registry", "save_hf"]


def load_gguf(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - see lmkit.convert.gguf
    """See `lmkit.convert.gguf.load_gguf` (imported lazily: it needs the `gguf` package)."""
    from lmkit.convert.gguf import load_gguf as _load

    return _load(*args, **kwargs)
