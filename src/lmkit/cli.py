"""The `lmkit` command: a thin face over the Python API (each command calls the same public
function a Python user would)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

COMMANDS: dict[str, Any] = {}


def command(name: str, help: str, arguments: Any):
    """Register `fn(args)` as the sub-command `name`; `arguments(parser)` adds its flags."""
    def register(fn):
        COMMANDS[name] = (fn, help, arguments)
        return fn
    return register


def _device_args(p: argparse.ArgumentParser, device: str | None = "auto",
                 dtype: str | None = "auto", weights: bool = True) -> None:
    """--device, and --dtype (the weights' format) where the command holds weights to run or
    write them; training commands have --precision instead. None defaults leave the choice to
    the config (device) or the checkpoint (dtype)."""
    p.add_argument("--device", default=device, help="auto (the GPU if there is one) | cpu | "
                   f"cuda | cuda:N (default: {device or 'the config, else auto'})")
    if weights:
        p.add_argument("--dtype", default=dtype, help="weights: auto (as stored where the "
                       "device computes that natively, else fp32) | fp32 | bf16 | fp16 (GPU "
                       f"only) (default: {dtype or 'as stored'})")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset name or a checkpoint folder / .gguf file")


@command("info", "show a preset's or a checkpoint's architecture and size", _info_args)
def info(args: argparse.Namespace) -> None:
    import lmkit
    from lmkit.flops import num_parameters

    if args.model in lmkit.PRESETS:
        config = lmkit.preset(args.model)
    else:
        config = lmkit.load(args.model).config
    print(json.dumps(config.to_dict(), indent=2))
    print(f"parameters: {num_parameters(config):,} "
          f"({num_parameters(config, include_embeddings=False):,} without embeddings)")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder (lmkit or Hugging Face) or .gguf file")
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue (or translate); repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--beams", type=int, default=1, help="beam width (1 = no beam search)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--n-best", type=int, default=1)
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


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?",
                   help="pretrained checkpoint: lmkit or Hugging Face folder, .gguf")
    p.add_argument("--task", help="classification | ner | translation | summarization | "
                   "generation")
    p.add_argument("--train", help="training file (TSV / CSV / JSONL / CoNLL)")
    p.add_argument("--dev", help="dev file, scored with the task's metric at the end")
    p.add_argument("--out", help="run folder (becomes the fine-tuned checkpoint)")
    p.add_argument("--scheme", help="full | frozen | top-k | lora")
    p.add_argument("--epochs", type=float)
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", help="auto (bf16 where the hardware has it, else fp32) | "
                   "fp32 | bf16")
    _device_args(p, device=None, weights=False)
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
             "device": args.device}
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


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a fine-tuned folder (from lmkit finetune)")
    p.add_argument("--data", required=True, help="labelled file in the task's format")
    p.add_argument("--limit", type=int, help="score only the first N examples")
    _device_args(p)


@command("evaluate", "score a fine-tuned model on labelled data with its task's metric",
         _evaluate_args)
def evaluate(args: argparse.Namespace) -> None:
    from lmkit.finetune.inference import evaluate_run

    print(json.dumps(evaluate_run(args.run, args.data, args.limit, device=args.device,
                                  dtype=args.dtype), indent=2))


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
    p.add_argument("--data", action="append", help="training text / JSONL file (repeatable)")
    p.add_argument("--tokenizer", help="bpe:8000 | wordpiece:N | unigram:N | a tokenizer path")
    p.add_argument("--objective", help="auto | causal | mlm | span | infilling")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--precision", help="auto (bf16 where the hardware has it, else fp32) | "
                   "fp32 | bf16")
    _device_args(p, device=None, weights=False)
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
             "device": args.device, "out": args.out}
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
    p.add_argument("dst", help="folder to write")
    p.add_argument("--to", choices=("hf", "lmkit"), default="hf")
    p.add_argument("--model-type", help="HF model_type to write (default: the natural one "
                   "for the architecture)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading pytorch_model.bin (torch.load with weights_only=True)")
    _device_args(p, device="cpu", dtype=None)


@command("convert", "convert a checkpoint to a Hugging Face folder or an lmkit folder",
         _convert_args)
def convert(args: argparse.Namespace) -> None:
    from lmkit.loading import convert as run

    out = run(args.src, args.dst, to=args.to, model_type=args.model_type,
              allow_pickle=args.allow_pickle, dtype=args.dtype, device=args.device)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help, arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        arguments(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lmkit.train.loop import TrainingDiverged, TrainingInterrupted

    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"lmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"lmkit {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"lmkit {args.command}: interrupted: {e}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
