"""`compile: true` trains with the same losses as eager and saves the same tensor names (or,
when it cannot compile, falls back to eager with one warning)."""

from __future__ import annotations

import logging

import pytest
import torch

import lmkit
from lmkit.train import TrainConfig, train


def _train_losses(tmp_path, name: str, compile: bool) -> tuple[list[float], set[str]]:
    torch.manual_seed(0)
    model = lmkit.Model(lmkit.preset("tiny-decoder", decoder_layers=1))
    rows = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    segments = torch.tensor([[1] * 5 + [2] * 7, [1] * 12])  # packed rows: the masked path
    batches = ({"input_ids": rows, "segment_ids": segments, "labels": rows} for _ in range(3))
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=1, eval_every=0,
                      save_every=0, progress=False, tensorboard=False, plot=False,
                      report_to=["none"], compile=compile)
    result = train(model, batches, cfg, tmp_path / name)
    saved = set(lmkit.load(tmp_path / name).state_dict())
    return result.losses, saved


def test_compile_trains_with_the_losses_of_eager_and_saves_the_same_names(tmp_path, caplog):
    eager, eager_names = _train_losses(tmp_path, "eager", False)
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        compiled, compiled_names = _train_losses(tmp_path, "compiled", True)
    assert not [r for r in caplog.records if "compile" in r.getMessage()]  # it compiled
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert compiled_names == eager_names and not any("_orig_mod" in n for n in compiled_names)


def test_compile_without_a_cpp_compiler_warns_once_and_trains_eagerly(tmp_path, caplog):
    import torch._dynamo
    import torch._inductor.config as inductor
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    eager, _ = _train_losses(tmp_path, "eager", False)
    torch._dynamo.reset()  # no kernel compiled before (in memory or on disk) may be reused
    # (inductor's own patch: monkeypatch's undo would delete the config entry, and every
    # later compilation in this process would fail)
    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}), \
            temporary_cache_dir(str(tmp_path / "inductor")), \
            caplog.at_level(logging.WARNING, logger="lmkit"):
        fallback, _ = _train_losses(tmp_path, "fallback", True)
    warnings = [r.getMessage() for r in caplog.records if "could not compile" in r.getMessage()]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0]
    assert fallback == eager


class _Seen(Exception):
    """Raised by the stand-in of a run: the CLI got as far as the config."""


@pytest.mark.parametrize("flag", [[], ["--compile"]])
def test_compile_flag_reaches_the_run_config_of_pretrain_and_finetune(flag, tmp_path,
                                                                      monkeypatch):
    import lmkit.finetune.run
    import lmkit.train
    from lmkit import cli

    def seen(*args, **kw):
        raise _Seen(args[-1])

    monkeypatch.setattr(lmkit.train, "pretrain", seen)
    monkeypatch.setattr(lmkit.finetune.run, "finetune", seen)
    (tmp_path / "corpus.txt").write_text("some text\n")
    configs = []
    for argv in (["pretrain", "--preset", "tiny-decoder", "--data", str(tmp_path / "corpus.txt")],
                 ["finetune", "ckpt", "--task", "classification", "--train", "t.tsv"]):
        with pytest.raises(_Seen) as got:
            cli.main([*argv, "--out", str(tmp_path / argv[0]), *flag])
        configs.append(got.value.args[0])
    assert [c.compile for c in configs] == [bool(flag)] * 2
