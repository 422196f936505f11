"""Data: corpora -> cached token streams -> packed rows or padded batches."""

from lmkit.data.corpus import TokenCache, iter_documents, tokenize_corpus
from lmkit.data.packing import PackedDataset, pad_batch

__all__ = ["PackedDataset", "TokenCache", "iter_documents", "pad_batch", "tokenize_corpus"]
