"""An exported model as an MLflow 3 pyfunc model: ``mlflow.pyfunc.load_model("models:/mdlm@current").predict(...)``.

The MLflow model holds the export folder (``config.json``, ``model.safetensors``, ``tokenizer.json``) as its
``model`` artifact and a "model from code" (:mod:`mdlm.mlflow_model_code`): no pickled object, no torch module
serialised, the weights load with safetensors. Input: prompts (a list of strings, a string, or a DataFrame /
Series whose first column holds them; an empty string generates unconditionally); output: one generated text per
prompt. Generation settings are pyfunc params (``steps``, ``length``, ``sampler``, ``top_p``, ``seed``), defaults
from the training config's ``sampling`` section and bounded like the service's requests.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from mdlm.hub import MLFLOW_MODEL_ARTIFACT as ARTIFACT
from mdlm.hub import TOKENIZER_NAME
from mdlm.output import mlflow_notices
from mdlm.tracking import fluent_tracking_uri

CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
MAX_PROMPTS = 64
MAX_STEPS = 4096
INPUT_EXAMPLE = ["ROMEO."]


class PyfuncInputError(ValueError):
    """Bad pyfunc input or params; the message names the field."""


def _prompts(model_input: Any) -> list[str]:
    """Prompts from what ``predict`` accepts: a string, a list of strings, a pandas DataFrame (first column) or
    Series, a numpy array."""
    if isinstance(model_input, str):
        values: list[Any] = [model_input]
    elif hasattr(model_input, "iloc") and hasattr(model_input, "columns"):  # DataFrame
        values = model_input.iloc[:, 0].tolist() if len(model_input.columns) else []
    elif hasattr(model_input, "tolist"):  # Series, ndarray
        values = list(model_input.tolist())
    else:
        values = list(model_input)
    if not values or len(values) > MAX_PROMPTS:
        raise PyfuncInputError(f"prompts: give 1 to {MAX_PROMPTS} prompts, got {len(values)}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise PyfuncInputError(f"prompts[{i}]: expected a string, got {type(value).__name__}")
    return values


class GeneratePyfunc(mlflow.pyfunc.PythonModel):
    """Prompts in, generated texts out, through the model's own ``generate``."""

    def load_context(self, context) -> None:
        from mdlm.modeling import load_pretrained

        self.model = load_pretrained(context.artifacts[ARTIFACT])
        self.model.eval()

    # The signature (a string column) makes MLflow hand ``predict`` a DataFrame; annotated so, MLflow neither warns
    # that the hint is missing nor adds a type-hint validation of its own.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        model = self.model
        params = dict(params or {})
        steps = int(params.get("steps", 128))
        length = int(params.get("length", 0)) or model.config.max_seq_len
        top_p = float(params.get("top_p", 1.0))
        seed = int(params.get("seed", -1))
        if not 1 <= steps <= MAX_STEPS:
            raise PyfuncInputError(f"steps: must be in [1, {MAX_STEPS}], got {steps}")
        if not 1 <= length <= model.config.max_seq_len:
            raise PyfuncInputError(f"length: must be in [1, {model.config.max_seq_len}], got {length}")
        if not 0 < top_p <= 1:
            raise PyfuncInputError(f"top_p: must be in (0, 1], got {top_p}")
        kwargs: dict[str, Any] = {"top_p": top_p}
        if model.model_type != "ar":
            sampler = str(params.get("sampler") or model.samplers[0])
            if sampler not in model.samplers:
                raise PyfuncInputError(f"sampler: {sampler!r} is not one of {', '.join(model.samplers)}")
            kwargs.update(sampler=sampler, steps=steps)
        texts = []
        for i, prompt in enumerate(_prompts(model_input)):  # prompt i draws with seed + i (reproducible per row)
            texts += model.generate(prompt or None, num_samples=1, length=length,
                                    seed=seed + i if seed >= 0 else None, **kwargs)
        return texts


def requirements() -> list[str]:
    """What loading the model needs: this package and the versions of its model-side dependencies installed here."""
    out = []
    for name in ("mdlm", "torch", "tokenizers", "safetensors", "mlflow"):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def log_pyfunc_model(tracking_uri: str, run_id: str, export_dir: str | os.PathLike[str], *,
                     sampling: dict[str, Any], metrics: dict[str, float] | None = None,
                     registered_name: str | None = None, alias: str | None = None) -> dict[str, Any]:
    """Log ``export_dir`` as the run's pyfunc model ``model`` (a LoggedModel with a signature and an input
    example, the run's final ``metrics`` linked to it as ``final_<name>``) and, with ``registered_name``,
    register it and point ``alias`` at the new version. Returns ``model_uri``, ``model_id`` and ``version``."""
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    params = {"steps": int(sampling.get("steps") or 128), "length": int(sampling.get("length") or 0),
              "sampler": str(sampling.get("sampler") or ""), "top_p": float(sampling.get("top_p", 1.0)),
              "seed": -1}
    signature = infer_signature(INPUT_EXAMPLE, ["generated text"], params=params)
    # MLflow checks the example by loading the model and predicting; a model without a tokenizer takes no text.
    example = (INPUT_EXAMPLE, {**params, "steps": 8, "seed": 0}) if Path(export_dir, TOKENIZER_NAME).is_file() else None
    with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT, python_model=str(CODE_FILE), artifacts={ARTIFACT: str(Path(export_dir).absolute())},
            signature=signature, input_example=example, pip_requirements=requirements())
        if metrics:  # as new keys (final_*), so the run's own step histories keep each step once
            step = int(metrics.get("step", 0))
            mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items() if k != "step"}, step=step,
                               model_id=info.model_id)
        version = None
        if registered_name:
            with mlflow_notices():  # "Successfully registered model ...": with MLflow's INFO records only
                version = mlflow.register_model(info.model_uri, registered_name).version
            if alias:
                MlflowClient(tracking_uri).set_registered_model_alias(registered_name, alias, version)
    return {"model_uri": info.model_uri, "model_id": info.model_id,
            "version": None if version is None else str(version)}

