"""Chat templates: kept with the tokenizer both ways, rendered as transformers renders them,
applied by `lmkit.generate(messages=...)` and by `lmkit chat` (a real subprocess, piped
stdin)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import lmkit
from lmkit.errors import TokenizerError
from lmkit.loading import convert
from lmkit.tokenizer import Tokenizer

# ChatML with a default system message, loop controls, raise_exception and bos_token:
# the features real templates use.
TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\n"
    "You are helpful.<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "user", "content": "Hello there, how are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
        {"role": "user", "content": "Tell me about élan and 東京. "}]
CORPUS = "\n".join(["hello there how are you", "fine thanks tell me about it",
                    "the user and the assistant talk", "élan 東京 system helpful"] * 20)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """A tiny lmkit decoder with a BPE tokenizer that has ChatML tokens and the template."""
    root = tmp_path_factory.mktemp("chat")
    (root / "corpus.txt").write_text(CORPUS)
    tok = Tokenizer.train([root / "corpus.txt"], "bpe", 300)
    tok.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(tok.backend, {"eos": "<|im_end|>", "bos": "<|endoftext|>"})
    tok.settings.update(chat_template=TEMPLATE, model_max_length=256)
    torch.manual_seed(0)
    cfg = lmkit.preset("tiny-decoder", vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                       eos_id=tok.eos_id, pad_id=None)
    model = lmkit.Model(cfg).eval()
    with torch.no_grad():  # varied replies: an untrained model repeats one token
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.02).add_(1 if p.dim() == 1 else 0)
    model.tokenizer = tok
    lmkit.save(model, root / "model")
    return root / "model"


def test_template_kept_and_rendered_as_transformers(chat_dir, tmp_path):
    model = lmkit.load(chat_dir)
    tok = model.tokenizer
    assert tok.chat_template == TEMPLATE and tok.settings["model_max_length"] == 256
    ref = tf.AutoTokenizer.from_pretrained(chat_dir)
    for prompt in (True, False):
        text = tok.apply_chat_template(CHAT, add_generation_prompt=prompt)
        assert text == ref.apply_chat_template(CHAT, add_generation_prompt=prompt,
                                               tokenize=False)
    ids = ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False) == list(ids)
    # exported to HF and read back by lmkit: the template and settings survive
    convert(chat_dir, tmp_path / "hf")
    assert lmkit.load(tmp_path / "hf").tokenizer.chat_template == TEMPLATE
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "hf").model_max_length == 256
    with pytest.raises(TokenizerError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_file_of_transformers_is_read(chat_dir, tmp_path):
    """transformers 5 saves the template as chat_template.jinja."""
    tf.AutoTokenizer.from_pretrained(chat_dir).save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    assert Tokenizer.from_dir(tmp_path).chat_template == TEMPLATE


def test_generate_with_messages(chat_dir):
    model = lmkit.load(chat_dir)
    prompt = model.tokenizer.encode(model.tokenizer.apply_chat_template(CHAT),
                                    add_special_tokens=False)
    by_ids = lmkit.generate(model, [prompt], max_new_tokens=6)
    by_messages = lmkit.generate(model, messages=CHAT, max_new_tokens=6)
    assert by_messages.sequences == by_ids.sequences and len(by_ids.sequences[0]) > 0
    two = lmkit.generate(model, messages=[CHAT, CHAT[:1]], max_new_tokens=6)
    assert two.sequences[0] == by_ids.sequences[0]
    with pytest.raises(ValueError, match="either prompts or messages"):
        lmkit.generate(model, [prompt], messages=CHAT)


def test_stream_gets_every_token(chat_dir):
    model = lmkit.load(chat_dir)
    steps: list[int] = []
    out = lmkit.generate(model, messages=CHAT[:1], max_new_tokens=6, eos_id=-1,
                         stream=lambda t: steps.append(int(t[0])))
    assert steps == out.sequences[0] and len(steps) == 6
    with pytest.raises(ValueError, match="streaming"):
        lmkit.generate(model, messages=CHAT[:1], num_beams=2, stream=print)


def test_lmkit_chat_in_a_subprocess(chat_dir, tmp_path):
    model = lmkit.load(chat_dir)

    def reply(messages: list[dict]) -> str:
        return lmkit.generate(model, messages=messages, max_new_tokens=5).texts[0]

    first = reply([{"role": "user", "content": "hello there"}])
    history = [{"role": "user", "content": "hello there"},
               {"role": "assistant", "content": first},
               {"role": "user", "content": "tell me about it"}]
    lmkit_bin = str(Path(sys.executable).parent / "lmkit")
    run = subprocess.run([lmkit_bin, "chat", str(chat_dir), "--max-new-tokens", "5",
                          "--device", "cpu"],
                         input="hello there\n/reset\nhello there\ntell me about it\n/exit\n"
                         "never read\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{first}\n(conversation cleared)\n{first}\n{reply(history)}\n"
    # end of input (Ctrl-D) ends the session too
    run = subprocess.run([lmkit_bin, "chat", str(chat_dir), "--max-new-tokens", "5"],
                         input="hello there\n",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == f"{first}\n"
    del model.tokenizer.settings["chat_template"]  # a model without a template is refused
    lmkit.save(model, tmp_path / "plain")
    run = subprocess.run([lmkit_bin, "chat", str(tmp_path / "plain")], input="hi\n",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "has no chat template" in run.stderr
