"""The config base every stage's config class derives from.

Each stage owns its config class, next to the code that uses it (as TRL pairs XTrainer and
XConfig); `ownlm.recipe` composes them into a recipe. This base sits on the ground floor so that
stages import it without importing the composer (which imports every stage).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config: unknown fields are errors, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def seeded(part: StrictModel, seed: int):
    """A sub-config with the recipe's seed, unless the user set that sub-config's own seed."""
    return part if "seed" in part.model_fields_set else part.model_copy(update={"seed": seed})


def read_yaml_mapping(path: Path, what: str, shape: str) -> dict:
    """A YAML file that must hold a mapping (an empty file is an empty one); errors name the file.
    `what` says what the file is ("the safety rules"), `shape` what it should look like."""
    import yaml

    from ownlm.core.errors import OwnlmError

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise OwnlmError(f"{path}: cannot read {what}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise OwnlmError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise OwnlmError(f"{path}: {shape}")
    return raw


def field_path(loc: tuple) -> str:
    """pydantic's error location as a path: block[0].category."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate_file(model: type[StrictModel], raw: dict, path: Path):
    """`model` from a file's mapping; the first error names the file and the field."""
    from pydantic import ValidationError

    from ownlm.core.errors import OwnlmError

    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise OwnlmError(
            f"{path}: field '{field_path(tuple(err['loc'])) or '(top level)'}': {err['msg']}"
        ) from None
