"""Evaluation metrics and autoregressive evaluators, in-process: ``sequence_nll`` against the library's own loss,
the NELBO summary's standard error against closed forms and simulation, entropy and generative perplexity in
closed form, windowed scoring, the project / Hugging Face evaluators against direct computation, and the
indexed parquet reader's row ranges (no Ray cluster)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mdlm.config import NoiseConfig
from mdlm.data.tokenizer import special_tokens, train_bpe
from mdlm.eval import EvalInputError
from mdlm.eval.evaluator import ProjectARScorer, evaluator_kind, load_scorer, scoring_windows
from mdlm.eval.generation import generate_and_score
from mdlm.eval.metrics import (
    generative_perplexity,
    row_generators,
    row_seed,
    sequence_nll,
    summarize_nelbo,
    unigram_entropy,
)
from mdlm.eval.report import to_json, write_json_atomic
from mdlm.eval.settings import GenSettings
from mdlm.modeling import MDLM, ARModel
from tests.conftest import perturb_

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. ")


def _batch(padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 31, (6, 16), generator=g)
    mask = torch.ones_like(x)
    if padded:
        mask[1, 9:] = 0
        mask[4, 3:] = 0
    return x, mask


# ---------------------------------------------------------------------------------------------------------
# sequence_nll


@pytest.mark.parametrize("noise", [
    NoiseConfig(),
    NoiseConfig(schedule="cosine", time="discrete", num_timesteps=10),
    NoiseConfig(schedule="linear", antithetic=False),
    NoiseConfig(schedule="geometric", sampling_eps=0.01),
], ids=["loglinear", "cosine-discrete", "linear-iid", "geometric"])
def test_sequence_nll_equals_model_loss(tiny_config, noise):
    model = perturb_(MDLM(tiny_config, noise), seed=2).eval()
    x, mask = _batch()
    for attention_mask in (mask, None):
        loss = model.loss(x, attention_mask, generator=torch.Generator().manual_seed(7)).loss.detach()
        nll, tokens = sequence_nll(model, x, attention_mask, generator=torch.Generator().manual_seed(7))
        assert nll.shape == (6, 1) and nll.dtype == torch.float64 and tokens.dtype == torch.float64
        expected_tokens = (attention_mask if attention_mask is not None else torch.ones_like(x)).sum(-1)
        assert torch.equal(tokens, expected_tokens.double())
        assert float(nll.sum() / tokens.sum()) == pytest.approx(float(loss), rel=1e-6)


def test_sequence_nll_of_the_ar_model_is_its_exact_loss(tiny_config):
    model = perturb_(ARModel(dataclasses.replace(tiny_config, kind="ar")), seed=2).eval()
    x, mask = _batch()
    nll, tokens = sequence_nll(model, x, mask, mc_samples=3)
    assert nll.shape == (6, 3) and torch.equal(nll[:, 0:1].expand(-1, 3), nll)
    assert torch.equal(tokens, mask[:, 1:].sum(-1).double())  # position 0 is never predicted
    assert float(nll[:, 0].sum() / tokens.sum()) == pytest.approx(model.loss(x, mask).loss.item(), rel=1e-6)


def test_per_row_generators_draw_as_single_rows(tiny_config):
    model = perturb_(MDLM(tiny_config), seed=2).eval()
    x, mask = _batch()
    batched, tokens = sequence_nll(model, x, mask, mc_samples=3, generator=row_generators(5, range(6)))
    single = torch.cat([sequence_nll(model, x[i:i + 1], mask[i:i + 1], mc_samples=3,
                                     generator=row_generators(5, [i])[0])[0] for i in range(6)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    # Row i with K = 1 and its own generator is model.loss on that row alone.
    one, _ = sequence_nll(model, x, mask, generator=row_generators(5, range(6)))
    for i in range(6):
        loss = model.loss(x[i:i + 1], mask[i:i + 1], generator=torch.Generator().manual_seed(row_seed(5, i)))
        assert float(one[i, 0] / tokens[i]) == pytest.approx(loss.loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="2 generators for 6 rows"):
        sequence_nll(model, x, mask, generator=row_generators(5, range(2)))
    with pytest.raises(ValueError, match="mc_samples"):
        sequence_nll(model, x, mask, mc_samples=0)


def test_sequence_nll_is_eval_mode_and_no_grad(tiny_config):
    model = perturb_(MDLM(dataclasses.replace(tiny_config, dropout=0.3)), seed=2).train()
    x, mask = _batch()
    first, _ = sequence_nll(model, x, mask, generator=torch.Generator().manual_seed(0))
    again, _ = sequence_nll(model, x, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)  # no dropout
    assert model.training and not first.requires_grad


@pytest.mark.parametrize("noise", [NoiseConfig(), NoiseConfig(schedule="cosine", time="discrete", num_timesteps=20)],
                         ids=["continuous", "discrete"])
def test_uniform_denoiser_nelbo_is_log_k_within_its_standard_error(tiny_config, noise):
    """A fresh model (zero output layer) is uniform over the 31 real tokens: the NELBO is log 31 per token under
    every schedule, and the estimate lands within a few standard errors of it."""
    model = MDLM(tiny_config, noise).eval()
    x = torch.randint(0, 31, (400, 16), generator=torch.Generator().manual_seed(0))
    nll, tokens = sequence_nll(model, x, mc_samples=2, generator=row_generators(0, range(400)))
    summary = summarize_nelbo(nll, tokens)
    assert abs(summary.nelbo - math.log(31)) < 4 * summary.se, (summary.nelbo, summary.se)
    assert 0 < summary.mc_se <= 1.5 * summary.se  # the data carry no signal: nearly all of it is Monte-Carlo noise


# ---------------------------------------------------------------------------------------------------------
# The summary


def test_summary_standard_error_closed_form_for_equal_lengths():
    rng = np.random.default_rng(0)
    y = rng.normal(300.0, 25.0, size=50)
    summary = summarize_nelbo(y, np.full(50, 100.0))
    assert summary.nelbo == pytest.approx(y.mean() / 100)
    assert summary.se == pytest.approx(y.std(ddof=1) / math.sqrt(50) / 100, rel=1e-12)
    z = NormalDist().inv_cdf(0.975)
    assert summary.ppl == pytest.approx(math.exp(summary.nelbo))
    assert summary.ppl_low == pytest.approx(math.exp(summary.nelbo - z * summary.se))
    assert summary.ppl_high == pytest.approx(math.exp(summary.nelbo + z * summary.se))
    assert summary.mc_se is None and summary.mc_samples == 1 and summary.num_tokens == 5000


def test_summary_with_k_samples_averages_them_and_measures_the_monte_carlo_part():
    base = np.linspace(100.0, 200.0, 40)
    values = np.stack([base - 3.0, base + 3.0], axis=1)  # every row: sample variance (ddof 1) 18
    summary = summarize_nelbo(values, np.full(40, 50.0))
    assert summary.nelbo == pytest.approx(base.sum() / 2000)
    assert summary.se == pytest.approx(base.std(ddof=1) / math.sqrt(40) / 50)
    assert summary.mc_se == pytest.approx(math.sqrt(40 * 18 / 2) / 2000)


def test_summary_standard_error_matches_simulation():
    """Unequal lengths: the delta-method SE of the ratio estimator matches the spread of the estimate over
    many simulated corpora, and its 95% interval covers the true ratio about 95% of the time."""
    rng = np.random.default_rng(1)
    trials, n, ratio = 4000, 60, 3.0
    lengths = rng.integers(10, 200, size=(trials, n)).astype(float)
    values = ratio * lengths + rng.normal(0.0, 1.0, size=(trials, n)) * 2.0 * np.sqrt(lengths) \
        + rng.normal(0.0, 15.0, size=(trials, n))
    summaries = [summarize_nelbo(values[i], lengths[i]) for i in range(trials)]
    estimates = np.array([s.nelbo for s in summaries])
    ses = np.array([s.se for s in summaries])
    assert estimates.mean() == pytest.approx(ratio, abs=0.01)
    assert ses.mean() == pytest.approx(estimates.std(), rel=0.06)
    covered = np.mean([math.log(s.ppl_low) <= ratio <= math.log(s.ppl_high) for s in summaries])
    assert 0.93 <= covered <= 0.97


def test_summary_edge_cases():
    one = summarize_nelbo([[10.0]], [5])
    assert one.nelbo == 2.0 and math.isnan(one.se) and math.isnan(one.ppl_low)
    assert '"se": null' in to_json(one.to_dict())
    assert summarize_nelbo([800.0, 900.0], [1, 1]).ppl == math.inf
    with pytest.raises(ValueError, match="no tokens"):
        summarize_nelbo([1.0], [0])
    with pytest.raises(ValueError, match="do not match"):
        summarize_nelbo([1.0, 2.0], [1])


# ---------------------------------------------------------------------------------------------------------
# Entropy, generative perplexity, seeds


def test_unigram_entropy_closed_forms():
    entropies, mean = unigram_entropy([[3, 1, 4, 7] * 5, [9] * 12, [2, 2, 5], []])
    assert entropies[0] == pytest.approx(math.log(4))
    assert entropies[1] == 0.0 and entropies[3] == 0.0
    assert entropies[2] == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert mean == pytest.approx(sum(entropies) / 4)
    tensor_entropies, _ = unigram_entropy(torch.arange(64).view(2, 32) % 8)
    assert tensor_entropies == pytest.approx([math.log(8)] * 2)


def test_generative_perplexity_is_token_weighted():
    assert generative_perplexity([10.0, 30.0], [10, 10]) == pytest.approx(math.exp(2.0))
    assert generative_perplexity([10.0, 30.0], [5, 35]) == pytest.approx(math.exp(1.0))
    with pytest.raises(ValueError):
        generative_perplexity([1.0], [0])


def test_row_seeds_are_stable_and_distinct():
    assert row_seed(0, 5) == row_seed(0, 5)
    seeds = {row_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**64 for s in seeds)


# ---------------------------------------------------------------------------------------------------------
# Evaluators


@pytest.mark.parametrize(("length", "width", "stride"), [(1, 8, None), (5, 8, None), (8, 8, None), (9, 8, None),
                                                         (40, 8, 3), (40, 8, 7), (100, 16, None)])
def test_scoring_windows_score_every_position_once(length, width, stride):
    windows = scoring_windows(length, width, stride)
    scored = [p for _, end, first in windows for p in range(first, end)]
    assert scored == list(range(1, length))
    for i, (begin, end, first) in enumerate(windows):
        assert end - begin <= width and begin < first
        if i:
            assert first - begin == width - (stride or width // 2)  # at least W - S tokens of context
    with pytest.raises(ValueError):
        scoring_windows(10, 8, 8)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT * 3, "A horse, a horse, my kingdom for a horse!"], 300)


@pytest.fixture(scope="module")
def ar_model(tokenizer):
    from mdlm.config import model_config_for

    special = special_tokens(tokenizer)
    config = model_config_for("cpu", kind="ar", vocab_size=special.vocab_size, mask_token_id=special.mask_id,
                              bos_token_id=special.bos_id, eos_token_id=special.eos_id, max_seq_len=24,
                              dropout=0.0, n_layers=2, hidden_size=32, n_heads=2, cond_dim=16)
    return perturb_(ARModel(config, tokenizer=tokenizer), scale=0.1, seed=4).eval()


def _direct_nll(logits_fn, ids: list[int], begin: int, end: int, first: int) -> float:
    window = torch.tensor([ids[begin:end]])
    with torch.no_grad():
        log_probs = torch.log_softmax(logits_fn(window)[0].float(), dim=-1)
    return float(sum(-log_probs[p - begin - 1, ids[p]] for p in range(first, end)))


def test_project_ar_scorer_matches_the_model(ar_model):
    scorer = ProjectARScorer(ar_model, "ar", stride=10)
    texts = ["To be, or not", TEXT, ""]  # short, longer than the 24-token context, empty
    ids = [scorer.encode(t) for t in texts]
    assert ids[0][0] == ar_model.config.bos_token_id and len(ids[1]) > 24 and ids[2] == [ar_model.config.bos_token_id]
    nll, counts = scorer.score_texts(texts, batch_size=2)
    assert counts.tolist() == [len(i) - 1 for i in ids]
    short, _ = sequence_nll(ar_model, torch.tensor([ids[0]]))
    assert nll[0] == pytest.approx(float(short[0, 0]), rel=1e-5)
    direct = sum(_direct_nll(lambda w: ar_model.backbone(w), ids[1], *window)
                 for window in scoring_windows(len(ids[1]), 24, 10))
    assert nll[1] == pytest.approx(direct, rel=1e-5)
    assert nll[2] == 0.0 and counts[2] == 0


def test_generation_scored_by_the_project_ar_model(tiny_config, tokenizer, ar_model):
    from mdlm.config import model_config_for

    special = special_tokens(tokenizer)
    config = model_config_for("cpu", vocab_size=special.vocab_size, mask_token_id=special.mask_id,
                              bos_token_id=special.bos_id, max_seq_len=24, dropout=0.0, n_layers=2, hidden_size=32,
                              n_heads=2, cond_dim=16)
    model = perturb_(MDLM(config, tokenizer=tokenizer), scale=0.1).eval()
    scorer = ProjectARScorer(ar_model, "ar")
    gen = GenSettings(num_samples=5, evaluator="ar", length=20, steps=6, batch_size=3, seed=3)
    rows = [generate_and_score(model, scorer, b, gen) for b in range(2)]
    assert [i for r in rows for i in r["sample_index"]] == list(range(5))
    again = generate_and_score(model, scorer, 1, gen)
    assert again["text"] == rows[1]["text"]  # a batch's samples depend on (seed, batch index) only
    for row in rows:
        nll, counts = scorer.score_texts(row["text"])
        assert row["nll"] == pytest.approx(nll.tolist()) and row["num_tokens"] == counts.tolist()
    samples = model.sample(3, 20, steps=6, prefix=[special.bos_id], seed=row_seed(3, 0)).tokens
    assert model.decode(samples) == rows[0]["text"]
    assert rows[0]["entropy"] == pytest.approx(unigram_entropy(samples[:, 1:])[0])
    # The AR baseline generates too (left to right from its BOS; steps and sampler do not apply).
    ar_rows = generate_and_score(ar_model, scorer, 0, GenSettings(num_samples=2, evaluator="ar", length=12))
    assert len(ar_rows["text"]) == 2 and ar_rows["forward_passes"] == [11, 11]


def test_results_json_is_written_atomically(tmp_path):
    target = tmp_path / "out" / "results.json"
    write_json_atomic(target, {"a": 1.5, "b": math.nan, "c": [math.inf, 2]})
    assert json.loads(target.read_text()) == {"a": 1.5, "b": None, "c": [None, 2]}
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2} and [p.name for p in target.parent.iterdir()] == ["results.json"]
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 2} and [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_evaluator_kind_errors(tmp_path, tiny_config):
    with pytest.raises(EvalInputError, match="directory not found"):
        evaluator_kind(tmp_path / "missing")
    with pytest.raises(EvalInputError, match=r"no config\.json"):
        evaluator_kind(tmp_path)
    MDLM(tiny_config).save_pretrained(tmp_path / "mdlm")
    with pytest.raises(EvalInputError, match="masked diffusion"):
        evaluator_kind(tmp_path / "mdlm")


def make_hf_gpt2(path, tokenizer, n_positions: int = 16):
    """A tiny GPT-2 and its tokenizer saved as a local Hugging Face directory (safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eos, eos_token=eos)
    eos_id = tokenizer.token_to_id(eos)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=n_positions, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=eos_id, eos_token_id=eos_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(path), safe_serialization=True)
    fast.save_pretrained(str(path))
    return path


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'mdlm[eval]')")
def test_hugging_face_scorer_matches_direct_computation(tmp_path, tokenizer):
    path = make_hf_gpt2(tmp_path / "gpt2", tokenizer)
    assert evaluator_kind(path) == "huggingface"
    scorer = load_scorer(path, name="gpt2")
    assert scorer.max_length == 16 and scorer.describe()["kind"] == "huggingface"
    eos = tokenizer.token_to_id("<|endoftext|>")
    texts = ["A horse", TEXT]
    nll, counts = scorer.score_texts(texts)
    for text, value, count in zip(texts, nll, counts, strict=True):
        ids = [eos, *tokenizer.encode(text, add_special_tokens=False).ids]
        assert count == len(ids) - 1
        direct = sum(_direct_nll(lambda w: scorer.model(input_ids=w).logits, ids, *window)
                     for window in scoring_windows(len(ids), 16))
        assert value == pytest.approx(direct, rel=1e-5)
    # Unwindowed check of the short text against the model's own loss.
    ids = torch.tensor([[eos, *tokenizer.encode("A horse", add_special_tokens=False).ids]])
    with torch.no_grad():
        logits = scorer.model(input_ids=ids).logits
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    assert nll[0] == pytest.approx(float(loss), rel=1e-5)


def test_indexed_reader_covers_every_row_once_in_aligned_blocks(tmp_path):
    """Several files with small row groups, two corpora, a row limit: every read task's blocks carry the right
    rows, tagged with their corpus and index, in blocks aligned on the block size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mdlm.eval.datasource import IndexedParquetDatasource, SplitFiles

    splits, expected = [], []
    for corpus, sizes in enumerate(([7, 5, 9], [6])):
        files, start = [], 0
        for i, n in enumerate(sizes):
            rows = [[corpus * 1000 + start + r] * 4 for r in range(n)]
            path = tmp_path / f"c{corpus}-{i}.parquet"
            pq.write_table(pa.table({"input_ids": rows}), path, row_group_size=3)
            files.append(str(path))
            start += n
        limit = 19 if corpus == 0 else 6  # the first corpus read up to a max_rows of 19
        splits.append(SplitFiles(files=files, file_rows=list(sizes), columns=["input_ids"], rows=limit,
                                 row_bytes=16))
        expected += [(corpus, i) for i in range(limit)]
    source = IndexedParquetDatasource(splits, block_rows=4)
    for parallelism in (1, 3, 100):
        seen = []
        for task in source.get_read_tasks(parallelism):
            for block in task():
                corpus, index = block["corpus"].to_numpy(), block["row_index"].to_numpy()
                assert len(set(corpus)) == 1 and index[0] % 4 == 0 and block.num_rows <= 4
                ids = np.stack(block["input_ids"].to_pylist())[:, 0]
                assert ids.tolist() == (corpus * 1000 + index).tolist()
                seen += list(zip(corpus.tolist(), index.tolist(), strict=True))
        assert sorted(seen) == expected, parallelism
