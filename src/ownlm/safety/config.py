"""The safety configuration of a server (`ownlm serve --safety safety.yaml`), and its policy.

    rules:      {defaults: true, files: [my_rules.yaml]}
    classifier: {path: runs/tiny/safety}          # level 2 (omit: none)
    external:                                     # level 3 (omit: none)
      url: http://127.0.0.1:9000/v1               # any server of OpenAI's /v1/moderations
      api_key_env: MODERATION_API_KEY
      timeout_s: 2.0
      fail: open                                  # open: go on without it; closed: 503
    input_action: block                           # block | refuse | log
    input_check: during                           # checked while the engine prefills (or: before)
    output_action: refuse
    categories:                                   # per category and direction
      S6: {input: log, output: log}
    refusal: "I can't help with that."
    stream: {mode: window, window_tokens: 16, context_tokens: 16}  # or mode: buffered

Actions: `block` answers 400 `content_policy_violation` (OpenAI's shape); `refuse` answers with
the configured refusal as a normal reply whose finish_reason is "content_filter"; `log` lets it
through, counted and logged. When several flagged categories disagree the strictest wins.
Specialised advice (S6) is `log` by default: "how should I invest $50,000?" deserves an answer.
Relative paths are relative to the YAML file. A malformed file is an error naming it and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ownlm.core.config import StrictModel, read_yaml_mapping, validate_file
from ownlm.models.cpu_precision import Precision
from ownlm.safety.categories import category_id

Action = Literal["block", "refuse", "log"]
SEVERITY = {"log": 0, "refuse": 1, "block": 2}


class RulesConfig(StrictModel):
    defaults: bool = Field(True, description="Use ownlm's shipped rules (safety/rules/default.yaml).")
    files: list[str] = Field(default_factory=list, description="Your rule files, added to the defaults.")


class ClassifierConfig(StrictModel):
    path: str = Field(description="A safety classifier directory (the `safety` stage's artifact).")
    quantize: Precision = Field(
        "auto", description="CPU precision: auto (bf16 with AMX, else int8), bf16, int8, none (fp32)."
    )
    threads: int | None = Field(1, ge=1, description="torch threads for it (None: leave torch's).")
    max_windows: int = Field(4, ge=1, le=64, description="Windows scored over a long text.")
    max_batch: int = Field(
        8, ge=1, description="Most checks scored in one pass (prompts never share a pass with replies)."
    )


class ExternalConfig(StrictModel):
    url: str = Field(description="Base URL of an OpenAI-compatible API (…/v1).")
    api_key: str | None = None
    api_key_env: str | None = Field(None, description="Read the key from this environment variable.")
    model: str | None = Field(None, description="The moderation model to ask for (omit: the server's).")
    timeout_s: float = Field(2.0, gt=0)
    fail: Literal["open", "closed"] = Field(
        "open", description="When it cannot answer: open (go on without it) or closed (503)."
    )
    cache_ttl_s: float = Field(60.0, ge=0, description="How long a verdict on a text is reused.")
    cache_size: int = Field(10_000, ge=0)
    breaker_failures: int = Field(5, ge=1, description="Failures in a row that open the breaker.")
    breaker_reset_s: float = Field(30.0, gt=0, description="How long it stays open before a retry.")


class CategoryPolicy(StrictModel):
    input: Action | None = None
    output: Action | None = None


class StreamConfig(StrictModel):
    mode: Literal["window", "buffered"] = Field(
        "window", description="window: at most window_tokens unchecked; buffered: nothing unchecked."
    )
    # 16, not 8: at 50 req/s of 32-token replies, 8 meant five classifier checks per request and
    # the server fell behind (42 req/s, bench/serve.py --peer safety, stop 27); 16 means three.
    # NeMo Guardrails checks 200-token chunks and releases them before the check.
    window_tokens: int = Field(16, ge=1, description="Most tokens a client holds past the last check.")
    context_tokens: int | None = Field(
        16, ge=0, description="Checked tokens each check reads again before the new ones (null: all)."
    )


DEFAULT_POLICY = {"S6": CategoryPolicy(input="log", output="log")}


class SafetyConfig(StrictModel):
    rules: RulesConfig = Field(default_factory=RulesConfig)
    classifier: ClassifierConfig | None = None
    external: ExternalConfig | None = None
    check_input: bool = True
    input_check: Literal["during", "before"] = Field(
        "during",
        description="during: the prompt's check runs while the engine prefills (nothing is sent "
        "before it answers; a blocked prompt's generation is aborted); before: generation waits for it.",
    )
    check_output: bool = True
    input_action: Action = "block"
    output_action: Action = "refuse"
    categories: dict[str, CategoryPolicy] = Field(
        default_factory=dict, description="Per-category actions, over the defaults (S6: log)."
    )
    refusal: str = Field("I can't help with that.", min_length=1)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    max_chars: int = Field(200_000, ge=1, description="Longer texts are refused with a 400.")
    log_text: bool = Field(False, description="Put the flagged text itself in the log.")

    @field_validator("categories")
    @classmethod
    def _known(cls, v: dict[str, CategoryPolicy]) -> dict[str, CategoryPolicy]:
        out = {}
        for name, pol in v.items():
            try:
                out[category_id(name)] = pol
            except KeyError:
                raise ValueError(f"unknown category {name!r}") from None
        return out

    def action(self, categories: tuple[str, ...] | list[str], direction: str) -> Action:
        """The strictest action over the flagged categories in this direction."""
        default = self.input_action if direction == "input" else self.output_action
        acts = []
        for c in categories:
            pol = self.categories.get(c) or DEFAULT_POLICY.get(c)
            a = getattr(pol, direction, None) if pol is not None else None
            acts.append(a or default)
        return max(acts, key=SEVERITY.__getitem__) if acts else "log"


def load_safety_config(path: str | Path) -> SafetyConfig:
    p = Path(path)
    raw = read_yaml_mapping(
        p, "the safety config", "a safety config is a mapping (rules, classifier, external, …)"
    )
    return resolve_paths(validate_file(SafetyConfig, raw, p), p.parent)


def resolve_paths(cfg: SafetyConfig, root: Path) -> SafetyConfig:
    def rel(x: str) -> str:
        q = Path(x)
        return str(q if q.is_absolute() else root / q)

    rules = cfg.rules.model_copy(update={"files": [rel(f) for f in cfg.rules.files]})
    update: dict = {"rules": rules}
    if cfg.classifier is not None:
        update["classifier"] = cfg.classifier.model_copy(update={"path": rel(cfg.classifier.path)})
    return cfg.model_copy(update=update)
