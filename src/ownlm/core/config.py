"""The config base every stage's config class derives from.

Each stage owns its config class, next to the code that uses it (as TRL pairs XTrainer and
XConfig); `ownlm.recipe` composes them into a recipe. This base sits on the ground floor so that
stages import it without importing the composer (which imports every stage).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config: unknown fields are errors, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def seeded(part: StrictModel, seed: int):
    """A sub-config with the recipe's seed, unless the user set that sub-config's own seed."""
    return part if "seed" in part.model_fields_set else part.model_copy(update={"seed": seed})
