"""Device and number format chosen for the hardware (lmkit.device): precision "auto" follows
the CPU/GPU capability probe (mocked here, never the training), an explicit bf16 without
native support warns once, --device/--dtype are checked with one-line errors, bf16 weights
run on the CPU, and the CLI does all of it in a real process."""

import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lmkit
from lmkit import device as lmdevice
from lmkit.device import resolve_device, resolve_precision, weight_dtype
from lmkit.finetune import FinetuneConfig
from lmkit.finetune.inference import predict
from lmkit.tokenizer import Tokenizer
from lmkit.train import TrainConfig, train
from lmkit.train.options import read_config
from lmkit.train.pretrain import PretrainConfig

CPU = torch.device("cpu")
EXAMPLES = Path(__file__).parent.parent / "examples"


def mock_cpu(monkeypatch, capability: str, avx512_bf16: bool, amx: bool) -> None:
    """What torch's CPU probes report: the kernels ATen runs, and the bf16 units."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(lmdevice, "_warned", set())


@pytest.mark.parametrize("capability, avx512_bf16, amx, expected", [
    ("AVX2", False, False, "fp32"),      # an ordinary AVX2 laptop/server CPU
    ("AVX2", True, True, "fp32"),        # ATEN_CPU_CAPABILITY=avx2: AVX2 kernels emulate bf16
    ("AVX512", False, False, "fp32"),    # AVX-512 without bf16 units (Skylake-X)
    ("AVX512", True, False, "bf16"),     # AVX512-BF16 (Cooper Lake, Zen 4)
    ("AVX512", False, True, "bf16"),     # AMX tiles (Sapphire Rapids)
    ("DEFAULT", False, False, "fp32"),
])
def test_auto_precision_follows_the_cpu_probe(monkeypatch, capability, avx512_bf16, amx,
                                              expected):
    mock_cpu(monkeypatch, capability, avx512_bf16, amx)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32"


@pytest.mark.parametrize("major, expected", [(7, "fp32"), (8, "bf16"), (9, "bf16")])
def test_auto_precision_on_cuda_needs_ampere(monkeypatch, major, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_explicit_bf16_without_native_support_warns_once(monkeypatch, fresh_warnings):
    mock_cpu(monkeypatch, "AVX2", False, False)
    with pytest.warns(RuntimeWarning, match=r"emulates it.*48\.6 s in bf16 vs 3\.4 s in fp32"):
        assert resolve_precision("bf16", CPU) == "bf16"  # still runs in bf16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_precision("bf16", CPU)
        weight_dtype("bf16", CPU, "float32")
    assert caught == []


def test_explicit_bf16_with_native_support_is_silent(monkeypatch, fresh_warnings):
    mock_cpu(monkeypatch, "AVX512", True, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("bf16", CPU) == "bf16"
    assert caught == []


def test_the_probe_sees_aten_cpu_capability():
    """A real process told to run AVX2 kernels (as on an AVX2-only CPU) has no native bf16,
    whatever this machine's CPU can do."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-c", "from lmkit.device import cpu_native_bf16; "
                           "import torch; print(torch.backends.cpu.get_cpu_capability(), "
                           "cpu_native_bf16())"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["AVX2", "False"]


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_training_records_what_auto_chose(monkeypatch, tmp_path, native, expected):
    mock_cpu(monkeypatch, "AVX512" if native else "AVX2", native, native)
    model = lmkit.Model(lmkit.preset("tiny-decoder"))
    rows = {"input_ids": torch.randint(5, 100, (2, 16))}
    rows["labels"] = rows["input_ids"].clone()
    cfg = TrainConfig(steps=2, batch_size=2, warmup_steps=0, eval_every=0, save_every=0,
                      progress=False, tensorboard=False, plot=False, device="cpu")
    result = train(model, itertools.repeat(rows), cfg, tmp_path)
    compute = json.loads((tmp_path / "compute.json").read_text())
    assert cfg.precision == "auto"
    assert compute["precision"] == result.compute["precision"] == expected
    assert compute["torch_device"] == "cpu"


def test_precision_auto_is_the_default_everywhere():
    assert TrainConfig().precision == FinetuneConfig().precision == "auto"
    assert PretrainConfig().precision == "auto"
    for path in sorted(EXAMPLES.glob("*/*.yaml")):
        cls = PretrainConfig if path.parent.name == "pretrain" else FinetuneConfig
        assert read_config(cls, path, {}).precision == "auto", path


def test_device_values(monkeypatch):
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available()
                                      else CPU)
    for bad in ("gpu", "cuda:x", "CPU", "cuda:0:1", ""):
        with pytest.raises(ValueError, match=r"not supported; choose auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(ValueError, match="device='tpu'"):
        TrainConfig(device="tpu").validate()
    with pytest.raises(ValueError, match="precision='fp16'"):
        TrainConfig(precision="fp16").validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(ValueError, match="no GPU is available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 GPU"):
        resolve_device("cuda:2")


def test_weight_dtypes(monkeypatch):
    mock_cpu(monkeypatch, "AVX2", False, False)
    assert weight_dtype(None, CPU, "bfloat16") == torch.bfloat16  # as stored
    assert weight_dtype("auto", CPU, "bfloat16") == torch.float32  # emulated: upcast
    assert weight_dtype("auto", CPU, "float16") == torch.float32
    assert weight_dtype("fp32", CPU, "bfloat16") == torch.float32
    assert weight_dtype("auto", torch.device("cuda", 0), "float16") == torch.float16
    with pytest.raises(ValueError, match="fp16 weights need a GPU"):
        weight_dtype("fp16", CPU, "float32")
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        weight_dtype("int8", CPU, "float32")
    mock_cpu(monkeypatch, "AVX512", True, True)
    assert weight_dtype("auto", CPU, "bfloat16") == torch.bfloat16


def test_load_and_generate_in_bf16_on_cpu(monkeypatch, tmp_path, fresh_warnings):
    model = lmkit.Model(lmkit.preset("tiny-decoder")).eval()
    model.save(tmp_path / "m")
    with pytest.warns(RuntimeWarning, match="emulates"):  # the suite runs as on an AVX2 CPU
        half = lmkit.load(tmp_path / "m", dtype="bf16", device="cpu")
    assert half.tokens.weight.dtype == torch.bfloat16 and half.config.dtype == "bfloat16"
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        ref, got = model(ids).logits, half(ids).logits.float()
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)  # bf16 keeps ~3 digits
    out = lmkit.generate(half, ids.tolist(), max_new_tokens=5)  # stops at EOS or 5 tokens
    assert len(out.sequences) == 2 and all(len(s) <= 5 for s in out.sequences)
    half.save(tmp_path / "half")  # the config says what the file holds
    assert lmkit.load(tmp_path / "half").tokens.weight.dtype == torch.bfloat16
    assert lmkit.load(tmp_path / "half", dtype="auto").tokens.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 weights need a GPU"):
        lmkit.load(tmp_path / "m", dtype="fp16", device="cpu")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A tiny classification checkpoint with its tokenizer, and SST-2-like TSV files."""
    d = tmp_path_factory.mktemp("precision")
    words = ["good", "bad", "film", "the", "plot", "was", "great", "awful", "a", "cast"]
    g = torch.Generator().manual_seed(0)
    rows = [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=g))
            for _ in range(64)]
    (d / "text.txt").write_text("\n".join(rows) + "\n")
    for name in ("train", "dev"):
        (d / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(
            f"{r}\t{'pos' if 'good' in r else 'neg'}\n" for r in rows))
    tok = Tokenizer.train([d / "text.txt"], "wordpiece", 120, family="encoder")
    cfg = lmkit.preset("tiny-encoder", vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                       head="classification", label_names=["neg", "pos"])
    lmkit.Model(cfg).save(d / "cls", tokenizer=tok)
    return d


def test_predict_in_bf16_on_cpu(classifier, fresh_warnings):
    texts = ["the film was good", "a bad plot"]
    ref = predict(classifier / "cls", texts, device="cpu", dtype="fp32")
    with pytest.warns(RuntimeWarning, match="emulates"):
        got = predict(classifier / "cls", texts, device="cpu", dtype="bf16")
    assert [p["label"] for p in got] == [p["label"] for p in ref]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in ref], abs=0.02)


def lmkit_cli(*args, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmkit.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_on_an_avx2_cpu(classifier):
    """Real processes running ATen's AVX2 kernels, as on a CPU without native bf16."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    d = classifier
    common = ["finetune", d / "cls", "--train", d / "train.tsv", "--steps", "2",
              "--batch-size", "8", "--device", "cpu", "--set", "progress=false",
              "--set", "tensorboard=false", "--set", "plot=false"]
    proc = lmkit_cli(*common, "--out", d / "auto", cwd=d, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "emulates" not in proc.stderr
    compute = json.loads((d / "auto" / "compute.json").read_text())
    assert (compute["precision"], compute["torch_device"]) == ("fp32", "cpu")
    proc = lmkit_cli(*common, "--precision", "bf16", "--out", d / "bf16", cwd=d, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("RuntimeWarning: bf16 asked for") == 1
    assert json.loads((d / "bf16" / "compute.json").read_text())["precision"] == "bf16"
    proc = lmkit_cli("predict", d / "auto", "the film was good", "--device", "cpu",
                     "--dtype", "bf16", cwd=d, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[0])["prediction"]["label"] in ("neg", "pos")
    proc = lmkit_cli("evaluate", d / "auto", "--data", d / "dev.tsv", "--device", "cpu",
                     cwd=d, env=env)
    assert proc.returncode == 0 and "accuracy" in json.loads(proc.stdout), proc.stderr[-3000:]
    for flags, message in [(["--dtype", "fp16"], "fp16 weights need a GPU"),
                           (["--device", "gpu"], "device='gpu' is not supported")]:
        proc = lmkit_cli("predict", d / "auto", "text", *flags, cwd=d, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1
        assert lines[0].startswith("lmkit: error: ") and message in lines[0]
