"""The `lmkit` command: a thin face over the Python API (each command calls the same public
function a Python user would).

The parser is built without importing torch or lmkit's models (choices come from
`lmkit.names`, the config dataclasses are read only for `--help-config`), so `--help` is
instant. Option values are checked at parse time by the same rules the API applies. Bad input, I/O
failures and interruptions end with one line `lmkit: error: ...` (or `stopped:` /
`interrupted:`) and a non-zero exit status; `--debug` shows the traceback instead. Anything
else is a bug in lmkit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

from lmkit import __version__, names

COMMANDS: dict[str, Any] = {}
DESCRIPTION = ("lmkit: pretrain, convert, fine-tune and run Transformer models. Each command "
               "calls the Python function of the same name; `lmkit COMMAND --help` lists its "
               "options.")


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
    from lmkit.device import check_device, check_dtype

    if name == "device":
        check_device(value)
    else:
        check_dtype(value)


def _convert_dtype(name: str, value: str) -> None:
    """convert's --dtype: a torch dtype name, or a GGUF weight type (q8_0, f16, f32)."""
    from lmkit.loading import GGUF_DTYPES, check_saved_dtype

    if value not in GGUF_DTYPES:
        check_saved_dtype(value)


PRETRAIN_CONFIG = "lmkit.train.pretrain:PretrainConfig"
FINETUNE_CONFIG = "lmkit.finetune.run:FinetuneConfig"
_PRETRAIN = _config_field(PRETRAIN_CONFIG)
_FINETUNE = _config_field(FINETUNE_CONFIG)


def command(name: str, help: str, arguments: Any):
    """Register `fn(args)` as the sub-command `name`; `arguments(parser)` adds its flags."""
    def register(fn):
        COMMANDS[name] = (fn, help, arguments)
        return fn
    return register


def _choices(values: tuple[str, ...]) -> str:
    return " | ".join(values)


def _source(module: str) -> tuple[Any, list[str]]:
    """The syntax tree and lines of an lmkit module's file, read without importing it."""
    import ast
    from pathlib import Path

    file = Path(__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    text = file.read_text(encoding="utf-8")
    return ast.parse(text), text.splitlines()


@functools.cache
def config_fields(cls_path: str, prefix: str = "") -> dict[str, tuple[str, str, str]]:
    """name -> (type, default, help) of every field of the config dataclass at `cls_path`
    ("module:Class"), its bases' first, and of a `NESTED` dataclass as `field.name`. Read
    from the source (the help is the comment beside the field, else the comment lines above
    it), so that `--help` and `--help-config` import neither torch nor the class."""
    import ast

    module, name = cls_path.split(":")
    tree, lines = _source(module)
    imported = {a.asname or a.name: f"{n.module}:{a.name}" for n in tree.body
                if isinstance(n, ast.ImportFrom) and n.module for a in n.names}
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    fields: dict[str, tuple[str, str, str]] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in imported:
            fields.update(config_fields(imported[base.id], prefix))
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        key, kind = node.target.id, ast.unparse(node.annotation)
        if kind.startswith("ClassVar"):
            if key == "NESTED" and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    fields.update(config_fields(imported[v.id], f"{prefix}{k.value}."))
            continue
        line = lines[node.lineno - 1]
        above = []
        for prev in reversed(lines[:node.lineno - 1]):
            if not prev.strip().startswith("#"):
                break
            above.insert(0, prev.strip().lstrip("# "))
        note = line.split("  # ", 1)[1] if "  # " in line else " ".join(above)
        fields[prefix + key] = (kind, _default(node.value),
                                note or fields.get(prefix + key, ("", "", ""))[2])
    return fields


def _default(value: Any) -> str:
    """A field's default as written (`field(default_factory=...)`: what the factory makes)."""
    import ast

    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
        factory = next(k.value for k in value.keywords if k.arg == "default_factory")
        if isinstance(factory, ast.Lambda):
            return ast.unparse(factory.body)
        return {"list": "[]", "dict": "{}"}.get(ast.unparse(factory), ast.unparse(factory) + "()")
    return ast.unparse(value) if value is not None else "(required)"


def _field_help(cls_path: str, name: str, text: str | None = None) -> str:
    """A flag's help: `text` (else the field's comment) and the field's default."""
    _, default, note = config_fields(cls_path)[name]
    return f"{text or note} (default: {default})".lstrip()


class _HelpConfig(argparse.Action):
    """`--help-config`: every field `--set` takes (type, default, help), read from the source
    of the config dataclass at `cls_path` ("module:Class")."""

    def __init__(self, option_strings: list[str], cls_path: str, **kw: Any):
        super().__init__(option_strings, nargs=0, default=argparse.SUPPRESS,
                         help="list every --set field with its type, default and meaning", **kw)
        self.cls_path = cls_path

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        fields = config_fields(self.cls_path)
        width = max(map(len, fields))
        print(f"{parser.prog}: fields of {self.cls_path.split(':')[1]} (--set KEY=VALUE, or "
              "a --config YAML file)")
        for key, (kind, default, note) in fields.items():
            print(f"  {key:<{width}}  {kind} = {default}" + (f"\n  {'':<{width}}    {note}"
                                                           if note else ""))
        parser.exit()


def _help_config(p: argparse.ArgumentParser, cls_path: str) -> None:
    p.add_argument("--help-config", action=_HelpConfig, cls_path=cls_path)


def config_flag(p: argparse.ArgumentParser, cls_path: str, name: str, kind: type = str,
                text: str | None = None) -> None:
    """`--name` for the run-config field `name`: checked by the class's `validate`, its help
    and default read from the field (`text` replaces the field's comment)."""
    p.add_argument("--" + name.replace("_", "-"), help=_field_help(cls_path, name, text),
                   type=_value(kind, _config_field(cls_path), name))


def _device_flag(p: argparse.ArgumentParser, device: str | None) -> None:
    """--device; a None default leaves the choice to the run config."""
    p.add_argument("--device", type=_value(str, _device_option, "device"), default=device,
                   help="auto (the GPU if there is one) | cpu | "
                   f"cuda | cuda:N (default: {device or 'the config, else auto'})")


def _training_device_args(p: argparse.ArgumentParser, cls_path: str) -> None:
    """--precision (bf16 autocast or fp32), --device and --compile of a training command."""
    config_flag(p, cls_path, "precision",
                text="auto (bf16 where the hardware has it, else fp32) | fp32 | bf16")
    _device_flag(p, None)
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training step: faster steps once the first has "
                   "compiled (seconds to minutes); eager, with a warning, if it cannot compile")
    p.add_argument("--carbon-intensity",
                   type=_value(str, _config_field(cls_path), "carbon_intensity"),
                   help="grid g CO2eq/kWh, or a country code (FRA, FR) for the run's "
                   "emissions (default: world average, 475)")


def _feedback_args(p: argparse.ArgumentParser, fields: Any) -> None:
    """Evaluation, keep-best / early stopping and trackers of a training command."""
    p.add_argument("--eval-every", type=_value(int, fields, "eval_every"),
                   help="steps between dev evaluations (0 = none)")
    p.add_argument("--best-metric", help="keep the model of the best dev evaluation by this "
                   "metric as the final one (loss, accuracy, macro_f1, f1, bleu, ...)")
    p.add_argument("--patience", type=_value(int, fields, "patience"),
                   help="stop after this many evaluations without a better best-metric "
                   "(default 0: never; alone it watches the dev loss)")
    p.add_argument("--report-to", type=_value(str, _report_to, "report_to"),
                   help="trackers besides metrics.jsonl, comma-separated: tensorboard, "
                   "mlflow, wandb, none (default auto: TensorBoard where it is installed)")


def _report_to(name: str, value: str) -> None:
    from lmkit.train.trackers import check_report_to

    check_report_to([v for v in value.split(",") if v])


def _feedback_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"eval_every": args.eval_every, "best_metric": args.best_metric,
            "patience": args.patience, "report_to": args.report_to}


def _device_args(p: argparse.ArgumentParser, device: str = "auto",
                 dtype: str | None = "auto") -> None:
    """--device and --dtype (the format the weights are held in) of a command that runs or
    writes a checkpoint; a None dtype keeps the checkpoint's."""
    _device_flag(p, device)
    p.add_argument("--dtype", type=_value(str, _device_option, "dtype"), default=dtype,
                   help="weights: auto (as stored where the "
                   "device computes that natively, else fp32) | fp32 | bf16 | fp16 (GPU "
                   "only) | int8 (linear layers' weights in int8: a quarter of fp32's bytes) "
                   f"(default: {dtype or 'as stored'})")


def _registry_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", metavar="URL", help="the registry: a folder or an fsspec URL "
                   "(default: $LMKIT_REGISTRY, else ~/.cache/lmkit/registry)")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a preset name, a checkpoint folder / .gguf "
                   "file, or a model name owner/name[@tag|@revision] (registry or Hugging "
                   "Face cache)")
    p.add_argument("--list", action="store_true", help="list presets, heads, tasks, "
                   "objectives, schemes and the foreign model types lmkit reads and writes")
    _registry_flag(p)


def catalog() -> dict[str, Any]:
    """What lmkit offers, read from its tables (what `lmkit info --list` prints)."""
    from lmkit.config import HEADS, PRESETS, preset
    from lmkit.convert.gguf import ARCHITECTURES
    from lmkit.convert.hf import registry

    configs = {name: preset(name) for name in PRESETS}
    return {"presets": {k: f"{c.family}, {c.encoder_layers + c.decoder_layers} layers, "
                        f"hidden {c.hidden_size}" for k, c in configs.items()},
            "heads": {k: f"for {', '.join(h.families)}" for k, h in HEADS.items()},
            "tasks": list(names.TASKS), "objectives": list(names.OBJECTIVES),
            "schemes": list(names.SCHEMES),
            "hugging_face_model_types": {k: sorted(s.architectures.values())
                                         for k, s in registry().items()},
            "gguf_architectures": sorted(ARCHITECTURES),
            "adapters": "LoRA, lmkit's layout and PEFT's (read and written)"}


@command("info", "show a preset's or a checkpoint's architecture and size (a named "
         "model's revisions, card and lineage; --list: everything lmkit offers)", _info_args)
def info(args: argparse.Namespace) -> None:
    if args.list:
        print(json.dumps(catalog(), indent=2))
        return
    if not args.model:
        raise ValueError("give a preset name or a checkpoint (or --list)")
    import lmkit
    from lmkit.flops import num_parameters

    located = None
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
    if located is not None and located.path.is_dir():
        from lmkit.lineage import describe

        print(describe(located.path))


def _print_origin(located: Any, ref: str, registry: str | None) -> None:
    """What `lmkit info` shows of where a checkpoint came from: a registry model's revisions
    and parents, a Hugging Face cache commit (`lineage.describe` then prints the lineage)."""
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
    elif origin["kind"] == "hf-cache":
        print(f"{origin['repo']}@{origin['commit']} from the Hugging Face cache {hub.hf_cache()}")


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


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The decoding flags of `generate` and `chat`; unset ones take the checkpoint's
    generation_config value, else lmkit.generate's default."""
    p.add_argument("model", help="checkpoint folder (lmkit or Hugging Face) or .gguf file")
    p.add_argument("--max-new-tokens", type=_value(int, _generate_option, "max_new_tokens"),
                   help="(default: the checkpoint's generation settings, else 32)")
    p.add_argument("--sample", action="store_true", default=None,
                   help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_value(float, _generate_option, "temperature"),
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=_value(int, _generate_option, "top_k"))
    p.add_argument("--top-p", type=_value(float, _generate_option, "top_p"))
    p.add_argument("--seed", type=int)
    _compile_flag(p)


def _compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster steps once compiled (a minute "
                   "or more at the first call); eager, with a warning, if it cannot compile")


def _generate_args(p: argparse.ArgumentParser) -> None:
    _sampling_args(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue (or translate); repeat for a batch")
    p.add_argument("--beams", type=_value(int, _generate_option, "num_beams"),
                   help="beam width (1 = no beam search)")
    p.add_argument("--length-penalty", type=_value(float, _generate_option, "length_penalty"))
    p.add_argument("--n-best", type=_value(int, _generate_option, "num_return_sequences"),
                   help="answers per prompt: the n best beams (at most --beams), or n samples "
                   "with --sample")
    p.add_argument("--adapter", help="a LoRA adapter folder to put on the model (PEFT's "
                   "layout or lmkit's)")
    _device_args(p)


@command("generate", "continue a prompt (decoder) or transform a source (encoder-decoder)",
         _generate_args)
def generate(args: argparse.Namespace) -> None:
    import lmkit

    model = lmkit.load(args.model, dtype=args.dtype, device=args.device, adapter=args.adapter)
    out = lmkit.generate(model, args.prompt, max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, num_beams=args.beams,
                         length_penalty=args.length_penalty,
                         num_return_sequences=args.n_best, compile=args.compile)
    per_prompt = len(out.texts) // len(args.prompt)
    for i, (text, score) in enumerate(zip(out.texts, out.scores)):
        prompt = args.prompt[i // per_prompt]
        sep = "" if model.config.family == "decoder" else " => "
        print(f"{prompt}{sep}{text}" + (f"   [score {score:.3f}]" if per_prompt > 1 else ""))


def _chat_args(p: argparse.ArgumentParser) -> None:
    _sampling_args(p)
    p.add_argument("--system", help="a system message that starts the conversation")
    _device_args(p)


@command("chat", "talk to a chat model in the terminal (its chat template; streams the reply; "
         "/reset, /exit or Ctrl-D)", _chat_args)
def chat(args: argparse.Namespace) -> None:
    import lmkit

    model = lmkit.load(args.model, dtype=args.dtype, device=args.device)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise ValueError(f"{args.model} has no chat template (tokenizer_config.json "
                         "chat_template): use lmkit generate --prompt instead")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":  # end of input (Ctrl-D) or /exit
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(start)
            print("(conversation cleared)", flush=True)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        stream = _Streamer(model.tokenizer)
        out = lmkit.generate(model, messages=messages, max_new_tokens=args.max_new_tokens,
                             do_sample=args.sample, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             stream=stream, compile=args.compile)
        stream.finish(out.texts[0])
        messages.append({"role": "assistant", "content": out.texts[0]})


class _Streamer:
    """Prints a reply as its tokens arrive: the text decoded so far, less what is already
    printed (a partial UTF-8 character waits for its next byte)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def __call__(self, step: Any) -> None:
        if int(step[0]) >= 0:
            self.tokens.append(int(step[0]))
            self._show(self.tokenizer.decode(self.tokens))

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self, text: str) -> None:
        self._show(text)
        print(flush=True)


def _column_args(p: argparse.ArgumentParser) -> None:
    """The columns of a task's records (default: found among the usual names)."""
    p.add_argument("--text-column", help="column holding the text")
    p.add_argument("--text-pair-column", help="column holding the second text of a pair")
    p.add_argument("--label-column", help="column holding the label")


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?",
                   help="pretrained checkpoint: lmkit or Hugging Face folder, .gguf")
    config_flag(p, FINETUNE_CONFIG, "task", text=_choices(names.TASKS))
    p.add_argument("--train", help="training data: a TSV / CSV / JSONL / CoNLL / Parquet / "
                   "Arrow file, a glob, a datasets folder or a cached dataset name "
                   "(SOURCE::SPLIT picks a split)")
    p.add_argument("--dev", help="dev data (as --train), scored with the task's metric at "
                   "each evaluation and at the end")
    _column_args(p)
    p.add_argument("--label-names", help="the classes in id order, comma-separated (e.g. "
                   "negative,positive): integer labels name the class at that position")
    p.add_argument("--out", help=_field_help(FINETUNE_CONFIG, "out", "run folder (becomes "
                                             "the fine-tuned checkpoint)"))
    config_flag(p, FINETUNE_CONFIG, "scheme", text=f"{_choices(names.SCHEMES)} (lora also "
                "writes <out>/peft: the adapter in PEFT's layout)")
    config_flag(p, FINETUNE_CONFIG, "epochs", float, "passes over the training data")
    config_flag(p, FINETUNE_CONFIG, "steps", int, "optimizer steps (overrides --epochs)")
    config_flag(p, FINETUNE_CONFIG, "lr", float)
    config_flag(p, FINETUNE_CONFIG, "batch_size", int)
    _training_device_args(p, FINETUNE_CONFIG)
    _feedback_args(p, _FINETUNE)
    p.add_argument("--config", help="YAML file of FinetuneConfig fields")
    p.add_argument("--resume", metavar="RUN", help="continue the fine-tuning run in this folder "
                   "(with its saved checkpoint and config; flags and --set change fields)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out and start again")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any FinetuneConfig field, e.g. --set lora_rank=16 (repeatable; "
                   "--help-config lists them)")
    _help_config(p, FINETUNE_CONFIG)


@command("finetune", "fine-tune a pretrained checkpoint on a labelled task", _finetune_args)
def finetune(args: argparse.Namespace) -> None:
    from lmkit.finetune.run import FinetuneConfig, resume
    from lmkit.finetune.run import finetune as run
    from lmkit.train.options import parse_set, read_config

    flags = {"task": args.task, "train": args.train, "dev": args.dev, "out": args.out,
             "scheme": args.scheme, "epochs": args.epochs, "steps": args.steps, "lr": args.lr,
             "batch_size": args.batch_size, "precision": args.precision,
             "device": args.device, "carbon_intensity": args.carbon_intensity,
             "compile": args.compile, **_feedback_flags(args), "text_column": args.text_column,
             "pair_column": args.text_pair_column, "label_column": args.label_column,
             "label_names": args.label_names}
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
                      "best": result.best,
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
    p.add_argument("inputs", nargs="*", help="texts to classify / tag / translate / continue "
                   "('-': read them from standard input)")
    p.add_argument("--input", metavar="FILE", help="read the texts from FILE ('-': standard "
                   "input): one text per line, or JSON lines with a text field")
    p.add_argument("--field", default="text", help="the JSON lines' text field (default: text)")
    p.add_argument("--output", metavar="FILE",
                   help="write the predictions (JSON lines) to FILE instead of standard output")
    p.add_argument("--task", help="the task (default: the folder's own)")
    p.add_argument("--batch-size", type=_value(int, _FINETUNE, "batch_size"), default=32)
    _device_args(p)


def read_inputs(lines: Any, where: str, field: str = "text") -> list[dict[str, Any]]:
    """Records from text lines: JSON objects (each with `field`) when the first non-blank line
    is one, else {"input": line} per non-blank line."""
    records, as_json = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if as_json is None:
            as_json = line.lstrip().startswith("{")
        if not as_json:
            records.append({"input": line.rstrip("\r\n")})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{number}: not valid JSON ({e.msg}); give one JSON "
                             "object per line, or plain text lines") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{where}:{number}: no text field {field!r} (choose it with "
                             "--field)")
        records.append(record)
    return records


@command("predict", "run a fine-tuned model on texts (arguments, a file or standard input) and "
         "write its predictions as JSON lines", _predict_args)
def predict(args: argparse.Namespace) -> None:
    import os

    from lmkit.finetune.inference import pipeline

    source = args.input or ("-" if args.inputs == ["-"] else None)
    if source and args.inputs not in ([], ["-"]):
        raise ValueError("give the texts as arguments or with --input, not both")
    if source == "-":
        records = read_inputs(sys.stdin, "stdin", args.field)
    elif source:
        with open(source, encoding="utf-8") as f:
            records = read_inputs(f, source, args.field)
    else:
        records = [{"input": text} for text in args.inputs]
    if not records:
        raise ValueError("no texts to predict: give them as arguments, with --input FILE or "
                         "on standard input ('-')")
    run = pipeline(args.task, args.run, device=args.device, dtype=args.dtype)
    texts = [r.get("input", r.get(args.field)) for r in records]
    out = open(args.output + ".tmp", "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for start in range(0, len(texts), 64 * args.batch_size):  # stream long inputs
            chunk = texts[start:start + 64 * args.batch_size]
            for record, prediction in zip(records[start:], run(chunk, args.batch_size)):
                out.write(json.dumps({**record, "prediction": prediction},
                                     ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    if args.output:
        os.replace(args.output + ".tmp", args.output)  # never a half-written file


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of PretrainConfig fields (examples/pretrain/)")
    p.add_argument("--preset", help=_field_help(PRETRAIN_CONFIG, "preset", "model preset "
                                                "(lmkit info --list) or a config.json path"))
    p.add_argument("--data", action="append", help="training text: a text / JSONL / CSV / "
                   "Parquet / Arrow file, a glob, a datasets folder or a cached dataset name "
                   "(repeatable)")
    p.add_argument("--text-column", help="column holding the text in records (default: text)")
    config_flag(p, PRETRAIN_CONFIG, "tokenizer",
                text="bpe:8000 | wordpiece:N | unigram:N (trained) | char (one token per "
                "character) | a tokenizer path")
    config_flag(p, PRETRAIN_CONFIG, "objective", text=_choices(names.OBJECTIVES))
    for name, kind in (("steps", int), ("batch_size", int), ("seq_len", int), ("lr", float)):
        config_flag(p, PRETRAIN_CONFIG, name, kind)
    _training_device_args(p, PRETRAIN_CONFIG)
    _feedback_args(p, _PRETRAIN)
    p.add_argument("--out", help=_field_help(PRETRAIN_CONFIG, "out"))
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any PretrainConfig field, model.* for the architecture "
                   "(e.g. --set model.hidden_size=128); repeatable; --help-config lists "
                   "them")
    _help_config(p, PRETRAIN_CONFIG)


@command("pretrain", "train a language model from scratch on text files (works under torchrun)",
         _pretrain_args)
def pretrain(args: argparse.Namespace) -> None:
    from lmkit.train import load_config, parse_set, resume
    from lmkit.train import pretrain as run
    from lmkit.train.distributed import launch_ranks

    flags = {"preset": args.preset, "data": args.data, "tokenizer": args.tokenizer,
             "objective": args.objective, "steps": args.steps, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "lr": args.lr, "precision": args.precision,
             "device": args.device, "out": args.out, "carbon_intensity": args.carbon_intensity,
             "compile": args.compile, **_feedback_flags(args), "text_field": args.text_column}
    overrides = {**flags, **parse_set(args.set)}
    if args.resume:
        if args.config:
            raise ValueError("--resume continues with the run's own saved config: drop "
                             "--config (change single fields with --set or flags)")
        out = resume(args.resume, overrides)
    else:
        out = run(load_config(args.config, overrides))
    if launch_ranks()[0] == 0:  # under torchrun, once
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


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint or fine-tuned folder")
    p.add_argument("--task", help="the task of /predict (default: the folder's own)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _compile_flag(p)
    _device_args(p)


@command("serve", "serve a model over HTTP: POST /generate and /predict (JSON; the serve "
         "extra)", _serve_args)
def serve(args: argparse.Namespace) -> None:
    from lmkit.errors import require
    from lmkit.serve import create_app

    uvicorn = require("uvicorn", "serve", "lmkit serve")
    app = create_app(args.model, args.task, device=args.device, dtype=args.dtype,
                     compile=args.compile)
    uvicorn.run(app, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmkit", description=DESCRIPTION)
    debug = {"action": "store_true", "help": "show the traceback of an error"}
    parser.add_argument("--debug", **debug)
    parser.add_argument("--version", action="version", version=f"lmkit {__version__}")
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
    from lmkit.logs import setup_logging

    setup_logging()
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
