"""The user-facing models: ``MDLM`` (masked diffusion) and ``ARModel`` (the autoregressive baseline).

Both wrap the same DiT backbone and add their objective, sampling, text generation and the
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` directory format (local paths, URLs, MLflow URIs and
Hugging Face Hub repo ids).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from mdlm.config import KIND_SAMPLERS, ConfigError, ModelConfig, NoiseConfig, SamplingConfig
from mdlm.diffusion.d3pm import D3PMObjective, d3pm_unmask_prob
from mdlm.diffusion.objective import (
    LossOutput,
    MaskedDiffusionObjective,
    NextTokenObjective,
    SequenceNLL,
    subs_log_probs,
    subs_masked_nll,
    zero_masked_log_probs,
    zero_masked_nll,
)
from mdlm.diffusion.schedules import get_schedule
from mdlm.diffusion.sedd import analytic_unmask_prob, euler_unmask_prob, log_ratios, score_entropy
from mdlm.hf_hub import check_repo_id, upload_dir
from mdlm.hub import read_model_dir, write_model_dir
from mdlm.model_card import ModelCardInfo
from mdlm.models.dit import DiT, PrefixKV
from mdlm.sampling.categorical import resolve_dtype, sample_categorical, top_p_filter
from mdlm.sampling.samplers import SampleOutput, UnmaskRule, run_sampler, semi_autoregressive_sample

IdsLike = Tensor | Sequence[int] | Sequence[Sequence[int]]


class _PretrainedModel(nn.Module):
    model_type: str
    objective: MaskedDiffusionObjective | NextTokenObjective
    config: ModelConfig
    noise_config: NoiseConfig | None
    tokenizer: Tokenizer | None

    def save_pretrained(self, path: str | os.PathLike[str], state_dict: dict[str, Tensor] | None = None, *,
                        card: ModelCardInfo | None = None) -> None:
        """Write ``config.json``, ``model.safetensors``, the model card ``README.md`` (``card``: data, training
        figures) and the tokenizer files (if any) to ``path``, atomically."""
        write_model_dir(path, model_type=self.model_type, model_config=self.config, noise_config=self.noise_config,
                        state_dict=state_dict if state_dict is not None else self.state_dict(),
                        tokenizer=self.tokenizer, card=card)

    def push_to_hub(self, repo_id: str, *, card: ModelCardInfo | None = None, private: bool | None = None,
                    revision: str | None = None, token: str | None = None, commit_message: str | None = None,
                    state_dict: dict[str, Tensor] | None = None) -> str:
        """Save to a temporary directory (as :meth:`save_pretrained`, the card naming ``repo_id``) and upload it as
        the Hugging Face Hub model repo ``repo_id`` (created if needed; its files become exactly these). Returns
        the commit URL. ``from_pretrained(repo_id)`` loads it back."""
        card = dataclasses.replace(card or ModelCardInfo(), repo_id=check_repo_id(repo_id))
        with tempfile.TemporaryDirectory(prefix="mdlm-push-") as tmp:
            folder = Path(tmp) / "model"
            self.save_pretrained(folder, state_dict=state_dict, card=card)
            return upload_dir(folder, repo_id, revision=revision, private=private, token=token,
                              commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *,
                        revision: str | None = None):
        """Load a model directory: a local path, an fsspec URL, an MLflow URI or a Hugging Face Hub repo id
        (``owner/name``, at ``revision``)."""
        parts = read_model_dir(path, map_location, revision=revision)
        if parts["model_type"] != cls.model_type:
            raise ValueError(f"{path} holds a '{parts['model_type']}' model, not '{cls.model_type}'; "
                             "use mdlm.load_pretrained to load either")
        return cls._from_parts(parts)

    @classmethod
    def _from_parts(cls, parts: dict[str, Any]):
        kwargs = {"tokenizer": parts["tokenizer"]}
        if cls.model_type != "ar":
            kwargs["noise"] = parts["noise_config"]
        model = cls(parts["model_config"], **kwargs)
        model.load_state_dict(parts["state_dict"], strict=True)
        weights = next(iter(parts["state_dict"].values()), None)
        if weights is not None:
            model.to(weights.device)
        return model.eval()

    @torch.no_grad()
    def sequence_nll(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, mc_samples: int = 1,
                     generator: torch.Generator | Sequence[torch.Generator] | None = None) -> SequenceNLL:
        """Per-sequence NELBO terms (MDLM, K Monte-Carlo samples) or exact NLL (AR) in eval mode, without
        gradients: the objective's ``sequence_nll`` on this model's backbone (see
        :func:`mdlm.diffusion.objective.sequence_nelbo`)."""
        was_training = self.training
        self.eval()
        try:
            return self.objective.sequence_nll(self.backbone, input_ids, attention_mask, mc_samples=mc_samples,
                                               generator=generator)
        finally:
            self.train(was_training)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids to sample(), or attach one with "
                             "model.tokenizer = tokenizers.Tokenizer.from_file(...)")
        return self.tokenizer

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt, preceded by [BOS] when the model has one (training rows start with it)."""
        ids = self._require_tokenizer().encode(text, add_special_tokens=False).ids
        bos = self.config.bos_token_id
        return ([bos] if bos is not None else []) + ids

    def decode(self, tokens: Tensor) -> list[str]:
        tokenizer = self._require_tokenizer()
        return tokenizer.decode_batch(tokens.tolist(), skip_special_tokens=True)

    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
        if generator is not None or seed is None:
            return generator
        return torch.Generator(device=self.device).manual_seed(seed)

    def _prefix_tensor(self, prefix: IdsLike | None, num_samples: int) -> Tensor:
        if prefix is None:
            return torch.empty(num_samples, 0, dtype=torch.long, device=self.device)
        ids = torch.as_tensor(prefix, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(num_samples, -1)
        if ids.dim() != 2 or ids.shape[0] != num_samples:
            raise ValueError(f"prefix must be [P] or [num_samples={num_samples}, P], got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"prefix token ids must lie in [0, {self.config.vocab_size})")
        return ids


class MDLM(_PretrainedModel):
    """Masked diffusion language model with the SUBS parameterization.

    >>> model = MDLM(model_config_for("cpu", vocab_size=1000, mask_token_id=999, max_seq_len=64))
    >>> out = model.loss(batch)              # NELBO per token (continuous time by default)
    >>> sample = model.sample(num_samples=2, steps=64).tokens
    """

    model_type = "mdlm"

    def __init__(self, config: ModelConfig, noise: NoiseConfig | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        if config.kind != self.model_type:
            raise ValueError(f"{type(self).__name__} needs model.kind={self.model_type!r}, got {config.kind!r}")
        config.validate()
        self.config = config
        self.noise_config = noise or self.default_noise()
        self.noise_config.validate()
        self.schedule = get_schedule(self.noise_config)
        self.mask_id = int(config.mask_token_id)  # type: ignore[arg-type]
        self.tokenizer = tokenizer
        self.backbone = DiT(config, causal=False)
        self.objective = self.build_objective()

    @property
    def samplers(self) -> tuple[str, ...]:
        """The ``sampler=`` names this model takes."""
        return KIND_SAMPLERS[self.model_type]

    @staticmethod
    def default_noise() -> NoiseConfig:
        return NoiseConfig()

    def build_objective(self) -> MaskedDiffusionObjective | D3PMObjective:
        """The NELBO with SUBS (Eq. 10 / Eq. 8); without carry-over when ``noise.carry_over`` is off."""
        masked_nll = subs_masked_nll if self.noise_config.carry_over else zero_masked_nll
        return MaskedDiffusionObjective(self.schedule, self.noise_config, self.mask_id, masked_nll=masked_nll)

    def sampler_log_weights(self, logits: Tensor) -> Tensor:
        """What the samplers draw from at a masked position: log x_theta, zero-masked (SUBS). Samplers only draw
        at masked positions and never touch the others (carry-over), so the carried-over one-hots are never
        materialised."""
        return zero_masked_log_probs(logits, self.mask_id)

    def unmask_rule(self, sampler: str) -> UnmaskRule | None:
        """How a masked position leaves the mask in a reverse step; None: MDLM's exact
        (alpha_s - alpha_t) / (1 - alpha_t)."""
        return None

    def forward(self, z_t: Tensor, t: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """Denoiser logits [B, L, V] for the noised sequence z_t at time t."""
        return self.backbone(z_t, t, attention_mask)

    def denoise(self, z_t: Tensor, t: Tensor) -> Tensor:
        """x_theta(z_t, t) as SUBS log-probabilities [B, L, V] (float32)."""
        return subs_log_probs(self.backbone(z_t, t), z_t, self.mask_id)

    def loss(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, t: Tensor | None = None,
             generator: torch.Generator | None = None) -> LossOutput:
        """One-sample Monte-Carlo NELBO per real token (an upper bound on the NLL; exp of it bounds perplexity).
        ``t`` [B] fixes the times (continuous-time objectives only)."""
        times = {} if t is None else {"t": t}
        return self.objective.loss(self.backbone, input_ids, attention_mask, generator=generator, **times)

    def sampling_kwargs(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The ``sample``/``generate`` arguments this model takes from a sampling config."""
        return {"steps": sampling.steps, "sampler": sampling.sampler, "top_p": sampling.top_p,
                "dtype": sampling.dtype, "seed": sampling.seed, "stride": sampling.stride,
                "confidence_threshold": sampling.confidence_threshold, "tokens_per_step": sampling.tokens_per_step,
                "remask_schedule": sampling.remask_schedule, "remask_eta": sampling.remask_eta,
                "prefix_cache": sampling.prefix_cache}

    @torch.no_grad()
    def sample(self, num_samples: int = 1, length: int | None = None, *, steps: int | None = None,
               sampler: str = "cached", top_p: float = 1.0, dtype: str | torch.dtype = "float64",
               prefix: IdsLike | None = None, template: IdsLike | None = None, stride: int | None = None,
               seed: int | None = None, generator: torch.Generator | None = None,
               callback: Callable[[int, Tensor], None] | None = None, confidence_threshold: float = 0.9,
               tokens_per_step: int | None = None, remask_schedule: str = "cap",
               remask_eta: float = 0.01, prefix_cache: bool = False,
               forward: Callable[[Tensor, Tensor], Tensor] | None = None) -> SampleOutput:
        """Generate token ids.

        ``prefix`` fixes the first tokens; ``template`` ([L] or [B, L]) fixes every position that is not the
        mask id (infilling). ``length`` beyond ``max_seq_len`` needs ``stride`` (semi-autoregressive).
        ``steps`` defaults to the number of generated positions; first_hitting and confidence ignore it.
        ``confidence_threshold`` (sampler 'confidence'), ``tokens_per_step`` ('confidence_k'; default
        ceil(masked / steps)), ``remask_schedule`` and ``remask_eta`` ('remdm') set the samplers of
        :func:`mdlm.sampling.samplers.run_sampler`. ``prefix_cache``: an approximate KV cache over each
        window's leading given tokens (:func:`prefix_cached_forward`; not exact). ``forward(z_t, t)`` replaces
        the backbone call (logits [B, L, V]); the service's continuous batcher passes its own
        (:mod:`mdlm.serve.continuous`).
        """
        resolve_dtype(dtype)
        generator = self._generator(seed, generator)
        settings = {"confidence_threshold": confidence_threshold, "tokens_per_step": tokens_per_step,
                    "remask_schedule": remask_schedule, "remask_eta": remask_eta, "forward": forward,
                    "prefix_cache": prefix_cache}
        block = self.config.max_seq_len
        was_training = self.training
        self.eval()
        try:
            if template is not None:
                if prefix is not None or stride is not None:
                    raise ValueError("template cannot be combined with prefix or stride")
                z = self._prefix_tensor(template, num_samples)
                if z.shape[1] > block:
                    raise ValueError(f"template of {z.shape[1]} tokens exceeds max_seq_len {block}")
                return self._sample_window(z, steps, sampler, top_p, dtype, generator, callback, settings)
            length = length or block
            start = self._prefix_tensor(prefix, num_samples)
            if length <= start.shape[1]:
                raise ValueError(f"length {length} must exceed the prefix length {start.shape[1]}")
            if length > block:
                if stride is None:
                    raise ValueError(f"length {length} exceeds max_seq_len {block}: set stride for "
                                     "semi-autoregressive generation")
                return semi_autoregressive_sample(
                    lambda z: self._sample_window(z, steps, sampler, top_p, dtype, generator, None, settings),
                    start, length, block, stride, self.mask_id,
                    callback=None if callback is None else (lambda tokens: callback(-1, tokens)))
            z = torch.full((num_samples, length), self.mask_id, dtype=torch.long, device=self.device)
            z[:, :start.shape[1]] = start
            return self._sample_window(z, steps, sampler, top_p, dtype, generator, callback, settings)
        finally:
            self.train(was_training)

    def _sample_window(self, z: Tensor, steps: int | None, sampler: str, top_p: float, dtype: str | torch.dtype,
                       generator: torch.Generator | None, callback: Callable[[int, Tensor], None] | None,
                       settings: dict[str, Any]) -> SampleOutput:
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} does not apply to a {self.model_type} model; "
                             f"available: {', '.join(self.samplers)}")
        steps = steps or max(int((z == self.mask_id).sum(dim=-1).max()), 1)
        settings = dict(settings)
        backbone = settings.pop("forward", None)
        if settings.pop("prefix_cache", False):
            if backbone is not None:
                raise ValueError("prefix_cache cannot be combined with a forward hook (continuous batching)")
            backbone = prefix_cached_forward(self.backbone, z, self.mask_id)
        backbone = backbone or self.backbone

        def denoise(z_t: Tensor, t: Tensor) -> Tensor:
            return self.sampler_log_weights(backbone(z_t, t))

        return run_sampler(sampler, denoise, z, self.schedule, self.mask_id, steps=steps, top_p=top_p,
                           dtype=dtype, generator=generator, callback=callback,
                           allow_cache=not self.config.time_conditioning, unmask_rule=self.unmask_rule(sampler),
                           **settings)

    def generate(self, prompt: str | None = None, *, infill: str | None = None, num_samples: int = 1,
                 length: int | None = None, **sample_kwargs: Any) -> list[str]:
        """Text in, text out. ``infill`` is a text with the tokenizer's mask token where text should go."""
        if infill is not None:
            if prompt is not None:
                raise ValueError("give either prompt or infill, not both")
            template = self.encode_prompt(infill)
            if self.mask_id not in template:
                raise ValueError("infill text contains no mask token; mark the gaps with the tokenizer's "
                                 f"mask token {self._require_tokenizer().id_to_token(self.mask_id)!r}")
            out = self.sample(num_samples, template=template, **sample_kwargs)
        else:
            prefix = self.encode_prompt(prompt) if prompt else (
                [self.config.bos_token_id] if self.config.bos_token_id is not None else None)
            out = self.sample(num_samples, length, prefix=prefix, **sample_kwargs)
        return self.decode(out.tokens)


class SEDD(MDLM):
    """SEDD absorbing (Lou et al. 2024) on the same backbone, data and forward process: the network outputs log
    concrete scores (``mdlm.diffusion.sedd``), trained with the diffusion-weighted denoising score entropy.
    Sampling: ``ancestral``/``cached`` take SEDD's analytic (Tweedie) step, ``euler`` its Euler step."""

    model_type = "sedd"

    def build_objective(self) -> MaskedDiffusionObjective:
        """The score-entropy bound, on MDLM's estimator and weight (continuous time)."""
        if self.noise_config.time != "continuous":
            raise ConfigError("noise.time: SEDD's score-entropy bound is continuous in time (model.kind=sedd)")
        return MaskedDiffusionObjective(self.schedule, self.noise_config, self.mask_id, masked_nll=score_entropy)

    def sampler_log_weights(self, logits: Tensor) -> Tensor:
        """log exp(o_y): the scores over r_t, unnormalised, [MASK] excluded."""
        return log_ratios(logits, self.mask_id)

    def unmask_rule(self, sampler: str) -> UnmaskRule:
        rule = euler_unmask_prob if sampler == "euler" else analytic_unmask_prob
        return functools.partial(rule, self.schedule)


class D3PM(MDLM):
    """D3PM absorbing (Austin et al. 2021) on the same backbone, data and forward process: x~_theta over the
    whole vocabulary ([MASK] included: no zero-masking, no carry-over), trained on the T-step ELBO
    (``noise.time=discrete``) with an optional auxiliary cross-entropy (``noise.aux_ce_weight``).
    Sampling: D3PM's reverse step, in which a masked position stays masked with 1 - p + p x~([MASK]); the last
    step (s = 0) draws every remaining position from x~ over the real tokens."""

    model_type = "d3pm"

    @staticmethod
    def default_noise() -> NoiseConfig:
        return NoiseConfig(time="discrete")

    def build_objective(self) -> D3PMObjective:
        if self.noise_config.time != "discrete":
            raise ConfigError("noise.time: D3PM's ELBO has T steps; set noise.time=discrete (model.kind=d3pm)")
        return D3PMObjective(self.schedule, self.noise_config, self.mask_id)

    def sampler_log_weights(self, logits: Tensor) -> Tensor:
        """log x~(y) for the real tokens, [MASK]'s mass left out (so the weights sum to 1 - x~([MASK]))."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return log_probs.index_fill(-1, torch.tensor([self.mask_id], device=log_probs.device), float("-inf"))

    def unmask_rule(self, sampler: str) -> UnmaskRule:
        return functools.partial(d3pm_unmask_prob, self.schedule)


class ARModel(_PretrainedModel):
    """The autoregressive baseline: the same DiT with causal attention and a next-token loss."""

    model_type = "ar"

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        if config.kind != "ar":
            raise ValueError(f"ARModel needs model.kind='ar', got {config.kind!r}")
        config.validate()
        self.config = config
        self.noise_config = None
        self.tokenizer = tokenizer
        self.backbone = DiT(config, causal=True)
        self.objective = NextTokenObjective()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.backbone(input_ids, None, attention_mask)

    def loss(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             generator: torch.Generator | None = None) -> LossOutput:
        """Next-token NLL per predicted real token (exact: ``generator`` draws nothing)."""
        return self.objective.loss(self.backbone, input_ids, attention_mask)

    def sampling_kwargs(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The ``sample``/``generate`` arguments this model takes from a sampling config (no steps, no sampler:
        one token per forward pass, left to right)."""
        return {"top_p": sampling.top_p, "dtype": sampling.dtype, "seed": sampling.seed}

    @torch.no_grad()
    def sample(self, num_samples: int = 1, length: int | None = None, *, top_p: float = 1.0,
               dtype: str | torch.dtype = "float64", prefix: IdsLike | None = None, seed: int | None = None,
               generator: torch.Generator | None = None, use_cache: bool = True) -> SampleOutput:
        """Left-to-right sampling, one forward pass per new token. ``use_cache`` keeps every position's keys and
        values (exact for causal attention), so a pass computes only the newest position; ``use_cache=False``
        recomputes the whole sequence each time. Both draw the same tokens under one seed."""
        generator = self._generator(seed, generator)
        dtype = resolve_dtype(dtype)
        length = length or self.config.max_seq_len
        if length > self.config.max_seq_len:
            raise ValueError(f"length {length} exceeds max_seq_len {self.config.max_seq_len}")
        tokens = self._prefix_tensor(prefix, num_samples)
        if tokens.shape[1] == 0:
            if self.config.bos_token_id is None:
                raise ValueError("the AR model needs a prefix or a bos_token_id to start from")
            tokens = torch.full((num_samples, 1), self.config.bos_token_id, dtype=torch.long, device=self.device)
        was_training = self.training
        self.eval()
        passes = 0
        try:
            cache = self.backbone.new_cache(length) if use_cache else None
            new = tokens  # what the next pass must compute: everything without a cache, else the uncached tail
            while tokens.shape[1] < length:
                logits = self.backbone(new if cache is not None else tokens, cache=cache)[:, -1]
                passes += 1
                token = self._draw_next(logits, top_p, dtype, generator)[:, None]
                tokens = torch.cat((tokens, token), 1)
                new = token
        finally:
            self.train(was_training)
        return SampleOutput(tokens=tokens, num_forward_passes=passes)

    def _draw_next(self, logits: Tensor, top_p: float, dtype: torch.dtype,
                   generator: torch.Generator | None) -> Tensor:
        """One token per row from the next-token ``logits`` [B, V] ([MASK] excluded), top-p, Gumbel-max."""
        logits = logits.float()
        if self.config.mask_token_id is not None:
            logits[:, self.config.mask_token_id] = float("-inf")
        probs = top_p_filter(torch.softmax(logits.to(dtype), dim=-1), top_p)
        return sample_categorical(probs, dtype=dtype, generator=generator)

    def generate(self, prompt: str | None = None, *, num_samples: int = 1, length: int | None = None,
                 **sample_kwargs: Any) -> list[str]:
        prefix = self.encode_prompt(prompt) if prompt else None
        return self.decode(self.sample(num_samples, length, prefix=prefix, **sample_kwargs).tokens)


MODEL_CLASSES: dict[str, type[MDLM] | type[ARModel]] = {"mdlm": MDLM, "sedd": SEDD, "d3pm": D3PM, "ar": ARModel}


def build_model(config: ModelConfig, noise: NoiseConfig | None = None,
                tokenizer: Tokenizer | None = None) -> MDLM | ARModel:
    """The model class that ``config.kind`` names."""
    if config.kind == "ar":
        return ARModel(config, tokenizer=tokenizer)
    return MODEL_CLASSES[config.kind](config, noise=noise, tokenizer=tokenizer)


def prefix_cached_forward(backbone: DiT, window: Tensor, mask_id: int) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The backbone call for sampling one ``window`` [B, L] with an approximate prefix KV cache
    (:class:`mdlm.models.dit.PrefixKV`) over its leading positions that are given (not masked) in every row; None
    when there are none. The first call runs the whole window and fills the cache; later calls compute only the
    positions after the prefix, whose logits they return after the first call's logits for the prefix (no sampler
    reads those: given positions are never drawn). A call over part of the batch (the cached sampler's changed
    rows) takes the cache rows of the same prefix tokens."""
    length = int((window != mask_id).all(dim=0).long().cumprod(0).sum())
    if length == 0 or length >= window.shape[1]:
        return None
    state: dict[str, Any] = {}

    def forward(z_t: Tensor, t: Tensor) -> Tensor:
        if "cache" not in state:
            cache = PrefixKV(length)
            logits = backbone(z_t, t, cache=cache)
            state.update(cache=cache, context=z_t[:, :length].clone(), head=logits[:, :length].clone())
            return logits
        cache, context, head = state["cache"], state["context"], state["head"]
        if z_t.shape[0] == context.shape[0] and torch.equal(z_t[:, :length], context):
            cache.rows = None
        else:
            same = (z_t[:, None, :length] == context[None]).all(dim=-1)  # [b, B]
            if not bool(same.any(dim=1).all()):
                return backbone(z_t, t)  # a prefix the cache has not seen: no cache for this call
            cache.rows = same.long().argmax(dim=1)
            head = head[cache.rows]
        return torch.cat((head, backbone(z_t[:, length:], t, cache=cache)), dim=1)

    return forward


def load_pretrained(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *,
                    revision: str | None = None) -> MDLM | ARModel:
    """Load whichever model (MDLM or AR) a ``save_pretrained`` directory holds: a local path, an fsspec URL, an
    MLflow URI or a Hugging Face Hub repo id (``owner/name``, at ``revision``)."""
    parts = read_model_dir(path, map_location, revision=revision)
    return MODEL_CLASSES[parts["model_type"]]._from_parts(parts)
