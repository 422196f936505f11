"""Data: corpora -> cached token streams -> packed rows or padded batches."""

from lmkit.data.corpus import TokenCache, tokenize_corpus
from lmkit.data.packing import PackedDataset, pad_batch
from lmkit.textfiles import iter_documents

__all__ = ["PackedDataset", "TokenCache", "iter_documents", "pad_batch", "tokenize_corpus"]
