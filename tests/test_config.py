import pytest

from ownlm.core.errors import OwnlmError
from ownlm.recipe import load_recipe, parse_overrides


def test_builtin_recipes_load_with_documented_fields():
    tiny = load_recipe("tiny")
    base = load_recipe("base")
    assert tiny.model.depth < base.model.depth
    assert 12 <= base.model.depth <= 24
    for section in ("data", "tokenizer", "model", "pretrain"):
        for name, field in type(getattr(tiny, section)).model_fields.items():
            assert field.description, f"{section}.{name} has no one-line doc"


def test_overrides_are_typed_and_nested():
    r = load_recipe("tiny", ["--pretrain.max_steps", "7", "--model.depth=3", "--data.sources", "[a.jsonl]"])
    assert r.pretrain.max_steps == 7 and r.model.depth == 3 and r.data.sources == ["a.jsonl"]
    assert parse_overrides(["--a.b.c", "1.5"]) == {"a": {"b": {"c": 1.5}}}


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--pretrain.max_steps", "many"], "pretrain.max_steps"),
        (["--model.attention", "quantum"], "model.attention"),
        (["--pretrain.not_a_field", "1"], "pretrain.not_a_field"),
        (["--pretrain.lr", "-1"], "pretrain.lr"),
    ],
)
def test_bad_fields_name_the_file_and_field(args, field):
    with pytest.raises(OwnlmError) as e:
        load_recipe("tiny", args)
    msg = str(e.value)
    assert "tiny.yaml" in msg and f"'{field}'" in msg and "\n" not in msg


def test_bad_recipe_file(tmp_path):
    with pytest.raises(OwnlmError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(OwnlmError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(OwnlmError, match="overrides look like"):
        load_recipe("tiny", ["max_steps", "3"])
