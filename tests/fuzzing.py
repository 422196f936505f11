"""Fuzzing lmkit's inputs as an attacker or an unlucky user would: mutated checkpoint folders,
training state, Hugging Face folders, GGUF files, data files and command-line values.

    python tests/fuzzing.py                 # the full corpus (`make fuzz`): a table of outcomes
    python tests/fuzzing.py --quick         # the seeded subset tests/test_fuzz.py runs

Seeds are real files made here: an lmkit folder, a tiny pretraining run (its checkpoints
and run config), random `transformers` models saved as Hugging Face folders (one sharded),
a GGUF file written with the `gguf` package, data files of every task format. Each case
copies a seed, mutates one file (bit flips, truncation, lying lengths and headers, crafted
pickles, wrong types and values in JSON / YAML, malformed data lines) or builds a bad
command line, and runs what a user would (load, resume, read, `lmkit ...`). Cases run in
worker processes (many cases each) under a memory cap (RLIMIT_AS) and a per-case timeout,
and each ends in one outcome:

- clean error: an error `lmkit` reports as one line (a known error class, no traceback);
- identical load: the mutation did not change what is loaded;
- silent change: loaded, but different from the unmutated seed (for data and command-line
  cases: malformed input or a bad value accepted);
- crash: a traceback (an exception lmkit does not report as bad input), a signal, memory
  exhaustion, or a crafted pickle that ran code;
- hang: the case ran past the timeout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import hashlib
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

OUTCOMES = ("clean error", "identical load", "silent change", "crash", "hang")
HERE = Path(__file__).resolve().parent

# What each input kind is: the seed it mutates, the file(s) in it, and the action run on it.
KINDS = {
    "lmkit weights (crc)": ("lmkit", ["model.safetensors"], "load"),
    "lmkit config.json": ("lmkit", ["config.json"], "load"),
    "lmkit tokenizer": ("lmkit", ["tokenizer.json", "tokenizer_config.json"], "load"),
    "training state": ("run", ["checkpoints/step-2/trainer_state.pt"], "resume"),
    "run config yaml": ("run", ["pretrain_config.yaml"], "resume"),
    "run checkpoint files": ("run", ["checkpoints/step-2/model.safetensors",
                                     "checkpoints/step-2/config.json", "metrics.jsonl"],
                             "resume"),
    "hf config.json": ("hf-gpt2", ["config.json"], "load"),
    "hf weights": ("hf-gpt2", ["model.safetensors"], "load"),
    "hf sharded index": ("hf-llama", ["model.safetensors.index.json"], "load"),
    "hf tokenizer": ("hf-gpt2", ["tokenizer.json"], "load"),
    "gguf": ("gguf", ["model.gguf"], "load"),
    "data tsv": ("data", ["cls.tsv"], "read"),
    "data csv": ("data", ["cls.csv"], "read"),
    "data jsonl": ("data", ["cls.jsonl"], "read"),
    "data conll": ("data", ["ner.txt"], "read"),
    "data ner jsonl": ("data", ["ner.jsonl"], "read"),
    "data seq2seq tsv": ("data", ["mt.tsv"], "read"),
    "data generation jsonl": ("data", ["gen.jsonl"], "read"),
    "data corpus jsonl": ("data", ["corpus.jsonl"], "read"),
    "cli values": ("lmkit", [], "cli"),
}
JSON_VALUES = [None, "64", -1, 0, 10 ** 9, 1.5, float("nan"), float("inf"), [], {}, True,
               "gelu", -1e-9]
WRONG_TYPES = [None, 3.5, [], {}, True]
STATE_EDITS = ["del step", "del optimizer", "del scheduler", "del ranks", "del world_size",
               "step -5", "step 1e9", "step str", "world_size 2", "opt shape", "opt shape",
               "opt dtype", "opt del", "opt step", "data pos", "data pos", "rng", "sched",
               "opt groups", "ranks empty"]
# command line: (sub-command, flag) -> values that must be refused
BAD_VALUES = {
    ("generate", "--max-new-tokens"): ["-1", "0", "nan", "abc"],
    ("generate", "--beams"): ["0", "-2"],
    ("generate", "--top-p"): ["0", "-0.5", "1.5", "nan"],
    ("generate", "--top-k"): ["0", "-3"],
    ("generate", "--temperature"): ["-1", "nan", "inf"],
    ("generate", "--n-best"): ["0", "-1"],
    ("generate", "--length-penalty"): ["nan", "inf"],
    ("pretrain", "--steps"): ["-5", "0", "abc", "1.5"],
    ("pretrain", "--batch-size"): ["0", "-1"],
    ("pretrain", "--seq-len"): ["1", "0", "-4"],
    ("pretrain", "--lr"): ["0", "-1e-3", "nan", "inf"],
    ("pretrain", "--tokenizer"): ["bpe:10", "bpe:0", "wordpiece:1", "unigram:2"],
    ("pretrain", "--objective"): ["foo"],
    ("finetune", "--steps"): ["-5"],
    ("finetune", "--epochs"): ["-1", "nan"],
    ("finetune", "--lr"): ["0", "nan", "-1"],
    ("finetune", "--batch-size"): ["0", "-8"],
    ("finetune", "--scheme"): ["nope"],
    ("finetune", "--task"): ["nope"],
    ("evaluate", "--limit"): ["0", "-1"],
    ("convert", "--to"): ["onnx"],
}


# ---- seeds -----------------------------------------------------------------------------------


def make_seeds(root: Path) -> None:
    """Write every seed under `root` (a few seconds)."""
    import torch
    import transformers

    import lmkit
    from lmkit.tokenizer import Tokenizer
    from lmkit.train import load_config, pretrain

    torch.manual_seed(0)
    rng = random.Random(0)
    words = ["the", "a", "film", "was", "good", "bad", "plot", "cast", "very", "really",
             "London", "Paris", "Ada", "went", "to"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(30))
                                  for _ in range(40)) + "\n")
    tok = Tokenizer.train([corpus], "bpe", 300)
    small = dict(hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1,
                 decoder_layers=1, max_positions=64)
    model = lmkit.Model(lmkit.preset("tiny-decoder", vocab_size=tok.vocab_size, **small))
    model.tokenizer = tok
    model.save(root / "lmkit")
    cfg = load_config(None, {"preset": "tiny-decoder", "data": [str(corpus)],
                             "tokenizer": "bpe:300", "steps": 2, "save_every": 1,
                             "batch_size": 2, "seq_len": 16, "eval_every": 0,
                             "valid_fraction": 0.0, "progress": False, "tensorboard": False,
                             "plot": False, "warmup_steps": 1, "out": str(root / "run"),
                             **{f"model.{k}": v for k, v in small.items()}})
    pretrain(cfg)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    gpt2.save_pretrained(root / "hf-gpt2")
    tok.save(root / "hf-gpt2")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    llama.save_pretrained(root / "hf-llama", max_shard_size="20KB")
    _gguf_seed(root / "gguf")
    _data_seeds(root / "data", rng)


def _gguf_seed(folder: Path) -> None:
    from test_convert_gguf import _vocab, write_gguf

    import lmkit

    folder.mkdir()
    model = lmkit.Model(lmkit.preset("tiny-decoder", vocab_size=len(_vocab()), hidden_size=16,
                                     intermediate_size=32, num_heads=2, num_kv_heads=1,
                                     decoder_layers=1, max_positions=64))
    write_gguf(folder / "model.gguf", model)


def _data_seeds(folder: Path, rng: random.Random) -> None:
    folder.mkdir()
    words = ["the", "film", "was", "good", "bad", "plot", "cast", "very"]
    sent = lambda: " ".join(rng.choice(words) for _ in range(6))  # noqa: E731
    rows = [(sent(), rng.choice(["pos", "neg"])) for _ in range(12)]
    (folder / "cls.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    (folder / "cls.csv").write_text("sentence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))
    (folder / "cls.jsonl").write_text("".join(json.dumps({"text": s, "label": y}) + "\n"
                                              for s, y in rows))
    conll, records = ["-DOCSTART- -X- -X- O", ""], []
    for _ in range(6):
        toks = ["Ada", "went", "to", "Paris"]
        tags = ["B-PER", "O", "O", "B-LOC"]
        conll += [f"{t} NNP B-NP {g}" for t, g in zip(toks, tags)] + [""]
        records.append({"tokens": toks, "tags": tags})
    (folder / "ner.txt").write_text("\n".join(conll) + "\n")
    (folder / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "mt.tsv").write_text("".join(f"{sent()}\t{sent()}\tCC-BY 2.0 #{i}\n"
                                           for i in range(10)))
    (folder / "gen.jsonl").write_text("".join(
        json.dumps({"prompt": sent(), "completion": sent()}) + "\n" for _ in range(10)))
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": sent()}) + "\n"
                                                 for _ in range(10)))


# ---- cases -----------------------------------------------------------------------------------


def make_cases(seeds: Path, per_kind: int, seed: int) -> list[dict[str, Any]]:
    """`per_kind` mutated cases per input kind, drawn with `seed`."""
    rng = random.Random(seed)
    cases = []
    for kind, (seed_name, files, action) in KINDS.items():
        for _ in range(per_kind):
            if action == "cli":
                case = _cli_case(rng)
            else:
                file = rng.choice(files)
                case = {"file": file, **_mutation(rng, seeds / seed_name / file)}
            cases.append({"kind": kind, "seed": seed_name, "action": action, **case})
    for i, case in enumerate(cases):
        case["id"] = i
    return cases


def _mutation(rng: random.Random, file: Path) -> dict[str, Any]:
    """A random mutation of `file`, fit to what it is."""
    name = file.name
    ops = ["bitflip", "bitflip", "bitflip", "truncate", "zero", "garbage", "append"]
    if name.endswith(".safetensors"):
        ops += ["u64 0", "st_header", "st_header", "st_header"]
    if name.endswith(".gguf"):
        ops += ["gguf_count", "gguf_count", "gguf_len", "bitflip_head", "bitflip_head"]
    if name.endswith(".json") and not name.startswith("ner") and name != "cls.jsonl":
        ops += ["json"] * 8 + ["json_huge"]
    if name.endswith(".yaml"):
        ops += ["yaml"] * 8 + ["yaml_huge"]
    if name == "trainer_state.pt":
        ops += ["state"] * 8 + ["evil_pickle", "evil_pickle_raw"]
    if file.parent.name == "data":
        ops = ["line"] * 6 + ["bad_utf8"]
    op = rng.choice(ops)
    args: dict[str, Any] = {"frac": rng.random(), "bit": rng.randrange(8), "n": rng.randint(1, 64),
                            "rand": rng.randrange(1 << 30)}
    if op == "u64 0" or op == "gguf_count":
        args["pos"] = 0 if op == "u64 0" else rng.choice([8, 16])
        args["value"] = rng.choice([0, 1, 7, 2 ** 31, 2 ** 40, 2 ** 63 - 1, 2 ** 64 - 1])
    elif op == "gguf_len":  # the first key's string length
        args["pos"], args["value"] = 24, rng.choice([0, 3, 2 ** 20, 2 ** 62])
    elif op in ("json", "yaml", "json_huge", "yaml_huge"):
        data = json.loads(file.read_text()) if op.startswith("json") else _yaml_load(file)
        args["path"] = _json_path(rng, data)
        args["how"] = rng.choice(["set", "set", "set", "del", "add"])
        args["value"] = rng.choice(JSON_VALUES)
        sizes = [path for path, v in _flat(data) if type(v) is int]
        if op.endswith("_huge") and sizes:  # a config of 10^6..10^9 layers, heads, ...
            args["path"], args["how"] = list(rng.choice(sizes)), "set"
            args["value"] = rng.choice([10 ** 6, 10 ** 9])
    elif op == "state":
        args["edit"] = rng.choice(STATE_EDITS)
    elif op == "line":
        lines = file.read_text().splitlines()
        first = 1 if file.suffix in (".tsv", ".csv") and file.name != "mt.tsv" else 0
        candidates = [i for i in range(first, len(lines)) if lines[i].strip()
                      and not lines[i].startswith("-DOCSTART-")]
        args["line"] = rng.choice(candidates)
        jsonl = file.suffix == ".jsonl"
        args["how"] = rng.choice(["cut", "json_type", "json_type", "json_del"] if jsonl else
                                 ["drop_cell", "add_cell", "empty_cell"] +
                                 (["bad_tag"] if file.name == "ner.txt" else []))
        args["value"] = rng.choice(WRONG_TYPES)
    return {"op": op, "args": args}


def _yaml_load(file: Path) -> Any:
    import yaml

    return yaml.safe_load(file.read_text())


def _json_path(rng: random.Random, data: Any) -> list:
    """A random path (list of keys) into nested JSON objects, at most three deep."""
    path: list = []
    for _ in range(3):
        if not isinstance(data, dict) or not data:
            break
        key = rng.choice(sorted(data))
        path.append(key)
        data = data[key]
        if rng.random() < 0.5:
            break
    return path


def _cli_case(rng: random.Random) -> dict[str, Any]:
    (command, flag), values = rng.choice(sorted(BAD_VALUES.items()))
    return {"op": "cli", "args": {"command": command, "flag": flag, "value": rng.choice(values)}}


# ---- mutations (run in the worker) -----------------------------------------------------------


def mutate(file: Path, op: str, a: dict[str, Any]) -> None:
    data = bytearray(file.read_bytes())
    pos = int(a["frac"] * max(len(data) - 1, 0))
    rnd = random.Random(a["rand"])
    if op in ("bitflip", "bitflip_head"):
        if op == "bitflip_head":
            pos = int(a["frac"] * min(len(data) - 1, 2048))
        data[pos] ^= 1 << a["bit"]
    elif op == "truncate":
        del data[pos:]
    elif op == "zero":
        data[pos:pos + a["n"]] = bytes(len(data[pos:pos + a["n"]]))
    elif op == "garbage":
        data[pos:pos + a["n"]] = bytes(rnd.randrange(256) for _ in data[pos:pos + a["n"]])
    elif op == "append":
        data += bytes(rnd.randrange(256) for _ in range(a["n"]))
    elif op in ("u64 0", "gguf_count", "gguf_len"):
        struct.pack_into("<Q", data, a["pos"], a["value"])
    elif op == "st_header":
        data = bytearray(_safetensors_header_edit(bytes(data), rnd))
    elif op in ("json", "json_huge"):
        obj = json.loads(data)
        _edit(obj, a["path"], a["how"], a["value"])
        data = bytearray(json.dumps(obj).encode())
    elif op in ("yaml", "yaml_huge"):
        import yaml

        obj = yaml.safe_load(bytes(data))
        _edit(obj, a["path"], a["how"], a["value"])
        data = bytearray(yaml.safe_dump(obj).encode())
    elif op == "state":
        data = bytearray(_state_edit(bytes(data), a["edit"], rnd))
    elif op in ("evil_pickle", "evil_pickle_raw"):
        data = bytearray(_evil_pickle(file.parent / "PWNED", zipped=op == "evil_pickle"))
    elif op == "line":
        data = bytearray(_line_edit(data.decode(), a).encode())
    elif op == "bad_utf8":
        lines = bytes(data).split(b"\n")
        i = int(a["frac"] * (len(lines) - 1))
        lines[i] = lines[i][:1] + b"\xff\xfe" + lines[i][1:]
        data = bytearray(b"\n".join(lines))
    file.write_bytes(bytes(data))


def _edit(obj: Any, path: list, how: str, value: Any) -> None:
    """Set, delete or add (an unknown key beside) the item at `path` of nested dicts."""
    for key in path[:-1]:
        obj = obj[key]
    if not path or how == "add":
        obj["fuzz_unknown_field"] = value
    elif how == "del":
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _safetensors_header_edit(data: bytes, rnd: random.Random) -> bytes:
    """A parseable header that lies: a tensor's dtype, shape or offsets changed."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = rnd.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    field = rnd.choice(["dtype", "shape", "data_offsets", "metadata"])
    if field == "dtype":
        entry["dtype"] = rnd.choice(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3"])
    elif field == "shape":
        entry["shape"] = rnd.choice([[], [0], list(reversed(entry["shape"])),
                                     [2 ** 31, 2 ** 31], [-1] + entry["shape"][1:]])
    elif field == "data_offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rnd.choice([[end, start], [start, end + 4], [0, end - start],
                                            [start, 2 ** 40]])
    else:
        header.setdefault("__metadata__", {})["lmkit.crc32"] = "00000000"
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data[8 + n:]


def _state_edit(data: bytes, edit: str, rnd: random.Random) -> bytes:
    """trainer_state.pt loaded, changed structurally (a crafted or damaged state that is
    still a valid file), saved again."""
    import torch

    state = torch.load(io.BytesIO(data), weights_only=True)
    opt = state["optimizer"]["state"]
    key = rnd.choice(sorted(opt)) if opt else None
    verb, _, rest = edit.partition(" ")
    if verb == "del":
        del state[rest]
    elif edit == "step -5":
        state["step"] = -5
    elif edit == "step 1e9":
        state["step"] = 10 ** 9
    elif edit == "step str":
        state["step"] = "2"
    elif edit == "world_size 2":
        state["world_size"] = 2
    elif edit == "opt shape":  # the out-of-bounds write of the fused AdamW
        t = opt[key]["exp_avg"]
        opt[key]["exp_avg"] = torch.zeros(max(1, t.numel() // 4)) if rnd.random() < 0.5 else \
            torch.zeros(t.numel() * 4 + 7)
    elif edit == "opt dtype":
        opt[key]["exp_avg_sq"] = opt[key]["exp_avg_sq"].to(torch.float64)
    elif edit == "opt del":
        del opt[key]["exp_avg_sq"]
    elif edit == "opt step":
        opt[key]["step"] = torch.tensor(-1.0)
    elif edit == "opt groups":
        state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
    elif edit == "data pos":
        data_state = state["ranks"][0]["data"]
        numbers = sorted(k for k, v in _flat(data_state) if isinstance(v, int))
        if numbers:
            _set_flat(data_state, rnd.choice(numbers), rnd.choice([-5, 10 ** 9]))
    elif edit == "rng":
        state["ranks"][0]["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)
    elif edit == "sched":
        state["scheduler"]["last_epoch"] = -5
    elif edit == "ranks empty":
        state["ranks"] = []
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


def _flat(d: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    if isinstance(d, dict):
        return [kv for k, v in d.items() for kv in _flat(v, (*prefix, k))]
    return [(prefix, d)]


def _set_flat(d: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


class _Payload:
    """Unpickling this runs `touch marker`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_pickle(marker: Path, zipped: bool) -> bytes:
    if not zipped:
        return pickle.dumps({"step": 2, "optimizer": _Payload(marker)})
    import torch

    out = io.BytesIO()
    torch.save({"step": 2, "optimizer": _Payload(marker)}, out)
    return out.getvalue()


def _line_edit(text: str, a: dict[str, Any]) -> str:
    lines = text.split("\n")
    i, line, how = a["line"], text.split("\n")[a["line"]], a["how"]
    sep = "\t" if "\t" in line else "," if "," in line else " "
    if how == "cut":
        line = line[:max(1, int(len(line) * a["frac"]) % (len(line) - 1))]
    elif how in ("json_type", "json_del"):
        record = json.loads(line)
        key = sorted(record)[a["rand"] % len(record)]
        if how == "json_del":
            del record[key]
        else:
            record[key] = a["value"]
        line = json.dumps(record)
    elif how == "drop_cell":
        cells = line.split(sep)
        del cells[a["rand"] % len(cells)]
        line = sep.join(cells)
    elif how == "add_cell":
        line = line + sep + "extra"
    elif how == "empty_cell":  # the label, or a translation's source or target
        cells = line.split(sep)
        cells[a["rand"] % 2 if len(cells) == 3 else -1] = " "
        line = sep.join(cells)
    elif how == "bad_tag":
        line = line.rsplit(" ", 1)[0] + " X-FOO"
    lines[i] = line
    return "\n".join(lines)


# ---- the worker: runs cases, classifies them ---------------------------------------------------


def _fingerprint_model(model: Any) -> str:
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    if model.tokenizer is not None:
        h.update(model.tokenizer.backend.to_str().encode())
        h.update(json.dumps(model.tokenizer.roles, sort_keys=True).encode())
    return h.hexdigest()


READERS = {"cls.tsv": "read_classification", "cls.csv": "read_classification",
           "cls.jsonl": "read_classification", "ner.txt": "read_token_classification",
           "ner.jsonl": "read_token_classification", "mt.tsv": "read_seq2seq",
           "gen.jsonl": "read_generation"}


def _act(case: dict[str, Any], folder: Path) -> str:
    """Do what a user would with the (mutated) seed in `folder`; a fingerprint of the result."""
    import lmkit

    if case["action"] == "load":
        target = folder / "model.gguf" if case["seed"] == "gguf" else folder
        return _fingerprint_model(lmkit.load(target))
    if case["action"] == "resume":
        from lmkit.checkpoint import read_tensors
        from lmkit.train import resume

        with _fallback_warnings() as warned:
            out = resume(folder, {"steps": 3})
        if warned:
            raise FellBack(warned[0])
        tensors, _ = read_tensors(Path(out) / "model.safetensors")
        h = hashlib.sha256()
        for name, t in sorted(tensors.items()):
            h.update(name.encode() + t.float().numpy().tobytes())
        return h.hexdigest()
    file = folder / case["file"]
    if file.name == "corpus.jsonl":
        from lmkit.data import iter_documents

        return repr(list(iter_documents(file, "text")))
    import lmkit.tasks

    return repr(getattr(lmkit.tasks, READERS[file.name])(file))


class FellBack(Exception):
    """The resume refused the damaged latest checkpoint, with a warning naming it, and went on
    from the previous intact one: the damage was detected and nothing of it was used (the
    result differs from resuming the undamaged run only because the run config's `steps`
    override changes the schedule of the step that is redone)."""


@contextlib.contextmanager
def _fallback_warnings() -> Any:
    """The lmkit warnings, logged inside the block, of a resume that skipped a checkpoint."""
    import logging

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "cannot be used" in record.getMessage():
                warned.append(record.getMessage().splitlines()[-1].strip())

    warned: list[str] = []
    logger, handler, level = logging.getLogger("lmkit"), Keep(), logging.root.manager.disable
    logging.disable(logging.NOTSET)  # the worker silences logging; this one is needed
    logger.addHandler(handler)
    try:
        yield warned
    finally:
        logger.removeHandler(handler)
        logging.disable(level)


def _reported(e: BaseException) -> str | None:
    """The line `lmkit` prints for `e`, or None when it would print a traceback."""
    if isinstance(e, FellBack):
        return f"fell back to the previous checkpoint: {e}"
    import lmkit.cli

    if hasattr(lmkit.cli, "error_line"):
        report = lmkit.cli.error_line(e)
        return None if report is None else report[0]
    from lmkit.train import TrainingDiverged, TrainingInterrupted  # before lmkit/errors.py

    if isinstance(e, (ValueError, FileNotFoundError, TrainingDiverged, TrainingInterrupted)):
        return str(e)
    return None


def _run_cli(case: dict[str, Any], folder: Path) -> tuple[str, str]:
    """`lmkit COMMAND ... FLAG VALUE` in this process; a bad value must be refused."""
    import lmkit.cli

    a = case["args"]
    missing = str(folder / "missing.txt")
    base = {"generate": ["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "2"],
            "pretrain": ["pretrain", "--data", missing, "--out", str(folder / "out"),
                         "--steps", "1"],
            "finetune": ["finetune", str(folder), "--train", missing, "--out",
                         str(folder / "out")],
            "evaluate": ["evaluate", str(folder), "--data", missing],
            "convert": ["convert", str(folder), str(folder / "out")]}[a["command"]]
    argv = [*base, a["flag"], a["value"]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = lmkit.cli.main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "traceback"
    text = err.getvalue()
    if code == "traceback" or "Traceback" in text:
        return "crash", text.strip().splitlines()[-1][:300]
    field = a["flag"].lstrip("-").replace("-", "_")
    names = (a["flag"], field, {"beams": "num_beams", "n_best": "num_return_sequences",
                                "limit": "dev_limit", "to": "to"}.get(field, field))
    if code and "error" in text and any(n in text for n in names):
        return "clean error", text.strip().splitlines()[-1][:300]
    return "silent change", f"exit {code}: {text.strip()[-200:]}"


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return f"{tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else "?"


def run_case(case: dict[str, Any], seeds: Path, work: Path,
             baselines: dict[str, str]) -> dict[str, Any]:
    folder = work / f"case-{case['id']}"
    shutil.copytree(seeds / case["seed"], folder)
    marker = (folder / case["file"]).parent / "PWNED" if case.get("file") else None
    try:
        if case["action"] == "cli":
            outcome, detail = _run_cli(case, folder)
        else:
            key = f"{case['seed']}/{case['file']}"
            if key not in baselines:
                clean = work / f"clean-{case['id']}"
                shutil.copytree(seeds / case["seed"], clean)
                baselines[key] = _act(case, clean)
                shutil.rmtree(clean, ignore_errors=True)
            mutate(folder / case["file"], case["op"], case["args"])
            try:
                fingerprint = _act(case, folder)
            except BaseException as e:  # noqa: BLE001 (classifying every outcome)
                line = _reported(e)
                if line is None:
                    outcome = "crash"
                    detail = f"{type(e).__name__} at {_where(e)}: {str(e)[:200]}"
                else:
                    outcome, detail = "clean error", line[:300]
            else:
                same = fingerprint == baselines[key]
                outcome, detail = ("identical load" if same else "silent change"), ""
        if marker is not None and marker.exists():
            outcome, detail = "crash", "a crafted pickle ran code"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"id": case["id"], "outcome": outcome, "detail": detail.replace("\n", " ")}


def worker(cases_file: Path, results_file: Path, seeds: Path, mem_mb: int) -> None:
    import torch

    import lmkit  # noqa: F401 (imported before the memory cap)
    import lmkit.cli  # noqa: F401
    import lmkit.tasks  # noqa: F401
    import lmkit.train  # noqa: F401

    torch.set_num_threads(1)
    logging_off()
    faulthandler.enable()
    cap = _vm_size() + mem_mb * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    cases = json.loads(cases_file.read_text())
    baselines: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cases-", dir=".") as tmp, \
            open(results_file, "a") as out:
        for case in cases:
            out.write(json.dumps({"start": case["id"]}) + "\n")
            out.flush()
            with contextlib.redirect_stdout(io.StringIO()):
                result = run_case(case, seeds, Path(tmp), baselines)
            out.write(json.dumps(result) + "\n")
            out.flush()


def logging_off() -> None:
    import logging
    import warnings

    logging.disable(logging.CRITICAL)
    warnings.filterwarnings("ignore")


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- the parent: runs workers, survives their deaths, times cases out ------------------------


def run_cases(cases: list[dict[str, Any]], seeds: Path, jobs: int, timeout: float,
              mem_mb: int, work: Path) -> list[dict[str, Any]]:
    """Every case's result; cases are spread over `jobs` workers, and a worker that dies or
    hangs is replaced, its current case marked crash or hang."""
    chunks = [cases[i::jobs] for i in range(jobs)]
    slots = [_Slot(i, chunk, seeds, work, mem_mb) for i, chunk in enumerate(chunks) if chunk]
    results: dict[int, dict[str, Any]] = {}
    while slots:
        time.sleep(0.1)
        for slot in list(slots):
            slot.poll(results, timeout)
            if slot.done:
                slots.remove(slot)
    return [results[c["id"]] for c in cases]


class _Slot:
    """One worker process and the cases it still has to run."""

    def __init__(self, index: int, cases: list[dict[str, Any]], seeds: Path, work: Path,
                 mem_mb: int):
        self.index, self.todo, self.seeds, self.work, self.mem_mb = index, cases, seeds, work, \
            mem_mb
        self.proc: subprocess.Popen | None = None
        self.done = False
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        if not self.todo:
            self.done = True
            return
        n = self.restarts
        self.cases_file = self.work / f"w{self.index}-{n}.json"
        self.results_file = self.work / f"w{self.index}-{n}.jsonl"
        self.log = self.work / f"w{self.index}-{n}.log"
        self.cases_file.write_text(json.dumps(self.todo))
        self.results_file.write_text("")
        self.read = 0
        self.current: int | None = None
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", str(self.cases_file),
                 str(self.results_file), str(self.seeds), str(self.mem_mb)],
                stdout=log, stderr=log, cwd=self.work, start_new_session=True)
        self.restarts += 1

    def poll(self, results: dict[int, dict[str, Any]], timeout: float) -> None:
        with open(self.results_file) as f:
            f.seek(self.read)
            chunk = f.read()
        complete = chunk[:chunk.rfind("\n") + 1]
        self.read += len(complete.encode())
        for line in complete.splitlines():
            record = json.loads(line)
            if "start" in record:
                self.current, self.started = record["start"], time.monotonic()
            else:
                results[record["id"]] = record
                self.todo = [c for c in self.todo if c["id"] != record["id"]]
                self.current = None
        code = self.proc.poll()
        if code is None and self.current is not None and \
                time.monotonic() - self.started > timeout:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._lost(results, "hang", f"no result after {timeout:.0f} s")
        elif code is not None:
            if self.current is not None:
                tail = self.log.read_text().strip().splitlines()[-1:] or [""]
                how = f"signal {-code}" if code < 0 else f"exit {code}"
                self._lost(results, "crash", f"worker died ({how}): {tail[0][:200]}")
            elif self.todo:  # died between cases (e.g. at start-up): report, do not loop
                raise RuntimeError(f"fuzz worker failed: {self.log.read_text()[-2000:]}")
            else:
                self.done = True

    def _lost(self, results: dict[int, dict[str, Any]], outcome: str, detail: str) -> None:
        results[self.current] = {"id": self.current, "outcome": outcome, "detail": detail}
        self.todo = [c for c in self.todo if c["id"] != self.current]
        self._start()


# ---- report ------------------------------------------------------------------------------------


def table(cases: list[dict[str, Any]], results: list[dict[str, Any]]) -> str:
    """Markdown table: cases per outcome per input kind."""
    counts: dict[str, collections.Counter] = {k: collections.Counter() for k in KINDS}
    for case, result in zip(cases, results):
        counts[case["kind"]][result["outcome"]] += 1
    total = collections.Counter()
    rows = ["| input kind | cases | " + " | ".join(OUTCOMES) + " |",
            "|---|---:|" + "---:|" * len(OUTCOMES)]
    for kind, c in counts.items():
        if c:
            total.update(c)
            rows.append(f"| {kind} | {sum(c.values())} | " +
                        " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    rows.append(f"| **all** | **{sum(total.values())}** | " +
                " | ".join(f"**{total[o]}**" for o in OUTCOMES) + " |")
    return "\n".join(rows)


def fuzz(per_kind: int, seed: int = 0, jobs: int = 2, timeout: float = 30.0,
         mem_mb: int = 3072, work: Path | None = None) -> tuple[list, list]:
    """Make the seeds and `per_kind` cases per input kind, run them; (cases, results)."""
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmkit-fuzz-")))
        seeds = work / "seeds"
        seeds.mkdir()
        _in_subprocess(make_seeds, seeds)
        cases = make_cases(seeds, per_kind, seed)
        return cases, run_cases(cases, seeds, jobs, timeout, mem_mb, work)


def _in_subprocess(fn: Any, arg: Path) -> None:
    """Run `fn(arg)` in a fresh process (transformers stays out of this one)."""
    code = (f"import sys, pathlib; sys.path.insert(0, {str(HERE)!r}); import fuzzing; "
            f"fuzzing.logging_off(); fuzzing.{fn.__name__}(pathlib.Path({str(arg)!r}))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=arg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="the subset the tests run")
    p.add_argument("--per-kind", type=int, help="cases per input kind (default 150; quick 14)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    p.add_argument("--mem-mb", type=int, default=3072, help="memory cap per worker, MiB")
    p.add_argument("--json", help="write every case and its outcome here")
    args = p.parse_args()
    if args.worker:
        cases_file, results_file, seeds, mem = args.worker
        worker(Path(cases_file), Path(results_file), Path(seeds), int(mem))
        return
    per_kind = args.per_kind or (14 if args.quick else 150)
    start = time.time()
    cases, results = fuzz(per_kind, args.seed, args.jobs, args.timeout, args.mem_mb)
    print(table(cases, results))
    print(f"\n{len(cases)} cases in {time.time() - start:.0f} s (seed {args.seed}, "
          f"{args.jobs} workers, {args.timeout:.0f} s and {args.mem_mb} MiB per case)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{**c, **r} for c, r in zip(cases, results)], indent=1, default=str))


if __name__ == "__main__":
    main()
