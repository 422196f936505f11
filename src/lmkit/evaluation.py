"""`lmkit evaluate`: score a checkpoint on data, by what the checkpoint is.

- a fine-tuned task folder (task.json), or a model with a task head: its task's metric on
  labelled data (`lmkit.finetune.inference.evaluate_run`);
- a language model (an `lm` or `mlm` head): :func:`language_model_scores` on text.

Language-model figures, over the documents of a source (`lmkit.sources.iter_documents`: the
blank-line blocks of a text file, or one record's text column each). Each document is scored
on its own (no context crosses documents) with the tokenizer's own special tokens:

- decoder: perplexity = exp(mean negative log-likelihood of each token given those before
  it; the first token of a document has no context and is not scored), and bits per byte =
  the summed NLL in bits / the UTF-8 bytes of the documents. A document longer than
  `max_length` is scored with a sliding window, as the transformers perplexity guide does:
  windows of `max_length` tokens start every `stride` tokens and each scores only the tokens
  no earlier window scored, so every token is predicted once, with at least
  `max_length - stride` tokens of context (stride = max_length: disjoint windows, whose
  first tokens have no context and are not scored, as in the guide);
- encoder (masked LM): pseudo-perplexity (Salazar et al., 2020) = exp(mean NLL of each
  token when it alone is replaced by the mask token, seen with the rest of its window);
  the special tokens are not scored; windows as above;
- encoder-decoder: per-token loss and its exp of the target given the source, teacher-forced
  (what transformers' `model(input_ids, labels=...).loss` is). The target is the
  `target_column` of each record when given (e.g. translations), else the document itself
  (reconstruction: BART's pretraining task without noise). Source and target are truncated
  to `max_length` (the number truncated is reported).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from lmkit import sources
from lmkit.data.batches import collate, length_grouped_batches
from lmkit.errors import DataError
from lmkit.finetune.inference import TASK_FILE, evaluate_run
from lmkit.loading import load, locate
from lmkit.model import Model, eval_mode
from lmkit.textfiles import PathLike

LM_HEADS = ("lm", "mlm")


def evaluate(checkpoint: str | Path, data: PathLike, *, limit: int | None = None,
             batch_size: int = 8, text_column: str | None = None,
             target_column: str | None = None, max_length: int | None = None,
             stride: int | None = None, device: str = "auto",
             dtype: str | torch.dtype | None = "auto", **task_options: Any) -> dict[str, Any]:
    """Score `checkpoint` on `data` (any source): task metrics for a fine-tuned folder (or
    a task head), perplexity-type figures for a language model (see the module docstring).
    `limit`: only the first N examples / documents. `task_options` (e.g. label_column)
    override the task options stored in task.json."""
    path = locate(checkpoint).path
    if not (Path(path) / TASK_FILE).is_file():
        model = load(checkpoint, dtype=dtype, device=device)
        if model.config.head in LM_HEADS:
            return language_model_scores(model, data, limit=limit, batch_size=batch_size,
                                         text_column=text_column,
                                         target_column=target_column,
                                         max_length=max_length, stride=stride)
        if model.head is None:
            raise ValueError(f"{checkpoint} has no head (a bare body): perplexity needs a "
                             "language-model head (lm or mlm), task scores a task head")
    if target_column or max_length is not None or stride is not None:
        raise ValueError("--target-column, --max-length and --stride are for language "
                         f"models; {checkpoint} is a task model (set the task's own options)")
    options = {**task_options, **({"text_column": text_column} if text_column else {})}
    return evaluate_run(checkpoint, data, limit, batch_size, device=device, dtype=dtype,
                        **options)


def check_stride(max_length: int, stride: int) -> None:
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length={max_length}, got {stride}")


def windows(n: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, new) of the sliding windows over n tokens: tokens [begin, end) are fed,
    the last `new` of them are scored (the transformers perplexity guide's loop)."""
    check_stride(max_length, stride)
    previous_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        yield begin, end, end - previous_end
        previous_end = end
        if end == n:
            break


def language_model_scores(model: Model, data: PathLike, *, limit: int | None = None,
                          batch_size: int = 8, text_column: str | None = None,
                          target_column: str | None = None, max_length: int | None = None,
                          stride: int | None = None) -> dict[str, Any]:
    """Perplexity (decoder), pseudo-perplexity (encoder) or per-token loss (encoder-decoder)
    of `model` on the texts of `data`; see the module docstring for the definitions."""
    cfg, tok = model.config, model.tokenizer
    if tok is None:
        raise ValueError("scoring text needs the checkpoint's tokenizer (tokenizer.json), "
                         "and this checkpoint has none")
    if cfg.head not in LM_HEADS:
        raise ValueError(f"perplexity needs a language-model head (lm or mlm), not "
                         f"{cfg.head!r}")
    if target_column and cfg.family != "encoder-decoder":
        raise ValueError("target_column is for encoder-decoder models (the target given "
                         "the source)")
    max_length = min(max_length or cfg.max_positions, cfg.max_positions)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    stride = stride or max_length
    check_stride(max_length, stride)
    if target_column:
        pairs = _pairs(data, text_column or "text", target_column)
    else:
        pairs = ((d, d) for d in sources.iter_documents(data, text_column))
    pairs = list(islice(pairs, limit))
    if not pairs:
        raise DataError(data, None, "no text to score")
    build = {"decoder": _causal_rows, "encoder": _masked_rows,
             "encoder-decoder": _seq2seq_rows}[cfg.family]
    rows, extra = build(model, pairs, max_length, stride)
    nll, count = _score(model, rows, batch_size)
    nbytes = sum(len(target.encode("utf-8")) for _, target in pairs)
    loss = nll / max(count, 1)
    kind = {"decoder": "perplexity", "encoder": "pseudo_perplexity",
            "encoder-decoder": "perplexity"}[cfg.family]
    out = {"loss": loss, kind: math.exp(loss), "tokens": count, "documents": len(pairs),
           "max_length": max_length, "stride": stride}
    if cfg.family == "decoder":
        out["bits_per_byte"] = nll / math.log(2) / nbytes
        out["bytes"] = nbytes
    return {**out, **extra}


def _pairs(data: PathLike, source: str, target: str) -> Iterator[tuple[str, str]]:
    for where, number, row in sources.records(data):
        for column in (source, target):
            if not isinstance(row, dict) or column not in row:
                raise DataError(where, number, f"no column {column!r} (columns: "
                                f"{', '.join(map(str, row))}): name one with --text-column "
                                "/ --target-column")
        yield str(row[source]), str(row[target])


def _split_specials(model: Model, text: str) -> tuple[list[int], list[int], list[int]]:
    """(leading special ids, the text's ids, trailing special ids) as the tokenizer adds."""
    enc = model.tokenizer.encode_with_offsets(text)
    mask, ids = enc.special_tokens_mask, enc.ids
    head = next((i for i, m in enumerate(mask) if not m), len(ids))
    tail = next((i for i, m in enumerate(reversed(mask)) if not m), 0) if head < len(ids) else 0
    return ids[:head], ids[head:len(ids) - tail], ids[len(ids) - tail:]


def _causal_rows(model: Model, pairs: list, max_length: int, stride: int
                 ) -> tuple[list[dict], dict]:
    rows = []
    for text, _ in pairs:
        ids = model.tokenizer.encode(text)
        for begin, end, new in windows(len(ids), max_length, stride):
            window = ids[begin:end]
            labels = [-100] * (len(window) - new) + window[len(window) - new:]
            rows.append({"input_ids": window, "labels": labels})
    return rows, {}


def _masked_rows(model: Model, pairs: list, max_length: int, stride: int
                 ) -> tuple[list[dict], dict]:
    mask_id = model.tokenizer.mask_id
    if mask_id is None:
        raise ValueError("pseudo-perplexity needs the tokenizer's mask token, and this one "
                         "has none")
    rows = []
    for text, _ in pairs:
        head, ids, tail = _split_specials(model, text)
        room = max_length - len(head) - len(tail)
        if room < 1:
            raise ValueError(f"max_length={max_length} leaves no room for text between the "
                             "special tokens")
        for begin, end, new in windows(len(ids), room, min(stride, room)):
            window = head + ids[begin:end] + tail
            for p in range(len(head) + end - begin - new, len(head) + end - begin):
                masked = list(window)
                masked[p] = mask_id
                labels = [-100] * len(window)
                labels[p] = window[p]
                rows.append({"input_ids": masked, "labels": labels})
    return rows, {}


def _seq2seq_rows(model: Model, pairs: list, max_length: int, stride: int
                  ) -> tuple[list[dict], dict]:
    def cut(ids: list[int]) -> list[int]:  # keep the closing </s>
        return ids if len(ids) <= max_length else ids[:max_length - 1] + ids[-1:]

    rows, truncated = [], 0
    for source, target in pairs:
        src, tgt = model.tokenizer.encode(source), model.tokenizer.encode(target)
        truncated += len(src) > max_length or len(tgt) > max_length
        rows.append({"input_ids": cut(src), "labels": cut(tgt)})
    return rows, {"truncated": truncated}


@torch.no_grad()
def _score(model: Model, rows: list[dict], batch_size: int) -> tuple[float, int]:
    """(summed NLL in nats, number of scored tokens) over rows, in length-grouped batches."""
    device = next(model.parameters()).device
    pad = model.config.fill_id()
    nll, count = 0.0, 0
    with eval_mode(model):
        lengths = [len(r["input_ids"]) for r in rows]
        for idx in length_grouped_batches(lengths, batch_size, shuffle=False):
            batch = collate([rows[i] for i in idx], pad)
            out = model(**{k: v.to(device) for k, v in batch.items()})
            nll += float(out.loss_sum)
            count += int(out.num_targets)
    return nll, count
