"""``python bench/reproduce.py --quick``: the whole reproduction path (prepare, train every baseline and
ablation, bounds with standard errors, zero-shot, sampling study, Ray evaluation invariance, MLflow, CSV,
plots, report) at a few-minute size, as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["mdlm", "ar", "sedd", "d3pm", "mdlm-discrete", "mdlm-no-carry-over", "mdlm-time-cond", "mdlm-cosine"]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def reproduce(folder: Path) -> tuple[Path, Path]:
    out, report = folder / "results", folder / "reproduction.md"
    command = [sys.executable, str(ROOT / "bench" / "reproduce.py"), "--quick", "--work", str(folder / "work"),
               "--out", str(out), "--report", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, report


def test_quick_reproduction_end_to_end(tmp_path):
    out, report = reproduce(tmp_path)

    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == RUNS
    for run in results["runs"]:
        assert len(run["curve"]) >= 2 and all(p["tokens"] > 0 for p in run["curve"])
        assert run["test"]["se"] > 0 and run["test"]["nelbo"] > 0 and run["zero_shot"]["num_tokens"] > 0
        if run["name"] != "mdlm-no-carry-over":  # it also scores the unmasked positions: a looser bound early on
            assert run["test"]["nelbo"] < 10  # about log(1024) = 6.93 nats/token at this size
    with (out / "table.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [row["run"] for row in table] == RUNS
    assert float(table[0]["vs_mdlm"]) == 1.0  # mdlm is the reference
    sampling = results["sampling"]
    assert set(sampling) == {"mdlm", "sedd", "d3pm"}
    assert {c["label"] for c in sampling["sedd"]} >= {"euler", "ancestral float32", "semi-AR x4"}
    assert all(c["gen_ppl"] > 1 and c["entropy"] > 0 for cells in sampling.values() for c in cells)
    semi = next(c for c in sampling["mdlm"] if c["label"] == "semi-AR x4")
    assert semi["length"] == 4 * 128
    first_hitting = [c for c in sampling["mdlm"] if c["label"] == "first_hitting"]
    assert len({c["forward_passes"] for c in first_hitting}) == 1  # its cost does not depend on steps
    invariance = results["invariance"]
    assert invariance[0]["nelbo"] == invariance[1]["nelbo"]  # 1 vs 2 actors: bit-identical
    assert abs(invariance[0]["nelbo"] - invariance[2]["nelbo"]) < 1e-4  # batch size: float rounding only

    text = report.read_text()
    figures = ("loss_curves.png", "bound_vs_tokens_baselines.png", "bound_vs_tokens_ablation.png",
               "ratio_to_ar_vs_tokens.png", "gen_ppl_entropy_vs_steps.png", "sampler_cost.png")
    for figure in figures:
        assert (out / figure).stat().st_size > 1000 and figure in text
    assert "27.04" in text and "MDLM / AR perplexity ratio reached" in text and "1 vs 2 actors: identical" in text

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mdlm-reproduce")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(f"reproduce-{name}" for name in RUNS)
    assert {r.data.tags["mdlm.comparison"] for r in runs} == {"baselines", "ablation"}
    assert all(r.info.status == "FINISHED" and "test_bound" in r.data.metrics for r in runs)

    # The report regenerates bit for bit from the seed: a second run from scratch (new data, models, MLflow store)
    again = tmp_path / "again"
    again.mkdir()
    out2, report2 = reproduce(again)
    assert report2.read_bytes() == report.read_bytes()
    for name in (*figures, "table.csv", "table.md"):
        assert (out2 / name).read_bytes() == (out / name).read_bytes(), name

    # --from-results redraws the same table, plots and report from the measurements alone
    before = {name: (out / name).read_bytes() for name in (*figures, "table.csv", "table.md")}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--quick", "--from-results",
                           str(out / "results.json"), "--work", str(tmp_path / "work"), "--out", str(out),
                           "--report", str(report)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert report.read_text() == text
    assert {name: (out / name).read_bytes() for name in before} == before
