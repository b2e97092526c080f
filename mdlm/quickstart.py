"""Train a CPU-sized MDLM (or AR baseline) on the default corpus in one process, evaluate it, export it
with ``save_pretrained``, reload it and sample: the whole core, end to end, in minutes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from mdlm.config import Config
from mdlm.data.local import prepare_in_memory
from mdlm.data.spec import resolve_model_config
from mdlm.model_card import ModelCardInfo
from mdlm.modeling import build_model, load_pretrained
from mdlm.train.ema import EMA
from mdlm.train.local import evaluate, train_local

logger = logging.getLogger(__name__)


def run_quickstart(config: Config, output_dir: str | Path, prompts: tuple[str, ...] = ("ROMEO.\n",)
                   ) -> dict[str, object]:
    """Train, evaluate, export, reload and sample; each stage is logged to ``logging.getLogger("mdlm.quickstart")``."""
    started = time.perf_counter()
    data = prepare_in_memory(config.data)
    logger.info(f"data: {config.data.source}, vocab {data.special.vocab_size} (mask id {data.special.mask_id}), "
                + ", ".join(f"{k} {v.shape[0]} rows" for k, v in data.input_ids.items()))
    torch.manual_seed(config.training.seed)
    model = build_model(resolve_model_config(config.model, data.spec), config.noise, tokenizer=data.tokenizer)
    logger.info(f"model: {model.model_type}, {model.backbone.num_parameters() / 1e6:.2f}M parameters")
    ema = EMA(model, config.training.ema_decay) if config.training.ema_decay > 0 else None
    mask = data.attention_mask["train"] if config.data.packing == "pad" else None
    state = train_local(model, data.input_ids["train"], config.training, attention_mask=mask, ema=ema,
                        on_log=lambda r: logger.info(f"step {int(r['step']):>5}  loss {r['loss']:.4f}  "
                                                     f"lr {r['lr']:.2e}  {r['tokens_per_s']:.0f} tok/s"))
    if ema is not None:
        ema.copy_to(model)
    split = "validation" if data.input_ids["validation"].shape[0] else "train"
    val_mask = data.attention_mask[split] if config.data.packing == "pad" else None
    metrics = evaluate(model, data.input_ids[split], val_mask, seed=config.training.seed)
    bound = model.objective.is_bound
    logger.info(f"{split} {'NELBO' if bound else 'NLL'} {metrics['nll']:.4f} nats/token, "
                f"perplexity{' bound' if bound else ''} {metrics['ppl']:.2f}")
    output_dir = Path(output_dir)
    figures = {f"{split} {'NELBO' if bound else 'NLL'} (nats/token)": metrics["nll"],
               f"{split} perplexity{' bound' if bound else ''}": metrics["ppl"]}
    card = ModelCardInfo.from_training(config, steps=state.step, metrics=figures)
    model.save_pretrained(output_dir, card=card)
    reloaded = load_pretrained(output_dir)
    s = config.sampling
    samples = []
    for prompt in prompts:
        samples.extend(reloaded.generate(prompt, num_samples=s.num_samples, length=s.length,
                                         **reloaded.sampling_kwargs(s)))
    for i, text in enumerate(samples):
        logger.info(f"--- sample {i} ---\n{text.strip()}")
    logger.info(f"saved model to {output_dir} in {time.perf_counter() - started:.0f}s; "
                f"reload with mdlm.load_pretrained('{output_dir}')")
    return {"metrics": metrics, "history": state.history, "samples": samples, "model_dir": str(output_dir)}
