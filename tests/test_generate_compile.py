"""`generate(..., compile=True)`: the decode step through torch.compile gives the tokens of the
eager path (greedy, seeded sampling, beam search), or, when it cannot compile, warns once and
decodes eagerly. One tiny model and one batch shape, so that every case shares one graph."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from conftest import tiny

import lmkit

generation = importlib.import_module("lmkit.generate")  # the module (lmkit.generate: its function)

# Two rows each (two padded prompts; one prompt with two beams), the same capacity: one graph.
CASES = {
    "greedy": dict(prompts=[[5, 9, 14, 3, 8], [7, 22]]),
    "sampling": dict(prompts=[[5, 9, 14, 3, 8], [7, 22]], do_sample=True, temperature=1.5,
                     top_p=0.95, seed=7),
    "beam": dict(prompts=[[5, 9, 14]], num_beams=2, num_return_sequences=2),
}


def _model() -> lmkit.Model:
    torch.manual_seed(0)
    return tiny("tiny-decoder", decoder_layers=1)


def _generate(model: lmkit.Model, case: str, compile: bool) -> lmkit.Generation:
    settings = dict(CASES[case])
    return lmkit.generate(model, settings.pop("prompts"), max_new_tokens=6, eos_id=-1,
                          compile=compile, **settings)


def test_compiled_decoding_gives_the_tokens_of_eager(caplog):
    from torch._dynamo.utils import counters

    model = _model()
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        for case in CASES:
            eager, compiled = _generate(model, case, False), _generate(model, case, True)
            assert compiled.sequences == eager.sequences, case
            assert compiled.scores == pytest.approx(eager.scores, abs=1e-4), case
        before = eager.sequences
        with torch.no_grad():  # weights changed in place: the compiled step must follow
            for p in model.decoder.layers[0].mlp.parameters():
                p.mul_(-3)
        eager, compiled = _generate(model, "beam", False), _generate(model, "beam", True)
        assert compiled.sequences == eager.sequences != before
    assert not [r for r in caplog.records if "compile" in r.getMessage()]  # it compiled
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


def test_compile_without_a_cpp_compiler_warns_once_and_decodes_eagerly(tmp_path, caplog,
                                                                         monkeypatch):
    import torch._dynamo
    import torch._inductor.config as inductor
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    monkeypatch.setattr(generation, "_COMPILED", {})
    model = _model()
    eager = [_generate(model, case, False).sequences for case in ("greedy", "sampling")]
    torch._dynamo.reset()  # no kernel compiled before (in memory or on disk) may be reused
    # (inductor's own patch: monkeypatch's undo would delete the config entry)
    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}), \
            temporary_cache_dir(str(tmp_path / "inductor")), \
            caplog.at_level(logging.WARNING, logger="lmkit"):
        fallback = [_generate(model, case, True).sequences for case in ("greedy", "sampling")]
    torch._dynamo.reset()
    warnings = [r.getMessage() for r in caplog.records if "could not compile" in r.getMessage()]
    assert len(warnings) == 1 and "generation" in warnings[0] and "C++ compiler" in warnings[0]
    assert fallback == eager


def test_compile_flag_reaches_generate(tmp_path, monkeypatch):
    from lmkit import cli

    seen = {}

    def fake(model, prompts, **kw):
        seen.update(kw)
        return lmkit.Generation([[5]], [0.0], ["x"])

    _model().save(tmp_path / "m")
    monkeypatch.setattr(lmkit, "generate", fake)
    for flag in ([], ["--compile"]):
        cli.main(["generate", str(tmp_path / "m"), "--prompt", "hi", *flag])
        assert seen["compile"] is bool(flag)


def test_serve_with_compile_decodes_with_compile(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    import lmkit.serve
    from lmkit.tokenizer import Tokenizer

    seen = {}

    def fake(model, prompts, **kw):
        seen.update(kw)
        return lmkit.Generation([[5]], [0.0], ["x"])

    (tmp_path / "corpus.txt").write_text("the film was good and the plot was bad\n" * 30)
    tokenizer = Tokenizer.train([tmp_path / "corpus.txt"], "wordpiece", 60, family="encoder")
    tiny("tiny-decoder", vocab_size=tokenizer.vocab_size).save(tmp_path / "m",
                                                               tokenizer=tokenizer)
    monkeypatch.setattr(lmkit.serve, "generate", fake)
    for compile in (False, True):
        client = TestClient(lmkit.serve.create_app(tmp_path / "m", device="cpu",
                                                   compile=compile))
        assert client.post("/generate", json={"prompt": "the film"}).status_code == 200
        assert seen["compile"] is compile
