"""The model card (``README.md``) of a saved model directory, as the Hugging Face Hub shows it.

A YAML header (library, pipeline tag, tags) and sections for the architecture, parameter count, noise process,
tokenizer, data and training figures. What the model itself holds comes from its config; what only the saving
code knows (the corpus, the steps, the validation figures) comes in a :class:`ModelCardInfo`. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from mdlm.config import Config, ModelConfig, NoiseConfig
from mdlm.data.tokenizer import model_role_ids

CARD_NAME = "README.md"

DESCRIPTIONS = {
    "mdlm": "A masked diffusion language model (MDLM; Sahoo et al. 2024, arXiv 2406.07524): absorbing-state "
            "forward process, SUBS parameterization, trained on the Rao-Blackwellized NELBO.",
    "sedd": "SEDD absorbing (Lou et al. 2024, arXiv 2310.16834) on the MDLM backbone: log concrete scores trained "
            "with the diffusion-weighted denoising score entropy.",
    "d3pm": "D3PM absorbing (Austin et al. 2021, arXiv 2107.03006) on the MDLM backbone: the T-step ELBO with a "
            "softmax over the whole vocabulary.",
    "ar": "The autoregressive baseline of MDLM (Sahoo et al. 2024): the same transformer with causal attention and "
          "a next-token loss.",
}


@dataclass(frozen=True)
class ModelCardInfo:
    """What the card says beyond the model's own config: where it lives, what it was trained on, its figures."""

    repo_id: str | None = None  # the Hub repo, for the loading snippet
    dataset: str | None = None  # the corpus (``data.source``)
    tokenizer: str | None = None  # how the tokenizer was made (``data.tokenizer``)
    training: Mapping[str, Any] = field(default_factory=dict)  # e.g. steps, tokens seen, batch size
    metrics: Mapping[str, float] = field(default_factory=dict)  # e.g. val_nelbo, val_ppl_bound

    @classmethod
    def from_training(cls, config: Config, *, steps: int, metrics: Mapping[str, float],
                      tokens_seen: float | None = None, workers: int = 1) -> ModelCardInfo:
        """The card of a model trained with ``config`` for ``steps`` optimizer steps, with its final ``metrics``."""
        t = config.training
        training: dict[str, Any] = {"optimizer steps": steps}
        if tokens_seen is not None:
            training["tokens seen"] = int(tokens_seen)
        training.update({"global batch (rows)": t.global_batch_size, "peak learning rate": t.lr,
                         "warmup steps": t.warmup_steps, "EMA decay": t.ema_decay, "precision": t.precision,
                         "workers": workers})
        return cls(dataset=config.data.source, tokenizer=config.data.tokenizer, training=training,
                   metrics=dict(metrics))


def _figure(value: Any) -> str:
    """A table cell: numbers with thousands separators or 4 significant digits, anything else as code."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        cell = str(value).replace("|", "\\|")  # a bare | would end the table cell, even inside code
        return f"`{cell}`"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1):
        return f"{int(value):,}"
    return f"{value:.4g}"


def _table(rows: Mapping[str, Any]) -> list[str]:
    return ["| | |", "| --- | --- |", *(f"| {name} | {_figure(value)} |" for name, value in rows.items())]


def render_model_card(*, model_type: str, model_config: ModelConfig, noise_config: NoiseConfig | None,
                      num_parameters: int, special_tokens: Mapping[str, str] | None = None,
                      info: ModelCardInfo | None = None) -> str:
    """The ``README.md`` text of a model directory. ``special_tokens`` maps Hugging Face roles to tokens (None: the
    model was saved without a tokenizer)."""
    info = info or ModelCardInfo()
    c = model_config
    tags = ["mdlm", *([model_type] if model_type != "mdlm" else []),
            "autoregressive" if model_type == "ar" else "diffusion-language-model"]
    header: dict[str, Any] = {"library_name": "mdlm", "pipeline_tag": "text-generation", "tags": tags}
    if info.dataset and info.dataset.startswith("hf:"):
        header["datasets"] = [info.dataset[3:].split(":")[0]]
    where = info.repo_id or "path/to/model"
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {info.repo_id or model_type.upper() + ' model'}", "", DESCRIPTIONS[model_type], "",
             "## Architecture", "",
             *_table({"model type": model_type, "parameters": num_parameters,
                      "parameters without the input embedding": num_parameters - c.vocab_size * c.hidden_size,
                      "transformer blocks": c.n_layers, "hidden size": c.hidden_size, "attention heads": c.n_heads,
                      "time-conditioning dim": c.cond_dim, "MLP ratio": c.mlp_ratio,
                      "context length (tokens)": c.max_seq_len, "vocabulary (with [MASK])": c.vocab_size,
                      "time conditioning": c.time_conditioning, "attention": "causal" if model_type == "ar" else
                      "bidirectional", "position embedding": f"rotary (base {c.rope_base:g})"}), ""]
    if noise_config is not None:
        lines += ["## Noise process", "",
                  *_table({"schedule": noise_config.schedule, "time": noise_config.time,
                           **({"steps (T)": noise_config.num_timesteps} if noise_config.time == "discrete" else {}),
                           "t sampled from": f"U[{noise_config.sampling_eps:g}, 1]"}), ""]
    lines += ["## Tokenizer", ""]
    if special_tokens is None:
        lines += ["Saved without a tokenizer: the model takes and returns token ids.", ""]
    else:
        made = f" ({info.tokenizer})" if info.tokenizer else ""
        ids = model_role_ids(c)
        lines += [f"`tokenizer.json`{made}, {c.vocab_size:,} tokens; `tokenizer_config.json` and "
                  "`special_tokens_map.json` let `transformers.AutoTokenizer.from_pretrained` load it.", "",
                  *_table({role: f"{token} (id {ids[role]})" if ids.get(role) is not None else token
                           for role, token in special_tokens.items()}), ""]
    if info.dataset:
        lines += ["## Data", "", f"Trained on `{info.dataset}`, rows of {c.max_seq_len} tokens.", ""]
    if info.training or info.metrics:
        lines += ["## Training", "", *_table({**info.training, **info.metrics}), ""]
    lines += ["## Use", "", "```python", "import mdlm", "", f'model = mdlm.load_pretrained("{where}")',
              'print(model.generate("ROMEO.", num_samples=1, length=64)[0])' if special_tokens is not None else
              "tokens = model.sample(num_samples=1).tokens", "```", "",
              "The weights are `model.safetensors` (no pickled code); `config.json` holds the model and noise "
              "configuration that `mdlm` reads. No remote code is needed.", ""]
    return "\n".join(lines)
