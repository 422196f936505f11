"""`lmkit serve CHECKPOINT`: a model over HTTP (FastAPI; the `serve` extra).

    POST /generate  {"prompt": "Once upon" | [...], and any of `lmkit.generate`'s options:
                     "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed",
                     "num_beams", "num_return_sequences", ... (left out: the model's
                     generation_config, then lmkit.generate.DEFAULTS)}
                    -> {"texts": [...], "scores": [...]}  (n consecutive answers per prompt)
    POST /predict   {"inputs": "text" | [...]} -> {"predictions": [...]}  (the task's, as
                     `lmkit predict` writes them)
    GET  /health    -> {"model": CHECKPOINT, "task": ..., "head": ...}

The model is loaded once (`lmkit.pipeline`); the endpoints call `lmkit.generate` and the
pipeline, so they answer exactly what the Python API and the CLI answer. Bad input is a 400
with lmkit's one-line message.
"""

# No `from __future__ import annotations`: FastAPI reads the request classes, defined inside
# create_app, from the endpoints' live annotations.
import typing
from pathlib import Path
from typing import Any

from lmkit.errors import require
from lmkit.finetune.inference import pipeline
from lmkit.generate import DEFAULTS, generate


def request_options() -> dict[str, tuple[Any, None]]:
    """`generate`'s options as request fields, typed as `generate` types them and None when
    left out, so that what a request leaves out comes from the model's generation_config
    (then `DEFAULTS`), as in the Python API and the CLI."""
    hints = typing.get_type_hints(generate)
    return {name: (hints[name], None) for name in hints if name in DEFAULTS or name == "seed"}


def create_app(checkpoint: str | Path, task: str | None = None, *, device: str = "auto",
               dtype: str | None = "auto", compile: bool = False) -> Any:
    """A FastAPI app serving `checkpoint` (any folder `lmkit.pipeline` reads); `compile`:
    /generate decodes with `generate(..., compile=True)`."""
    fastapi = require("fastapi", "serve", "lmkit serve")
    pydantic = require("pydantic", "serve", "lmkit serve")

    GenerateRequest = pydantic.create_model(  # noqa: N806 (a class)
        "GenerateRequest", prompt=(str | list[str], ...), **request_options())

    class PredictRequest(pydantic.BaseModel):
        inputs: str | list[str]

    runner = pipeline(task, checkpoint, device=device, dtype=dtype)
    model = runner.model
    app = fastapi.FastAPI(title="lmkit", description=f"serving {checkpoint}")

    def bad_input(e: ValueError) -> Any:
        return fastapi.HTTPException(400, " ".join(str(e).split()))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"model": str(checkpoint), "task": runner.task.name, "head": model.config.head}

    @app.post("/generate")
    def generate_text(request: GenerateRequest) -> dict[str, Any]:
        try:
            out = generate(model, request.prompt, **request.model_dump(exclude={"prompt"}),
                           compile=compile)
        except ValueError as e:
            raise bad_input(e) from None
        return {"texts": out.texts, "scores": out.scores}

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        try:
            predictions = runner(request.inputs)
        except ValueError as e:
            raise bad_input(e) from None
        return {"predictions": predictions}

    return app
