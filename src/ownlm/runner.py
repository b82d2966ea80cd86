"""`ownlm run RECIPE`: the recipe's stages in order, each skipped when its artifact is up to date.

Every stage function decides that itself from the fingerprint (config + input hashes) in its
manifest, so the runner only orders them and reports; a crashed run picks up where it stopped
(pretraining resumes from its last checkpoint).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from ownlm.core.progress import console
from ownlm.recipe import STAGES


def run_recipe(recipe, force: bool = False) -> dict[str, Path]:
    from ownlm.align.stage import run_align
    from ownlm.compress.quantize import run_quantize
    from ownlm.data.clean import run_clean
    from ownlm.data.stage import run_data
    from ownlm.instruct.augment import run_augment
    from ownlm.instruct.stage import run_instruct
    from ownlm.pretrain.stage import run_pretrain
    from ownlm.safety_training.stage import run_safety
    from ownlm.sft import run_sft
    from ownlm.tokenizer import run_tokenizer

    runners = {
        "data": run_data,
        "clean": run_clean,
        "tokenizer": run_tokenizer,
        "pretrain": run_pretrain,
        "instruct": run_instruct,
        "augment": run_augment,
        "sft": run_sft,
        "safety": run_safety,
        "align": run_align,
        "quantize": run_quantize,
    }
    wanted = set(recipe.stages)
    if not recipe.clean.enabled:
        wanted.discard("clean")
    if recipe.pretrain.init_from:
        wanted.discard("tokenizer")  # the base model's tokenizer is kept as is
    stages = [
        (name, functools.partial(runners[name], recipe, force=force)) for name in STAGES if name in wanted
    ]
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
