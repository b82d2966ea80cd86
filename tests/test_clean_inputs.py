"""Bad and extreme input for the data and clean stages: reported, never silently lost."""

import json

import pytest

from conftest import prepare_corpus, tiny_recipe
from ownlm.core.errors import OwnlmError
from ownlm.data.readers import read_source


def _rec(i, text, domain="books"):
    return {"id": f"r{i}", "text": text, "meta": {"domain": domain, "source": "t", "license": "CC0"}}


def test_a_file_vanishing_mid_read_is_a_clear_error(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"text of {name}")
    records = read_source(tmp_path)
    assert next(records)["text"] == "text of a.txt"
    (tmp_path / "b.txt").unlink()
    with pytest.raises(OwnlmError, match=r"b.txt: vanished while its folder was read"):
        next(records)


def test_binary_file_is_named(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(OwnlmError, match=r"blob.txt: not valid UTF-8 at byte 128"):
        list(read_source(tmp_path / "blob.txt"))


@pytest.mark.slow
def test_a_100_mb_single_line_is_dropped_and_counted(tmp_path):
    src = tmp_path / "big.jsonl"
    prose = "The river ran quietly past the mill, and the miller counted his sacks again. " * 5
    with open(src, "w", encoding="utf-8") as f:
        for i in range(20):
            f.write(json.dumps(_rec(i, f"{prose} Story number {i}.")) + "\n")
        f.write(json.dumps(_rec(99, "x" * 100_000_000)) + "\n")  # one 100 MB line
    recipe = tiny_recipe(tmp_path / "runs", src, clean={"steps": ["normalize", "exact_dedup"], "workers": 1})
    prepare_corpus(recipe)
    m = json.loads((recipe.run_dir / "clean" / "manifest.json").read_text())["metrics"]
    assert m["docs_in"] == 21 and m["docs_kept"] == 20
    assert m["steps"]["normalize"]["dropped"] == {"too_long": 1}
    dropped = (recipe.run_dir / "clean" / "dropped").glob("*.jsonl")
    big = [json.loads(x) for f in dropped for x in f.read_text().splitlines()]
    assert [r["id"] for r in big] == ["r99"] and len(big[0]["text"]) == 100_000_000  # kept, with its reason
