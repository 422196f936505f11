"""Data: corpora -> cached token streams -> packed rows or padded batches -> batch streams."""

from lmkit.data.batches import BatchStream, TaskBatches, collate, fixed_batches
from lmkit.data.corpus import TokenCache, tokenize_corpus
from lmkit.data.packing import PackedDataset, pad_batch
from lmkit.sources import iter_documents

__all__ = ["BatchStream", "PackedDataset", "TaskBatches", "TokenCache", "collate",
           "fixed_batches", "iter_documents", "pad_batch", "tokenize_corpus"]
