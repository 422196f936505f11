"""Model cards and lineage: what every checkpoint lmkit writes says about where it came from
and what it cost.

A checkpoint folder's README.md is its model card: YAML front matter that Hugging Face tools
read (license, base_model, datasets, tags, pipeline_tag, model-index, co2_eq_emissions) plus
a `lineage` record, then Markdown. The record holds this run (`kind`: pretrain, finetune or
convert; `base`: the origin `lmkit.loading.locate` gave for the base checkpoint, or
``{"kind": "scratch"}``; the data files with their sha256; the training config; the
compute, energy and emissions of this run from compute.json) and `ancestors`: the records of
the base checkpoint and its own ancestors, copied from the base's card, newest first, so one
card carries the whole chain. `totals` adds the costs up (this run, its ancestors, both).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from lmkit.textfiles import split_card

log = logging.getLogger("lmkit")
CARD, FORMAT = "README.md", 1
# The costs a record carries and the chain adds up.
COSTS = ("flops", "tokens", "wall_time_s", "energy_kwh", "emissions_kg")
# From compute.json into the record, besides the costs.
RUN_FIELDS = ("steps", "sessions", "device", "precision", "energy_method",
              "carbon_intensity_g_per_kwh", "carbon_source")
# Hugging Face pipeline tags: by lmkit task, and by family for a pretrained language model.
PIPELINE_TAGS = {"classification": "text-classification", "ner": "token-classification",
                 "translation": "translation", "summarization": "summarization",
                 "generation": "text-generation", "fill_mask": "fill-mask",
                 "decoder": "text-generation", "encoder": "fill-mask",
                 "encoder-decoder": "text2text-generation"}


def lmkit_version() -> str:
    try:
        return importlib.metadata.version("lmkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- the record ------------------------------------------------------------------------------


def data_record(path: str | Path, role: str) -> dict[str, Any]:
    """A data source of a run: its path, size and sha256 (a folder: the sha256 of its files'
    relative paths and hashes, in order; something that is not on disk: its name alone)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        return {"role": role, "path": str(path.resolve()), "bytes": path.stat().st_size,
                "sha256": digest}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(path)}\0{data_record(f, role)['sha256']}\n".encode())
        return {"role": role, "path": str(path.resolve()), "files": len(files),
                "bytes": sum(f.stat().st_size for f in files), "sha256": h.hexdigest()}
    return {"role": role, "name": str(path), "sha256": None}


def run_compute(compute: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a compute.json summary a record keeps (None: zero cost, a conversion)."""
    if compute is None:
        return {**{k: 0 for k in COSTS}, "energy_method": "none (no training)"}
    return {k: compute.get(k) for k in (*COSTS, *RUN_FIELDS) if k in compute}


def ancestors_of(base_path: Path | None) -> list[dict[str, Any]]:
    """The base checkpoint's record and its ancestors (newest first), from its card; [] when
    it has none (a foreign checkpoint, or training from scratch)."""
    if base_path is None:
        return []
    record = read_lineage(base_path)
    if record is None:
        return []
    return chain(record)


def make_record(kind: str, out: Path, base: dict[str, Any], *, base_path: Path | None = None,
                data: list[dict[str, Any]] = (), config: dict[str, Any] | None = None,
                compute: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The lineage record of a checkpoint written at `out` by a run of `kind` from `base`
    (an origin dict; ``{"kind": "scratch"}`` for none) read at `base_path`."""
    return {"format": FORMAT, "kind": kind, "name": Path(out).resolve().name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "lmkit_version": lmkit_version(), **extra, "base": base, "data": list(data),
            "config": config or {}, "compute": run_compute(compute),
            "ancestors": ancestors_of(base_path)}


def chain(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record and its ancestors, newest first (each without ancestors and totals)."""
    return [{k: v for k, v in record.items() if k not in ("ancestors", "totals")},
            *record.get("ancestors", [])]


def totals(record: dict[str, Any]) -> dict[str, Any]:
    """This run's cost (`own`), its ancestors' (`ancestors`) and their sum (`total`), per
    field of COSTS (a figure nobody recorded counts as 0). `complete`: the first ancestor
    was trained from scratch, so nothing before it is missing."""
    runs = chain(record)

    def add(entries: list[dict[str, Any]]) -> dict[str, float]:
        return {k: sum(float(e.get("compute", {}).get(k) or 0) for e in entries)
                for k in COSTS}

    own, ancestors = add(runs[:1]), add(runs[1:])
    return {"own": own, "ancestors": ancestors,
            "total": {k: own[k] + ancestors[k] for k in COSTS},
            "complete": runs[-1].get("base", {}).get("kind") == "scratch"}


def describe_base(base: dict[str, Any]) -> str:
    """One phrase for an origin: registry name@revision, HF repo@commit, a path, scratch."""
    kind = base.get("kind")
    if kind == "scratch":
        return "from scratch"
    if kind == "registry":
        return f"{base.get('name')}@{str(base.get('revision', ''))[:12]} (registry " \
               f"{base.get('registry', '?')})"
    if kind == "hf-cache":
        return f"{base.get('repo')}@{str(base.get('commit', ''))[:12]} (Hugging Face cache)"
    if kind == "path":
        return str(base.get("path"))
    return str(base)


# ---- the card --------------------------------------------------------------------------------


def read_card(folder: str | Path) -> tuple[dict[str, Any], str]:
    """The front matter and the Markdown of `folder`'s README.md ({} and "" without one; a
    card whose front matter cannot be read is logged and treated as having none)."""
    file = Path(folder) / CARD
    if not file.is_file():
        return {}, ""
    text = file.read_text(errors="replace")
    try:
        return split_card(text)
    except yaml.YAMLError as e:
        log.warning("%s: the front matter is not YAML (%s); its lineage is ignored", file,
                    str(e).splitlines()[0])
        return {}, text


def read_lineage(folder: str | Path) -> dict[str, Any] | None:
    """The lineage record of the checkpoint at `folder` (None when its card has none)."""
    record = read_card(folder)[0].get("lineage")
    return record if isinstance(record, dict) and "kind" in record else None


def card_metadata(record: dict[str, Any], *, pipeline_tag: str | None = None,
                  metrics: dict[str, Any] | None = None, task: str | None = None,
                  base_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Hugging Face front matter of a new checkpoint: the license of the base's card
    (else "unknown"), base_model (a registry name or a Hugging Face repo), datasets, tags,
    pipeline_tag, model-index with the dev `metrics`, co2_eq_emissions (grams, this run)."""
    base = record["base"]
    meta: dict[str, Any] = {"library_name": "lmkit",
                            "license": (base_meta or {}).get("license", "unknown")}
    base_model = base.get("name") if base.get("kind") == "registry" else base.get("repo")
    if base_model:
        meta["base_model"] = base_model
    names = {r["role"]: dataset_name(r) for r in record["data"]}
    if record["data"]:
        meta["datasets"] = sorted({dataset_name(r) for r in record["data"]})
    meta["tags"] = ["lmkit", record["kind"], *([task] if task else [])]
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    scores = {k: v for k, v in (metrics or {}).items()
              if isinstance(v, (int, float)) and math.isfinite(v)}
    dev = names.get("dev") or names.get("valid") or names.get("train")  # else a held-out split
    if scores and dev and pipeline_tag:
        meta["model-index"] = [{"name": record["name"], "results": [{
            "task": {"type": pipeline_tag, **({"name": task} if task else {})},
            "dataset": {"name": dev, "type": dev, "split": "validation"},
            "metrics": [{"type": k, "value": float(v), "name": k} for k, v in scores.items()],
        }]}]
    compute = record["compute"]
    if compute.get("emissions_kg") is not None and record["kind"] != "convert":
        meta["co2_eq_emissions"] = {
            "emissions": compute["emissions_kg"] * 1000,  # Hugging Face's unit: grams
            "source": f"lmkit: {compute.get('energy_method')}; {compute.get('carbon_source')}",
            "training_type": "pre-training" if record["kind"] == "pretrain" else "fine-tuning",
            "hardware_used": compute.get("device", "unknown")}
    record["totals"] = totals(record)
    meta["lineage"] = record
    return meta


def dataset_name(data: dict[str, Any]) -> str:
    """A data source's short name for the card: `folder/file` of a path, else its name."""
    if "path" not in data:
        return data.get("name", "?")
    path = Path(data["path"])
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def write_card(folder: str | Path, meta: dict[str, Any], summary: list[str],
               source_body: str = "") -> Path:
    """Write README.md into `folder` (atomically): the front matter `meta` (with its
    `lineage`), a title, the `summary` lines, the cost of the chain, how to load it."""
    folder = Path(folder)
    record = meta["lineage"]
    lines = [f"# {record['name']}", "", *summary, "", "## Lineage and cost", "",
             *chain_table(record), "", f"Load it with `lmkit.load(\"{folder}\")`.", ""]
    if source_body.strip():
        lines += ["## The source's card", "", source_body.strip(), ""]
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + \
        "\n".join(lines)
    file = folder / CARD
    tmp = folder / f".{CARD}.tmp-{os.getpid()}"  # one per process: ranks may write at once
    tmp.write_text(text)
    os.replace(tmp, file)
    return file


def write_conversion_card(dst: str | Path, src: Path, origin: dict[str, Any],
                          config: dict[str, Any], file_meta: dict[str, Any] | None = None
                          ) -> Path:
    """The card of a converted checkpoint: the source (`origin`, read at `src`) as its base,
    zero compute, the source's ancestors; what the source's card (or, for a single-file
    source such as GGUF, `file_meta`: license, model_name, language) says about the model
    (license, datasets, pipeline_tag, model-index, tags) is kept, and a foreign card's text."""
    source_meta, body = read_card(src) if src.is_dir() else (dict(file_meta or {}), "")
    record = make_record("convert", dst, origin, base_path=src if src.is_dir() else None,
                         config=config)
    meta = card_metadata(record, pipeline_tag=source_meta.get("pipeline_tag"),
                         base_meta=source_meta)
    for key in ("datasets", "model-index", "model_name", "language"):
        if key in source_meta:
            meta[key] = source_meta[key]
    meta["tags"] = list(dict.fromkeys([*(source_meta.get("tags") or []), *meta["tags"]]))
    meta["lineage"] = meta.pop("lineage")  # last, after what Hugging Face reads
    summary = [f"Converted by lmkit from `{describe_base(origin)}` "
               f"({', '.join(f'{k}={v}' for k, v in config.items())}); the weights are the "
               "source's, so it adds no training cost."]
    return write_card(dst, meta, summary, "" if "lineage" in source_meta else body)


# ---- tables ----------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".3g") -> str:
    return "?" if value is None else format(value, spec) if isinstance(value, (int, float)) \
        else str(value)


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def chain_table(record: dict[str, Any]) -> list[str]:
    """The chain, newest first, one row per run with its cost, then the ancestors' and the
    total cost, then the energy method and carbon intensity of each run."""
    runs, sums = chain(record), totals(record)
    header = ["run", "kind", "base", "FLOPs", "time (s)", "energy (kWh)", "CO2 (kg)"]

    def cost(c: dict[str, Any]) -> list[str]:
        return [fmt(c.get("flops")), fmt(c.get("wall_time_s"), ".1f"),
                fmt(c.get("energy_kwh")), fmt(c.get("emissions_kg"))]

    rows = [[("**" + r["name"] + "** (this)") if i == 0 else r["name"], r["kind"],
             describe_base(r["base"]), *cost(r["compute"])] for i, r in enumerate(runs)]
    rows += [["ancestors", "", "", *cost(sums["ancestors"])],
             ["**total**", "", "", *cost(sums["total"])]]
    notes = [f"- {r['name']}: {r['compute'].get('energy_method', '?')}"
             + (f"; {fmt(r['compute'].get('carbon_intensity_g_per_kwh'))} g CO2eq/kWh "
                f"({r['compute'].get('carbon_source')})"
                if r["compute"].get("carbon_source") else "") for r in runs]
    if not sums["complete"]:
        notes.append(f"- before {runs[-1]['name']}: {describe_base(runs[-1]['base'])} has no "
                     "lineage record, so its training cost is not counted")
    return [*markdown(header, rows), "", "Energy measured or estimated as follows:", *notes]


def describe(folder: str | Path) -> str:
    """The lineage of the checkpoint at `folder` as text (`lmkit info`): this run's base and
    data, then the chain back to its first ancestor with each run's cost, the ancestors' and
    the total."""
    record = read_lineage(folder)
    if record is None:
        return f"{folder}: no lineage record (its README.md has none)"
    data = [f"  {d['role']}: {d.get('path') or d.get('name')} (sha256 "
            f"{str(d.get('sha256'))[:16]})" for d in record.get("data", [])]
    head = f"lineage of {folder} ({record['kind']}; base: {describe_base(record.get('base', {}))})"
    return "\n".join([head, *(["data:", *data] if data else []), "chain (newest first):",
                      *chain_table(record)])
