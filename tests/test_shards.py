import json

import numpy as np
import pytest

from ownlm.core.errors import OwnlmError
from ownlm.pretrain.shards import StepSampler, TokenShards, build_shards, is_heldout, val_rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory, trained_run):
    from ownlm.tokenizer import load_tokenizer

    tok = load_tokenizer(trained_run.run_dir / "tokenizer")
    out = tmp_path_factory.mktemp("shards")
    meta = build_shards(
        trained_run.run_dir / "data", tok, out, seq_len=32, val_fraction=0.05, rows_per_shard=100
    )
    return tok, out, meta


def test_rows_are_bos_aligned_and_lose_no_token(shards, trained_run):
    tok, out, meta = shards
    train, val = TokenShards(out, "train"), TokenShards(out, "val")
    assert len(meta["splits"]["train"]["files"]) > 1  # several shard files, read as one
    for split in (train, val):
        rows = split.rows(np.arange(split.n_rows))
        assert (rows[:, 0] == tok.bos_token_id).all()
    # Within each domain, every document's tokens appear in order: the packed stream minus the BOS
    # tokens added to continuations equals the documents' own tokens (up to the dropped last row).
    from ownlm.data.records import iter_corpus

    docs = [r for r in iter_corpus(trained_run.run_dir / "data") if not is_heldout(r["id"], 0.05)]
    assert set(train.domain_ranges) == {"code", "docs"}
    for domain, (lo, hi) in train.domain_ranges.items():
        want = [t for r in docs if r["meta"]["domain"] == domain for t in tok(r["text"])["input_ids"]]
        stream = train.rows(np.arange(lo, hi)).reshape(-1).tolist()
        assert stream[0] == want[0] == tok.bos_token_id
        rebuilt, w = [], 0
        for t in stream:  # skip BOS tokens that the packer inserted at row starts of continuations
            if t == want[w]:
                rebuilt.append(t)
                w += 1
            else:
                assert t == tok.bos_token_id
        assert rebuilt == want[: len(rebuilt)] and len(want) - len(rebuilt) < 33


def test_mixture_sampler_follows_the_weights():
    ranges = {"a": (0, 100), "b": (100, 110)}
    s = StepSampler(n_rows=110, global_batch=64, seed=1, domain_ranges=ranges, weights={"a": 0.5, "b": 0.5})
    rows = np.concatenate([s.global_rows(k) for k in range(50)])
    share_b = float(np.mean(rows >= 100))
    assert 0.45 < share_b < 0.55  # b is 9% of the rows but gets half the samples
    assert (s.global_rows(7) == s.global_rows(7)).all()  # a pure function of the step
    one = np.concatenate([s.micro_rows(3, m, 0, 1, 32) for m in range(2)])
    two = np.concatenate([s.micro_rows(3, 0, r, 2, 32) for r in range(2)])
    assert (one == two).all()


def test_heldout_split_is_stable_and_close_to_fraction():
    ids = [f"doc-{i}" for i in range(20000)]
    share = sum(is_heldout(i, 0.05) for i in ids) / len(ids)
    assert 0.04 < share < 0.06
    assert [is_heldout(i, 0.05) for i in ids[:50]] == [is_heldout(i, 0.05) for i in ids[:50]]


def test_two_processes_see_the_same_global_batch_as_one():
    s = StepSampler(n_rows=50, global_batch=8, seed=3)
    for step in (0, 5, 6, 13):  # crosses epoch boundaries (50 rows, 8 per step)
        one = np.concatenate([s.micro_rows(step, m, 0, 1, 4) for m in range(2)])
        two = np.concatenate([s.micro_rows(step, 0, r, 2, 4) for r in range(2)])
        assert (one == two).all() and (one == s.global_rows(step)).all()
    epoch0 = np.concatenate([s.global_rows(k) for k in range(6)])[:48]
    assert len(set(epoch0.tolist())) == 48  # no repeats within an epoch
    assert (val_rows(1000, 10) == val_rows(1000, 10)).all() and len(val_rows(5, 10)) == 5


def test_truncated_shard_is_reported(shards, tmp_path):
    import shutil

    _, out, _ = shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    name = json.loads((copy / "shards.json").read_text())["splits"]["train"]["files"][0]
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[:-6])
    with pytest.raises(OwnlmError, match=f"{name}: truncated shard"):
        TokenShards(copy, "train")


def test_corpus_too_small_for_a_row(tmp_path, shards):
    tok = shards[0]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text(
        '{"id": "1", "text": "tiny", "meta": {"domain": "x", "source": "t", "license": "CC0"}}\n'
    )
    (tmp_path / "o").mkdir()
    with pytest.raises(OwnlmError, match="too small"):
        build_shards(tmp_path / "c", tok, tmp_path / "o", seq_len=64, val_fraction=0.5)
