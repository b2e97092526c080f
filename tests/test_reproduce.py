"""``python bench/reproduce.py --quick``: the whole reproduction path (prepare, train every baseline and
ablation, bounds with standard errors, zero-shot, sampling study, Ray evaluation invariance, MLflow, CSV,
plots, report) at a few-minute size, as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import shutil
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
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=folder, env=env)
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
                           "--report", str(report)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert report.read_text() == text
    assert {name: (out / name).read_bytes() for name in before} == before


def run_script(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "gpu"], "--preset gpu needs --corpus"),
    (["--quick", "--preset", "gpu"], "contradict"),
    (["--quick", "size.bogus=1"], "unknown size key 'size.bogus'"),
    (["--quick", "size.steps=0"], "size.steps must be >= 1"),
    (["--quick", "size.steps=many"], "size.steps='many' is not an integer"),
    (["--quick", "model.bogus=1"], "model.bogus"),
    (["--quick", "steps"], "overrides must be KEY=VALUE"),
])
def test_bad_arguments_are_named_before_anything_runs(tmp_path, args, message):
    done = run_script([*args, "--work", str(tmp_path / "work")], tmp_path)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "work").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_preset_without_cuda_says_how_to_run_it_on_cpu(tmp_path):
    done = run_script(["--preset", "gpu", "--corpus", str(tmp_path), "--work", str(tmp_path / "work")], tmp_path)
    assert done.returncode == 2 and "which this machine lacks (--device cpu" in done.stderr, done.stderr[-2000:]


def linux_doc_deb(folder: Path) -> Path:
    """A small linux-doc-6.12 .deb (built by dpkg-deb) whose Documentation holds real English: this machine's
    Debian changelogs (80 small ones), gzipped as the package's files are."""
    docs = folder / "tree" / "usr/share/doc/linux-doc-6.12/Documentation"
    docs.mkdir(parents=True)
    small = [p for p in sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")) if p.stat().st_size < 8000]
    for path in small[:80]:
        (docs / f"{path.parent.name}.rst.gz").write_bytes(path.read_bytes())
    if len(small) < 40:
        pytest.skip("this machine has too few Debian changelogs for the test corpus")
    (folder / "tree" / "DEBIAN").mkdir()
    (folder / "tree" / "DEBIAN" / "control").write_text(
        "Package: linux-doc-6.12\nVersion: 6.12.118-1~deb12u1\nArchitecture: all\nMaintainer: t <t@example.com>\n"
        "Description: test corpus\n")
    deb = folder / "linux-doc-6.12_6.12.118-1~deb12u1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(folder / "tree"), str(deb)], check=True,
                   capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb builds the test .deb")
def test_gpu_preset_path_on_cpu(tmp_path):
    """``--preset gpu`` as a user runs it, on the CPU at a tiny size: the corpus read from a real .deb, GPT-2
    tokens, the 'small' config with overrides, zero-shot on Shakespeare, every run, sampling and invariance."""
    deb = linux_doc_deb(tmp_path)
    overrides = ["data.block_size=128", "training.precision=fp32", "model.hidden_size=64", "model.n_layers=1",
                 "model.n_heads=2", "training.global_batch_size=4", "training.micro_batch_size=4", "size.steps=3",
                 "size.eval_points=2", "size.eval_rows=4", "size.test_rows=4", "size.gen_samples=2",
                 "size.gen_steps=4", "size.invariance_rows=4", "size.semi_ar_steps=4"]
    out, report = tmp_path / "results", tmp_path / "reproduction-gpu.md"
    done = run_script(["--preset", "gpu", "--device", "cpu", "--corpus", str(deb), "--work", str(tmp_path / "work"),
                       "--out", str(out), "--report", str(report), *overrides], tmp_path, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    setup = results["setup"]
    assert (setup["corpus"], setup["zero_shot"], setup["tokenizer"], setup["config"]) == \
        ("linux-doc", "shakespeare", "gpt2", "small")
    assert (setup["vocab_size"], setup["block_size"], setup["batch"], setup["device"]) == (50258, 128, 4, "cpu")
    assert results["size_fields"]["steps"] == 3 and results["size_fields"]["gen_steps"] == [4]
    assert [r["name"] for r in results["runs"]] == RUNS
    assert all(r["curve"][-1]["tokens"] == 3 * 4 * 128 for r in results["runs"])
    assert set(results["sampling"]) == {"mdlm", "sedd", "d3pm"}
    semi = next(c for c in results["sampling"]["mdlm"] if c["label"] == "semi-AR x4")
    assert semi["length"] == 4 * 128 and semi["steps"] == 4
    assert results["invariance"][0]["nelbo"] == results["invariance"][1]["nelbo"]
    text = report.read_text()
    assert "the Linux 6.12 documentation" in text and "GPT-2's byte-level BPE" in text and "`small` model" in text
    assert ("python bench/reproduce.py --preset gpu --corpus linux-doc-6.12_6.12.118-1~deb12u1_all.deb "
            "--device cpu --seed 0 data.block_size=128") in text
    assert "zero-shot on Shakespeare" in text
    corpus = sorted((tmp_path / "work" / "corpus" / "linux-doc-6.12").glob("part-*.jsonl"))
    assert len(corpus) == 16 and all(json.loads(p.read_text().splitlines()[0])["path"].endswith(".rst")
                                     for p in corpus)
