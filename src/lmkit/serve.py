"""`lmkit serve CHECKPOINT`: a model over HTTP (FastAPI; the `serve` extra).

    POST /generate  {"prompt": "Once upon" | [...], "max_new_tokens": 32, "do_sample": false,
                     "temperature": 1.0, "top_k": null, "top_p": null, "seed": null,
                     "num_beams": 1, "num_return_sequences": 1}
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
from pathlib import Path
from typing import Any

from lmkit.errors import require
from lmkit.finetune.inference import pipeline
from lmkit.generate import generate


def create_app(checkpoint: str | Path, task: str | None = None, *, device: str = "auto",
               dtype: str | None = "auto") -> Any:
    """A FastAPI app serving `checkpoint` (any folder `lmkit.pipeline` reads)."""
    fastapi = require("fastapi", "serve", "lmkit serve")
    pydantic = require("pydantic", "serve", "lmkit serve")

    class GenerateRequest(pydantic.BaseModel):
        prompt: str | list[str]
        max_new_tokens: int = 32
        do_sample: bool = False
        temperature: float = 1.0
        top_k: int | None = None
        top_p: float | None = None
        seed: int | None = None
        num_beams: int = 1
        length_penalty: float = 1.0
        num_return_sequences: int = 1

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
            out = generate(model, request.prompt, **request.model_dump(exclude={"prompt"}))
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
