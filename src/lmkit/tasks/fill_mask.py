"""Fill-mask: what a masked-LM checkpoint predicts for its mask token (inference only; a
masked LM is trained with `lmkit pretrain`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmkit.model import Model, eval_mode
from lmkit.tasks.task import Task, TaskOptions

MASK_SPELLINGS = ("[MASK]", "<mask>")


@dataclass
class FillMaskOptions(TaskOptions):
    top_k: int = 5  # fillings per mask


class FillMaskTask(Task):
    name, head = "fill-mask", "mlm"
    families = ("encoder",)
    Options = FillMaskOptions

    def features(self, example: object) -> dict:
        raise ValueError("fill-mask is inference only: train a masked LM with `lmkit pretrain`")

    @torch.no_grad()
    def predict(self, model: Model, inputs: Sequence[str], batch_size: int = 32) -> list:
        """For each text with one or more mask tokens ([MASK] or <mask>), the `top_k` (option,
        default 5) fillings of each mask: {"token", "token_id", "score", "sequence"}."""
        mask_id = self.tok.mask_id
        mask = self.tok.id_to_token(mask_id) if mask_id is not None else None
        if mask is None:
            raise ValueError("this tokenizer has no mask token: not a masked-LM checkpoint")
        k = self.options.top_k
        device = next(model.parameters()).device
        with eval_mode(model):
            return [self._fill(model, text, mask, mask_id, k, device) for text in inputs]

    def _fill(self, model: Model, text: str, mask: str, mask_id: int, k: int,
              device: torch.device) -> list:
        for spelling in MASK_SPELLINGS:
            text = text.replace(spelling, mask)
        ids = self.truncate(self.tok.encode(text))
        where = [i for i, t in enumerate(ids) if t == mask_id]
        if not where:
            raise ValueError(f"no {mask} in {text!r}: put one where a word should go")
        probs = model(torch.tensor([ids], device=device)).logits[0].float().softmax(-1)
        per_mask = []
        for pos in where:
            top = probs[pos].topk(k)
            per_mask.append([{"token": self.tok.decode([int(t)]).strip(),
                              "token_id": int(t), "score": float(p),
                              "sequence": self.tok.decode(ids[:pos] + [int(t)]
                                                          + ids[pos + 1:])}
                             for p, t in zip(top.values, top.indices)])
        return per_mask[0] if len(per_mask) == 1 else per_mask
