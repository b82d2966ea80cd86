"""`ownlm run RECIPE`: the recipe's stages in order, each skipped when its artifact is up to date.

Every stage function decides that itself from the fingerprint (config + input hashes) in its
manifest, so the runner only orders them and reports; a crashed run picks up where it stopped
(pretraining resumes from its last checkpoint).
"""

from __future__ import annotations

import time
from pathlib import Path

from ownlm.progress import console


def run_recipe(recipe, force: bool = False) -> dict[str, Path]:
    from ownlm.data.clean import run_clean
    from ownlm.data.stage import run_data
    from ownlm.pretrain import run_pretrain
    from ownlm.tokenizer import run_tokenizer

    stages = [("data", lambda: run_data(recipe, force=force))]
    if recipe.clean.enabled:
        stages.append(("clean", lambda: run_clean(recipe, force=force)))
    if not recipe.pretrain.init_from:
        stages.append(("tokenizer", lambda: run_tokenizer(recipe, force=force)))
    stages.append(("pretrain", lambda: run_pretrain(recipe, force=force)))
    done: dict[str, Path] = {}
    t_start = time.time()
    for name, fn in stages:
        t0 = time.time()
        console.rule(f"[bold]{name}")
        done[name] = fn()
        console.print(f"{name}: {done[name]} ({time.time() - t0:.1f} s)")
    console.rule()
    console.print(
        f"run {recipe.name}: all stages done in {time.time() - t_start:.1f} s; artifacts in {recipe.run_dir}"
    )
    return done
