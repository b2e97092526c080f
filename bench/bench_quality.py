"""Sampling quality against speed: every MDLM sampler at steps in {L/8, L/4, L/2, L, 2L} and the AR baseline with
its KV cache, in one run: forward passes, wall time, tokens/s, generative perplexity under an autoregressive
evaluator and unigram entropy; written as JSON and a plot (tokens/s against generative perplexity), with the
targets checked.

    python bench/bench_quality.py --model runs/ray/cpu-demo/model --evaluator runs/ray/ar-demo/model
                                  [--ar PATH] [--length L] [--samples 32] [--batch 32] [--seed 0] [--threads 2]
                                  [--device cpu|cuda] [--out bench/results/quality-....json]

Cells: ancestral, cached, confidence_k (tokens per step = ceil(masked / steps)) and remdm (its default cap
schedule) at each step count; first_hitting once (it takes exactly one pass per generated token, whatever the
steps); confidence at thresholds 0.5, 0.7, 0.9 and 0.99 (it has no step count). Samples start from the BOS token
as training rows do; sample batch j is drawn with seed ``row_seed(seed, j)`` in every cell. Wall time counts the
sampling calls only (not decoding or scoring). ``--ar`` is the AR baseline sampled with its KV cache (default:
the evaluator itself, which then scores its own samples: the JSON says so, since that favours it).

Two more cells: semi-autoregressive generation of 4 blocks (windows advancing by half a block, the cached
sampler at half a block of steps per window), without and with the approximate prefix KV cache
(``prefix_cache``): its effect on generative perplexity, measured.

Targets (issue #13):
1. quality at a quarter of the passes: a cell other than ancestral with at most L/4 forward passes whose
   generative perplexity is within 10% of ancestral-at-L and entropy within 2% of it;
2. speed at equal quality (meant for a GPU, L = 1,024, batch 32): the fastest MDLM cell whose generative
   perplexity is at most the AR baseline's has tokens/s >= the AR baseline's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlm.eval.evaluator import load_scorer
from mdlm.eval.metrics import generative_perplexity, row_seed, unigram_entropy
from mdlm.eval.report import write_json_atomic
from mdlm.modeling import MDLM, ARModel, load_pretrained

RESULTS = Path(__file__).resolve().parent / "results"
STEP_FRACTIONS = (0.125, 0.25, 0.5, 1.0, 2.0)  # steps = fraction x L
STEPPED = ("ancestral", "cached", "confidence_k", "remdm")
THRESHOLDS = (0.5, 0.7, 0.9, 0.99)
PPL_TOLERANCE, ENTROPY_TOLERANCE = 0.10, 0.02


def cells_for(length: int, samplers: tuple[str, ...], semi_ar: bool = True) -> list[dict[str, Any]]:
    """The (sampler, settings) cells of one run, in the order they are measured."""
    cells: list[dict[str, Any]] = []
    for sampler in (s for s in STEPPED if s in samplers):
        for fraction in STEP_FRACTIONS:
            cells.append({"sampler": sampler, "steps": max(1, round(fraction * length))})
    if "first_hitting" in samplers:
        cells.append({"sampler": "first_hitting", "steps": None})
    if "confidence" in samplers:
        cells.extend({"sampler": "confidence", "steps": None, "confidence_threshold": t} for t in THRESHOLDS)
    if semi_ar and "cached" in samplers:  # 4 blocks, windows advancing by half a block; with and without the cache
        for cached in (False, True):
            cells.append({"sampler": "cached", "steps": length // 2, "length": 4 * length, "stride": length // 2,
                          "prefix_cache": cached})
    return cells


def label(cell: dict[str, Any]) -> str:
    if cell["sampler"] == "ar":
        return "ar (KV cache)"
    if "confidence_threshold" in cell:
        return f"confidence >{cell['confidence_threshold']}"
    if "stride" in cell:
        return f"semi-AR x4 {cell['sampler']} @{cell['steps']}" + (" prefix cache" if cell["prefix_cache"] else "")
    return cell["sampler"] if cell["steps"] is None else f"{cell['sampler']} @{cell['steps']}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model: MDLM | ARModel, scorer, cell: dict[str, Any], args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    """Draw ``args.samples`` samples of ``args.length`` tokens for one cell, time the sampling calls and score
    the texts: forward passes (per batch), seconds, tokens/s, generative perplexity, mean unigram entropy."""
    bos = model.config.bos_token_id
    prefix = [bos] if bos is not None else None
    kwargs = {k: v for k, v in cell.items() if k not in ("sampler", "length") and v is not None}
    length = cell.get("length", args.length)
    if cell["sampler"] != "ar":
        kwargs["sampler"] = cell["sampler"]
    seconds, passes, texts, entropies, generated = 0.0, [], [], [], 0
    for j, first in enumerate(range(0, args.samples, args.batch)):
        count = min(args.batch, args.samples - first)
        sync(device)
        start = time.perf_counter()
        out = model.sample(count, length, prefix=prefix, seed=row_seed(args.seed, j), **kwargs)
        sync(device)
        seconds += time.perf_counter() - start
        mask_id = model.config.mask_token_id
        if cell["sampler"] != "ar" and bool((out.tokens == mask_id).any()):
            raise RuntimeError(f"{label(cell)} left masked tokens")
        body = out.tokens[:, len(prefix or []):].cpu()
        generated += body.numel()
        passes.append(out.num_forward_passes)
        texts.extend(model.decode(out.tokens))
        entropies.extend(unigram_entropy(body)[0])
    nll, scored = scorer.score_texts(texts, args.evaluator_batch)
    return {**cell, "label": label(cell), "forward_passes": max(passes), "seconds": round(seconds, 4),
            "tokens_per_s": round(generated / seconds, 2) if seconds > 0 else math.inf,
            "gen_ppl": generative_perplexity(nll, scored), "entropy": sum(entropies) / len(entropies),
            "samples": len(texts)}


def check_targets(cells: list[dict[str, Any]], ar: dict[str, Any], length: int) -> dict[str, Any]:
    """Both targets of the module docstring, from the measured cells (semi-autoregressive ones aside)."""
    cells = [c for c in cells if "stride" not in c]
    reference = next(c for c in cells if c["sampler"] == "ancestral" and c["steps"] == length)
    within = [c["label"] for c in cells
              if c["sampler"] != "ancestral" and c["forward_passes"] <= length / 4
              and c["gen_ppl"] <= (1 + PPL_TOLERANCE) * reference["gen_ppl"]
              and abs(c["entropy"] - reference["entropy"]) <= ENTROPY_TOLERANCE * reference["entropy"]]
    as_good = [c for c in cells if c["gen_ppl"] <= ar["gen_ppl"]]
    fastest = max(as_good, key=lambda c: c["tokens_per_s"]) if as_good else None
    return {
        "quality_at_quarter_passes": {
            "reference": reference["label"], "reference_gen_ppl": reference["gen_ppl"],
            "reference_entropy": reference["entropy"], "max_forward_passes": length / 4,
            "gen_ppl_at_most": (1 + PPL_TOLERANCE) * reference["gen_ppl"],
            "entropy_within": ENTROPY_TOLERANCE, "cells_meeting_it": within, "met": bool(within)},
        "speed_at_equal_quality": {
            "ar_gen_ppl": ar["gen_ppl"], "ar_tokens_per_s": ar["tokens_per_s"],
            "fastest_mdlm_cell_as_good": fastest["label"] if fastest else None,
            "its_tokens_per_s": fastest["tokens_per_s"] if fastest else None,
            "met": bool(fastest and fastest["tokens_per_s"] >= ar["tokens_per_s"])},
    }


def plot(record: dict[str, Any], path: Path) -> None:
    """tokens/s (log) against generative perplexity, one line per sampler, the AR baseline as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    def line(c: dict[str, Any]) -> str:
        return c["label"] if "stride" in c else c["sampler"]

    for name in dict.fromkeys(line(c) for c in record["cells"]):
        group = [c for c in record["cells"] if line(c) == name]
        ax.plot([c["tokens_per_s"] for c in group], [c["gen_ppl"] for c in group], marker="s" if "stride" in group[0]
                else "o", label=name)
        for c in group:
            ax.annotate(str(c["forward_passes"]), (c["tokens_per_s"], c["gen_ppl"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ar = record["ar"]
    ax.plot([ar["tokens_per_s"]], [ar["gen_ppl"]], marker="*", markersize=14, linestyle="none", color="black",
            label="ar (KV cache)")
    target = record["targets"]["quality_at_quarter_passes"]
    ax.axhline(target["gen_ppl_at_most"], color="grey", linestyle="--", linewidth=0.8,
               label="ancestral@L gen. ppl + 10%")
    ax.set_xscale("log")
    ax.set_xlabel("tokens / s (sampling only)")
    ax.set_ylabel(f"generative perplexity ({Path(record['evaluator']).name} evaluator)")
    ax.set_title(f"L = {record['length']}, {record['samples']} samples, batch {record['batch']}, "
                 f"{record['machine']['device']} (labels: forward passes)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def table(record: dict[str, Any]) -> str:
    lines = ["| cell | forward passes | seconds | tokens/s | gen. ppl | entropy |", "|---|---|---|---|---|---|"]
    for c in [*record["cells"], record["ar"]]:
        lines.append(f"| {c['label']} | {c['forward_passes']} | {c['seconds']:.2f} | {c['tokens_per_s']:.0f} | "
                     f"{c['gen_ppl']:.1f} | {c['entropy']:.3f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the MDLM (save_pretrained directory or models:/ URI)")
    parser.add_argument("--evaluator", required=True, help="AR evaluator: this project's AR export or a local "
                        "Hugging Face causal-LM directory")
    parser.add_argument("--ar", help="the AR baseline to sample (default: --evaluator)")
    parser.add_argument("--length", type=int, help="L, tokens per sample incl. BOS (default: the model's block)")
    parser.add_argument("--samples", type=int, default=32, help="samples per cell")
    parser.add_argument("--batch", type=int, default=32, help="samples per sampling call")
    parser.add_argument("--evaluator-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, help="JSON path (the plot goes beside it as .png)")
    args = parser.parse_args(argv)
    for name in ("samples", "batch", "evaluator_batch", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def load(path: str, device: torch.device, kind: type, what: str):
    try:
        model = load_pretrained(path, map_location=device)
    except (OSError, ValueError) as error:
        raise SystemExit(f"{what} {path}: {error}") from None
    if not isinstance(model, kind):
        raise SystemExit(f"{what} {path} holds a {model.model_type} model, not {kind.__name__}")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load(args.model, device, MDLM, "--model")
    ar_model = load(args.ar or args.evaluator, device, ARModel, "--ar" if args.ar else "--evaluator")
    args.length = args.length or model.config.max_seq_len
    for what, m in (("--model", model), ("the AR baseline", ar_model)):
        if not 8 <= args.length <= m.config.max_seq_len:
            raise SystemExit(f"--length {args.length} must be in [8, {m.config.max_seq_len}] ({what}'s block)")
    scorer = load_scorer(args.evaluator, device)
    started = time.perf_counter()
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    cells = []
    for cell in cells_for(args.length, model.samplers):
        cells.append(measure(model, scorer, cell, args, device))
        c = cells[-1]
        print(f"{c['label']:>22}: {c['forward_passes']:4d} passes {c['seconds']:8.2f} s "
              f"{c['tokens_per_s']:9.0f} tok/s  gen ppl {c['gen_ppl']:8.1f}  entropy {c['entropy']:.3f}", flush=True)
    ar = measure(ar_model, scorer, {"sampler": "ar", "steps": None, "use_cache": True}, args, device)
    print(f"{ar['label']:>22}: {ar['forward_passes']:4d} passes {ar['seconds']:8.2f} s "
          f"{ar['tokens_per_s']:9.0f} tok/s  gen ppl {ar['gen_ppl']:8.1f}  entropy {ar['entropy']:.3f}")
    record = {"benchmark": "quality", "date": dt.date.today().isoformat(), "machine": machine,
              "model": str(args.model), "model_parameters": sum(p.numel() for p in model.parameters()),
              "ar": ar, "ar_model": str(args.ar or args.evaluator), "ar_scored_by_itself": not args.ar,
              "evaluator": str(args.evaluator), "length": args.length, "samples": args.samples,
              "batch": args.batch, "seed": args.seed, "cells": cells,
              "targets": check_targets(cells, ar, args.length)}
    record["seconds_total"] = round(time.perf_counter() - started, 1)
    out = args.out or RESULTS / f"quality-{device.type}-L{args.length}-{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, record)
    plot(record, out.with_suffix(".png"))
    print(table(record))
    print(json.dumps(record["targets"], indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
