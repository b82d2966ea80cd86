"""The `ownlm` command: thin wrappers that load a recipe and call a stage function.

Every stage takes `--recipe` (a YAML path or a built-in name) and overrides of any recipe field as
`--stage.field VALUE`. Bad input ends with one `error:` line and a non-zero exit, no traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from ownlm.core.errors import OwnlmError

app = typer.Typer(
    help="ownlm: build your own assistant model end to end — data → clean → tokenizer → pretrain → sft.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Corpus commands: the embedded default corpus and the data stage.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
safety_app = typer.Typer(help="Content safety: train the classifier, check a text.", no_args_is_help=True)
app.add_typer(safety_app, name="safety")

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Recipe YAML file or built-in name (tiny, base).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run even if the artifact is up to date.")]


def user_errors(fn):
    """Turn an OwnlmError into one clear line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OwnlmError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(getattr(e, "exit_code", 1)) from None

    return wrapper


def _recipe(recipe: str, ctx: typer.Context):
    from ownlm.recipe import load_recipe

    return load_recipe(recipe, list(ctx.args))


@data_app.command("fetch-default")
@user_errors
def data_fetch_default(
    out: Annotated[
        Path | None, typer.Option(help="Where to write it (default: $OWNLM_HOME/default-corpus).")
    ] = None,
    extras: Annotated[
        bool, typer.Option(help="Also use npm/Debian sources when this machine has them.")
    ] = True,
) -> None:
    """Build the embedded default corpus (real text from installed packages) as JSONL + manifest."""
    from ownlm.data.default_corpus import default_corpus_dir, fetch_default

    target = out or default_corpus_dir()
    summary = fetch_default(target, include_extras=extras)
    print(f"default corpus: {target} {summary}")


@data_app.command("build", context_settings=OVERRIDES)
@user_errors
def data_build(ctx: typer.Context, recipe: RecipeOpt = "tiny", force: ForceOpt = False) -> None:
    """The data stage: gather the recipe's sources into runs/<run>/data/."""
    from ownlm.data.stage import run_data

    print(run_data(_recipe(recipe, ctx), force=force))


@data_app.command("clean", context_settings=OVERRIDES)
@user_errors
def data_clean(ctx: typer.Context, recipe: RecipeOpt = "tiny", force: ForceOpt = False) -> None:
    """The clean stage: normalise, deduplicate, filter and balance runs/<run>/data/ into runs/<run>/clean/."""
    from ownlm.data.clean import run_clean

    print(run_clean(_recipe(recipe, ctx), force=force))


@data_app.command("instruct", context_settings=OVERRIDES)
@user_errors
def data_instruct(ctx: typer.Context, recipe: RecipeOpt = "tiny", force: ForceOpt = False) -> None:
    """Instruction data (verifiable tasks, calculator tool use, chatterbot, FAQ) into runs/<run>/instruct/."""
    from ownlm.instruct.stage import run_instruct

    print(run_instruct(_recipe(recipe, ctx), force=force))


@data_app.command("augment", context_settings=OVERRIDES)
@user_errors
def data_augment(ctx: typer.Context, recipe: RecipeOpt = "tiny", force: ForceOpt = False) -> None:
    """Model-written instruction data (Self-Instruct, paraphrase), filtered, into runs/<run>/augment/."""
    from ownlm.instruct.augment import run_augment

    print(run_augment(_recipe(recipe, ctx), force=force))


@app.command(context_settings=OVERRIDES)
@user_errors
def tokenizer(ctx: typer.Context, recipe: RecipeOpt = "tiny", force: ForceOpt = False) -> None:
    """Train the byte-level BPE tokenizer (or adopt `tokenizer.path`) into runs/<run>/tokenizer/."""
    from ownlm.tokenizer import run_tokenizer

    print(run_tokenizer(_recipe(recipe, ctx), force=force))


@app.command(context_settings=OVERRIDES)
@user_errors
def pretrain(
    ctx: typer.Context,
    recipe: RecipeOpt = "tiny",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint (must exist).")
    ] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard checkpoints and start over.")] = False,
    init_from: Annotated[
        str | None, typer.Option(help="Continue pretraining a local HF model dir or GGUF file.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Pretrain the model on the token shards; checkpoints, resumes, writes an HF model directory.

    Without --resume or --restart a compatible checkpoint is picked up automatically."""
    from ownlm.pretrain import run_pretrain

    if resume and restart:
        raise OwnlmError("--resume and --restart are opposites: pass one")
    mode = True if resume else (False if restart else None)
    print(run_pretrain(_recipe(recipe, ctx), resume=mode, init_from=init_from, force=force))


@app.command(context_settings=OVERRIDES)
@user_errors
def sft(ctx: typer.Context, recipe: RecipeOpt = "tiny", force: ForceOpt = False) -> None:
    """Supervised fine-tuning (TRL; full or LoRA, merged) on the instruction data into runs/<run>/sft/."""
    from ownlm.sft import run_sft

    print(run_sft(_recipe(recipe, ctx), force=force))


@app.command(context_settings=OVERRIDES)
@user_errors
def align(
    ctx: typer.Context,
    recipe: RecipeOpt = "tiny",
    method: Annotated[
        str | None, typer.Option(help="rm | dpo | ppo | grpo | cai (default: the recipe's align.method).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Preference alignment of the SFT model (reward model, DPO, PPO with KL, Constitutional AI)."""
    from ownlm.align.stage import run_align

    print(run_align(_recipe(recipe, ctx), force=force, method=method))


@app.command()
@user_errors
def chat(
    model: Annotated[
        str, typer.Argument(help="A run directory (runs/NAME), an HF model directory or a GGUF file.")
    ],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    tools: Annotated[bool, typer.Option(help="Offer the calculator tool to the model.")] = True,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.7,
) -> None:
    """Chat in the terminal with streaming replies; /reset, /system TEXT, /exit. Tool calls run."""
    from ownlm.engine.chat import ChatSession, repl
    from ownlm.models import load_model, load_tokenizer_for, most_trained_model

    path = most_trained_model(Path(model))
    session = ChatSession(
        load_model(path),
        load_tokenizer_for(path),
        system=system,
        tools=None if tools else [],
        on_tool=lambda name, args, result: print(f"\n[{name}({args}) → {result}]", flush=True),
    )
    session.send = functools.partial(session.send, max_new_tokens=max_new_tokens, temperature=temperature)
    print(f"chatting with {path} — /reset, /system TEXT, /exit")
    repl(session)


@app.command()
@user_errors
def serve(
    model: Annotated[
        str,
        typer.Argument(help="A run directory (runs/NAME), an HF model directory, a GGUF file, a built-in."),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model id clients send (default: the directory or file name).")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Sequences in the running batch.")] = 64,
    kv_cache_mb: Annotated[float | None, typer.Option(min=1, help="KV cache budget (default 1 GiB).")] = None,
    max_model_len: Annotated[int | None, typer.Option(min=8, help="Context cap (default: model).")] = None,
    max_pending: Annotated[int, typer.Option(min=1, help="Requests in flight before 503s.")] = 1024,
    dtype: Annotated[str | None, typer.Option(help="fp32 or bf16 (default: fp32).")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads (default: cores - 1, leaving one to HTTP).")
    ] = None,
    engine_process: Annotated[
        bool,
        typer.Option(
            "--engine-process/--in-process",
            help="Run the engine in its own process (default; the HTTP layer and the engine then "
            "do not share Python's GIL) or as a thread of the server process.",
        ),
    ] = True,
    safety: Annotated[
        Path | None,
        typer.Option(help="Safety config YAML (rules, classifier, external moderation, policy)."),
    ] = None,
    no_safety: Annotated[
        bool,
        typer.Option("--no-safety", help="No content checks (default: on when the run has a classifier)."),
    ] = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, embeddings, moderations,
    /metrics)."""
    from ownlm.engine.config import EngineConfig
    from ownlm.engine.process import EngineProcess
    from ownlm.models import builtin_model, most_trained_model
    from ownlm.models.memory import memory_line
    from ownlm.serve.api import run_server

    path = most_trained_model(Path(model))
    if builtin_model(model) is None and not path.exists():
        raise OwnlmError(f"{model}: no such run, model directory or GGUF file")
    name = served_model_name or (Path(model).stem if Path(model).is_file() else Path(model).resolve().name)
    config = EngineConfig(
        max_num_seqs=max_num_seqs,
        kv_cache_bytes=int(kv_cache_mb * 2**20) if kv_cache_mb else None,
        max_model_len=max_model_len,
    )

    import os

    # A torch thread per core would spin against the event loop's thread: on 2 cores measured
    # 12-20x slower streaming than 1 thread (bench/serve.py).
    n_threads = threads or max(1, (os.cpu_count() or 2) - 1)

    def load():
        if engine_process:  # this process then never imports torch (engine/process.py)
            engine = EngineProcess(path, dtype=dtype, config=config, threads=n_threads)
        else:
            import torch

            from ownlm.engine.core import Engine

            torch.set_num_threads(n_threads)
            engine = Engine.from_pretrained(path, dtype=dtype, config=config)
        m = engine.memory  # known once loaded (an engine process sends it with "ready")
        print(memory_line(m["weights_bytes"], m["kv_cache_bytes"], m["kv_bytes_per_token"]), file=sys.stderr)
        return engine

    guard = _safety_guard(Path(model), safety, no_safety, shares_torch=not engine_process)
    print(f"serving {path} as {name!r} on http://{host}:{port}/v1", file=sys.stderr)
    run_server(load, served_model_name=name, host=host, port=port, max_pending=max_pending, safety=guard)


def _safety_guard(model: Path, config: Path | None, off: bool, *, shares_torch: bool):
    """The server's safety guard: from `--safety`, else the run's classifier when it has one."""
    if off:
        if config is not None:
            raise OwnlmError("--safety and --no-safety contradict each other")
        return None
    from ownlm.core.artifacts import read_manifest
    from ownlm.safety.config import ClassifierConfig, SafetyConfig, load_safety_config
    from ownlm.safety.guard import SafetyGuard

    if config is not None:
        cfg = load_safety_config(config)
    elif read_manifest(model / "safety") is not None:
        cfg = SafetyConfig(classifier=ClassifierConfig(path=str(model / "safety")))
    else:
        return None
    if cfg.classifier is not None and shares_torch:
        # In-process, the engine set torch's threads; the classifier shares them.
        cfg = cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"threads": None})})
    guard = SafetyGuard(cfg)
    print(f"safety: {', '.join(guard.levels)} on prompts and replies", file=sys.stderr)
    return guard


@safety_app.command("train", context_settings=OVERRIDES)
@user_errors
def safety_train(ctx: typer.Context, recipe: RecipeOpt = "tiny", force: ForceOpt = False) -> None:
    """Fine-tune the safety classifier (the `safety` stage): runs/NAME/safety/."""
    from ownlm.safety_training.stage import run_safety

    print(run_safety(_recipe(recipe, ctx), force=force))


@safety_app.command("check")
@user_errors
def safety_check(
    text: Annotated[str, typer.Argument(help="The text to check.")],
    config: Annotated[Path | None, typer.Option(help="Safety config YAML (default: rules only).")] = None,
    classifier: Annotated[Path | None, typer.Option(help="A safety classifier (runs/NAME/safety).")] = None,
    reply: Annotated[bool, typer.Option("--reply", help="Judge it as a reply, not a prompt.")] = False,
) -> None:
    """Print the verdict of every configured level on one text, as JSON."""
    import asyncio
    import json

    from ownlm.safety.config import ClassifierConfig, SafetyConfig, load_safety_config
    from ownlm.safety.guard import SafetyGuard

    cfg = load_safety_config(config) if config else SafetyConfig()
    if classifier is not None:
        cfg = cfg.model_copy(update={"classifier": ClassifierConfig(path=str(classifier))})
    guard = SafetyGuard(cfg)
    direction = "output" if reply else "input"
    v = asyncio.run(guard.check(text, direction, full=True))
    print(json.dumps({**v.as_dict(), "action": guard.action(v, direction)}, indent=2))


@app.command(context_settings=OVERRIDES)
@user_errors
def run(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="Recipe YAML or built-in name.")] = "tiny",
    force: ForceOpt = False,
) -> None:
    """Run a recipe's stages in order, skipping those whose inputs and config did not change."""
    from ownlm.runner import run_recipe

    run_recipe(_recipe(recipe, ctx), force=force)


@app.command()
@user_errors
def sample(
    model: Annotated[
        str, typer.Argument(help="A run directory (runs/NAME) or an HF model directory / GGUF file.")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "Once upon a time",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 80,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.8,
    top_k: Annotated[int, typer.Option(min=0)] = 50,
    seed: int = 0,
) -> None:
    """Print a continuation of a prompt from a trained model."""
    from ownlm.models import load_model, load_tokenizer_for, most_trained_model
    from ownlm.pretrain import generate_text

    path = most_trained_model(Path(model))
    m = load_model(path)
    tok = load_tokenizer_for(path)
    print(
        generate_text(
            m, tok, prompt, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_k=top_k
        )
    )


# What export and quantize start from.
SourceModelArg = Annotated[
    str, typer.Argument(help="A run directory (its most trained model), an HF directory or a GGUF file.")
]


@app.command()
@user_errors
def export(
    model: SourceModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The export's artifact directory.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="hf (a clean HF directory) or gguf (llama.cpp).")
    ] = "gguf",
    type_: Annotated[
        str | None,
        typer.Option(
            "--type", "-t", help="gguf: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 (f16); hf: f32 bf16 f16 (f32)."
        ),
    ] = None,
) -> None:
    """Export a model for other tools, checked against it: a parity card, gated per format."""
    from pydantic import ValidationError

    from ownlm.compress.export import ExportConfig, export_model
    from ownlm.compress.parity import format_card

    try:
        cfg = ExportConfig(format=fmt, type=type_)
    except ValidationError as e:
        raise OwnlmError(f"--format {fmt}: {e.errors()[0]['msg']}") from None
    m = export_model(model, out, cfg)
    print(f"{out}: {m['format']} {m['type']}, {m['size_mb']:.1f} MB")
    print(f"parity (transformers): {format_card(m['parity'])} (gate passed)")
    if "skipped" in m.get("parity_llama_cpp", {}):
        print(f"parity (llama.cpp):    not checked: {m['parity_llama_cpp']['skipped']}")
    elif "parity_llama_cpp" in m:
        print(f"parity (llama.cpp):    {format_card(m['parity_llama_cpp'])} (gate passed)")


@app.command()
@user_errors
def quantize(
    model: SourceModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The quantized model's artifact directory.")],
    method: Annotated[
        str, typer.Option(help="int8-dynamic, bf16, int4-weight or qat-int4 (int4 after QAT).")
    ] = "int8-dynamic",
    qat_steps: Annotated[int, typer.Option(min=1, help="qat-int4: fine-tuning steps.")] = 100,
    qat_method: Annotated[
        str, typer.Option(help="qat-int4: train the weights (full) or a LoRA update of each (lora).")
    ] = "full",
    qat_lr: Annotated[
        float | None, typer.Option(help="qat-int4: peak learning rate (default 2e-5 full, 2e-4 lora).")
    ] = None,
    smooth_alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="int8: SmoothQuant's strength (0: no smoothing).")
    ] = 0.5,
    outliers: Annotated[int, typer.Option(min=0, help="int8: input channels per layer kept in fp32.")] = 32,
    calibration: Annotated[
        Path | None, typer.Option(help="JSONL ('text' or 'messages' per line) to calibrate on.")
    ] = None,
    speed: Annotated[bool, typer.Option(help="Measure engine tokens/s against the source.")] = True,
) -> None:
    """Quantize a model for CPU serving, checked against it: a parity card (gated), speed, memory."""
    from pydantic import ValidationError

    from ownlm.compress.parity import format_card
    from ownlm.compress.quantize import QuantizeConfig, quantize_model
    from ownlm.models.memory import memory_line

    try:
        cfg = QuantizeConfig(
            method=method, calibration=calibration, speed=speed,
            qat={"steps": qat_steps, "method": qat_method, "lr": qat_lr},
            smooth_alpha=smooth_alpha, outliers=outliers,
        )  # fmt: skip
    except ValidationError as e:
        err = e.errors()[0]
        raise OwnlmError(f"--{'-'.join(map(str, err['loc']))}: {err['msg']}") from None
    m = quantize_model(model, out, cfg)
    print(f"{out}: {m['method']}, {m['size_mb']:.1f} MB on disk (source {m['source_size_mb']:.1f} MB)")
    print(f"parity: {format_card(m['parity'])} (gate passed)")
    mem = m["memory"]
    print(memory_line(mem["weights_bytes"], mem["kv_cache_bytes"], mem["kv_bytes_per_token"]))
    for rows, s in m.get("speed", {}).items():
        print(
            f"engine decode at {rows}: {s['tokens_per_s']:.1f} tokens/s, {s['ratio']:.2f}x the source's fp32"
        )
    print(f"serve it: ownlm serve {out}")


@app.command()
@user_errors
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/NAME).")]) -> None:
    """Write the run's report card, runs/NAME/report.html: metrics, curves and a sample per stage."""
    from ownlm.report import write_report

    print(write_report(run_dir))


if __name__ == "__main__":
    app()
