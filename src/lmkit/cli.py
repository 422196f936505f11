"""The `lmkit` command: a thin face over the Python API (each command calls the same public
function a Python user would).

Option values are checked at parse time by the same rules the API applies. Bad input, I/O
failures and interruptions end with one line `lmkit: error: ...` (or `stopped:` /
`interrupted:`) and a non-zero exit status; `--debug` shows the traceback instead. Anything
else is a bug in lmkit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

COMMANDS: dict[str, Any] = {}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str) -> None:
        self.exit(2, f"lmkit: error: {message} (see {self.prog} --help)\n")


def _value(kind: type, check: Callable[[str, Any], None], name: str) -> Callable[[str], Any]:
    """An argparse type: `kind(text)`, then `check(name, value)` (a ValueError becomes the
    usage error). So a flag is checked by the rule the API applies to the same value."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        try:
            check(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _config_field(cls_path: str) -> Callable[[str, Any], None]:
    """A check of one field of the run config class at `cls_path` ("module:Class"): its
    defaults with that field changed must pass the class's `validate`."""
    def check(name: str, value: Any) -> None:
        import importlib

        module, cls = cls_path.split(":")
        defaults = getattr(importlib.import_module(module), cls)()
        dataclasses.replace(defaults, **{name: value}).validate()
    return check


def _generate_option(name: str, value: Any) -> None:
    from lmkit.generate import check_option

    check_option(name, value)


def _device_option(name: str, value: str) -> None:
    from lmkit.device import as_dtype, check_device

    if name == "device":
        check_device(value)
    elif value != "auto":  # dtype
        as_dtype(value)


def _convert_dtype(name: str, value: str) -> None:
    """convert's --dtype: a torch dtype name, or a GGUF weight type (q8_0, f16, f32)."""
    from lmkit.loading import GGUF_DTYPES

    if value not in GGUF_DTYPES:
        _device_option(name, value)


_PRETRAIN = _config_field("lmkit.train.pretrain:PretrainConfig")
_FINETUNE = _config_field("lmkit.finetune.run:FinetuneConfig")


def command(name: str, help: str, arguments: Any):
    """Register `fn(args)` as the sub-command `name`; `arguments(parser)` adds its flags."""
    def register(fn):
        COMMANDS[name] = (fn, help, arguments)
        return fn
    return register


def _device_flag(p: argparse.ArgumentParser, device: str | None) -> None:
    """--device; a None default leaves the choice to the run config."""
    p.add_argument("--device", type=_value(str, _device_option, "device"), default=device,
                   help="auto (the GPU if there is one) | cpu | "
                   f"cuda | cuda:N (default: {device or 'the config, else auto'})")


def _training_device_args(p: argparse.ArgumentParser, fields: Any) -> None:
    """--precision (bf16 autocast or fp32) and --device of a training command."""
    p.add_argument("--precision", type=_value(str, fields, "precision"),
                   help="auto (bf16 where the hardware has it, else fp32) | fp32 | bf16")
    _device_flag(p, None)
    p.add_argument("--carbon-intensity", type=_value(str, fields, "carbon_intensity"),
                   help="grid g CO2eq/kWh, or a country code (FRA, FR) for the run's "
                   "emissions (default: world average, 475)")


def _device_args(p: argparse.ArgumentParser, device: str = "auto",
                 dtype: str | None = "auto") -> None:
    """--device and --dtype (the format the weights are held in) of a command that runs or
    writes a checkpoint; a None dtype keeps the checkpoint's."""
    _device_flag(p, device)
    p.add_argument("--dtype", type=_value(str, _device_option, "dtype"), default=dtype,
                   help="weights: auto (as stored where the "
                   "device computes that natively, else fp32) | fp32 | bf16 | fp16 (GPU "
                   f"only) (default: {dtype or 'as stored'})")


def _registry_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", metavar="URL", help="the registry: a folder or an fsspec URL "
                   "(default: $LMKIT_REGISTRY, else ~/.cache/lmkit/registry)")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset name, a checkpoint folder / .gguf file, or a model "
                   "name owner/name[@tag|@revision] (registry or Hugging Face cache)")
    _registry_flag(p)


@command("info", "show a preset's or a checkpoint's architecture and size (and a named "
         "model's revisions, card and lineage)", _info_args)
def info(args: argparse.Namespace) -> None:
    import lmkit
    from lmkit.flops import num_parameters

    if args.model in lmkit.PRESETS:
        config = lmkit.preset(args.model)
    else:
        from lmkit.loading import locate

        located = locate(args.model, args.registry)
        _print_origin(located, args.model, args.registry)
        config = lmkit.load(located.path).config
    print(json.dumps(config.to_dict(), indent=2))
    print(f"parameters: {num_parameters(config):,} "
          f"({num_parameters(config, include_embeddings=False):,} without embeddings)")
    if args.model not in lmkit.PRESETS:
        from lmkit.lineage import describe
        from lmkit.loading import locate

        print(describe(locate(args.model).path))


def _print_origin(located: Any, ref: str, registry: str | None) -> None:
    """What `lmkit info` shows of where a checkpoint came from: a registry model's revisions
    and parents, a Hugging Face cache commit; then the lineage record, if it has one."""
    from lmkit import hub

    origin = located.origin
    if origin["kind"] == "registry":
        record = hub.info(ref, registry=registry)
        print(f"{record['name']}@{record['revision'][:12]} in the registry {record['registry']}")
        print(f"card: {json.dumps(record['manifest']['card'])}")
        print("revisions (oldest first):")
        for r in record["revisions"]:
            tags = f" [{', '.join(r['tags'])}]" if r["tags"] else ""
            here = " <- this one" if r["id"] == record["revision"] else ""
            print(f"  {r['id'][:12]}  {r['created'][:19].replace('T', ' ')}  "
                  f"{r['size']:>13,} bytes  {r['files']} file{'s' * (r['files'] != 1)}{tags}  "
                  f"{r['message']}{here}")
        chain = " <- ".join(p[:12] for p in record["parents"]) or "none (the first push)"
        print(f"parents: {chain}")
        lineage = record["lineage"]
    else:
        if origin["kind"] == "hf-cache":
            print(f"{origin['repo']}@{origin['commit']} from the Hugging Face cache "
                  f"{hub.hf_cache()}")
        folder = located.path
        lineage = hub.lineage(hub.read_small(folder)) if folder.is_dir() else None
    if lineage is not None:
        print(f"lineage: {json.dumps(lineage, indent=2)}")


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="the checkpoint folder (or .gguf file) to publish")
    p.add_argument("name", help="owner/name")
    p.add_argument("--tag", default="main", help="the tag to point at it (default: main)")
    p.add_argument("--message", "-m", default="", help="a note kept in the revision")
    _registry_flag(p)


@command("push", "publish a checkpoint in the registry as a new immutable revision",
         _push_args)
def push(args: argparse.Namespace) -> None:
    from lmkit.hub import push as run

    r = run(args.path, args.name, tag=args.tag, message=args.message, registry=args.registry)
    what = "new revision" if r.new else "unchanged: the same files as the tagged revision"
    print(f"{r.name}@{r.tag} -> {r.revision} ({what}) in {r.registry}")


def _pull_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="owner/name[@tag|@revision id prefix] (default tag: main)")
    p.add_argument("dest", nargs="?", help="a new folder to write (default: the local cache, "
                   "$LMKIT_CACHE or ~/.cache/lmkit/models)")
    _registry_flag(p)


@command("pull", "fetch a named checkpoint from the registry, every file verified", _pull_args)
def pull(args: argparse.Namespace) -> None:
    from lmkit.hub import pull as run

    r = run(args.name, args.dest, registry=args.registry)
    print(f"{r.name}@{r.revision} verified in {r.path}")


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="a glob on owner/name (e.g. 'me/*')")
    _registry_flag(p)


@command("list", "list the models in the registry with their tags", _list_args)
def list_models(args: argparse.Namespace) -> None:
    from lmkit.hub import default_registry
    from lmkit.hub import list_models as run

    models = run(args.pattern, registry=args.registry)
    for m in models:
        tags = ", ".join(f"{t}={rev[:12]}" for t, rev in sorted(m["tags"].items()))
        print(f"{m['name']}  {m['revisions']} revision(s)  {tags}")
    if not models:
        print(f"no model matching {args.pattern!r} in {args.registry or default_registry()}")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder (lmkit or Hugging Face) or .gguf file")
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue (or translate); repeat for a batch")
    p.add_argument("--max-new-tokens", type=_value(int, _generate_option, "max_new_tokens"),
                   default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_value(float, _generate_option, "temperature"),
                   default=1.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=_value(int, _generate_option, "top_k"))
    p.add_argument("--top-p", type=_value(float, _generate_option, "top_p"))
    p.add_argument("--seed", type=int)
    p.add_argument("--beams", type=_value(int, _generate_option, "num_beams"), default=1,
                   help="beam width (1 = no beam search)")
    p.add_argument("--length-penalty", type=_value(float, _generate_option, "length_penalty"),
                   default=1.0)
    p.add_argument("--n-best", type=_value(int, _generate_option, "num_return_sequences"),
                   default=1)
    _device_args(p)


@command("generate", "continue a prompt (decoder) or transform a source (encoder-decoder)",
         _generate_args)
def generate(args: argparse.Namespace) -> None:
    import lmkit

    model = lmkit.load(args.model, dtype=args.dtype, device=args.device)
    out = lmkit.generate(model, args.prompt, max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, num_beams=args.beams,
                         length_penalty=args.length_penalty,
                         num_return_sequences=args.n_best)
    per_prompt = args.n_best if args.beams > 1 else 1
    for i, (text, score) in enumerate(zip(out.texts, out.scores)):
        prompt = args.prompt[i // per_prompt]
        sep = "" if model.config.family == "decoder" else " => "
        print(f"{prompt}{sep}{text}" + (f"   [score {score:.3f}]" if per_prompt > 1 else ""))


def _column_args(p: argparse.ArgumentParser) -> None:
    """The columns of a task's records (default: found among the usual names)."""
    p.add_argument("--text-column", help="column holding the text")
    p.add_argument("--text-pair-column", help="column holding the second text of a pair")
    p.add_argument("--label-column", help="column holding the label")


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?",
                   help="pretrained checkpoint: lmkit or Hugging Face folder, .gguf")
    p.add_argument("--task", type=_value(str, _FINETUNE, "task"),
                   help="classification | ner | translation | summarization | generation")
    p.add_argument("--train", help="training data: a TSV / CSV / JSONL / CoNLL / Parquet / "
                   "Arrow file, a glob, a datasets folder or a cached dataset name "
                   "(SOURCE::SPLIT picks a split)")
    p.add_argument("--dev", help="dev data (as --train), scored with the task's metric at "
                   "the end")
    _column_args(p)
    p.add_argument("--label-names", help="the classes in id order, comma-separated (e.g. "
                   "negative,positive): integer labels name the class at that position")
    p.add_argument("--out", help="run folder (becomes the fine-tuned checkpoint)")
    p.add_argument("--scheme", type=_value(str, _FINETUNE, "scheme"),
                   help="full | frozen | top-k | lora")
    p.add_argument("--epochs", type=_value(float, _FINETUNE, "epochs"))
    p.add_argument("--steps", type=_value(int, _FINETUNE, "steps"),
                   help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=_value(float, _FINETUNE, "lr"))
    p.add_argument("--batch-size", type=_value(int, _FINETUNE, "batch_size"))
    _training_device_args(p, _FINETUNE)
    p.add_argument("--config", help="YAML file of FinetuneConfig fields")
    p.add_argument("--resume", metavar="RUN", help="continue the fine-tuning run in this folder "
                   "(with its saved checkpoint and config; flags and --set change fields)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out and start again")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any FinetuneConfig field, e.g. --set lora_rank=16 (repeatable)")


@command("finetune", "fine-tune a pretrained checkpoint on a labelled task", _finetune_args)
def finetune(args: argparse.Namespace) -> None:
    from lmkit.finetune.run import FinetuneConfig, resume
    from lmkit.finetune.run import finetune as run
    from lmkit.train.options import parse_set, read_config

    flags = {"task": args.task, "train": args.train, "dev": args.dev, "out": args.out,
             "scheme": args.scheme, "epochs": args.epochs, "steps": args.steps, "lr": args.lr,
             "batch_size": args.batch_size, "precision": args.precision,
             "device": args.device, "carbon_intensity": args.carbon_intensity,
             "text_column": args.text_column, "pair_column": args.text_pair_column,
             "label_column": args.label_column, "label_names": args.label_names}
    overrides = {**flags, **parse_set(args.set)}
    if args.resume:
        if args.checkpoint or args.config or args.overwrite:
            raise ValueError("--resume continues the run with its own checkpoint and config: "
                             "drop CHECKPOINT, --config and --overwrite (change single fields "
                             "with flags or --set)")
        result = resume(args.resume, overrides)
    else:
        if not args.checkpoint:
            raise ValueError("give the pretrained CHECKPOINT to fine-tune (or --resume RUN)")
        cfg = read_config(FinetuneConfig, args.config, overrides)
        if not cfg.train:
            raise ValueError("give the training data with --train FILE")
        result = run(args.checkpoint, cfg, overwrite=args.overwrite)
    print(json.dumps({"out": str(result.out_dir), "dev": result.metrics,
                      "trainable_parameters": result.trainable, "steps": result.steps,
                      "wall_time_s": round(result.wall_time_s, 1),
                      "flops": result.compute.get("flops")}, indent=2))


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="checkpoint", help="a fine-tuned folder (task metric) or a "
                   "language model (perplexity / pseudo-perplexity / per-token loss)")
    p.add_argument("--data", required=True, help="labelled data in the task's format, or "
                   "text for a language model (any --train source of lmkit finetune)")
    p.add_argument("--limit", type=_value(int, _FINETUNE, "dev_limit"),
                   help="score only the first N examples / documents")
    p.add_argument("--batch-size", type=_value(int, _positive, "batch_size"), default=8)
    _column_args(p)
    p.add_argument("--target-column", help="encoder-decoder: the target given --text-column "
                   "(default: the text itself)")
    p.add_argument("--max-length", type=_value(int, _positive, "max_length"),
                   help="language model: tokens per window (default: the model's positions)")
    p.add_argument("--stride", type=_value(int, _positive, "stride"),
                   help="language model: tokens between window starts (default: max-length)")
    _device_args(p)


@command("evaluate", "score a checkpoint on data: a fine-tuned model with its task's metric, "
         "a language model with perplexity", _evaluate_args)
def evaluate(args: argparse.Namespace) -> None:
    from lmkit.evaluation import evaluate as run

    options = {"pair_column": args.text_pair_column, "label_column": args.label_column}
    print(json.dumps(run(args.run, args.data, limit=args.limit, batch_size=args.batch_size,
                         text_column=args.text_column, target_column=args.target_column,
                         max_length=args.max_length, stride=args.stride, device=args.device,
                         dtype=args.dtype,
                         **{k: v for k, v in options.items() if v is not None}), indent=2))


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a fine-tuned folder (or any checkpoint with a task head)")
    p.add_argument("inputs", nargs="+", help="texts to classify / tag / translate / continue")
    p.add_argument("--task", help="the task (default: the folder's own)")
    _device_args(p)


@command("predict", "run a fine-tuned model on texts and print its predictions as JSON",
         _predict_args)
def predict(args: argparse.Namespace) -> None:
    from lmkit.finetune.inference import predict as run

    predictions = run(args.run, args.inputs, args.task, device=args.device, dtype=args.dtype)
    for text, prediction in zip(args.inputs, predictions):
        print(json.dumps({"input": text, "prediction": prediction}, ensure_ascii=False))


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of PretrainConfig fields (examples/pretrain/)")
    p.add_argument("--preset", help="model preset (lmkit info PRESET) or a config.json path")
    p.add_argument("--data", action="append", help="training text: a text / JSONL / CSV / "
                   "Parquet / Arrow file, a glob, a datasets folder or a cached dataset name "
                   "(repeatable)")
    p.add_argument("--text-column", help="column holding the text in records (default: text)")
    p.add_argument("--tokenizer", type=_value(str, _PRETRAIN, "tokenizer"),
                   help="bpe:8000 | wordpiece:N | unigram:N | char (one token per character) | a "
                   "tokenizer path")
    p.add_argument("--objective", type=_value(str, _PRETRAIN, "objective"),
                   help="auto | causal | mlm | span | infilling")
    p.add_argument("--steps", type=_value(int, _PRETRAIN, "steps"))
    p.add_argument("--batch-size", type=_value(int, _PRETRAIN, "batch_size"))
    p.add_argument("--seq-len", type=_value(int, _PRETRAIN, "seq_len"))
    p.add_argument("--lr", type=_value(float, _PRETRAIN, "lr"))
    _training_device_args(p, _PRETRAIN)
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any PretrainConfig field, model.* for the architecture "
                   "(e.g. --set model.hidden_size=128); repeatable")


@command("pretrain", "train a language model from scratch on text files (works under torchrun)",
         _pretrain_args)
def pretrain(args: argparse.Namespace) -> None:
    from lmkit.train import load_config, parse_set, resume
    from lmkit.train import pretrain as run

    flags = {"preset": args.preset, "data": args.data, "tokenizer": args.tokenizer,
             "objective": args.objective, "steps": args.steps, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "lr": args.lr, "precision": args.precision,
             "device": args.device, "out": args.out, "carbon_intensity": args.carbon_intensity,
             "text_field": args.text_column}
    overrides = {**flags, **parse_set(args.set)}
    if args.resume:
        if args.config:
            raise ValueError("--resume continues with the run's own saved config: drop "
                             "--config (change single fields with --set or flags)")
        out = resume(args.resume, overrides)
    else:
        out = run(load_config(args.config, overrides))
    print(f"model saved in {out} (lmkit generate {out} --prompt ...)")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint: lmkit or Hugging Face folder, or a .gguf file")
    p.add_argument("dst", help="folder to write (a .gguf file with --to gguf)")
    p.add_argument("--to", choices=("hf", "lmkit", "gguf"), default="hf")
    p.add_argument("--model-type", help="HF model_type to write (default: the natural one "
                   "for the architecture)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading pytorch_model.bin (torch.load with weights_only=True)")
    _device_flag(p, "cpu")
    p.add_argument("--dtype", type=_value(str, _convert_dtype, "dtype"), default=None,
                   help="weights written: fp32 | bf16 | fp16, or with --to gguf also q8_0 "
                   "(8-bit blocks; f32 / f16 accepted) (default: as stored)")


@command("convert", "convert a checkpoint to a Hugging Face folder or an lmkit folder",
         _convert_args)
def convert(args: argparse.Namespace) -> None:
    from lmkit.loading import convert as run

    out = run(args.src, args.dst, to=args.to, model_type=args.model_type,
              allow_pickle=args.allow_pickle, dtype=args.dtype, device=args.device)
    print(f"wrote {out}")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (pretrain, finetune, "
                   "convert) to put side by side")
    p.add_argument("--out", default="report.png",
                   help="the PNG to write; the Markdown table goes next to it as .md "
                   "(default: report.png)")


@command("report", "compare runs: loss/metric curves against FLOPs and the compute, time, "
         "energy and CO2 of each run and its lineage (PNG + Markdown table)", _report_args)
def report(args: argparse.Namespace) -> None:
    from lmkit.report import write_report

    rep = write_report(args.runs, args.out)
    print(rep.table)
    print(f"wrote {rep.png} and {rep.markdown}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmkit", description=__doc__.splitlines()[0])
    debug = {"action": "store_true", "help": "show the traceback of an error"}
    parser.add_argument("--debug", **debug)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (fn, help, arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        arguments(p)
        p.add_argument("--debug", **debug, default=argparse.SUPPRESS)  # after the command too
        p.set_defaults(func=fn)
    return parser


def error_line(e: BaseException) -> tuple[str, int] | None:
    """The one line `lmkit` prints for the exception `e` and its exit status, or None when
    `e` is a bug (not bad input, an I/O failure or an interruption)."""
    from lmkit.errors import TrainingDiverged, storage_error

    if isinstance(e, TrainingDiverged):
        return f"stopped: {e}", 1
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C, SIGTERM (TrainingInterrupted)
        return f"interrupted: {e or 'Ctrl-C'}", 130
    if isinstance(e, OSError):
        e = storage_error(e, "use") if e.errno is not None else e
    elif not isinstance(e, ValueError):  # lmkit's input errors are all ValueErrors
        return None
    return "error: " + "; ".join(s.strip() for s in str(e).splitlines() if s.strip()), 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BaseException as e:
        report = error_line(e)
        if report is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"lmkit: {report[0]}", file=sys.stderr)
        return report[1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
