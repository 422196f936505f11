"""`lmkit serve`: the FastAPI app answers what the Python API answers."""

from __future__ import annotations

import pytest
from conftest import tiny
from fastapi.testclient import TestClient

import lmkit
from lmkit.generation_config import GenerationConfig
from lmkit.serve import create_app
from lmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("serve") / "corpus.txt"
    corpus.write_text("the film was good and the plot was bad\n" * 30)
    return Tokenizer.train([corpus], "wordpiece", 60, family="encoder")


def test_generate_endpoint(tmp_path, tokenizer):
    model = tiny("tiny-decoder", vocab_size=tokenizer.vocab_size)
    model.generation_config = GenerationConfig(max_new_tokens=3)
    model.save(tmp_path / "dec", tokenizer=tokenizer)
    client = TestClient(create_app(tmp_path / "dec", device="cpu"))
    assert client.get("/health").json()["head"] == "lm"
    body = {"prompt": ["the film", "a plot"], "max_new_tokens": 5, "do_sample": True,
            "seed": 3, "num_return_sequences": 2}
    answer = client.post("/generate", json=body)
    assert answer.status_code == 200, answer.text
    expected = lmkit.generate(lmkit.load(tmp_path / "dec"), body.pop("prompt"), **body)
    assert answer.json() == {"texts": expected.texts, "scores": pytest.approx(expected.scores)}
    plain = client.post("/generate", json={"prompt": "the film"})  # the checkpoint's options
    stored = lmkit.generate(lmkit.load(tmp_path / "dec"), "the film")
    assert len(stored.sequences[0]) <= 3  # scores sum over the new tokens: 3, not 32
    assert plain.json() == {"texts": stored.texts, "scores": pytest.approx(stored.scores)}
    bad = client.post("/generate", json={"prompt": "the", "top_p": 2})
    assert bad.status_code == 400 and "top_p must be in (0, 1]" in bad.json()["detail"]


def test_predict_endpoint(tmp_path, tokenizer):
    model = tiny("tiny-encoder", vocab_size=tokenizer.vocab_size, head="classification",
                 label_names=["neg", "pos"])
    model.save(tmp_path / "cls", tokenizer=tokenizer)
    client = TestClient(create_app(tmp_path / "cls", device="cpu"))
    texts = ["the film was good", "the plot was bad"]
    answer = client.post("/predict", json={"inputs": texts})
    assert answer.status_code == 200, answer.text
    expected = lmkit.pipeline(None, tmp_path / "cls", device="cpu")(texts)
    assert answer.json()["predictions"] == expected  # JSON keeps floats exactly
    assert client.post("/generate", json={"prompt": "the"}).status_code == 400  # no LM head
