"""Recipes: one YAML file of typed stage configs, with CLI overrides.

Each stage owns its config class (next to the code that uses it, as TRL pairs XTrainer and XConfig,
all deriving from `ownlm.core.config.StrictModel`); this module only composes them into a `Recipe`,
loads YAML, applies `--stage.field value` overrides and turns validation failures into one clear
line naming the file and the field. It sits above the stages (beside `runner.py` and `cli.py`)
because composing needs every stage's config class.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model

from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError


def _stage_types() -> dict[str, type[StrictModel]]:
    # Imported here so `ownlm --help` does not pay for torch/transformers.
    from ownlm.align.stage import AlignConfig
    from ownlm.compress.quantize import QuantizeConfig
    from ownlm.data.clean import CleanConfig
    from ownlm.data.stage import DataConfig
    from ownlm.instruct.augment import AugmentConfig
    from ownlm.instruct.stage import InstructConfig
    from ownlm.models import ModelConfig
    from ownlm.pretrain.stage import PretrainConfig
    from ownlm.safety_training.stage import SafetyTrainConfig
    from ownlm.sft import SFTConfig
    from ownlm.tokenizer import TokenizerConfig

    return {
        "data": DataConfig,
        "clean": CleanConfig,
        "tokenizer": TokenizerConfig,
        "model": ModelConfig,
        "pretrain": PretrainConfig,
        "instruct": InstructConfig,
        "augment": AugmentConfig,
        "sft": SFTConfig,
        "safety": SafetyTrainConfig,
        "align": AlignConfig,
        "quantize": QuantizeConfig,
    }


# `safety` (the content classifier) needs no model of the run; it precedes `align`, whose
# Constitutional AI labels and refusal judge use it.
STAGES = (
    "data", "clean", "tokenizer", "pretrain", "instruct", "augment", "sft", "safety", "align", "quantize",
)  # fmt: skip
# `augment` (model-written instruction data) costs minutes of generation, `quantize` (e.g. QAT)
# minutes of fine-tuning: a recipe opts in.
DEFAULT_STAGES = tuple(s for s in STAGES if s not in ("augment", "quantize"))


StageName = Literal[
    "data", "clean", "tokenizer", "pretrain", "instruct", "augment", "sft", "safety", "align", "quantize"
]


class RecipeBase(StrictModel):
    name: str = Field("tiny", description="Run name: artifacts go to runs_dir/name/<stage>/.")
    runs_dir: str = Field("runs", description="Folder holding all runs.")
    seed: int = Field(1337, description="Seed for every random choice of every stage.")
    stages: list[StageName] = Field(
        default_factory=lambda: list(DEFAULT_STAGES),
        description="Stages `ownlm run` runs, in pipeline order (augment only when listed).",
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


@functools.cache
def recipe_class() -> type[RecipeBase]:
    """The recipe: the common fields plus one section per stage, typed by the stage's own config."""
    sections = {name: (cls, Field(default_factory=cls)) for name, cls in _stage_types().items()}
    return create_model("Recipe", __base__=RecipeBase, **sections)


def builtin_recipe(name: str) -> Path | None:
    """`tiny` → the packaged recipes/tiny.yaml (so recipes work from any working directory)."""
    res = importlib.resources.files("ownlm") / "recipes" / f"{name}.yaml"
    return Path(str(res)) if res.is_file() else None


def resolve_recipe_path(recipe: str | Path) -> Path:
    p = Path(recipe)
    if p.is_file():
        return p
    builtin = builtin_recipe(str(recipe))
    if builtin is not None:
        return builtin
    raise OwnlmError(f"{recipe}: no such recipe file (built-in recipes: tiny, base)")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--pretrain.max_steps", "200", "--model.depth=6", "--name", "x"]` → nested dict of raw values."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise OwnlmError(
                f"{arg}: overrides look like --stage.field VALUE (e.g. --pretrain.max_steps 200)"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise OwnlmError(f"{arg}: missing value")
            key, value = arg[2:], args[i + 1]
            i += 2
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if value != "" else ""
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_recipe(recipe: str | Path = "tiny", overrides: list[str] | dict[str, Any] | None = None):
    """Load and validate a recipe; errors name the file and the dotted field."""
    path = resolve_recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise OwnlmError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise OwnlmError(f"{path}: a recipe is a mapping of stage names to settings")
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        raw = _merge(raw, over)
    try:
        return recipe_class().model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        got = first.get("input")
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise OwnlmError(f"{path}: field '{field}': {first['msg']} (got {got!r}){more}") from None
