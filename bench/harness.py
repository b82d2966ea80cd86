"""What every benchmark shares: the one JSON object it prints (and saves), and the model it runs.

Benchmarks are scripts (`python bench/NAME.py`), so this module is imported as `harness` from the
script's own folder; it is not part of the `ownlm` package, which never depends on benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path


def emit_bench(result: dict, save: bool, name: str | None = None) -> None:
    """Print a benchmark's one JSON object; with `save`, also bench/results/<name or bench>.json."""
    text = json.dumps(result, indent=2)
    print(text)
    if save:
        out = Path(__file__).resolve().parent / "results" / f"{name or result['bench']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")


def bench_model(work: Path, model_arg: str | None) -> tuple[Path, str]:
    """The model a benchmark runs: `model_arg` (a run or HF dir), else runs/tiny's most trained
    model, else the tiny recipe's shape with random weights saved under `work`. Returns (HF model
    dir, how it was obtained)."""
    from ownlm.models import most_trained_model

    if model_arg:
        return most_trained_model(Path(model_arg)), f"model {model_arg}"
    trained = most_trained_model(Path("runs/tiny"))
    if (trained / "config.json").is_file():
        return trained, f"trained run {trained}"
    import sysconfig

    from ownlm.models import build_model, count_params
    from ownlm.recipe import load_recipe
    from ownlm.tokenizer import TokenizerConfig, train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    with open(corpus / "stdlib.jsonl", "w", encoding="utf-8") as f:
        for p in sorted(stdlib.glob("*.py"))[:150]:
            f.write(
                json.dumps({"id": p.name, "text": p.read_text(encoding="utf-8", errors="replace")}) + "\n"
            )
    tok = train_tokenizer(corpus, TokenizerConfig(vocab_size=8192))
    recipe = load_recipe("tiny", {})
    model = build_model(recipe.model, tok, seed=0)
    out = work / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    how = (
        f"no trained run (runs/tiny): the tiny recipe's model shape (depth {recipe.model.depth}, "
        f"{len(tok)} vocab, {count_params(model) / 1e6:.2f}M params) with RANDOM weights and a tokenizer "
        f"trained on the stdlib's source"
    )
    return out, how
