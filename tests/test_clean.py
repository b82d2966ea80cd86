"""The clean stage end to end on real text: accounting, artifact, report, mixture, executors."""

import json

import pytest

from conftest import corpus_with_junk, reference_docs, tiny_recipe

ALL_STEPS = ["normalize", "exact_dedup", "quality", "pii", "minhash_dedup", "perplexity"]


def clean_config(tmp, **over):
    ppl = {"order": 3, "reference_file": str(reference_docs(tmp / "reference.jsonl")), "min_words": 20}
    return {"steps": ALL_STEPS, "workers": 2, "docs_per_shard": 100, "perplexity": ppl, **over}


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory, small_corpus):
    from conftest import prepare_corpus

    tmp = tmp_path_factory.mktemp("clean")
    corpus, n = corpus_with_junk(tmp, small_corpus)
    recipe = tiny_recipe(tmp / "runs", corpus, clean=clean_config(tmp))
    prepare_corpus(recipe)
    return recipe, n


def test_every_document_is_accounted_for(cleaned):
    recipe, n = cleaned
    out = recipe.run_dir / "clean"
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    kept = [json.loads(x) for f in sorted(out.glob("*.jsonl")) for x in f.read_text().splitlines()]
    dropped = [
        json.loads(x) for f in sorted((out / "dropped").glob("*.jsonl")) for x in f.read_text().splitlines()
    ]
    assert m["docs_in"] == n == len(kept) + len(dropped)
    assert {r["id"] for r in kept}.isdisjoint({r["id"] for r in dropped})
    by = {}
    for r in dropped:
        by.setdefault(r["meta"]["dropped_by"], set()).add(r["id"])
    assert {f"copy-{i}" for i in range(10)} <= by["exact_dedup"]
    assert any(i.startswith("near-") for i in by["minhash_dedup"])
    assert sum(i.startswith("salad-") for i in by.get("perplexity", set())) >= 10  # most of the 15 salads
    assert all(r["meta"]["drop_reason"] for r in dropped)
    real_docs = [r for r in kept + dropped if r["meta"]["domain"] == "docs" and r["id"].startswith("doc-")]
    lost = [r for r in real_docs if r["meta"].get("dropped_by") == "perplexity"]
    assert len(lost) < 0.1 * len(real_docs)  # the ceiling costs little real text
    pii = next(r for r in kept + dropped if r["id"] == "pii")
    assert "<EMAIL>" in pii["text"] and "<PHONE>" in pii["text"] and "jane.doe" not in pii["text"]
    assert all(r["meta"]["ppl_bucket"] in {"head", "middle", "tail", None} for r in kept)


def test_report_stats_and_mixture(cleaned):
    recipe, _ = cleaned
    out = recipe.run_dir / "clean"
    for f in ("stats.json", "mixture.json", "report.html", "steps.png", "mixture.png", "perplexity.png"):
        assert (out / f).is_file(), f
    mixture = json.loads((out / "mixture.json").read_text())
    assert set(mixture["weights"]) == {"code", "docs"}
    assert sum(mixture["weights"].values()) == pytest.approx(1.0)
    assert 0 < mixture["mixture_entropy_bits"] <= 1.0
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats) == ALL_STEPS


def test_pretraining_draws_from_the_mixture(cleaned):
    from ownlm.pretrain.shards import StepSampler, TokenShards
    from ownlm.pretrain.stage import run_pretrain
    from ownlm.tokenizer import run_tokenizer

    recipe, _ = cleaned
    run_tokenizer(recipe)
    out = run_pretrain(
        recipe.model_copy(update={"pretrain": recipe.pretrain.model_copy(update={"max_steps": 2})})
    )
    assert json.loads((out / "manifest.json").read_text())["inputs"]["corpus"]
    weights = json.loads((recipe.run_dir / "clean" / "mixture.json").read_text())["weights"]
    train = TokenShards(recipe.run_dir / "shards", "train")
    s = StepSampler(train.n_rows, 256, 0, train.domain_ranges, weights)
    rows = s.global_rows(0)
    lo, hi = train.domain_ranges["docs"]
    assert abs(((rows >= lo) & (rows < hi)).mean() - weights["docs"]) < 0.1


@pytest.mark.slow
def test_dask_and_local_clean_stages_are_byte_identical(tmp_path, small_corpus):
    from conftest import prepare_corpus

    corpus, _ = corpus_with_junk(tmp_path, small_corpus)
    outs = {}
    for ex in ("local", "dask"):
        recipe = tiny_recipe(tmp_path / ex, corpus, clean=clean_config(tmp_path, executor=ex))
        prepare_corpus(recipe)
        out = recipe.run_dir / "clean"
        outs[ex] = {
            p.relative_to(out).as_posix(): p.read_bytes()
            for p in [*sorted(out.rglob("*.jsonl")), out / "stats.json", out / "mixture.json"]
        }
    assert outs["local"] == outs["dask"]
