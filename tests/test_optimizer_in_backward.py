"""optimizer_in_backward: each parameter steps in backward as soon as its gradient is ready.
The same update, schedule, logged gradient norm and checkpoints as the step after backward;
what it cannot do is refused with the fix."""

import dataclasses

import pytest
import torch

import lmkit
from lmkit.errors import ConfigError
from lmkit.finetune import FinetuneConfig, LoRAConfig, apply_scheme
from lmkit.objectives import CausalLM, MaskedLM
from lmkit.train import PretrainConfig, TrainConfig, build_optimizer, read_metrics, train
from lmkit.train.distributed import DistEnv
from lmkit.train.optim import OptimizerInBackward, clip_gradients
from lmkit.train.options import read_config

QUIET = dict(progress=False, tensorboard=False, plot=False, eval_every=0, save_every=0)
# clipping off on both paths; several groups: decay / no decay, each depth its own rate
SAME = dict(batch_size=4, lr=3e-3, warmup_steps=2, weight_decay=0.1, layer_decay=0.8,
            grad_clip=0.0, log_every=1, **QUIET)


class Batches:
    """A fixed list of batches that resumes where it stopped (state_dict/load_state_dict,
    as `train` takes for an exact resume)."""

    def __init__(self, batches: list[dict]):
        self.batches, self.index = batches, 0

    def __iter__(self):
        while self.index < len(self.batches):
            self.index += 1
            yield self.batches[self.index - 1]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def setup(family: str, steps: int, lora: bool = False) -> tuple[lmkit.Model, list[dict]]:
    """A tiny model (dropout on: its random state must follow too) and `steps` batches."""
    torch.manual_seed(0)
    name = {"decoder": "tiny-decoder", "encoder": "tiny-encoder"}[family]
    model = lmkit.Model(lmkit.preset(name, dropout=0.1))
    if lora:
        apply_scheme(model, "lora", lora=LoRAConfig(rank=2))
    objective = CausalLM() if family == "decoder" else MaskedLM(
        mask_id=4, vocab_size=512, special_ids=range(5), mask_prob=0.3, seed=0)
    g = torch.Generator().manual_seed(1)
    return model, [objective({"input_ids": torch.randint(5, 500, (4, 24), generator=g)})
                   for _ in range(steps)]


def grad_norms(out) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(out) if r["split"] == "train"]


@pytest.mark.parametrize("family,checkpointing,lora", [
    ("decoder", True, False), ("encoder", False, False), ("decoder", False, True)])
def test_same_parameters_losses_and_gradient_norms_as_the_step_after_backward(
        family, checkpointing, lora, tmp_path):
    runs = {}
    for on in (False, True):
        model, batches = setup(family, 5, lora)
        c = TrainConfig(steps=5, optimizer_in_backward=on,
                        activation_checkpointing=checkpointing, **SAME)
        runs[on] = model, train(model, Batches(batches), c, tmp_path / str(on))
    (plain, a), (hooked, b) = runs[False], runs[True]
    assert b.losses == pytest.approx(a.losses, abs=1e-6)
    assert grad_norms(tmp_path / "True") == pytest.approx(grad_norms(tmp_path / "False"),
                                                          rel=1e-5)
    moved = 0
    for (name, p), (_, q), (_, p0) in zip(plain.named_parameters(), hooked.named_parameters(),
                                          setup(family, 0, lora)[0].named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
        moved += not torch.equal(p, p0)
    assert moved == sum(p.requires_grad for p in plain.parameters())  # all trained, no more
    batch = batches[0]
    hooked(**batch).loss.backward()  # the hooks are gone after the run: plain backward
    assert all(p.grad is not None for p in hooked.parameters() if p.requires_grad)


def test_each_gradient_is_freed_as_soon_as_its_parameter_stepped():
    model, batches = setup("decoder", 1)
    params = list(model.parameters())
    hooks = OptimizerInBackward(build_optimizer(model, lr=1e-3))
    live = []  # gradients alive after each step (these hooks run after the optimizer's)
    for p in params:
        p.register_post_accumulate_grad_hook(
            lambda p: live.append(sum(q.grad is not None for q in params)))
    model(**batches[0]).loss.backward()
    assert len(live) == len(params) and set(live) == {0}
    reference, _ = setup("decoder", 1)
    reference(**batches[0]).loss.backward()
    expected = clip_gradients(reference, 0.0)  # clipping off: the global norm
    torch.testing.assert_close(hooks.grad_norm(), expected, rtol=1e-5, atol=0)
    assert float(hooks.grad_norm()) == 0.0  # the sum restarts for the next step


def test_resume_is_exact_with_or_without_the_option(tmp_path):
    """The checkpoint's optimizer state is torch's AdamW state_dict: a run with the option,
    stopped at step 5, goes on as if never stopped, resumed with the option or without it."""
    c = TrainConfig(steps=8, optimizer_in_backward=True, **SAME)
    model, batches = setup("decoder", 8)
    straight = train(model, Batches(batches), c, tmp_path / "straight")
    for on in (True, False):
        run = tmp_path / f"resumed-{on}"
        part = train(setup("decoder", 0)[0], Batches(batches), c, run, max_steps=5)
        state = torch.load(part.checkpoint / "trainer_state.pt", weights_only=False)
        assert set(state["optimizer"]) == {"state", "param_groups"}
        assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {5.0}
        torch.manual_seed(123)  # other weights: the checkpoint's replace them
        resumed = lmkit.Model(lmkit.preset("tiny-decoder", dropout=0.1))
        rest = train(resumed, Batches(batches), dataclasses.replace(
            c, optimizer_in_backward=on), run, resume=True)
        assert rest.start_step == 5 and len(rest.losses) == 3
        if on:
            assert part.losses + rest.losses == straight.losses  # exact float equality
        else:
            assert part.losses + rest.losses == pytest.approx(straight.losses, abs=1e-6)
        for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
            torch.testing.assert_close(b, a, atol=1e-6 if not on else 0, rtol=0, msg=k)


def test_a_nan_loss_stops_before_anything_is_applied(tmp_path):
    model, batches = setup("decoder", 3)
    calls = iter(range(10))
    model.tokens.register_forward_hook(  # the 3rd forward pass (step 3) gives NaN
        lambda m, i, out: out * float("nan") if next(calls) == 2 else out)
    before = {}
    c = TrainConfig(steps=3, optimizer_in_backward=True, **SAME)
    with pytest.raises(lmkit.errors.TrainingDiverged, match="loss is nan at step 3.*not "
                                                            "applied"):
        train(model, Batches(batches), c, tmp_path,
              on_step=lambda step, r: before.update(
                  {n: p.detach().clone() for n, p in model.named_parameters()}))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # the weights after step 2, untouched


def test_a_nan_gradient_with_a_finite_loss_stops_and_says_the_step_was_applied(tmp_path):
    model, batches = setup("decoder", 3)
    calls = iter(range(10))
    first = next(p for name, p in model.named_parameters() if ".0." in name)
    first.register_hook(  # its gradient at step 2 is NaN
        lambda grad: grad * float("nan") if next(calls) == 1 else grad)
    c = TrainConfig(steps=3, optimizer_in_backward=True, **{**SAME, "save_every": 1})
    with pytest.raises(lmkit.errors.TrainingDiverged, match="gradient norm is nan at step 2.*"
                       "had applied that step.*last good checkpoint is .*step-1"):
        train(model, Batches(batches), c, tmp_path)


@pytest.mark.parametrize("change,fix", [
    ({"grad_clip": 1.0}, "set grad_clip: 0"),
    ({"grad_accum": 2}, "set grad_accum: 1"),
    ({"sparse_embeddings": True}, "set sparse_embeddings: false"),
])
def test_what_it_cannot_do_is_refused_with_the_fix(change, fix):
    fields = {"optimizer_in_backward": "true", "grad_clip": "0", **change}
    for cls in (PretrainConfig, FinetuneConfig):  # --set and YAML go through read_config
        with pytest.raises(ConfigError, match=f"{fix}.* or drop optimizer_in_backward"):
            read_config(cls, None, fields)
    assert read_config(PretrainConfig, None, {"optimizer_in_backward": "true",
                                              "grad_clip": "0"}).optimizer_in_backward


def test_torchrun_is_refused(monkeypatch, tmp_path):
    """Under torchrun DDP all-reduces gradients after backward, FSDP shards them: both need
    them whole, after the hooks would have stepped. (The process group is not joined: the
    check comes first.)"""
    monkeypatch.setattr("lmkit.train.loop.init_distributed",
                        lambda device: DistEnv(rank=0, world_size=2))
    model, batches = setup("decoder", 1)
    c = TrainConfig(steps=1, optimizer_in_backward=True, **SAME)
    with pytest.raises(ConfigError, match="optimizer_in_backward runs in one process"):
        train(model, Batches(batches), c, tmp_path)
