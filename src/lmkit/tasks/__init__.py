"""Fine-tuning tasks: a task is a head + a data format + a metric.

- data formats (``formats``): readers for classification (TSV/CSV/JSONL), token
  classification (CoNLL/JSONL), seq2seq (TSV/JSONL) and prompt/completion (JSONL) files;
- NER alignment (``alignment``): word <-> subword <-> character-span;
- batching: length-grouped variable-length batches and padding (``lmkit.data.batches``);
- scores (``scores``): accuracy, macro-F1, entity F1 (seqeval), BLEU / chrF (sacrebleu),
  ROUGE (rouge-score), all on a 0-100 scale;
- the tasks themselves (``TASKS``): each turns examples into features, evaluates with its
  metric and predicts from raw inputs (``task.Task`` is the interface).
"""

from lmkit.data.batches import collate, length_grouped_batches, padding_fraction
from lmkit.errors import DataError
from lmkit.tasks.alignment import (
    Span,
    align_labels,
    align_predictions,
    encode_words,
    split_words,
    tags_to_spans,
)
from lmkit.tasks.formats import (
    ClassificationExample,
    GenerationExample,
    Seq2SeqExample,
    TokenClassificationExample,
    label_names,
    read_classification,
    read_generation,
    read_seq2seq,
    read_token_classification,
)
from lmkit.tasks.scores import accuracy, bleu, chrf, entity_scores, macro_f1, rouge

__all__ = [
    "ClassificationExample",
    "GenerationExample",
    "Seq2SeqExample",
    "Span",
    "DataError",
    "TokenClassificationExample",
    "accuracy",
    "align_labels",
    "align_predictions",
    "bleu",
    "chrf",
    "collate",
    "encode_words",
    "entity_scores",
    "label_names",
    "length_grouped_batches",
    "macro_f1",
    "padding_fraction",
    "read_classification",
    "read_generation",
    "read_seq2seq",
    "read_token_classification",
    "rouge",
    "split_words",
    "tags_to_spans",
]

from lmkit.tasks.classification import ClassificationTask  # noqa: E402
from lmkit.tasks.fill_mask import FillMaskTask  # noqa: E402
from lmkit.tasks.ner import NERTask  # noqa: E402
from lmkit.tasks.seq2seq import GenerationTask, SummarizationTask, TranslationTask  # noqa: E402
from lmkit.tasks.task import Task  # noqa: E402

TASKS: dict[str, type[Task]] = {t.name: t for t in (
    ClassificationTask, NERTask, TranslationTask, SummarizationTask, GenerationTask,
    FillMaskTask)}
__all__ += ["TASKS", "Task"]
