"""Model cards with lineage, energy and carbon per run, `lmkit report`: a real chain
(tiny pretrain -> fine-tune from it -> convert to Hugging Face), real files, real processes."""

import hashlib
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import lmkit
from lmkit.errors import ConfigError
from lmkit.finetune import FinetuneConfig, finetune
from lmkit.lineage import COSTS, chain, read_card, read_lineage, totals
from lmkit.loading import convert
from lmkit.train import TrainConfig, energy, load_config, pretrain, train
from lmkit.train import energy as energy_mod
from lmkit.train.energy import CPU_WATTS_PER_CORE, EnergyMeter, carbon_intensity

GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "day", "saw", "went", "to", "and", "with", "very", "was"]
QUIET = {"progress": False, "tensorboard": False, "plot": False}


def _cls_rows(rng: random.Random, n: int) -> str:
    rows = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(FILLER) for _ in range(5)]
        words.insert(rng.randrange(6), rng.choice(GOOD if label == "pos" else BAD))
        rows.append(" ".join(words) + "\t" + label)
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """pretrain (from scratch) -> fine-tune from it -> convert the fine-tuned model to HF;
    and a fine-tuning of the same architecture from scratch."""
    d = tmp_path_factory.mktemp("lineage")
    rng = random.Random(0)
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(FILLER + GOOD + BAD) for _ in range(12))
                                  for _ in range(200)) + "\n")
    (d / "train.tsv").write_text(_cls_rows(rng, 80))
    (d / "dev.tsv").write_text(_cls_rows(rng, 20))
    pre = pretrain(load_config(None, {
        "preset": "tiny-encoder", "data": [str(corpus)], "tokenizer": "wordpiece:200",
        "out": str(d / "pre"), "steps": 4, "seq_len": 32, "batch_size": 4, "warmup_steps": 1,
        "eval_every": 2, "save_every": 0, "log_every": 1, "valid_fraction": 0.1,
        "carbon_intensity": "FRA", **QUIET}))
    common = dict(task="classification", train=str(d / "train.tsv"), dev=str(d / "dev.tsv"),
                  steps=3, batch_size=8, eval_every=1, carbon_intensity="120", **QUIET)
    ft = finetune(pre, FinetuneConfig(out=str(d / "ft"), **common)).out_dir
    scratch = finetune(pre, FinetuneConfig(out=str(d / "scratch"), from_scratch=True,
                                           **common)).out_dir
    conv = convert(ft, d / "conv", to="lmkit")
    hf = convert(pre, d / "pre_hf", to="hf")  # a Hugging Face folder: the card is its README
    return {"dir": d, "corpus": corpus, "pre": pre, "ft": ft, "scratch": scratch,
            "conv": conv, "hf": hf}


def _compute(folder):
    return json.loads((folder / "compute.json").read_text())


def test_cards_parse_with_huggingface_hub_and_yaml(runs):
    for key, task_type in (("pre", "fill-mask"), ("ft", "text-classification"),
                           ("scratch", "text-classification"), ("conv", "text-classification"),
                           ("hf", "fill-mask")):
        file = runs[key] / "README.md"
        card = ModelCard.load(file)
        meta = yaml.safe_load(file.read_text().split("---")[1])
        assert card.data.library_name == "lmkit" == meta["library_name"]
        assert card.data.pipeline_tag == task_type
        assert meta["lineage"]["format"] == 1 and "lmkit" in card.data.tags
        assert card.data.license == "unknown"
    ft = ModelCard.load(runs["ft"] / "README.md").data
    assert ft.datasets == ["lineage0/dev.tsv", "lineage0/train.tsv"]
    results = {r.metric_type: r.metric_value for r in ft.eval_results}
    dev = json.loads((runs["ft"] / "eval.json").read_text())
    assert results == {k: dev[k] for k in ("accuracy", "macro_f1", "loss")}
    assert ft.eval_results[0].task_type == "text-classification"
    assert ft.eval_results[0].dataset_name == "lineage0/dev.tsv"
    own = _compute(runs["ft"])
    assert ft.co2_eq_emissions["emissions"] == pytest.approx(own["emissions_kg"] * 1000)
    assert ft.co2_eq_emissions["training_type"] == "fine-tuning"
    pre = ModelCard.load(runs["pre"] / "README.md").data
    assert {r.metric_type for r in pre.eval_results} == {"loss", "perplexity"}
    # converted folders still load, and their cards keep the source's model-index
    assert ModelCard.load(runs["conv"] / "README.md").data.eval_results[0].metric_value == \
        results["accuracy"]
    assert lmkit.load(runs["conv"]).config.head == "classification"
    hf = ModelCard.load(runs["hf"] / "README.md").data
    assert hf.eval_results == pre.eval_results and hf.lineage["base"]["path"] == \
        str(runs["pre"].resolve())
    assert lmkit.load(runs["hf"]).config.head == "mlm"


def test_lineage_records_base_data_config_and_compute(runs):
    pre, ft, hf = (read_lineage(runs[k]) for k in ("pre", "ft", "conv"))
    assert pre["kind"] == "pretrain" and pre["base"] == {"kind": "scratch"}
    assert pre["ancestors"] == []
    digest = hashlib.sha256(runs["corpus"].read_bytes()).hexdigest()
    assert [(d["role"], d["sha256"]) for d in pre["data"]] == [("train", digest)]
    assert pre["config"]["steps"] == 4 and pre["config"]["model"] == {}
    assert ft["base"] == {"kind": "path", "path": str(runs["pre"].resolve())}
    for d in ft["data"]:
        assert d["sha256"] == hashlib.sha256(Path(d["path"]).read_bytes()).hexdigest()
    assert [d["role"] for d in ft["data"]] == ["train", "dev"]
    assert ft["config"]["lr"] == 5e-5 and ft["task"] == "classification"
    # the ancestors are the base's own record, copied: the chain is self-contained
    assert ft["ancestors"] == chain(pre)
    assert hf["kind"] == "convert" and hf["base"]["path"] == str(runs["ft"].resolve())
    assert hf["ancestors"] == chain(ft)[:1] + chain(pre)
    assert [r["name"] for r in chain(hf)] == ["conv", "ft", "pre"]
    scratch = read_lineage(runs["scratch"])
    assert scratch["base"]["kind"] == "scratch" and scratch["ancestors"] == []
    assert scratch["base"]["architecture"]["path"] == str(runs["pre"].resolve())


@pytest.mark.parametrize("origin, base_model, phrase", [
    ({"kind": "registry", "name": "ada/tiny", "revision": "9f2c" * 16, "registry": "file:///r"},
     "ada/tiny", "ada/tiny@9f2c9f2c9f2c (registry file:///r)"),
    ({"kind": "hf-cache", "repo": "org/model", "commit": "ab12" * 10},
     "org/model", "org/model@ab12ab12ab12 (Hugging Face cache)"),
    ({"kind": "path", "path": "/models/x"}, None, "/models/x"),
])
def test_every_kind_of_origin_is_recorded(runs, tmp_path, origin, base_model, phrase):
    """What `locate(ref).origin` gives (registry, Hugging Face cache, path) goes into the
    record as the base, and into base_model where it is a hub-style name."""
    from lmkit.lineage import card_metadata, describe_base, make_record, write_card

    record = make_record("finetune", tmp_path, origin, base_path=runs["pre"])
    write_card(tmp_path, card_metadata(record, pipeline_tag="fill-mask"), ["a test card"])
    card = ModelCard.load(tmp_path / "README.md").data
    assert card.base_model == base_model and card.lineage["base"] == origin
    assert card.lineage["ancestors"] == chain(read_lineage(runs["pre"]))
    assert describe_base(origin) == phrase and phrase in read_card(tmp_path)[1]


def test_lineage_totals_are_the_sum_of_the_parts(runs):
    pre, ft = _compute(runs["pre"]), _compute(runs["ft"])
    for key in COSTS:  # each record holds its run's compute.json figures
        assert read_lineage(runs["pre"])["compute"][key] == pre[key]
        assert read_lineage(runs["ft"])["compute"][key] == ft[key]
    sums = totals(read_lineage(runs["conv"]))
    assert sums["complete"]  # the chain goes back to a run from scratch
    for key in COSTS:
        assert sums["own"][key] == 0  # a conversion costs no training
        assert sums["ancestors"][key] == pytest.approx(ft[key] + pre[key])
        assert sums["total"][key] == pytest.approx(ft[key] + pre[key])
    ft_sums = read_lineage(runs["ft"])["totals"]  # written in the card too
    assert ft_sums["own"]["energy_kwh"] == pytest.approx(ft["energy_kwh"])
    assert ft_sums["ancestors"]["emissions_kg"] == pytest.approx(pre["emissions_kg"])
    assert ft_sums["total"]["flops"] == pytest.approx(ft["flops"] + pre["flops"])
    body = read_card(runs["ft"])[1]
    assert "| ancestors |" in body and "| **total** |" in body and "ft** (this)" in body


def test_energy_and_emissions_in_compute_json(runs):
    pre, ft = _compute(runs["pre"]), _compute(runs["ft"])
    for c, intensity in ((pre, carbon_intensity("FRA")[0]), (ft, 120.0)):
        assert c["energy_kwh"] > 0 and c["energy_method"]
        assert c["carbon_intensity_g_per_kwh"] == intensity
        assert c["emissions_kg"] == pytest.approx(c["energy_kwh"] * intensity / 1000)
        seg = c["segments"][0]
        parts = [seg[k] for k in ("cpu_kwh", "gpu_kwh", "ram_kwh") if k in seg]
        assert parts and seg["energy_kwh"] == pytest.approx(sum(parts))
        assert seg["energy_method"] == c["energy_method"]
    assert ft["carbon_source"] == "given (g CO2eq/kWh)"


def test_energy_adds_up_over_resumed_sessions(tmp_path):
    model = lmkit.Model(lmkit.preset("tiny-decoder"))
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(5, 100, (2, 16), generator=gen)),
                "labels": ids} for _ in range(6)]
    cfg = TrainConfig(steps=6, warmup_steps=1, save_every=3, eval_every=0, **QUIET)
    train(model, batches, cfg, tmp_path, max_steps=3)
    train(model, batches, cfg, tmp_path, resume=True)
    c = _compute(tmp_path)
    assert [s["end_step"] for s in c["segments"]] == [3, 6]
    assert all(s["energy_kwh"] > 0 for s in c["segments"])
    assert c["energy_kwh"] == pytest.approx(sum(s["energy_kwh"] for s in c["segments"]))
    assert c["emissions_kg"] == pytest.approx(sum(s["emissions_kg"] for s in c["segments"]))


def test_estimated_energy_without_rapl(tmp_path, monkeypatch):
    """No readable RAPL: energy = process CPU seconds x W per core, on a fake CPU clock (so
    the figure is exact and no timing is involved)."""
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(energy.time, "process_time", lambda: next(clock))
    meter = EnergyMeter(torch.device("cpu"), use_codecarbon=False, rapl_root=tmp_path)
    r = meter.reading()
    assert r["energy_method"] == f"cpu estimated: process CPU time x {CPU_WATTS_PER_CORE:g} " \
        "W per core"
    assert r["energy_kwh"] == pytest.approx(2.5 * CPU_WATTS_PER_CORE / 3.6e6)
    assert r["emissions_kg"] == pytest.approx(r["energy_kwh"] * 475 / 1000)


def _zone(root, name, kind, uj, max_uj=1_000_000):
    zone = root / name
    zone.mkdir(exist_ok=True)
    (zone / "name").write_text(kind + "\n")
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")


def test_measured_energy_from_rapl_counters(tmp_path):
    """Fake RAPL counter files: two packages (one wraps around), DRAM counted, cores not
    (they are part of the package)."""
    _zone(tmp_path, "intel-rapl:0", "package-0", 900_000)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5_000)
    _zone(tmp_path, "intel-rapl:0:1", "dram", 1_000)
    _zone(tmp_path, "intel-rapl:1", "package-1", 100)
    meter = EnergyMeter(torch.device("cpu"), use_codecarbon=False, rapl_root=tmp_path,
                        intensity="56")
    _zone(tmp_path, "intel-rapl:0", "package-0", 50_000)  # wrapped: +150,000 uJ
    _zone(tmp_path, "intel-rapl:0:0", "core", 905_000)
    _zone(tmp_path, "intel-rapl:0:1", "dram", 21_000)  # +20,000
    _zone(tmp_path, "intel-rapl:1", "package-1", 30_100)  # +30,000
    r = meter.reading()
    assert r["energy_method"] == "cpu measured: Intel RAPL (whole CPU package)"
    assert r["energy_kwh"] == pytest.approx(200_000 / 3.6e12)
    assert r["emissions_kg"] == pytest.approx(200_000 / 3.6e12 * 56 / 1000)


def _burn(seconds: float) -> None:
    """Some CPU work for a tracker to see (its amount is not asserted)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        sum(range(1000))


def test_codecarbon_offline_quiet_no_files_no_network(tmp_path, monkeypatch, capfd):
    pytest.importorskip("codecarbon")
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("codecarbon tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    meter = EnergyMeter(torch.device("cpu"), use_codecarbon=True, intensity="SE")
    _burn(0.3)
    meter.stop()
    r = meter.reading()
    assert r["energy_method"].startswith("codecarbon ")
    assert {"cpu_kwh", "gpu_kwh", "ram_kwh"} < set(r)
    assert r["energy_kwh"] > 0 and r["carbon_source"].startswith("SWE grid")
    assert list(tmp_path.iterdir()) == []  # no emissions.csv, no lock file here
    assert "codecarbon" not in capfd.readouterr().err


def test_carbon_intensity_by_number_and_country(monkeypatch):
    assert carbon_intensity("56") == (56.0, "given (g CO2eq/kWh)")
    assert carbon_intensity(0) == (0.0, "given (g CO2eq/kWh)")
    assert carbon_intensity("world")[0] == carbon_intensity(None)[0] == 475.0
    assert carbon_intensity("FR") == carbon_intensity("fra")
    monkeypatch.setattr(energy_mod, "_codecarbon_mix", lambda: {})  # the built-in table
    assert carbon_intensity("FR") == (56.0, "FRA grid (2023, Our World in Data / Ember)")
    assert carbon_intensity("se")[0] == 40.7
    with pytest.raises(ConfigError, match="known: AUS, BRA"):
        carbon_intensity("BEL")


@pytest.mark.parametrize("bad, match", [("-5", "a number >= 0"), ("nan", "a number >= 0"),
                                        ("XX", "nor a known country code"),
                                        ("", "nor a known country code")])
def test_bad_carbon_intensity_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(carbon_intensity=bad).validate()


def test_cli_rejects_a_bad_carbon_intensity_at_parse_time(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmkit.cli", "finetune", "ckpt", "--train",
                          "x.tsv", "--carbon-intensity", "Mars"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "nor a known country code" in out.stderr


def test_report_writes_a_png_and_the_table_in_a_real_process(runs, tmp_path):
    png = tmp_path / "out" / "report.png"
    out = subprocess.run([sys.executable, "-m", "lmkit.cli", "report", str(runs["ft"]),
                          str(runs["scratch"]), str(runs["pre"]), "--out", str(png)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
        assert image.size[0] > 1000
    table = (tmp_path / "out" / "report.md").read_text()
    assert table in out.stdout
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in
            table.splitlines() if line.startswith("| ") and "---" not in line}
    ft, pre = _compute(runs["ft"]), _compute(runs["pre"])
    assert rows["ft"][4:7] == [f"{ft['flops']:.3g}", f"{pre['flops']:.3g}",
                               f"{ft['flops'] + pre['flops']:.3g}"]
    accuracy = json.loads((runs["ft"] / "eval.json").read_text())["accuracy"]
    assert rows["ft"][3] == f"accuracy {accuracy:.2f}"
    assert rows["scratch"][5] == "0" and rows["scratch"][2] == "from scratch"


def test_report_errors(runs, tmp_path):
    from lmkit.report import write_report

    with pytest.raises(ValueError, match="ending in .png"):
        write_report([runs["ft"]], tmp_path / "r.jpg")
    with pytest.raises(FileNotFoundError, match="no run folder"):
        write_report([tmp_path / "missing"], tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()
    stopped = tmp_path / "stopped"  # a run that did not finish: compute.json, no card yet
    stopped.mkdir()
    (stopped / "compute.json").write_text((runs["ft"] / "compute.json").read_text())
    rep = write_report([stopped], tmp_path / "r.png")
    assert rep.png.is_file() and "stopped: no model card yet" in rep.table
    assert f"| {_compute(runs['ft'])['flops']:.3g} | 0 |" in rep.table


def test_info_shows_the_chain(runs):
    out = subprocess.run([sys.executable, "-m", "lmkit.cli", "info", str(runs["conv"])],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout[out.stdout.index("lineage of"):]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[1] for r in rows[1:4]] == ["convert", "finetune", "pretrain"]
    total = _compute(runs["ft"])["energy_kwh"] + _compute(runs["pre"])["energy_kwh"]
    assert rows[-1].split(" | ")[5] == f"{total:.3g}"
    assert "from scratch" in rows[3]
