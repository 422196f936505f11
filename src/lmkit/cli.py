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


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset name or a checkpoint folder / .gguf file")


@command("info", "show a preset's or a checkpoint's architecture and size", _info_args)
def info(args: argparse.Namespace) -> None:
    import lmkit

    if args.model in lmkit.PRESETS:
        config = lmkit.preset(args.model)
    else:
        config = lmkit.load(args.model).config
    print(json.dumps(config.to_dict(), indent=2))
    print(f"parameters: {config.num_parameters():,} "
          f"({config.num_parameters(include_embeddings=False):,} without embeddings)")



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


@command("generate", "continue a prompt (decoder) or transform a source (encoder-decoder)",
         _generate_args)
def generate(args: argparse.Namespace) -> None:
    import lmkit

    model = lmkit.load(args.model)
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
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"lmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
