"""Weight-only int8 for inference (lmkit.model.quant, `dtype="int8"`): Int8Linear against the
dequantised and the fp32 linear on each of its paths, int8 models of every family against
fp32, cached greedy decoding against the int8 model's own uncached forward, the CLI, and the
refusals (LoRA, save, convert, train) that keep int8 weights out of every checkpoint."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny, variant
from test_generate import Uncached

import lmkit
from lmkit import device as lmdevice
from lmkit.checkpoint import WEIGHTS
from lmkit.convert.hf import save_hf
from lmkit.errors import CheckpointError
from lmkit.generate import _Decoder, _pad_prompts, _Processors, _sample
from lmkit.loading import convert
from lmkit.model.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from lmkit.model.quant import KERNEL_ROWS, Int8Linear, quantize_int8
from lmkit.tokenizer import Tokenizer
from lmkit.train import TrainConfig, train

# Int8Linear's ways to compute on the CPU, (int8 kernel for few rows, bf16 matmul for many):
# the fallback of other devices, an AVX2 CPU, a CPU with native bf16.
PLANS = [(False, False), (True, False), (True, True)]


def with_plan(model: torch.nn.Module, plan: tuple[bool, bool]) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.plan = plan
    return model


def centered_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two logit tensors, each row's mean removed (softmax ignores it)."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("rows", [1, KERNEL_ROWS, 3 * KERNEL_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_the_dequantised_linear(plan, rows, bias):
    g = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=g) * 0.05)
        linear.weight[3] = 0.0  # an all-zero row: scale clamped, no 0 / 0
        if bias:
            linear.bias.copy_(torch.randn(40, generator=g))
    q = Int8Linear.quantize(linear, plan)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
    x = torch.randn(1, rows, 96, generator=g)
    deq = q.weight.float() * q.scales.float()[:, None]  # exact: int8 and bf16 fit in fp32
    with torch.no_grad():
        got, fp32 = q(x), linear(x)
    assert got.dtype == torch.float32 and got.shape == fp32.shape
    kernel = plan[0] and rows <= KERNEL_ROWS
    bf16 = kernel or plan[1]  # these paths take bf16 activations
    xs = x.bfloat16().float() if bf16 else x
    ref = F.linear(xs, deq, linear.bias)
    # fp32 path: the same sum in another order. bf16 paths: the output rounded to bf16 (and
    # scaled in bf16 on the matmul path): 2 ** -8 of the largest term.
    mag = F.linear(xs.abs(), deq.abs())
    torch.testing.assert_close(got, ref, rtol=0, atol=(2 ** -8 if bf16 else 1e-6) * mag.max())
    # Against fp32 weights: each weight is off by at most half its row's scale, so an output
    # by at most sum |x| * scale / 2; bf16 activations add 2 ** -8 of sum |x w| (rounding x,
    # and the output) and the bf16 output 2 ** -8 of |y|.
    bound = x.abs().sum(-1, keepdim=True) * q.scales.float() / 2
    if bf16:
        bound = bound + 2 ** -8 * (F.linear(x.abs(), linear.weight.abs()) + fp32.abs())
    assert ((got - fp32).abs() <= bound * 1.01 + 1e-6).all()
    # Typically: rounding errors uniform in +-scale / 2 (rms scale / sqrt 12, scale ~ 2.7
    # sigma / 127 for Gaussian rows of 96) are ~0.6% of the weights, so of the outputs.
    assert (got - fp32).norm() / fp32.norm() < 0.02


FAMILIES = {  # every family and head kind, GQA, tied and untied heads, biases
    "decoder-rotary-gqa": dict(),  # Llama-like, tied head
    "decoder-learned-gpt2": dict(),  # GPT-2-like, biases, tied head
    "decoder-untied": dict(tie_embeddings=False),
    "encoder-classification": dict(head="classification", label_names=["a", "b", "c"]),
    "seq2seq-relative-t5": dict(),
    "seq2seq-learned-bart": dict(),
}


def family_model(key: str) -> lmkit.Model:
    if key == "decoder-untied":
        return tiny("tiny-decoder", **FAMILIES[key])
    if key == "encoder-classification":
        return tiny("tiny-encoder", **FAMILIES[key])
    return variant(key)


def tiny_copy(model: lmkit.Model) -> lmkit.Model:
    copy = lmkit.Model(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("key", list(FAMILIES))
def test_int8_models_are_close_to_fp32(key, plan):
    model = family_model(key)
    torch.manual_seed(0)
    with torch.no_grad():  # a wider spread than the init's std 0.02: logits that differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    int8 = with_plan(quantize_int8(tiny_copy(model)), plan)
    assert not any(type(m) is torch.nn.Linear for m in int8.modules())
    if model.config.tied_output:  # the head has its own int8 copy; the table stays for lookups
        assert torch.equal(int8.tokens.weight, model.tokens.weight)
        assert int8.head.proj.weight.dtype == torch.int8
    ids = torch.randint(5, 500, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if model.config.family == "decoder":
        mask[1, :4] = 0  # left padding
    else:
        mask[1, 7:] = 0  # right padding
    seq2seq = model.config.family == "encoder-decoder"
    for batch in (dict(input_ids=ids, attention_mask=mask),  # many rows
                  dict(input_ids=ids[:1, :4])):  # a few: the kernel, where the plan has it
        if seq2seq:
            batch["decoder_input_ids"] = batch["input_ids"][:, :3]
        with torch.no_grad():
            assert centered_cosine(int8(**batch).logits, model(**batch).logits) > 0.99


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("key", ["decoder-rotary-gqa", "decoder-learned-gpt2",
                                 "seq2seq-relative-t5"])
def test_int8_greedy_decoding_is_its_own_uncached_argmax(key, plan):
    """The static cache with the fused int8 q/k/v gives the tokens of recomputing the whole
    sequence with the same int8 model: one prompt of 3 tokens and 5 new ones (both ways run
    at most KERNEL_ROWS rows a call, so both take the same path on every plan) and, where
    no plan has the kernel, a padded batch."""
    int8 = with_plan(quantize_int8(variant(key)), plan)
    for prompts, new in (([[5, 9, 14]], KERNEL_ROWS - 3), ([[5, 9, 14, 3, 8, 4], [7, 22]], 6)):
        if len(prompts) > 1 and plan[0]:
            continue  # a padded batch runs > KERNEL_ROWS rows uncached: another path
        ids, mask = _pad_prompts(prompts, 0, left=int8.config.family == "decoder")
        out = []
        for dec in (_Decoder(int8, ids, mask, max_new=new), Uncached(int8, ids, mask)):
            with torch.inference_mode():
                out.append(_sample(dec, new, eos=(), pad=0, greedy=True, temperature=1.0,
                                   top_k=None, top_p=None, gen=None, process=_Processors(),
                                   stream=None)[0])
        assert out[0] == out[1] and all(len(s) == new for s in out[0])
    dec = _Decoder(int8, ids, mask, max_new=2)
    dec.logits(dec.prefix)
    assert isinstance(dec.cache.self_attn[0].weights["qkv"], Int8Linear)  # fused, as int8


def test_load_int8_and_the_checkpoint_is_untouched(tmp_path):
    model = tiny("tiny-decoder")
    model.save(tmp_path / "m")
    files = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    int8 = lmkit.load(tmp_path / "m", dtype="int8")
    assert isinstance(int8.head.proj, Int8Linear) and int8.config.dtype == "float32"
    out = lmkit.generate(int8, [[5, 9, 14]], max_new_tokens=4, eos_id=-1)
    assert len(out.sequences[0]) == 4
    for dst in (tmp_path / "m", tmp_path / "new"):  # over the source or anywhere else
        with pytest.raises(CheckpointError, match="int8 weights .* never saved: load the "
                                                  "checkpoint again without dtype int8"):
            int8.save(dst)
    with pytest.raises(CheckpointError, match="never saved"):
        save_hf(int8, tmp_path / "hf")
    assert not (tmp_path / "new").exists() and not (tmp_path / "hf").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == files
    torch.testing.assert_close(lmkit.load(tmp_path / "m").state_dict(), model.state_dict())


def test_convert_and_train_refuse_int8(tmp_path):
    tiny("tiny-decoder").save(tmp_path / "m")
    with pytest.raises(ValueError, match="int8 is for inference and is never written"):
        convert(tmp_path / "m", tmp_path / "out", to="lmkit", dtype="int8")
    assert not (tmp_path / "out").exists()
    int8 = lmkit.load(tmp_path / "m", dtype="int8")
    batches = [{"input_ids": torch.randint(5, 500, (2, 8)),
                "labels": torch.randint(5, 500, (2, 8))}]
    with pytest.raises(CheckpointError, match="without dtype int8 to save, convert or train"):
        train(int8, batches, TrainConfig(steps=1), tmp_path / "run")
    with pytest.raises(ValueError, match="int8 is a weight format for inference"):
        TrainConfig(precision="int8").validate()


def test_lora_is_merged_by_load_and_refused_by_quantize(tmp_path):
    model = tiny("tiny-decoder")
    model.save(tmp_path / "base")
    apply_lora(model, LoRAConfig(rank=2, targets=("q", "v", "down")))
    for name, p in model.named_parameters():  # LoRA's B starts at zero: make it count
        if name.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.2)
    with pytest.raises(ValueError, match=r"LoRA adapters: merge them first .*merge_lora"):
        quantize_int8(model)
    save_adapter(model, tmp_path / "adapter")
    int8 = lmkit.load(tmp_path / "base", adapter=tmp_path / "adapter", dtype="int8")
    assert int8.config.lora is None
    merged = quantize_int8(merge_lora(model))
    torch.testing.assert_close(int8.state_dict(), merged.state_dict())


def test_int8_off_the_cpu_warns_once(monkeypatch):
    monkeypatch.setattr(lmdevice, "_warned", set())
    with pytest.warns(RuntimeWarning, match="dtype int8 on cuda:0 dequantises .* saves "
                                            "memory, not time"):
        lmdevice.warn_int8(torch.device("cuda", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmdevice.warn_int8(torch.device("cuda", 0))
        lmdevice.warn_int8(torch.device("cpu"))
    assert lmdevice.check_dtype("int8") == "int8"
    with pytest.raises(ValueError, match="choose auto, fp32, bf16, fp16 or int8"):
        lmdevice.check_dtype("int4")


def lmkit_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmkit.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_runs_int8_and_refuses_to_convert_to_it(tmp_path):
    """Real processes (the real CPU's plan): generate and predict with --dtype int8."""
    (tmp_path / "text.txt").write_text("the cat sat on the mat\nthe dog sat on the log\n" * 20)
    tok = Tokenizer.train([tmp_path / "text.txt"], "bpe", 300, family="decoder")
    cfg = lmkit.preset("tiny-decoder", vocab_size=tok.vocab_size)
    lmkit.Model(cfg).save(tmp_path / "lm", tokenizer=tok)
    proc = lmkit_cli("generate", tmp_path / "lm", "--prompt", "the cat", "--max-new-tokens",
                     "4", "--dtype", "int8", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("the cat")
    tok = Tokenizer.train([tmp_path / "text.txt"], "wordpiece", 60, family="encoder")
    cfg = lmkit.preset("tiny-encoder", vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                       head="classification", label_names=["neg", "pos"])
    lmkit.Model(cfg).save(tmp_path / "cls", tokenizer=tok)
    proc = lmkit_cli("predict", tmp_path / "cls", "the cat sat", "a dog", "--task",
                     "classification", "--dtype", "int8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.count('"label"') for line in proc.stdout.splitlines()] == [1, 1]
    proc = lmkit_cli("convert", tmp_path / "lm", tmp_path / "out", "--dtype", "int8",
                     cwd=tmp_path)
    assert proc.returncode != 0 and not (tmp_path / "out").exists()
    assert "int8 is for inference and is never written" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "lm" / WEIGHTS).exists()
