"""Pretraining from text (files, Parquet, Arrow, datasets: `lmkit.sources`) to a checkpoint, in
one call.

    cfg = load_config("cfg.yaml", {"preset": "tiny-decoder", "data": ["corpus.txt"],
                                   "tokenizer": "bpe:8000", "steps": 2000, "out": "runs/x"})
    out = pretrain(cfg)          # runs/x: config.json + model.safetensors + tokenizer.json
    out = resume("runs/x")       # continue an interrupted run exactly

The steps: a tokenizer (trained on the data from a spec like "bpe:8000", or loaded from a
path) -> a token cache (tokenized once, memory-mapped, keyed by a hash) -> packed rows of
`seq_len` tokens -> the objective of the model's family (decoder: causal LM; encoder: masked
LM; encoder-decoder: T5 span corruption, or BART text infilling) -> a model from a preset
with the tokenizer's vocabulary size and special ids -> the training loop.

Under `torchrun --nproc_per_node N` rank 0 trains the tokenizer and builds the cache while
the others wait; each rank then trains on its own share of the rows.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch.distributed as dist

from lmkit import sources
from lmkit.checkpoint import atomic_folder
from lmkit.config import PRESETS, ModelConfig
from lmkit.data.batches import BatchStream, fixed_batches
from lmkit.data.corpus import TokenCache, tokenize_corpus
from lmkit.data.packing import PackedDataset
from lmkit.lineage import PIPELINE_TAGS, card_metadata, data_record, make_record, write_card
from lmkit.logs import setup_logging
from lmkit.model import Model
from lmkit.objectives import CausalLM, MaskedLM, Objective, SpanCorruption, TextInfilling
from lmkit.tokenizer import Tokenizer, min_vocab_size
from lmkit.train import options
from lmkit.train.distributed import DistEnv, barrier, broadcast_object, cleanup, init_distributed
from lmkit.train.loop import TrainConfig, TrainResult, train
from lmkit.train.metrics import COMPUTE, CURVE
from lmkit.train.state import list_checkpoints, seed_everything
from lmkit.train.trackers import Trackers

CONFIG_FILE, TOKENIZER_DIR = "pretrain_config.yaml", "tokenizer"
SMALL_VALID = 10_000  # validation tokens below which the validation loss is noisy
TOKENIZER_SPEC = re.compile(r"(bpe|wordpiece|unigram):(\d+)|(char)(?::(\d+))?")
T = TypeVar("T")
log = logging.getLogger("lmkit")


@dataclass
class PretrainConfig(TrainConfig):
    """Everything `pretrain` needs: the TrainConfig fields (steps, batch_size, lr, ...) plus
    the data, tokenizer, model and objective."""

    preset: str = "tiny-decoder"  # a preset name (lmkit.PRESETS) or a config.json path
    data: list[str] = field(default_factory=list)  # training sources (lmkit.sources)
    out: str = "runs/pretrain"  # the run folder
    tokenizer: str = "bpe:8000"  # "bpe|wordpiece|unigram:VOCAB", "char[:MAX]" (trained) or a path
    objective: str = "auto"  # auto | causal | mlm | span | infilling
    seq_len: int = 128  # tokens per packed row
    valid_data: list[str] = field(default_factory=list)  # held-out sources (else a split)
    valid_fraction: float = 0.05  # share of documents held out when no valid_data; 0 = none
    valid_batches: int = 20  # at most this many validation batches (per process) per eval
    text_field: str | None = None  # column holding the text in records ("text" by default)
    lowercase: bool = False  # WordPiece only (BERT "uncased")
    cache_dir: str | None = None  # token cache; default <out>/cache
    mask_prob: float = 0.15  # masked LM
    whole_word: bool = False  # masked LM: mask whole words
    noise_density: float = 0.15  # span corruption
    mean_span_length: float = 3.0  # span corruption
    infill_prob: float = 0.3  # text infilling: share of tokens masked
    poisson_lambda: float = 3.0  # text infilling: mean span length
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to override

    NESTED: ClassVar = {"model": ModelConfig}
    PATH_FIELDS: ClassVar = ("preset", "data", "out", "tokenizer", "valid_data", "cache_dir")

    def validate(self) -> None:
        super().validate()
        if self.objective not in ("auto", *OBJECTIVES):
            raise ValueError(f"objective={self.objective!r} is not supported; choose one of "
                             f"{('auto', *OBJECTIVES)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.valid_batches < 1:
            raise ValueError(f"valid_batches must be at least 1, got {self.valid_batches}")
        spec = tokenizer_spec(self.tokenizer)
        if spec and spec[1] is not None and spec[1] < min_vocab_size(spec[0]):
            raise ValueError(f"tokenizer={self.tokenizer!r}: a {spec[0]} vocabulary "
                             f"needs at least {min_vocab_size(spec[0])} tokens (the "
                             "alphabet and the special tokens)")


@dataclass(frozen=True)
class ObjectiveChoice:
    """A pretraining objective: the family it trains, how it is built from the tokenizer
    and the run config, and whether it is the family's default (objective="auto")."""

    family: str
    build: Callable[[Tokenizer, PretrainConfig, int], Objective]
    default: bool = False


def _masked_lm(tok: Tokenizer, cfg: PretrainConfig, seed: int) -> Objective:
    return MaskedLM.from_tokenizer(tok, mask_prob=cfg.mask_prob, whole_word=cfg.whole_word,
                                   seed=seed)


def _span(tok: Tokenizer, cfg: PretrainConfig, seed: int) -> Objective:
    return SpanCorruption.from_tokenizer(tok, noise_density=cfg.noise_density,
                                         mean_span_length=cfg.mean_span_length, seed=seed)


def _infilling(tok: Tokenizer, cfg: PretrainConfig, seed: int) -> Objective:
    if tok.mask_id is None:
        raise ValueError("text infilling needs a mask token: use a tokenizer trained for an "
                         "encoder-decoder model (e.g. --tokenizer unigram:8000)")
    return TextInfilling.from_tokenizer(tok, mask_prob=cfg.infill_prob,
                                        poisson_lambda=cfg.poisson_lambda, seed=seed)


OBJECTIVES: dict[str, ObjectiveChoice] = {
    "causal": ObjectiveChoice("decoder", lambda tok, cfg, seed: CausalLM(seed), default=True),
    "mlm": ObjectiveChoice("encoder", _masked_lm, default=True),
    "span": ObjectiveChoice("encoder-decoder", _span, default=True),
    "infilling": ObjectiveChoice("encoder-decoder", _infilling),
}


def default_objective(family: str) -> str:
    return next(name for name, o in OBJECTIVES.items() if o.default and o.family == family)


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """A PretrainConfig from its defaults, a YAML file (flat keys plus a `model:` mapping of
    ModelConfig fields) and overrides (dotted keys: "model.hidden_size"); `$VARS` and ~ in
    paths are expanded ("$LMKIT_DATA/tinyshakespeare/input.txt")."""
    return options.read_config(PretrainConfig, path, overrides)


# ---- the steps --------------------------------------------------------------------------------


def _say(env: DistEnv, cfg: PretrainConfig, message: str) -> None:
    if env.is_main and cfg.progress:
        print(f"[lmkit] {message}", file=sys.stderr, flush=True)


def _rank0_first(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the others (which find its result on disk). A failure on
    rank 0 is raised on every rank instead of leaving the others waiting."""
    if not env.distributed:
        return fn()
    error, result = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # told to the other ranks, then raised here
            error = f"{type(e).__name__}: {e}"
            broadcast_object(error, env)
            raise
    error = broadcast_object(error, env)
    if error is not None:
        raise RuntimeError(f"rank 0 failed: {error}")
    return result if env.is_main else fn()


def base_config(preset: str) -> ModelConfig:
    """A preset by name, or a ModelConfig read from a config.json path."""
    if preset in PRESETS:
        return ModelConfig(**PRESETS[preset])
    if preset.endswith(".json") or Path(preset).is_file():
        if not Path(preset).is_file():
            raise FileNotFoundError(f"model config {preset} does not exist")
        return ModelConfig.from_json(preset)
    raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)} (or give the "
                     "path of a config.json)")


def tokenizer_spec(text: str) -> tuple[str, int | None] | None:
    """("bpe", 8000) for "bpe:8000", ("char", None) for "char"; None for a path."""
    match = TOKENIZER_SPEC.fullmatch(text.strip().lower())
    if match is None:
        return None
    if match.group(3):
        return "char", int(match.group(4)) if match.group(4) else None
    return match.group(1), int(match.group(2))


def make_tokenizer(cfg: PretrainConfig, family: str, env: DistEnv,
                   reuse: bool = False) -> Tokenizer:
    """Train the tokenizer spec ("bpe:8000") on the data, or load it from a path; saved to
    <out>/tokenizer (and loaded from there when `reuse`, i.e. on resume)."""
    saved = Path(cfg.out) / TOKENIZER_DIR
    if reuse and (saved / "tokenizer.json").is_file():
        return Tokenizer.from_dir(saved)
    spec = cfg.tokenizer.strip()
    match = tokenizer_spec(spec)

    def build() -> None:
        if match:
            kind, size = match
            _say(env, cfg, f"training a {kind} tokenizer ({size or 'all characters'} tokens, "
                           f"for a {family} model) on {', '.join(cfg.data)}")
            tok = Tokenizer.train(cfg.data, kind=kind, vocab_size=size, family=family,
                                  text_field=cfg.text_field, lowercase=cfg.lowercase)
        else:
            path = Path(spec)
            if path.is_dir():
                tok = Tokenizer.from_dir(path)
            elif path.is_file():
                tok = Tokenizer.from_file(path)
            else:
                raise FileNotFoundError(
                    f"tokenizer {spec!r} is neither a spec like 'bpe:8000' (kinds: bpe, "
                    "wordpiece, unigram; or 'char') nor an existing tokenizer folder or file")
        with atomic_folder(saved, swap=True) as staging:  # a kill keeps the old one whole
            tok.save(staging)

    _rank0_first(env, lambda: build() if env.is_main else None)
    return Tokenizer.from_dir(saved)


def make_objective(name: str, tok: Tokenizer, cfg: PretrainConfig, seed: int) -> Objective:
    return OBJECTIVES[name].build(tok, cfg, seed)


def model_config(cfg: PretrainConfig, tok: Tokenizer, objective: Objective) -> ModelConfig:
    """The preset with the tokenizer's vocabulary and special ids, then `cfg.model`; checks
    that a packed row fits the model's positions."""
    base = base_config(cfg.preset)
    ids: dict[str, Any] = {"vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
                           "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    if base.family == "encoder-decoder":
        ids["decoder_start_id"] = objective.decoder_start_id
    config = base.replace(**{**ids, **cfg.model})
    if config.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={config.vocab_size} is smaller than the "
                         f"tokenizer's {tok.vocab_size} tokens")
    check_seq_len(cfg, config)
    return config


def check_seq_len(cfg: PretrainConfig, config: ModelConfig) -> None:
    """A packed row (plus the eos a seq2seq objective appends) must fit max_positions."""
    extra = 1 if config.family == "encoder-decoder" else 0
    if cfg.seq_len + extra > config.max_positions:
        plus = " (+1 for the end-of-sequence token the objective appends)" if extra else ""
        raise ValueError(
            f"seq_len={cfg.seq_len}{plus} is longer than the model's max_positions="
            f"{config.max_positions} ({cfg.preset}): lower seq_len (--set seq_len="
            f"{config.max_positions - extra}) or raise it (--set model.max_positions=...)")


def _rows(cache: TokenCache, cfg: PretrainConfig, env: DistEnv, what: str,
          shuffle: bool) -> PackedDataset:
    try:
        return PackedDataset(cache, cfg.seq_len, shuffle=shuffle, seed=cfg.seed,
                             rank=env.rank, world_size=env.world_size)
    except ValueError as e:
        hint = (" Give more validation data (--set valid_fraction=... or valid_data=...) or "
                "turn validation off (--set valid_fraction=0)." if what == "validation" else "")
        raise ValueError(f"the {what} data is too small: {e}.{hint}") from e


def pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
    """Tokenizer -> token cache -> packed rows -> objective -> model -> train. Returns the
    run folder, which ends up holding the final model (a checkpoint folder loadable with
    `lmkit.load`), the tokenizer, checkpoints/, metrics.jsonl, tensorboard/, loss.png,
    compute.json and pretrain_config.yaml (what `resume` reads)."""
    cfg.validate()
    setup_logging()
    if not cfg.data:
        raise ValueError("no training data: pass one or more text, JSONL, Parquet, Arrow or "
                         "datasets sources (--data)")
    data = sources.check(cfg.data)
    valid = sources.check(cfg.valid_data) if cfg.valid_data else []
    cfg = dataclasses.replace(cfg, data=data, valid_data=valid)
    out = Path(cfg.out)
    if not resume and list_checkpoints(out):
        raise ValueError(f"{out} already holds a run: continue it with `lmkit pretrain --resume "
                         f"{out}` or choose another --out")
    base = base_config(cfg.preset)
    check_seq_len(cfg, base.replace(**cfg.model))  # before any work
    objective_name = default_objective(base.family) if cfg.objective == "auto" else cfg.objective
    if OBJECTIVES[objective_name].family != base.family:
        fits = {name: o.family for name, o in OBJECTIVES.items()}
        raise ValueError(f"the {objective_name} objective is for "
                         f"{OBJECTIVES[objective_name].family} models but {cfg.preset} is a "
                         f"{base.family} model; objectives and their families: {fits}")
    trackers = Trackers(cfg.report_to, out, cfg.tensorboard)  # a missing package: said now
    owns_group = not dist.is_initialized()
    env = init_distributed(cfg.device)
    try:
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            options.save_config(cfg, out / CONFIG_FILE)
        tok = make_tokenizer(cfg, base.family, env, reuse=resume)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"

        def tokenize(files: list[str]) -> TokenCache:
            return _rank0_first(env, lambda: tokenize_corpus(files, tok, cache_dir,
                                                             text_field=cfg.text_field))

        cache = tokenize(cfg.data)
        _say(env, cfg, f"{cache.num_tokens:,} tokens in {cache.num_docs:,} documents "
                       f"(vocabulary {tok.vocab_size:,})")
        valid_cache = None
        if valid:
            valid_cache = tokenize(valid)
        elif cfg.valid_fraction > 0:
            cache, valid_cache = cache.split(cfg.valid_fraction, seed=cfg.seed)

        objective = make_objective(objective_name, tok, cfg, seed=cfg.seed + 1 + env.rank)
        stream = BatchStream(_rows(cache, cfg, env, "training", shuffle=True), cfg.batch_size,
                             objective)
        eval_batches = None
        if valid_cache is not None:
            eval_objective = make_objective(objective_name, tok, cfg,
                                            seed=cfg.seed + 10_000 + env.rank)
            eval_batches = fixed_batches(_rows(valid_cache, cfg, env, "validation", False),
                                         cfg.batch_size, eval_objective, cfg.valid_batches)

        config = model_config(cfg, tok, objective)
        seed_everything(cfg.seed)
        model = Model(config)
        model.tokenizer = tok
        if env.is_main and valid_cache is not None and valid_cache.num_tokens < SMALL_VALID:
            log.warning("the validation data has only %s tokens: its loss is noisy; hold out "
                        "more (--set valid_fraction=... or valid_data=...)",
                        f"{valid_cache.num_tokens:,}")
        valid_size = f", validation {valid_cache.num_tokens:,} tokens in " \
            f"{valid_cache.num_docs:,} documents" if valid_cache is not None else \
            ", no validation data"
        summary = {"model": f"{cfg.preset} ({config.family}, {objective_name} objective)",
                   "data": f"train {cache.num_tokens:,} tokens in {cache.num_docs:,} "
                           f"documents{valid_size}; vocabulary {tok.vocab_size:,}",
                   "tokens per step": cfg.batch_size * cfg.grad_accum * env.world_size
                   * cfg.seq_len}
        with trackers:
            result = train(model, stream, cfg, out, eval_batches, resume=resume,
                           resume_hint=f"lmkit pretrain --resume {out}", trackers=trackers,
                           summary=summary)
            trackers.finish(result.final_metrics(),
                            [out / CURVE, out / COMPUTE, out / CONFIG_FILE])
        if env.is_main and result.stopped != "max_steps":  # the final model is saved
            write_model_card(out, cfg, config, objective_name, result)
        barrier(env)
    finally:
        if owns_group:
            cleanup()
    return out


def write_model_card(out: Path, cfg: PretrainConfig, config: ModelConfig, objective: str,
               result: TrainResult) -> Path:
    """README.md of a pretrained model: front matter, lineage (from scratch; the data files
    and their sha256, the config, the compute and energy), the last validation scores."""
    data = [*(data_record(f, "train") for f in cfg.data),
            *(data_record(f, "valid") for f in cfg.valid_data)]
    record = make_record("pretrain", out, {"kind": "scratch"}, data=data,
                                 config=dataclasses.asdict(cfg), compute=result.compute,
                                 objective=objective, preset=cfg.preset)
    scores = {k: v for k, v in (result.evals[-1] if result.evals else {}).items()
              if k in ("loss", "perplexity")}
    meta = card_metadata(record, pipeline_tag=PIPELINE_TAGS[config.family],
                                 metrics=scores)
    c = result.compute
    return write_card(out, meta, [
        f"Pretrained from scratch by lmkit: {cfg.preset} ({config.family}, "
        f"{c.get('parameters', 0):,} parameters), {objective} objective, {result.step} steps "
        f"on {', '.join(f'`{f}`' for f in cfg.data)}.", "",
        f"- validation: {', '.join(f'{k} {v:.4g}' for k, v in scores.items()) or 'none'}",
        f"- compute: {c.get('flops', 0):.3g} training FLOPs, {c.get('tokens', 0):,} tokens, "
        f"{c.get('wall_time_s', 0):.0f} s on {c.get('device', '?')} "
        f"({c.get('precision', '?')}); {c.get('energy_kwh') or 0:.3g} kWh, "
        f"{c.get('emissions_kg') or 0:.3g} kg CO2eq"])


def resume(out_dir: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Continue the run in `out_dir` from its latest checkpoint, with its saved config
    (`overrides`, e.g. {"steps": 4000}, change it)."""
    out_dir = Path(out_dir)
    file = out_dir / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{out_dir} has no {CONFIG_FILE}: it is not a run folder "
                                "written by `lmkit pretrain`")
    if not list_checkpoints(out_dir):
        raise ValueError(f"{out_dir} has no checkpoint to resume from (none was saved before "
                         "it stopped): start it again without --resume")
    cfg = options.read_config(PretrainConfig, file, {**(overrides or {}), "out": str(out_dir)},
                              strict=True)
    return pretrain(cfg, resume=True)
