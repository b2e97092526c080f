"""Autoregressive evaluators for generative perplexity: score texts by next-token NLL.

Two kinds of model directory are accepted:

- this project's AR baseline (``save_pretrained`` directory whose ``config.json`` says ``model_type: ar``; also
  ``models:/`` and ``runs:/`` URIs and fsspec URLs through :func:`mdlm.hub.resolve_model_dir`), with its own
  ``tokenizer.json``;
- any **local** Hugging Face causal-LM directory, loaded with ``transformers`` (``AutoModelForCausalLM`` and
  ``AutoTokenizer``, ``local_files_only=True``, ``trust_remote_code=False``, safetensors weights when present).
  ``transformers`` is imported only then (``pip install 'mdlm[eval]'``).

Texts are re-tokenized by the evaluator's tokenizer and preceded by a context token (the project model's BOS;
a Hugging Face tokenizer's BOS, else its EOS, as GPT-2's ``<|endoftext|>``), so every text token is scored;
without one the first token is context only. A sequence longer than the evaluator's context W is scored in
sliding windows of W tokens advanced by a stride S (default W // 2): the first window scores all its tokens,
each later one only the tokens past the previous window, each with at least W - S tokens of context. Every
token is scored exactly once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mdlm.config import MODEL_KINDS
from mdlm.eval import EvalInputError

HF_EXTRA = "pip install 'mdlm[eval]'  (transformers)"


def scoring_windows(length: int, max_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first)`` over ``length`` ids: the model reads ids[begin:end] and scores the
    positions first..end-1 (each predicted from the ids before it). Positions 1..length-1 are scored exactly once;
    a window after the first starts ``stride`` after the previous one (default ``max_length // 2``)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, {max_length - 1}], got {stride}")
    if length < 2:
        return []
    windows = [(0, min(length, max_length), 1)]
    while windows[-1][1] < length:
        begin = windows[-1][0] + stride
        windows.append((begin, min(begin + max_length, length), windows[-1][1]))
    return windows


class ARScorer:
    """Next-token NLL of texts under an autoregressive model (subclasses supply ``encode`` and ``logits``)."""

    name: str
    kind: str
    max_length: int
    device: torch.device

    def __init__(self, stride: int | None = None) -> None:
        self.stride = stride

    def encode(self, text: str) -> list[int]:
        """Context token (if any) followed by the text's token ids."""
        raise NotImplementedError

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits [B, L, V] for right-padded ``input_ids``."""
        raise NotImplementedError

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(NLL sum in nats, number of scored tokens) per sequence; position 0 is context only."""
        segments = [(i, begin, end, first) for i, ids in enumerate(sequences)
                    for begin, end, first in scoring_windows(len(ids), self.max_length, self.stride)]
        nll = np.zeros(len(sequences), dtype=np.float64)
        counts = np.zeros(len(sequences), dtype=np.int64)
        for start in range(0, len(segments), batch_size):
            chunk = segments[start:start + batch_size]
            width = max(end - begin for _, begin, end, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            scored = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
            for row, (i, begin, end, first) in enumerate(chunk):
                ids[row, :end - begin] = torch.as_tensor(list(sequences[i][begin:end]), dtype=torch.long)
                mask[row, :end - begin] = 1
                scored[row, first - begin - 1:end - begin - 1] = True  # targets first..end-1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.logits(ids, mask)[:, :-1].float()
            token_nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            token_nll = (token_nll.view(len(chunk), -1).double().cpu() * scored).sum(dim=-1)
            for row, (i, *_rest) in enumerate(chunk):
                nll[i] += float(token_nll[row])
                counts[i] += int(scored[row].sum())
        return nll, counts

    def score_texts(self, texts: Sequence[str], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(NLL sum, scored tokens) per text, re-tokenized by this evaluator's tokenizer."""
        return self.score_ids([self.encode(text) for text in texts], batch_size)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "max_length": self.max_length,
                "stride": self.stride or max(1, self.max_length // 2)}


class ProjectARScorer(ARScorer):
    """This project's autoregressive baseline (:class:`mdlm.modeling.ARModel`)."""

    kind = "mdlm-ar"

    def __init__(self, model, name: str, stride: int | None = None, max_length: int | None = None) -> None:
        super().__init__(stride)
        if model.tokenizer is None:
            raise EvalInputError("gen.evaluator", "the AR model has no tokenizer.json to re-tokenize texts with",
                                 value=name)
        self.model, self.name, self.device = model.eval(), name, model.device
        self.max_length = min(max_length or model.config.max_seq_len, model.config.max_seq_len)

    def encode(self, text: str) -> list[int]:
        return self.model.encode_prompt(text)

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.backbone(input_ids, None, attention_mask)


class HFCausalLMScorer(ARScorer):
    """A local Hugging Face causal LM and its tokenizer."""

    kind = "huggingface"

    def __init__(self, model, tokenizer, name: str, stride: int | None = None, max_length: int | None = None) -> None:
        super().__init__(stride)
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.device = next(model.parameters()).device
        config = model.config
        context = next((getattr(config, key) for key in ("n_positions", "max_position_embeddings", "n_ctx")
                        if isinstance(getattr(config, key, None), int)), None)
        if context is None and tokenizer.model_max_length and tokenizer.model_max_length < 10**7:
            context = int(tokenizer.model_max_length)
        if context is None and max_length is None:
            raise EvalInputError("gen.evaluator", "cannot tell the model's context length from its config; give "
                                 "max_length (gen.evaluator_max_length) explicitly", value=name)
        self.max_length = min(x for x in (context, max_length) if x)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.context_ids = [] if bos is None else [int(bos)]

    def encode(self, text: str) -> list[int]:
        return self.context_ids + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def evaluator_kind(local_dir: str | os.PathLike[str], name: str | None = None) -> str:
    """'mdlm-ar' or 'huggingface' for a local evaluator directory; :class:`EvalInputError` naming it otherwise."""
    root = Path(local_dir)
    label = name or str(root)
    config_path = root / "config.json"
    if not root.is_dir():
        raise EvalInputError("gen.evaluator", "directory not found", value=label)
    if not config_path.is_file():
        raise EvalInputError("gen.evaluator", "no config.json (not a model directory)", value=label)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalInputError("gen.evaluator", f"config.json is not valid JSON ({exc})", value=label) from None
    if not isinstance(config, dict):
        raise EvalInputError("gen.evaluator", "config.json is not a JSON object", value=label)
    if "format_version" in config and config.get("model_type") in MODEL_KINDS:
        if config["model_type"] != "ar":
            raise EvalInputError("gen.evaluator", "holds a masked diffusion model; the evaluator must be "
                                 "autoregressive (this project's AR baseline or a Hugging Face causal LM)",
                                 value=label)
        return "mdlm-ar"
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise EvalInputError("gen.evaluator", f"a Hugging Face model directory needs transformers: {HF_EXTRA}",
                             value=label) from None
    if not any(root.glob("*.safetensors")) and not any(root.glob("*.bin")):
        raise EvalInputError("gen.evaluator", "no weights (*.safetensors or *.bin) in the directory", value=label)
    return "huggingface"


def resolve_evaluator_dir(uri: str | os.PathLike[str]) -> Path:
    """A local directory for an evaluator URI: local paths as they are; ``models:/``, ``runs:/`` and fsspec URLs
    through :func:`mdlm.hub.resolve_model_dir` (this project's model format)."""
    from mdlm.hub import resolve_model_dir

    try:
        return resolve_model_dir(uri)
    except Exception as exc:  # MLflow or fsspec: unknown model, unreachable store
        raise EvalInputError("gen.evaluator", f"cannot be resolved ({str(exc).splitlines()[0]})",
                             value=str(uri)) from None


def load_scorer(local_dir: str | os.PathLike[str], device: str | torch.device = "cpu", *, name: str | None = None,
                max_length: int | None = None, stride: int | None = None) -> ARScorer:
    """Load the evaluator in a local directory (see :func:`evaluator_kind`) onto ``device``."""
    root = Path(local_dir)
    name = name or str(root)
    kind = evaluator_kind(root, name)
    if kind == "mdlm-ar":
        from mdlm.modeling import load_pretrained

        return ProjectARScorer(load_pretrained(root, map_location=device), name, stride, max_length)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    options = {"local_files_only": True, "trust_remote_code": False}
    safetensors = any(root.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(str(root), **options)
    model = AutoModelForCausalLM.from_pretrained(str(root), use_safetensors=safetensors, **options)
    return HFCausalLMScorer(model.to(device), tokenizer, name, stride, max_length)
