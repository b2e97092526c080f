"""``bench/bench_quality.py`` end to end on tiny saved models (MDLM, AR baseline, AR evaluator): the cells it
measures, forward passes against each sampler's closed count, cached = ancestral draw for draw, the JSON and
plot it writes, its targets rule on hand-made cells, and its input errors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from mdlm.config import model_config_for
from mdlm.data.tokenizer import special_tokens, train_bpe
from mdlm.modeling import MDLM, ARModel
from tests.conftest import perturb_

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles. ")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    tokenizer = train_bpe([TEXT * 3], 300)
    special = special_tokens(tokenizer)
    shape = dict(vocab_size=special.vocab_size, mask_token_id=special.mask_id, bos_token_id=special.bos_id,
                 eos_token_id=special.eos_id, max_seq_len=24, dropout=0.0, n_layers=1, hidden_size=32, n_heads=2,
                 cond_dim=16)
    perturb_(MDLM(model_config_for("cpu", **shape), tokenizer=tokenizer), 0.1, 1).save_pretrained(root / "mdlm")
    perturb_(ARModel(model_config_for("cpu", kind="ar", **shape), tokenizer=tokenizer), 0.1, 2).save_pretrained(
        root / "ar")
    perturb_(ARModel(model_config_for("cpu", kind="ar", **shape), tokenizer=tokenizer), 0.1, 3).save_pretrained(
        root / "evaluator")
    return root


def test_every_cell_is_measured_and_written(models, tmp_path, capsys):
    bench, out = _bench(), tmp_path / "q.json"
    assert bench.main(["--model", str(models / "mdlm"), "--evaluator", str(models / "evaluator"),
                       "--ar", str(models / "ar"), "--length", "16", "--samples", "4", "--batch", "2",
                       "--threads", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ar (KV cache) | 15 |" in capsys.readouterr().out
    labels = [c["label"] for c in record["cells"]]
    steps = [2, 4, 8, 16, 32]  # L/8 .. 2L for L = 16
    assert labels == ([f"{s} @{n}" for s in ("ancestral", "cached", "confidence_k", "remdm") for n in steps]
                      + ["first_hitting"] + [f"confidence >{t}" for t in (0.5, 0.7, 0.9, 0.99)]
                      + ["semi-AR x4 cached @8", "semi-AR x4 cached @8 prefix cache"])
    cell = {c["label"]: c for c in record["cells"]}
    generated = 15  # 16 tokens after the BOS
    for n in steps:
        ancestral, cached = cell[f"ancestral @{n}"], cell[f"cached @{n}"]
        assert ancestral["forward_passes"] <= n and cached["forward_passes"] <= ancestral["forward_passes"]
        # the cached sampler draws exactly what ancestral draws: same texts, so the same scores
        assert (cached["gen_ppl"], cached["entropy"]) == (ancestral["gen_ppl"], ancestral["entropy"])
        per_step = math.ceil(generated / n)  # confidence_k's default k = ceil(masked / steps)
        assert cell[f"confidence_k @{n}"]["forward_passes"] == math.ceil(generated / per_step)
    assert cell["first_hitting"]["forward_passes"] == generated
    assert all(1 <= cell[f"confidence >{t}"]["forward_passes"] <= generated for t in (0.5, 0.7, 0.9, 0.99))
    assert record["ar"]["forward_passes"] == generated and record["ar_scored_by_itself"] is False
    semi = [cell["semi-AR x4 cached @8"], cell["semi-AR x4 cached @8 prefix cache"]]
    assert [c["length"] for c in semi] == [64, 64] and [c["prefix_cache"] for c in semi] == [False, True]
    windows = 1 + (64 - 24) // 8  # a 24-token block, then 8 new tokens per window
    assert all(c["forward_passes"] <= 8 * windows for c in semi)
    for c in [*record["cells"], record["ar"]]:
        assert c["samples"] == 4 and c["seconds"] > 0 and c["tokens_per_s"] > 0
        assert 1 < c["gen_ppl"] < 1e6 and 0 < c["entropy"] <= math.log(c.get("length", 16) - 1)
    quality = record["targets"]["quality_at_quarter_passes"]
    assert quality["reference"] == "ancestral @16" and quality["max_forward_passes"] == 4
    assert set(record["targets"]) == {"quality_at_quarter_passes", "speed_at_equal_quality"}


def _cell(label, sampler, steps, passes, ppl, entropy, rate=100.0):
    return {"label": label, "sampler": sampler, "steps": steps, "forward_passes": passes, "gen_ppl": ppl,
            "entropy": entropy, "tokens_per_s": rate}


def test_targets_rule():
    bench = _bench()
    reference = _cell("ancestral @128", "ancestral", 128, 128, 100.0, 4.0, rate=10.0)
    cells = [reference,
             _cell("at the edge", "cached", 32, 32, 110.0, 4.07, rate=50.0),       # 10%, < 2%, L/4: meets it
             _cell("one pass too many", "cached", 33, 33, 100.0, 4.0),
             _cell("worse", "confidence_k", 16, 16, 110.5, 4.0),
             _cell("entropy drop", "confidence_k", 16, 16, 90.0, 3.9),
             _cell("ancestral, few steps", "ancestral", 16, 16, 100.0, 4.0),         # ancestral is the reference
             {**_cell("semi-AR", "cached", 64, 8, 100.0, 4.0, rate=1e6), "stride": 64}]  # other lengths: aside
    targets = bench.check_targets(cells, {"gen_ppl": 105.0, "tokens_per_s": 40.0}, 128)
    assert targets["quality_at_quarter_passes"]["cells_meeting_it"] == ["at the edge"]
    assert targets["quality_at_quarter_passes"]["met"] is True
    speed = targets["speed_at_equal_quality"]  # ppl <= 105: four cells; the first of the fastest wins
    assert speed["fastest_mdlm_cell_as_good"] == "one pass too many" and speed["met"] is True
    slower = bench.check_targets(cells, {"gen_ppl": 95.0, "tokens_per_s": 1000.0}, 128)["speed_at_equal_quality"]
    assert slower["fastest_mdlm_cell_as_good"] == "entropy drop" and slower["met"] is False
    none = bench.check_targets(cells, {"gen_ppl": 50.0, "tokens_per_s": 1.0}, 128)["speed_at_equal_quality"]
    assert none["fastest_mdlm_cell_as_good"] is None and none["met"] is False


def test_bad_input_names_the_argument(models):
    bench = _bench()
    with pytest.raises(SystemExit, match=r"--model .*holds a ar model"):
        bench.main(["--model", str(models / "ar"), "--evaluator", str(models / "evaluator")])
    with pytest.raises(SystemExit, match=r"--length 40 must be in \[8, 24\]"):
        bench.main(["--model", str(models / "mdlm"), "--evaluator", str(models / "evaluator"), "--length", "40"])
    with pytest.raises(SystemExit, match=r"--model .*missing"):
        bench.main(["--model", str(models / "missing"), "--evaluator", str(models / "evaluator")])
