"""The paper's comparisons in miniature, as one regenerable report (docs/reproduction.md, PNG plots, CSV/markdown).

    python bench/reproduce.py            # 2-core CPU, under an hour: the default corpus, the 'cpu' model size
    python bench/reproduce.py --quick    # the same path at a few-minute size (tests/test_reproduce.py runs it)
    python bench/reproduce.py --preset gpu --corpus linux-doc-6.12_*.deb   # one H100/H200, about 8 minutes:
        # the 'small' model, GPT-2 tokens, 1,024-token rows, the kernel documentation (bench/linux_doc.py)

Trailing ``a.b=value`` arguments override the preset's config of every run (``model.n_layers=2``), and
``size.NAME=value`` its sizes (``size.steps=10``), as in every entry point.

Every model (MDLM, the AR baseline, SEDD absorbing, D3PM absorbing, and the MDLM ablations) has the same size,
data, optimiser and token budget, and is trained by the library's single-process loop (``train_local``, whose
``train_step`` the Ray Train loop shares). The numbers are computed by the code that trains and evaluates:

- the perplexity bound against tokens seen: the model's own objective (``model.sequence_nll``) on the validation
  rows with K Monte-Carlo time samples per row, per-row seeds, summarised with standard errors
  (``summarize_nelbo``), at log-spaced points of training, with the EMA weights;
- the test and zero-shot bounds at the end, on the prepared test split and on a second real corpus prepared with
  the same tokenizer (/usr/share/common-licenses; Shakespeare for ``--preset gpu``);
- generative perplexity under the AR baseline of this run and unigram entropy, against sampling steps, for each
  sampler, float64 vs float32 categorical draws, and semi-autoregressive samples of 4 blocks
  (``mdlm.eval.generation.generate_and_score``, as the evaluation job);
- invariance: the Ray evaluation job (``mdlm.eval.run.run_evaluation``) with 1 vs 2 actors and two batch sizes.

Runs are logged to one MLflow experiment (``mdlm-reproduce``), tagged ``mdlm.comparison``; results go to
``--out`` (bench/results/reproduce[-quick]/: results.json, table.csv, table.md, *.png) and the report to
``--report``. Everything printed in the report is deterministic given ``--seed`` (costs are counted in forward
passes; wall times go to results.json only), so the report regenerates bit for bit on the same machine type.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdlm import tracking  # noqa: E402
from mdlm.config import Config, load_config  # noqa: E402
from mdlm.data.manifest import Manifest  # noqa: E402
from mdlm.data.spec import resolve_model_config  # noqa: E402
from mdlm.eval.generation import generate_and_score  # noqa: E402
from mdlm.eval.metrics import generative_perplexity, row_generators, sequence_nll, summarize_nelbo  # noqa: E402
from mdlm.eval.settings import GenSettings  # noqa: E402
from mdlm.modeling import build_model  # noqa: E402
from mdlm.storage import write_text_atomic  # noqa: E402
from mdlm.train.ema import EMA  # noqa: E402
from mdlm.train.local import train_local  # noqa: E402

# name -> (comparison, overrides of the 'cpu' preset). 'mdlm' is the reference of every comparison.
RUNS: dict[str, tuple[str, list[str]]] = {
    "mdlm": ("baselines", []),
    "ar": ("baselines", ["model.kind=ar"]),
    "sedd": ("baselines", ["model.kind=sedd"]),
    "d3pm": ("baselines", ["model.kind=d3pm", "noise.time=discrete", "noise.num_timesteps=1000"]),
    "mdlm-discrete": ("ablation", ["noise.time=discrete", "noise.num_timesteps=1000"]),
    "mdlm-no-carry-over": ("ablation", ["noise.carry_over=false"]),
    "mdlm-time-cond": ("ablation", ["model.time_conditioning=true"]),
    "mdlm-cosine": ("ablation", ["noise.schedule=cosine"]),
}

# The samplers of the papers reproduced here (MDLM's ancestral and cached, first-hitting, SEDD's Euler); the
# faster heuristic ones are compared in the sampling benchmark instead.
PAPER_SAMPLERS = ("ancestral", "cached", "first_hitting", "euler")

# The paper's published numbers (Sahoo et al. 2024; 110M models), perplexity (bounds).
PAPER = [
    ("LM1B, 33B tokens", "AR 22.32", "MDLM <= 27.04", "SEDD <= 32.79"),
    ("LM1B, 327B tokens", "AR 20.86", "MDLM <= 23.00", ""),
    ("OpenWebText", "AR 17.54", "MDLM <= 23.21", "SEDD <= 24.10"),
    ("LM1B ablations", "discrete time (T = 1000) 27.19", "continuous 27.04", "without carry-over 28.56"),
]


@dataclass(frozen=True)
class Size:
    steps: int  # optimizer steps per run
    eval_points: int  # points of the bound-vs-tokens curve
    eval_rows: int  # validation rows for the curve
    mc_samples: int  # K time samples per row
    test_rows: int | None  # test / zero-shot rows at the end (None: all)
    gen_samples: int  # samples per (sampler, steps) cell
    gen_steps: tuple[int, ...]  # sampling steps
    invariance_rows: int
    semi_ar_steps: int | None = None  # steps per block of the semi-autoregressive samples (None: block / 2)


@dataclass(frozen=True)
class Preset:
    """What ``--preset`` runs: the config preset every run overrides (``RUNS``), the corpora, sizes and device."""

    config: str
    overrides: tuple[str, ...]
    size: Size
    device: str
    corpus: str  # 'shakespeare' (the default corpus) or 'linux-doc' (bench/linux_doc.py, from --corpus)
    zero_shot: str  # 'licenses' (/usr/share/common-licenses) or 'shakespeare'


CPU_SIZE = Size(steps=800, eval_points=8, eval_rows=256, mc_samples=4, test_rows=None, gen_samples=32,
                gen_steps=(16, 32, 64, 128, 256), invariance_rows=128)
PRESETS = {
    "cpu": Preset("cpu", (), CPU_SIZE, "cpu", "shakespeare", "licenses"),
    "quick": Preset("cpu", (), Size(steps=24, eval_points=3, eval_rows=32, mc_samples=2, test_rows=32,
                                    gen_samples=4, gen_steps=(8, 32), invariance_rows=32),
                    "cpu", "shakespeare", "licenses"),
    # Sized from the measured eager step of 'small' at 32 x 1,024 tokens (170 ms on an H200, bench/results/
    # gpu_check_h200_2026-11-27.json): 8 runs x 128 steps ~ 3 minutes of training, the rest evaluation and
    # sampling. The invariance job runs on CPU actors (1 vs 2 actors would need 2 GPUs), on few rows.
    "gpu": Preset("small", ("training.global_batch_size=32", "training.micro_batch_size=32",
                            "training.precision=bf16", "training.lr=6e-4", "training.warmup_steps=20",
                            "training.lr_schedule=cosine", "training.ema_decay=0.999"),
                  Size(steps=128, eval_points=6, eval_rows=64, mc_samples=2, test_rows=256, gen_samples=8,
                       gen_steps=(16, 64, 256), invariance_rows=8, semi_ar_steps=64),
                  "cuda", "linux-doc", "shakespeare"),
}
SIZES = {name: preset.size for name, preset in PRESETS.items()}
CORPORA = {"shakespeare": "Shakespeare", "licenses": "/usr/share/common-licenses",
           "linux-doc": "the Linux 6.12 documentation (Debian's linux-doc-6.12)"}


def size_with(size: Size, overrides: list[str]) -> Size:
    """``size`` with ``size.NAME=value`` overrides (a comma-separated list for gen_steps, 'none' for None)."""
    from dataclasses import fields

    types = {f.name: f.type for f in fields(Size)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        name = key.removeprefix("size.")
        if name not in types:
            raise SystemExit(f"reproduce.py: unknown size key {key!r} (known: {', '.join('size.' + n for n in types)})")
        try:
            if name == "gen_steps":
                changes[name] = tuple(int(v) for v in value.split(","))
            elif value.lower() == "none" and "None" in str(types[name]):
                changes[name] = None
            else:
                changes[name] = int(value)
        except ValueError:
            raise SystemExit(f"reproduce.py: {key}={value!r} is not an integer") from None
        if changes[name] is not None and min(changes[name] if name == "gen_steps" else (changes[name],)) < 1:
            raise SystemExit(f"reproduce.py: {key} must be >= 1, got {value!r}")
    return replace(size, **changes)


@dataclass
class RunResult:
    name: str
    comparison: str
    kind: str
    curve: list[dict[str, float]] = field(default_factory=list)  # tokens, bound, se, ppl
    losses: list[list[float]] = field(default_factory=list)  # [step, training loss]
    test: dict[str, Any] = field(default_factory=dict)
    zero_shot: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: float = 0.0


def log(message: str) -> None:
    print(f"[reproduce] {message}", flush=True)


def _show_data_log() -> None:
    """The data pipeline's messages (``mdlm.data`` logger) as this script's own lines; evaluation's stay quiet."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[reproduce] %(message)s"))
    data_logger = logging.getLogger("mdlm.data")
    data_logger.handlers = [handler]
    data_logger.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------------------
# Data


def prepare(config: Config, preset: Preset, work: Path, corpus: Path | None = None) -> tuple[Manifest, Manifest]:
    """The preset's corpus and its zero-shot corpus (tokenized with the same tokenizer), prepared by the Ray Data
    pipeline (reused when present); ``corpus``: the linux-doc .deb or folder (bench/linux_doc.py)."""
    from mdlm.data.pipeline import prepare_dataset

    _show_data_log()
    data = replace(config.data, output_dir=str(work / "data" / preset.corpus))
    if preset.corpus == "linux-doc":
        import linux_doc

        if corpus is None:
            raise ValueError("the linux-doc corpus needs its .deb or folder")
        try:
            stats = linux_doc.write_corpus(corpus, work / "corpus" / linux_doc.PACKAGE)
        except linux_doc.CorpusError as exc:
            raise SystemExit(f"reproduce.py: --corpus {exc}") from None
        log(f"corpus: {stats['files']:,} files, {stats['bytes'] / 1e6:.1f} MB of text from {corpus}")
        data = replace(data, source=str(work / "corpus" / linux_doc.PACKAGE), format="jsonl")
    main = prepare_dataset(data, progress=False)
    zero = replace(config.data, tokenizer=main.tokenizer_path, validation_fraction=0.0, test_fraction=0.9,
                   output_dir=str(work / "data" / f"{preset.zero_shot}-zero-shot"))
    if preset.zero_shot == "licenses":
        zero = replace(zero, source="/usr/share/common-licenses/*", format="text")
    else:
        zero = replace(zero, source="shakespeare", format="auto")
    return main, prepare_dataset(zero, progress=False)


def rows(manifest: Manifest, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    import pyarrow.parquet as pq

    tables = [pq.read_table(path) for path in manifest.split_files(split)]
    ids = np.concatenate([np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)) for t in tables])
    if "attention_mask" in tables[0].column_names:  # pad packing; wrap rows are all real tokens
        mask = np.concatenate([np.stack(t.column("attention_mask").to_numpy(zero_copy_only=False)) for t in tables])
    else:
        mask = np.ones_like(ids)
    if limit is not None:
        ids, mask = ids[:limit], mask[:limit]
    return torch.as_tensor(ids.astype(np.int64)), torch.as_tensor(mask.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------
# Measurements


def bound(model, ids: torch.Tensor, mask: torch.Tensor, mc_samples: int, seed: int, batch: int = 32) -> dict:
    """The corpus NELBO (or AR NLL) per token with its standard error: per-row seeds, K samples per row."""
    nll, tokens = [], []
    for start in range(0, len(ids), batch):
        index = range(start, min(start + batch, len(ids)))
        out = sequence_nll(model, ids[start:index.stop], mask[start:index.stop], mc_samples=mc_samples,
                           generator=row_generators(seed, index))
        nll.append(out[0])
        tokens.append(out[1])
    return summarize_nelbo(torch.cat(nll), torch.cat(tokens)).to_dict()


def train_run(name: str, config: Config, manifest: Manifest, val: tuple, size: Size, seed: int,
              experiment_id: str, tracking_uri: str, work: Path, device: str = "cpu") -> tuple[RunResult, Any]:
    comparison, _ = RUNS[name]
    started = time.perf_counter()
    train_ids, train_mask = rows(manifest, "train")
    torch.manual_seed(config.training.seed)
    from tokenizers import Tokenizer

    model = build_model(resolve_model_config(config.model, manifest.data_spec()), config.noise,
                        tokenizer=Tokenizer.from_file(manifest.tokenizer_path)).to(device)
    ema = EMA(model, config.training.ema_decay)
    result = RunResult(name=name, comparison=comparison, kind=config.model.kind)
    tokens_per_step = config.training.global_batch_size * manifest.block_size
    points = sorted({max(1, round(size.steps ** ((i + 1) / size.eval_points))) for i in range(size.eval_points)})

    def on_log(record: dict[str, float]) -> None:
        step = int(record["step"])
        if step in points:
            with ema.swapped_in(model):
                summary = bound(model, *val, size.mc_samples, seed)
            model.train()
            result.curve.append({"step": step, "tokens": step * tokens_per_step, "bound": summary["nelbo"],
                                 "se": summary["se"], "ppl": summary["ppl"], "loss": record["loss"]})

    training = replace(config.training, max_steps=size.steps, log_every=1)
    state = train_local(model, train_ids, training, attention_mask=train_mask, ema=ema, on_log=on_log)
    ema.copy_to(model)
    model.eval()
    run_id = tracking.create_run(tracking_uri, experiment_id, f"reproduce-{name}", config.flat(),
                                 tags={"mdlm.comparison": comparison, "mdlm.reproduce_seed": str(seed)})
    buffer = tracking.MetricBuffer(tracking_uri, run_id)
    for record in state.history:
        buffer.add(int(record["step"]), {"loss": record["loss"]})
        result.losses.append([int(record["step"]), round(float(record["loss"]), 6)])
    for point in result.curve:
        buffer.add(int(point["step"]), {"val_bound": point["bound"], "val_bound_se": point["se"],
                                        "tokens_seen": point["tokens"]})
    buffer.flush()
    result.mlflow_run_id = run_id
    result.seconds = round(time.perf_counter() - started, 1)
    export = work / "models" / name
    model.save_pretrained(export)
    return result, model


def sampling_study(model, evaluator_dir: Path, size: Size, seed: int, block: int) -> list[dict[str, Any]]:
    """Generative perplexity (AR evaluator) and unigram entropy against steps, per sampler; float32 draws; semi-AR."""
    from mdlm.eval.evaluator import load_scorer

    scorer = load_scorer(evaluator_dir, next(model.parameters()).device)
    cells: list[dict[str, Any]] = []

    def measure(label: str, **settings: Any) -> None:
        gen = GenSettings(num_samples=size.gen_samples, evaluator=str(evaluator_dir), seed=seed,
                          batch_size=size.gen_samples, **settings)
        out = generate_and_score(model, scorer, 0, gen)
        cells.append({"label": label, **{k: v for k, v in settings.items()},
                      "gen_ppl": generative_perplexity(out["nll"], out["num_tokens"]),
                      "entropy": float(np.mean(out["entropy"])), "forward_passes": out["forward_passes"][0]})

    for sampler in (s for s in model.samplers if s in PAPER_SAMPLERS):
        for steps in size.gen_steps:
            measure(sampler, sampler=sampler, steps=steps, length=block)
    for steps in size.gen_steps:
        measure("ancestral float32", sampler="ancestral", steps=steps, length=block, dtype="float32")
    measure("semi-AR x4", sampler="cached", steps=size.semi_ar_steps or block // 2, length=4 * block,
            stride=block // 2)
    return cells


def invariance(model_dir: Path, data_dir: Path, size: Size, seed: int, runs_dir: Path) -> list[dict[str, Any]]:
    """The Ray evaluation job with 1 vs 2 actors and batch sizes 8 vs 16 must give the same bound."""
    from mdlm.eval.run import run_evaluation
    from mdlm.eval.settings import EvalRequest, NelboSettings

    out = []
    for actors, batch in ((1, 16), (2, 16), (1, 8)):
        request = EvalRequest(model=str(model_dir), data=[str(data_dir)], mlflow=False, runs_dir=str(runs_dir),
                              nelbo=NelboSettings(split="validation", mc_samples=size.mc_samples, seed=seed,
                                                  max_rows=size.invariance_rows, batch_size=batch,
                                                  num_actors=actors))
        corpus = run_evaluation(request).to_dict()["corpora"]
        summary = next(iter(corpus.values()))
        out.append({"actors": actors, "batch_size": batch, "nelbo": summary["nelbo"], "se": summary["se"]})
    return out


# ---------------------------------------------------------------------------------------------------------
# Report


def table(results: list[RunResult]) -> list[dict[str, Any]]:
    reference = {r.name: r for r in results}["mdlm"]
    ar = {r.name: r for r in results}.get("ar")
    out = []
    for r in results:
        out.append({"run": r.name, "comparison": r.comparison, "kind": r.kind,
                    "tokens": r.curve[-1]["tokens"] if r.curve else 0,
                    "test_bound": r.test["nelbo"], "test_se": r.test["se"], "test_ppl": r.test["ppl"],
                    "zero_shot_bound": r.zero_shot["nelbo"], "zero_shot_ppl": r.zero_shot["ppl"],
                    "vs_mdlm": r.test["ppl"] / reference.test["ppl"],
                    "vs_ar": r.test["ppl"] / ar.test["ppl"] if ar else math.nan})
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(rows_: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows_]
    return "\n".join(lines) + "\n"


def plots(results: list[RunResult], cells: dict[str, list[dict[str, Any]]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> str:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, metadata={"Software": None})
        plt.close(fig)
        return name

    names = []
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in results:
        steps, losses = zip(*r.losses, strict=True)
        window = max(1, len(losses) // 40)  # a running mean, so the runs stay readable side by side
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=r.name, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("training loss (running mean)")
    ax.legend(fontsize=7)
    names.append(save(fig, "loss_curves.png"))
    for comparison in ("baselines", "ablation"):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for r in results:
            if r.comparison == comparison or r.name == "mdlm":
                x = [p["tokens"] for p in r.curve]
                ax.errorbar(x, [p["bound"] for p in r.curve], yerr=[2 * p["se"] for p in r.curve], label=r.name,
                            marker="o", ms=3, capsize=2)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation NELBO / NLL (nats/token)")
        ax.set_title(f"bound vs tokens seen: {comparison}")
        ax.legend()
        names.append(save(fig, f"bound_vs_tokens_{comparison}.png"))
    by = {r.name: r for r in results}
    if "ar" in by:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for name in ("mdlm", "sedd", "d3pm"):
            if name in by:
                pairs = list(zip(by[name].curve, by["ar"].curve, strict=True))
                ax.plot([a["tokens"] for a, _ in pairs], [a["ppl"] / b["ppl"] for a, b in pairs], marker="o",
                        label=f"{name} / AR")
        ax.axhline(27.04 / 22.32, ls="--", c="gray", label="paper, LM1B 33B tokens: 1.21")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("perplexity (bound) ratio to AR")
        ax.legend()
        names.append(save(fig, "ratio_to_ar_vs_tokens.png"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in sorted({c["label"] for c in cells["mdlm"]} - {"semi-AR x4"}):
        row = [c for c in cells["mdlm"] if c["label"] == label]
        axes[0].plot([c["steps"] for c in row], [c["gen_ppl"] for c in row], marker="o", label=label)
        axes[1].plot([c["steps"] for c in row], [c["entropy"] for c in row], marker="o", label=label)
    for ax, ylabel in zip(axes, ("generative perplexity (AR evaluator)", "unigram entropy (nats)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(ylabel)
        ax.legend()
    names.append(save(fig, "gen_ppl_entropy_vs_steps.png"))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label in sorted({c["label"] for c in cells["mdlm"]} - {"semi-AR x4"}):
        row = [c for c in cells["mdlm"] if c["label"] == label]
        ax.plot([c["steps"] for c in row], [c["forward_passes"] for c in row], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("forward passes")
    ax.set_title("sampler cost")
    ax.legend()
    names.append(save(fig, "sampler_cost.png"))
    return names


def orderings(rows_: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The paper's orderings and signs, and whether this run shows them."""
    ppl = {r["run"]: r["test_ppl"] for r in rows_}
    checks = [("AR < MDLM (the AR baseline has the lower perplexity)", ppl["ar"] < ppl["mdlm"]),
              ("MDLM < SEDD", ppl["mdlm"] < ppl["sedd"]),
              ("MDLM < D3PM", ppl["mdlm"] < ppl["d3pm"]),
              ("continuous time <= discrete time (27.04 vs 27.19)", ppl["mdlm"] <= ppl["mdlm-discrete"]),
              ("carry-over helps (27.04 vs 28.56 without)", ppl["mdlm"] < ppl["mdlm-no-carry-over"])]
    return checks


def budget_for_ratio(curve_mdlm: list[dict], curve_ar: list[dict], target: float) -> float | None:
    """Training tokens at which the MDLM/AR perplexity ratio would reach ``target``: a straight-line fit of the
    ratio against log10(tokens) over the second half of the curve, extrapolated (None if it is not falling)."""
    pairs = list(zip(curve_mdlm, curve_ar, strict=True))[len(curve_mdlm) // 2:]
    if len(pairs) < 2:
        return None
    x = np.log10([a["tokens"] for a, _ in pairs])
    y = np.array([a["ppl"] / b["ppl"] for a, b in pairs])
    slope, intercept = np.polyfit(x, y, 1)
    if y[-1] <= target:
        return float(pairs[-1][0]["tokens"])
    if slope >= 0:
        return None
    return float(10 ** ((target - intercept) / slope))


def setup_of(record: dict[str, Any]) -> dict[str, Any]:
    """The record's setup; records written before presets had one are the 'cpu' or 'quick' preset's."""
    if "setup" in record:
        return record["setup"]
    flag = " --quick" if record["size"] == "quick" else ""
    return {"preset": record["size"], "config": "cpu", "corpus": "shakespeare", "zero_shot": "licenses",
            "tokenizer": "bpe", "vocab_size": 1024, "block_size": 128, "batch": 32, "device": "cpu",
            "command": f"python bench/reproduce.py{flag} --seed {record['seed']}"}


def describe_tokenizer(setup: dict[str, Any]) -> str:
    if setup["tokenizer"] == "bpe":
        return f"byte-level BPE of {setup['vocab_size']:,} tokens trained on it"
    if setup["tokenizer"] == "gpt2":
        return "GPT-2's byte-level BPE (50,257 tokens)"
    return f"the tokenizer {setup['tokenizer']} ({setup['vocab_size']:,} tokens)"


def write_report(path: Path, out: Path, setup: dict[str, Any], size: Size, results: list[RunResult],
                 rows_: list[dict], cells: dict[str, list[dict]], invariant: list[dict], figures: list[str],
                 parameters: dict[str, int]) -> None:
    relative = Path(os.path.relpath(out, path.parent))  # the figures, as the report's own folder sees them
    text = io.StringIO()
    w = text.write
    w("# Reproducing the MDLM paper's comparisons in miniature\n\n")
    w(f"Regenerate with `{setup['command']}` (every number below is computed by the library's training, objective "
      "and evaluation code; costs are counted in forward passes, so the report is the same on every run of the "
      "command on the same kind of machine).\n\n")
    budget = rows_[0]["tokens"]
    counts = sorted(set(parameters.values()))
    sizes = " to ".join(f"{c / 1e6:.2f}M" for c in (counts[0], counts[-1]) if counts) + " parameters"
    if len(counts) == 1:
        sizes = f"{counts[0] / 1e6:.2f}M parameters"
    block, batch = setup["block_size"], setup["batch"]
    corpus = CORPORA[setup["corpus"]] + (" (the default corpus)" if setup["corpus"] == "shakespeare" else "")
    model = f"the `{setup['config']}` model size"
    if any(not o.startswith(("size.", "training.seed=", "data.seed=")) for o in setup.get("overrides", [])):
        model += " with the command's overrides"
    device = setup["device"] + (f" ({setup['gpu']})" if setup.get("gpu") else "")
    w(f"Setup: {corpus}, {describe_tokenizer(setup)}, {block:,}-token rows packed as MDLM packs OpenWebText; "
      f"{model} ({sizes}) for every run, on {device}; "
      f"{size.steps} optimizer steps of {batch} x {block:,} tokens = {budget:,} training tokens each, EMA weights, "
      f"K = {size.mc_samples} Monte-Carlo time samples per row with per-row seeds. The paper trains "
      f"110M-parameter models on 33B-327B tokens: about {33e9 / max(budget, 1):,.0f} x this budget.\n\n")
    w(f"## Perplexity bounds (test split, and zero-shot on {CORPORA[setup['zero_shot']]})\n\n")
    w(markdown(rows_, ["run", "comparison", "test_bound", "test_se", "test_ppl", "zero_shot_ppl", "vs_mdlm",
                       "vs_ar"]))
    w("\n`test_bound`: NELBO per token (an upper bound on the NLL; the exact NLL for AR), `test_se` its standard "
      "error over rows (includes the Monte-Carlo noise); `vs_mdlm`, `vs_ar`: perplexity ratios.\n\n")
    for name in figures:
        w(f"![{name}]({relative / name})\n\n")
    w("## The paper's published figures\n\n| setting | | | |\n| --- | --- | --- | --- |\n")
    for row in PAPER:
        w("| " + " | ".join(row) + " |\n")
    w("\n## Orderings and signs\n\n")
    for claim, holds in orderings(rows_):
        w(f"- {claim}: {'reproduced' if holds else 'not reproduced'} here.\n")
    ratio = rows_[[r["run"] for r in rows_].index("mdlm")]["test_ppl"] / \
        rows_[[r["run"] for r in rows_].index("ar")]["test_ppl"]
    w(f"\nMDLM / AR perplexity ratio reached: {ratio:.3f} (the paper: 27.04 / 22.32 = 1.21 on LM1B at 33B tokens, "
      "1.10 at 327B; 23.21 / 17.54 = 1.32 on OpenWebText). The curve above shows how the ratio moves with tokens; "
      "the paper's ratio is reached only at budgets thousands of times larger than this one.\n\n")
    by = {r.name: r for r in results}
    need = budget_for_ratio(by["mdlm"].curve, by["ar"].curve, 27.04 / 22.32)
    if need is None:
        w("Over the second half of the curve the ratio is not falling, so no budget for the paper's 1.21 can be "
          "extrapolated from this run.\n\n")
    else:
        w(f"Extrapolating the ratio linearly in log(tokens) over the second half of the curve, the paper's 1.21 "
          f"would need about {need:.2g} training tokens at this model size ({need / budget:.3g} x this budget; a "
          "rough extrapolation from a few points, not a measurement).\n\n")
    w("## Sampling: generative perplexity and entropy against steps (MDLM)\n\n")
    w(markdown(cells["mdlm"], ["label", "steps", "length", "gen_ppl", "entropy", "forward_passes"]))
    w("\nThe evaluator is this run's AR baseline. Zheng et al. (2024) found that float32 Gumbel noise lowers the "
      "entropy of samples and so flatters generative perplexity; the float32 rows show whether it does at this "
      "size (compare their entropy with the float64 rows'), which is why entropy is reported beside it.\n\n")
    for name in ("sedd", "d3pm"):
        if name in cells:
            w(f"### {name}\n\n")
            w(markdown(cells[name], ["label", "steps", "gen_ppl", "entropy", "forward_passes"]))
            w("\n")
    w("## Invariance of the evaluation job\n\n")
    w(markdown(invariant, ["actors", "batch_size", "nelbo", "se"]))
    same = invariant[0]["nelbo"] == invariant[1]["nelbo"]
    close = abs(invariant[0]["nelbo"] - invariant[2]["nelbo"]) < 1e-4
    w(f"\n1 vs 2 actors: {'identical' if same else 'DIFFERENT'}; batch size 16 vs 8: "
      f"{'equal up to float rounding' if close else 'DIFFERENT'}.\n")
    if setup["preset"] != "gpu":
        w("\n## On one GPU: `--preset gpu`\n\n"
          "The same comparisons at the paper's model size on a real corpus of its kind of scale: the `small` model "
          "(hidden 768, 12 blocks), GPT-2's tokenizer, 1,024-token rows, the Linux 6.12 documentation as Debian "
          "ships it (linux-doc-6.12: 9,538 files, 42.5 MB of text, 14.7M GPT-2 tokens of training rows), 128 "
          "steps of 32 x 1,024 tokens per run, sized for about 8 minutes on one H100/H200:\n\n"
          "```bash\napt-get download linux-doc-6.12     # Debian 12; or the .deb from packages.debian.org\n"
          "python bench/reproduce.py --preset gpu --corpus linux-doc-6.12_*.deb\n```\n\n"
          "Its report goes to `docs/reproduction-gpu.md`, its table, plots and results to "
          "`bench/results/reproduce-gpu/`.\n")
    write_text_atomic(path, text.getvalue())


def parameter_counts(work: Path) -> dict[str, int]:
    """Parameters of each trained model, read from its safetensors header (no weights loaded)."""
    from safetensors import safe_open

    counts = {}
    for name in RUNS:
        path = work / "models" / name / "model.safetensors"
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                counts[name] = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return counts


def render(record: dict[str, Any], out: Path, report: Path, work: Path) -> None:
    """Table (CSV, markdown), plots, results.json and the report from the measurements alone."""
    results = [RunResult(**r) for r in record["runs"]]
    if not record.get("parameters"):
        record["parameters"] = parameter_counts(work)
    rows_ = table(results)
    record["table"] = rows_
    with (out / "table.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_[0]))
        writer.writeheader()
        writer.writerows(rows_)
    write_text_atomic(out / "table.md", markdown(rows_, list(rows_[0])))
    figures = plots(results, record["sampling"], out)
    write_text_atomic(out / "results.json", json.dumps(record, indent=1, default=str) + "\n")
    size = Size(**{**record["size_fields"], "gen_steps": tuple(record["size_fields"]["gen_steps"])}) \
        if "size_fields" in record else SIZES[record["size"]]
    write_report(report, out, setup_of(record), size, results, rows_, record["sampling"], record["invariance"],
                 figures, record["parameters"])


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="cpu (default), quick or gpu")
    parser.add_argument("--quick", action="store_true", help="the same as --preset quick: the same path, tiny sizes")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="--preset gpu: the linux-doc-6.12 .deb (apt-get download linux-doc-6.12) or its folder")
    parser.add_argument("--device", default=None, help="torch device of training and sampling (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="data, models and MLflow store (default: runs/)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/reproduce)")
    parser.add_argument("--report", type=Path, default=None, help="the markdown report (default: docs/...)")
    parser.add_argument("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only redraw the table, plots and report from a results.json of an earlier run")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides of every run (model.n_layers=2) and sizes (size.steps=10)")
    args = parser.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        parser.error(f"--quick and --preset {args.preset} contradict each other")
    preset_name = "quick" if args.quick else args.preset or "cpu"
    preset = PRESETS[preset_name]
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        parser.error(f"overrides must be KEY=VALUE, got {bad[0]!r}")
    size = size_with(preset.size, [o for o in args.overrides if o.startswith("size.")])
    config_overrides = [*preset.overrides, f"training.seed={args.seed}", f"data.seed={args.seed}",
                        *(o for o in args.overrides if not o.startswith("size."))]
    suffix = "" if preset_name == "cpu" else f"-{preset_name}"
    work = (args.work or ROOT / "runs" / f"reproduce{suffix}").absolute()
    out = (args.out or ROOT / "bench" / "results" / f"reproduce{suffix}").absolute()
    report = (args.report or ROOT / "docs" / f"reproduction{suffix}.md").absolute()
    if args.from_results is not None:
        out.mkdir(parents=True, exist_ok=True)
        render(json.loads(args.from_results.read_text()), out, report, work)
        log(f"report: {report}; results: {out}")
        return 0
    from mdlm.config_base import ConfigError

    try:
        base = load_config(preset.config, config_overrides)
        for name in RUNS:  # every run's config is checked before anything is prepared or trained
            load_config(preset.config, [*config_overrides, *RUNS[name][1]])
    except ConfigError as exc:
        parser.error(str(exc))
    if preset.corpus == "linux-doc" and args.corpus is None:
        parser.error(f"--preset {preset_name} needs --corpus: the linux-doc-6.12 .deb (apt-get download "
                     "linux-doc-6.12, or from packages.debian.org) or the folder it was extracted to")
    device = args.device or preset.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--preset {preset_name} trains on {device}, which this machine lacks (--device cpu runs "
                     "the same path on the CPU, at a smaller size: size.steps=... model.n_layers=...)")
    out.mkdir(parents=True, exist_ok=True)
    if device == "cpu":
        torch.set_num_threads(2)
    else:
        torch.set_float32_matmul_precision("high")  # evaluation and sampling in fp32 with TF32 matmuls
    started = time.perf_counter()

    main_data, zero_data = prepare(base, preset, work, args.corpus)
    val = rows(main_data, "validation", size.eval_rows)
    test = rows(main_data, "test", size.test_rows)
    zero = rows(zero_data, "test", size.test_rows)
    tracking_uri = tracking.default_tracking_uri(work)
    experiment_id = tracking.ensure_experiment(tracking_uri, "mdlm-reproduce", work / "mlartifacts")

    results: list[RunResult] = []
    models: dict[str, Any] = {}
    for name in RUNS:
        config = load_config(preset.config, [*config_overrides, *RUNS[name][1]])
        log(f"training {name} ({size.steps} steps)")
        result, model = train_run(name, config, main_data, val, size, args.seed, experiment_id, tracking_uri, work,
                                  device)
        result.test = bound(model, *test, size.mc_samples, args.seed + 1)
        result.zero_shot = bound(model, *zero, size.mc_samples, args.seed + 2)
        metrics = {"test_bound": result.test["nelbo"], "test_ppl": result.test["ppl"],
                   "zero_shot_bound": result.zero_shot["nelbo"]}
        buffer = tracking.MetricBuffer(tracking_uri, result.mlflow_run_id)
        buffer.add(size.steps, metrics)
        buffer.flush()
        tracking.finish_run(tracking_uri, result.mlflow_run_id)
        log(f"{name}: test {result.test['nelbo']:.4f} +- {result.test['se']:.4f} nats/token "
            f"(ppl {result.test['ppl']:.2f}), zero-shot {result.zero_shot['nelbo']:.4f}, {result.seconds:.0f} s")
        results.append(result)
        models[name] = model

    evaluator = work / "models" / "ar"
    cells = {name: sampling_study(models[name], evaluator, size, args.seed, main_data.block_size)
             for name in ("mdlm", "sedd", "d3pm") if name in models}
    log("sampling study done; invariance of the Ray evaluation job")
    invariant = invariance(work / "models" / "mdlm", Path(main_data.root), size, args.seed, work)

    flags = {"cpu": "", "quick": " --quick"}.get(preset_name, f" --preset {preset_name}")
    if preset.corpus == "linux-doc":
        import linux_doc

        flags += f" --corpus {linux_doc.PACKAGE}_{linux_doc.VERSION}_all.deb"
    if args.device:
        flags += f" --device {args.device}"
    command = f"python bench/reproduce.py{flags} --seed {args.seed}" + "".join(f" {o}" for o in args.overrides)
    setup = {"preset": preset_name, "config": preset.config, "corpus": preset.corpus, "zero_shot": preset.zero_shot,
             "tokenizer": base.data.tokenizer,
             "vocab_size": base.data.tokenizer_vocab_size if base.data.tokenizer == "bpe" else main_data.vocab_size,
             "block_size": main_data.block_size,
             "batch": base.training.global_batch_size, "device": device, "command": command,
             "overrides": args.overrides,
             "torch": torch.__version__,
             "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    record = {"size": preset_name, "size_fields": size.__dict__, "setup": setup, "seed": args.seed,
              "runs": [r.__dict__ for r in results], "parameters": parameter_counts(work), "sampling": cells,
              "invariance": invariant, "seconds": round(time.perf_counter() - started, 1)}
    render(record, out, report, work)
    log(f"report: {report}; results: {out}; {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
