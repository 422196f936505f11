"""Text-to-text tasks, scored on generated text: translation (BLEU, chrF) and summarization
(ROUGE) with an encoder-decoder, or with a decoder-only model that reads the source as a
prompt; and causal generation from JSONL prompt / completion pairs (scored by the loss).

A decoder-only model sees `source EOS target EOS` and is trained on the target only; at
prediction time it continues `source EOS` until EOS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmkit.config import IGNORE_INDEX
from lmkit.data.batches import collate, length_grouped_batches
from lmkit.generate import generate
from lmkit.model import Model
from lmkit.tasks.formats import GenerationExample, Seq2SeqExample, read_generation, read_seq2seq
from lmkit.tasks.scores import bleu, chrf, rouge
from lmkit.tasks.task import Features, Task, TaskOptions
from lmkit.train.loop import evaluate


@dataclass
class Seq2SeqOptions(TaskOptions):
    source_field: str | None = None  # None: found from the header / JSON keys
    target_field: str | None = None
    num_beams: int = 4  # beam width of predictions (and of dev scoring)
    max_new_tokens: int = 64


@dataclass
class SummarizationOptions(Seq2SeqOptions):
    max_new_tokens: int = 128


@dataclass
class GenerationOptions(TaskOptions):
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


class Seq2SeqTask(Task):
    families = ("encoder-decoder", "decoder")
    Options = Seq2SeqOptions

    def read(self, path: str | Path, label_names: Sequence[str] | None = None,
             limit: int | None = None) -> list[Seq2SeqExample]:
        return read_seq2seq(path, source_field=self.options.source_field,
                            target_field=self.options.target_field, limit=limit)

    def score(self, hyps: list[str], refs: list[str]) -> dict[str, float]:
        raise NotImplementedError

    @property
    def eos(self) -> int:
        eos = self.config.eos_ids[0] if self.config.eos_ids else self.tok.eos_id
        if eos is None:
            raise ValueError(f"the {self.name} task needs an EOS token id in the config")
        return eos

    @property
    def stops(self) -> list[int]:
        """Every id that ends a generated text: the config's EOS set, else the EOS."""
        return list(self.config.eos_ids) or [self.eos]

    def prompt(self, source: str) -> list[int]:
        """What the model reads: the encoder input, or the decoder's prompt `source EOS`."""
        if self.config.family == "encoder-decoder":
            return self.truncate(self.tok.encode(source))
        ids = self.tok.encode(source, add_special_tokens=False)
        return ids[:self.max_length // 2] + [self.eos]

    def pair(self, source: str, target: str) -> Features:
        prompt = self.prompt(source)
        target_ids = self.tok.encode(target, add_special_tokens=False)
        if self.config.family == "encoder-decoder":
            return {"input_ids": prompt,
                    "labels": self.truncate(self.tok.encode(target), keep_last=True)}
        ids = (prompt + target_ids)[:self.max_length - 1] + [self.eos]
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]}

    def features(self, example: Seq2SeqExample) -> Features:
        return self.pair(example.source, example.target)

    def predict(self, model: Model, inputs: Sequence[str], batch_size: int = 32) -> list[str]:
        """Generated text for each source (beam search, `num_beams` option, default 4)."""
        prompts = [self.prompt(s) for s in inputs]
        out: list[str] = [""] * len(prompts)
        lengths = [len(p) for p in prompts]
        for idx in length_grouped_batches(lengths, batch_size, shuffle=False):
            gen = generate(model, [prompts[i] for i in idx], num_beams=self.options.num_beams,
                           max_new_tokens=self.options.max_new_tokens, eos_id=self.stops)
            for i, seq in zip(idx, gen.sequences):
                out[i] = self.tok.decode(seq)
        return out

    def evaluate(self, model: Model, examples: list, batch_size: int = 32) -> dict[str, float]:
        hyps = self.predict(model, [e.source for e in examples], batch_size)
        return self.score(hyps, [e.target for e in examples])


class TranslationTask(Seq2SeqTask):
    name = "translation"

    def score(self, hyps: list[str], refs: list[str]) -> dict[str, float]:
        b, c = bleu(hyps, refs), chrf(hyps, refs)
        return {"bleu": b["bleu"], "chrf": c["chrf"]}


class SummarizationTask(Seq2SeqTask):
    name = "summarization"
    Options = SummarizationOptions

    def score(self, hyps: list[str], refs: list[str]) -> dict[str, float]:
        return rouge(hyps, refs)


class GenerationTask(Seq2SeqTask):
    """Prompt -> completion with a decoder: trained on the completion only; scored by the
    loss (perplexity) of the completions; predicts by sampling or greedy continuation."""

    name = "generation"
    families = ("decoder",)
    Options = GenerationOptions
    reports_loss = True

    def read(self, path: str | Path, label_names: Sequence[str] | None = None,
             limit: int | None = None) -> list[GenerationExample]:
        return read_generation(path, limit=limit)

    def prompt(self, source: str) -> list[int]:
        ids = self.tok.encode(source, add_special_tokens=False)
        bos = self.config.bos_id
        ids = ([bos] if bos is not None and bos != self.eos else []) + ids
        return ids[-(self.max_length // 2):] or [self.eos]

    def features(self, example: GenerationExample) -> Features:
        return self.pair(example.prompt, example.completion)

    def evaluate(self, model: Model, examples: list, batch_size: int = 32) -> dict[str, float]:
        feats = [self.features(e) for e in examples]
        pad = model.config.fill_id(self.eos)
        batches = [collate(feats[i:i + batch_size], pad)
                   for i in range(0, len(feats), batch_size)]
        return evaluate(model, batches, "fp32")  # no autocast: as the weights are held

    def predict(self, model: Model, inputs: Sequence[str], batch_size: int = 32) -> list[str]:
        o = self.options
        gen = generate(model, [self.prompt(p) for p in inputs], max_new_tokens=o.max_new_tokens,
                       do_sample=o.do_sample, temperature=o.temperature, top_p=o.top_p,
                       top_k=o.top_k, seed=o.seed, eos_id=self.stops)
        return [self.tok.decode(s) for s in gen.sequences]
