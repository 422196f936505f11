"""Nothing on disk is trusted: training checkpoints (checksums, structure, fallback, stale
staging, kill -9 during a save), run configs, config.json, foreign configs, weights indexes and
pickles. Every damaged or crafted input gives a clear error, never a crash or a silent change."""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from safetensors.torch import load_file, save_file

import lmkit
from lmkit.checkpoint import write_manifest
from lmkit.errors import CheckpointError, ConfigError
from lmkit.objectives import CausalLM
from lmkit.train import TrainConfig, list_checkpoints, read_metrics, train
from lmkit.train.pretrain import PretrainConfig, resume
from lmkit.train.state import load_checkpoint

QUIET = dict(progress=False, tensorboard=False, plot=False)


class Rows:
    """Endless, resumable batches: batch i is drawn from a generator seeded with i."""

    def __init__(self):
        self.index = 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.index)
            self.index += 1
            yield CausalLM()({"input_ids": torch.randint(5, 200, (2, 16), generator=g)})

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = int(state["index"])


ROWS = "\n" + inspect.getsource(Rows)  # the same class in the scripts run as other processes


def model() -> lmkit.Model:
    return lmkit.Model(lmkit.preset("tiny-decoder", dropout=0.1))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, eval_every=0,
                                 save_every=2, keep_checkpoints=0, log_every=1), **QUIET, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run stopped at step 4 with checkpoints step-2 and step-4 (copy before changing)."""
    out = tmp_path_factory.mktemp("run") / "run"
    torch.manual_seed(0)
    train(model(), Rows(), cfg(), out, max_steps=4)
    return out


@pytest.fixture
def copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def resume_into(out: Path, folder: Path | None = None) -> dict:
    """Load a checkpoint into fresh objects the way `train` does."""
    from lmkit.train.distributed import DistEnv
    from lmkit.train.optim import build_optimizer, build_scheduler

    m = model()
    opt = build_optimizer(m, 3e-3)
    sched = build_scheduler(opt, "cosine", 1, 6, 0.1)
    folder = folder or list_checkpoints(out)[-1]
    return load_checkpoint(folder, m, opt, sched, Rows(), DistEnv())


def craft(folder: Path, edit) -> None:
    """Change trainer_state.pt and sign it again: a consistent, but crafted, checkpoint."""
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "trainer_state.pt")
    write_manifest(folder)


# ---- training state --------------------------------------------------------------------------


def test_crafted_optimizer_state_is_refused_before_the_optimizer(copy):
    """A wrong-shape exp_avg once made the fused AdamW write out of bounds (SIGSEGV)."""
    for ckpt in list_checkpoints(copy):
        craft(ckpt, lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)))
    script = copy.parent / "resume.py"
    script.write_text("import torch, lmkit\nfrom lmkit.objectives import CausalLM\n"
                      "from lmkit.train import TrainConfig, train\n" + ROWS + textwrap.dedent(f"""
        model = lmkit.Model(lmkit.preset("tiny-decoder", dropout=0.1))
        train(model, Rows(), TrainConfig(steps=6, batch_size=2, lr=3e-3, warmup_steps=1,
              eval_every=0, save_every=2, keep_checkpoints=0, log_every=1, progress=False,
              tensorboard=False, plot=False), {str(copy)!r}, resume=True)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # not a signal death
    assert "CheckpointError: no intact checkpoint to resume from" in proc.stderr
    assert "optimizer state 0.exp_avg: (3,) torch.float32 for a parameter of (64, 64)" \
        in proc.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["optimizer"]["state"][1].update(exp_avg_sq=-s["optimizer"]["state"][1][
        "exp_avg_sq"] - 1), "exp_avg_sq is negative"),
    (lambda s: s["optimizer"]["state"][2].update(exp_avg=s["optimizer"]["state"][2][
        "exp_avg"].double()), "torch.float64 for a parameter"),
    (lambda s: s["optimizer"]["state"][0].pop("exp_avg"), "optimizer state 0"),
    (lambda s: s["optimizer"]["state"].update({999: {}}), "parameter 999"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")), "lr=nan"),
    (lambda s: s.update(step=-5), "step=-5"),
    (lambda s: s.update(step=10 ** 9), "step 1000000000 in a folder named step-4"),
    (lambda s: s["scheduler"].update(last_epoch=10 ** 9), "the scheduler is at step"),
    (lambda s: s["ranks"][0]["data"].update(index=-1), "data.index=-1"),
    (lambda s: s["ranks"][0]["data"].update(index="12"), "data.index='12'"),
    (lambda s: s["ranks"][0]["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
     "rng.torch: tensor shape"),
    (lambda s: s.pop("ranks"), "missing ['ranks']"),
    (lambda s: s.update(batches=-1), "batches=-1"),
])
def test_crafted_trainer_states_are_refused(copy, edit, message):
    folder = list_checkpoints(copy)[-1]
    craft(folder, edit)
    with pytest.raises(CheckpointError, match="is not a valid training state") as e:
        resume_into(copy, folder)
    assert message in str(e.value)


def test_data_position_out_of_range_is_refused(tmp_path, corpus_stream):
    """A BatchStream position beyond its epoch, or an epoch beyond the batches drawn."""
    from lmkit.train.distributed import DistEnv
    from lmkit.train.optim import build_optimizer, build_scheduler

    out = tmp_path / "run"
    train(model(), corpus_stream(), cfg(steps=2), out)
    folder = list_checkpoints(out)[-1]
    original = (folder / "trainer_state.pt").read_bytes()
    for change, message in [({"row": 10 ** 9}, "row=1000000000 is outside this data"),
                            ({"epoch": 10 ** 9}, "data epoch 1000000000 after only 2 batches")]:
        (folder / "trainer_state.pt").write_bytes(original)
        craft(folder, lambda s: s["ranks"][0]["data"].update(change))  # noqa: B023
        m = model()
        opt = build_optimizer(m, 3e-3)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(folder, m, opt, build_scheduler(opt, "cosine", 1, 6, 0.1),
                            corpus_stream(), DistEnv())


@pytest.fixture
def corpus_stream(tmp_path):
    from lmkit.data import PackedDataset, tokenize_corpus
    from lmkit.tokenizer import Tokenizer
    from lmkit.train import BatchStream

    (tmp_path / "c.txt").write_text("\n\n".join(f"the cat {i} sat on the mat {i}" * 3
                                                for i in range(40)) + "\n")
    tok = Tokenizer.train([tmp_path / "c.txt"], kind="bpe", vocab_size=300, family="decoder")
    cache = tokenize_corpus([tmp_path / "c.txt"], tok, tmp_path / "cache")

    return lambda: BatchStream(PackedDataset(cache, 16, seed=0), 2, CausalLM())


def test_bit_flips_in_the_trainer_state_are_detected(copy):
    folder = list_checkpoints(copy)[-1]
    original = (folder / "trainer_state.pt").read_bytes()
    rng = random.Random(0)
    for _ in range(30):
        data = bytearray(original)
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        (folder / "trainer_state.pt").write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="trainer_state.pt is corrupted"):
            resume_into(copy, folder)
    (folder / "trainer_state.pt").write_bytes(original)
    assert resume_into(copy, folder)["step"] == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "no manifest", "config"])
def test_resume_falls_back_to_the_previous_checkpoint(run, tmp_path, damage, caplog):
    out = Path(shutil.copytree(run, tmp_path / "run"))
    latest = list_checkpoints(out)[-1]
    if damage == "flip":
        f = latest / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-7] ^= 0x10
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f = latest / "trainer_state.pt"
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "no manifest":
        (latest / "manifest.json").unlink()
    else:
        (latest / "config.json").write_text("{}")
    torch.manual_seed(0)
    straight = train(model(), Rows(), cfg(), tmp_path / "straight")
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        result = train(model(), Rows(), cfg(), out, resume=True)
    assert result.start_step == 2
    assert "resuming from" in caplog.text and "step-4" in caplog.text
    assert result.losses == straight.losses[2:]  # exact, from the previous checkpoint
    train_steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert train_steps == list(range(1, 7))


def test_an_explicit_damaged_checkpoint_is_not_replaced_by_another(copy):
    latest = list_checkpoints(copy)[-1]
    (latest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="(?s)no intact checkpoint.*has no manifest.json"):
        train(model(), Rows(), cfg(), copy, resume=latest)


def test_stale_staging_is_cleaned_and_a_swapped_out_copy_restored(copy, caplog):
    ckpts = copy / "checkpoints"
    (ckpts / "step-4").rename(ckpts / ".step-4.old-0badc0de")  # killed between the renames
    (ckpts / ".step-4.tmp-12345678").mkdir()
    (ckpts / ".step-4.tmp-12345678" / "model.safetensors").write_bytes(b"half")
    (ckpts / ".step-2.del-abcdef01").mkdir()  # killed while deleting an old checkpoint
    (copy.parent / f".{copy.name}.tmp-00000000").mkdir()  # killed while writing the model
    (copy.parent / ".other.tmp-00000000").mkdir()  # not this run's: left alone
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        result = train(model(), Rows(), cfg(), copy, resume=True)
    assert result.start_step == 4 and result.step == 6
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4", "step-6"]
    assert not (copy.parent / f".{copy.name}.tmp-00000000").exists()
    assert (copy.parent / ".other.tmp-00000000").exists()
    assert "interrupted save" in caplog.text


def test_partial_last_metrics_line_does_not_block_the_resume(copy, caplog):
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 5, "lo')
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        train(model(), Rows(), cfg(), copy, resume=True)
    assert "metrics.jsonl:5 is not a metrics record" in caplog.text
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 7))


KILL_SCRIPT = """
import os, sys, time, torch, lmkit
import lmkit.checkpoint, lmkit.train.state
from lmkit.objectives import CausalLM
from lmkit.train import TrainConfig, train
""" + ROWS + """
out, where, at = sys.argv[1], sys.argv[2], sys.argv[3]

def pause(fn):
    def wrapper(*args, **kwargs):
        if os.path.basename(args[0]).startswith(at):
            print("PAUSED", flush=True)
            time.sleep(600)
        return fn(*args, **kwargs)
    return wrapper

if where == "manifest":  # staging written except the manifest
    lmkit.train.state.write_manifest = pause(lmkit.train.state.write_manifest)
elif where == "rename":  # staging complete, about to be moved into place
    lmkit.checkpoint._move_into_place = pause(lmkit.checkpoint._move_into_place)
elif where == "prune":  # an old checkpoint renamed for deletion, not yet deleted
    import shutil
    shutil.rmtree = pause(shutil.rmtree)
torch.manual_seed(0)
model = lmkit.Model(lmkit.preset("tiny-decoder", dropout=0.1))
train(model, Rows(), TrainConfig(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, eval_every=0,
      save_every=2, keep_checkpoints=2, log_every=1, progress=False, tensorboard=False,
      plot=False), out, resume=where == "resume")
print("WEIGHTS", list(map(float, lmkit.load(out).tokens.weight.flatten()[:8])), flush=True)
"""


@pytest.mark.parametrize("where, at", [("manifest", ".step-4.tmp-"),
                                       ("rename", ".step-4.tmp-"), ("prune", ".step-2.del-")])
def test_kill_9_during_a_save_then_resume(tmp_path, where, at):
    """Real processes: a run is SIGKILLed in the middle of saving a checkpoint; the resumed
    run ends with exactly the weights of a run that was never stopped."""
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)

    def go(out: Path, mode: str) -> str:
        proc = subprocess.run([sys.executable, str(script), str(out), mode, "-"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    straight = go(tmp_path / "straight", "none")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(out), where, at],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "PAUSED", proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    hidden = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert hidden  # the kill left a staging or half-deleted folder
    resumed = go(out, "resume")
    assert resumed.splitlines()[-1] == straight.splitlines()[-1]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, 7))


# ---- run configs -----------------------------------------------------------------------------


def test_truncated_run_config_is_refused_on_resume(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "trainer_state.pt").write_bytes(b"")
    from lmkit.train.options import save_config

    save_config(PretrainConfig(data=["x.txt"], out=str(out), steps=50), out /
                "pretrain_config.yaml")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    text = (out / "pretrain_config.yaml").read_text()
    assert yaml.safe_load(text)["steps"] == 50
    lines = text.splitlines(keepends=True)
    (out / "pretrain_config.yaml").write_text("".join(lines[: len(lines) // 3]))
    with pytest.raises(ValueError, match=r"pretrain_config.yaml lacks \[.*'model'\]"):
        resume(out)
    saved = yaml.safe_load(text)  # a run saved before the later fields existed resumes
    assert set(PretrainConfig.LATER_FIELDS) <= set(saved)
    (out / "pretrain_config.yaml").write_text(yaml.safe_dump(
        {k: v for k, v in saved.items() if k not in PretrainConfig.LATER_FIELDS}))
    with pytest.raises(FileNotFoundError, match="x.txt"):  # read past the config: the data
        resume(out)
    (out / "pretrain_config.yaml").write_text("steps: [1\n")
    with pytest.raises(ValueError, match=r"pretrain_config.yaml:\d+: invalid YAML"):
        resume(out)


def test_pretrain_resume_with_a_changed_tokenizer_is_refused(tmp_path):
    from lmkit.train import load_config, pretrain

    (tmp_path / "c.txt").write_text("\n\n".join(f"the cat {i} sat on the mat" for i in
                                                range(200)) + "\n")
    out = pretrain(load_config(None, {"data": [str(tmp_path / "c.txt")], "tokenizer": "bpe:300",
                                      "out": str(tmp_path / "run"), "steps": 2, "seq_len": 16,
                                      "batch_size": 2, "valid_fraction": 0, **QUIET}))
    file = out / "tokenizer" / "tokenizer.json"
    tok = json.loads(file.read_text())
    vocab = tok["model"]["vocab"]
    a, b = [k for k in vocab if k.isalpha()][-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # still a valid tokenizer: two ids swapped
    file.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer of the model being trained differs"):
        resume(out, {"steps": 4})


# ---- config.json -----------------------------------------------------------------------------


def edit_config(folder: Path, **changes) -> None:
    """Change config.json (and drop lmkit's checksums, as another tool writing it would)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is ...]:
        del cfg[k]
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(load_file(folder / "model.safetensors"), folder / "model.safetensors")


def test_edited_config_is_caught_by_the_checksum(tmp_path):
    model().save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "activation": "gelu"}))
    with pytest.raises(CheckpointError, match="config.json is corrupted or was edited"):
        lmkit.load(tmp_path / "m")


@pytest.mark.parametrize("changes, message", [
    ({"activation": ...}, r"config fields missing: \['activation'\].*activation=\"gelu\""),
    ({"norm_eps": float("nan")}, "norm_eps=nan"),
    ({"rope_theta": float("inf")}, "rope_theta=inf"),
    ({"norm_eps": 0.0}, "norm_eps must be a positive number"),
    ({"hidden_size": "64"}, "hidden_size='64' \\(expected an integer\\)"),
    ({"decoder_layers": 2.0}, "decoder_layers=2.0"),
    ({"tie_embeddings": 1}, "tie_embeddings=1 \\(expected true or false\\)"),
    ({"eos_id": 512}, "eos_id=512 is not a token id"),
    ({"pad_id": -1}, "pad_id=-1 is not a token id"),
    ({"label_names": "abc"}, "label_names='abc'"),
])
def test_config_mutations_are_refused(tmp_path, changes, message):
    model().save(tmp_path / "m")
    edit_config(tmp_path / "m", **changes)
    with pytest.raises(ConfigError, match=message):
        lmkit.load(tmp_path / "m")


def _fails_in_a_subprocess(code: str, expected: str) -> None:
    """Run `code` in a fresh process; it must end with `expected` in its error, not hang."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr[-2000:]


def test_a_huge_layer_count_fails_fast(tmp_path):
    model().save(tmp_path / "m")
    edit_config(tmp_path / "m", decoder_layers=10 ** 9)
    _fails_in_a_subprocess(f"import lmkit; lmkit.load({str(tmp_path / 'm')!r})",
                           "gives the decoder 1000000000 layers but the weights hold 2")
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64)).save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**raw, "n_layer": 10 ** 9}))
    _fails_in_a_subprocess(f"import lmkit; lmkit.load({str(tmp_path / 'hf')!r})",
                           "gives the decoder 1000000000 layers but the weights hold 2")


def test_a_hidden_size_too_large_to_build_is_refused(tmp_path):
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64)).save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**raw, "n_embd": 10 ** 9}))
    with pytest.raises(CheckpointError, match="the config's sizes cannot be built"):
        lmkit.load(tmp_path / "hf")  # torch cannot even describe 4*10^9 x 10^9 on meta


def test_a_huge_gguf_block_count_fails_fast(tmp_path):
    from test_convert_gguf import write_gguf

    m = model()
    m.config = m.config.replace(decoder_layers=10 ** 9)  # written as block_count
    write_gguf(tmp_path / "m.gguf", m)
    _fails_in_a_subprocess(f"import lmkit; lmkit.load({str(tmp_path / 'm.gguf')!r})",
                           "gives the decoder 1000000000 layers but the weights hold 2")


def test_oversized_config_is_refused_unread(tmp_path):
    model().save(tmp_path / "m")
    with open(tmp_path / "m" / "config.json", "a") as f:
        f.truncate(20 << 20)  # 20 MB (sparse): a config is never this large
    with pytest.raises(ConfigError, match="more than a config can be"):
        lmkit.load(tmp_path / "m")


def test_hf_config_with_string_numbers_is_refused(tmp_path):
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64)).save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, message in [({"n_embd": "32"}, "hidden_size='32' (expected an integer)"),
                            ({"n_layer": 2.0}, "decoder_layers=2.0"),
                            ({"n_head": 0}, "num_heads must be a positive number"),
                            ({"layer_norm_epsilon": float("nan")}, "norm_eps=nan")]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(CheckpointError, match="cannot be expressed in lmkit") as e:
            lmkit.load(tmp_path / "hf")
        assert message in str(e.value)


# ---- weights files: index and pickle policy ----------------------------------------------------


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A BERT folder with its weights as one indexed shard."""
    model = tf.BertModel(tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64,
                                       max_position_embeddings=64))
    model.save_pretrained(tmp_path / "bert")
    folder = tmp_path / "bert"
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    names = load_file(folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors"
                                            for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert lmkit.load(folder).config.encoder_layers == 2
    return folder


def _point_index_to(folder: Path, shard: str) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("shard, message", [
    ("../outside.safetensors", "leads outside the folder"),
    ("/etc/passwd.safetensors", "leads outside the folder"),
    ("pytorch_model.bin", "which is not a .safetensors shard"),
    ("missing.safetensors", "does not exist"),
])
def test_index_may_name_only_safetensors_inside_the_folder(sharded, shard, message):
    shutil.copy(sharded / "model-00001-of-00001.safetensors",
                sharded.parent / "outside.safetensors")
    _point_index_to(sharded, shard)
    with pytest.raises(CheckpointError, match=message):
        lmkit.load(sharded, allow_pickle=True)


def test_symlinked_shard_escaping_the_folder_is_refused(sharded):
    shard = sharded / "model-00001-of-00001.safetensors"
    outside = sharded.parent / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a link to .*outside"):
        lmkit.load(sharded)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickles_need_allow_pickle_per_file_and_never_run_code(tmp_path, monkeypatch):
    folder = tmp_path / "bert"
    tf.BertModel(tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64)).save_pretrained(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a pickle file.*allow_pickle"):
        lmkit.load(folder)
    assert lmkit.load(folder, allow_pickle=True).config.encoder_layers == 2
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        lmkit.load(folder, allow_pickle=True)
    assert "weights-only" in str(e.value) and "system" in str(e.value)
    assert "weights_only=False" not in str(e.value) and "False" not in str(e.value)
    assert not (tmp_path / "pwned.txt").exists()
