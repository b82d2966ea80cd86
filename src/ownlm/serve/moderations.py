"""`POST /v1/moderations` in OpenAI's shape, answered by the safety guard with every level.

Each input gets `flagged`, `categories` and `category_scores` under OpenAI's names where ownlm's
categories correspond (`ownlm.safety.categories`) and under ownlm's own names for the rest
(S5 defamation, S6 specialised advice, …, jailbreak, prompt_injection), plus
`category_applied_input_types` (always "text": images are refused with a 400). A string, a list
of strings, or a list of text parts is accepted, as OpenAI's API does.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from ownlm.safety.categories import to_openai
from ownlm.safety.guard import ModerationUnavailable, SafetyGuard, TextTooLong
from ownlm.serve.api_errors import APIError
from ownlm.serve.metrics import Metrics
from ownlm.serve.protocol import ModerationRequest

MODEL = "ownlm-moderation"


def _texts(req: ModerationRequest) -> list[str]:
    if isinstance(req.input, str):
        return [req.input]
    out = []
    for i, x in enumerate(req.input):
        if isinstance(x, str):
            out.append(x)
        elif x.type != "text" or x.text is None:
            msg = f"input part type {x.type!r} is not supported (text only)"
            raise APIError(400, msg, param=f"input[{i}]")
        else:
            out.append(x.text)
    return out


async def moderation_body(guard: SafetyGuard, req: ModerationRequest, metrics: Metrics) -> dict:
    texts = _texts(req)
    t0 = time.perf_counter()
    try:
        verdicts = await asyncio.gather(*(guard.check(t, "input", full=True) for t in texts))
    except TextTooLong as e:
        raise APIError(400, str(e), param="input", code="content_too_long") from None
    except ModerationUnavailable as e:
        raise APIError(503, str(e), code="moderation_unavailable") from None
    metrics.safety_seconds.labels(direction="moderation").observe(time.perf_counter() - t0)
    results = []
    for v in verdicts:
        flags = dict.fromkeys(v.categories, True)
        cats, scores = to_openai(flags, v.scores)
        metrics.count_verdict("moderation", v, "flag")
        results.append(
            {
                "flagged": v.flagged,
                "categories": cats,
                "category_scores": scores,
                "category_applied_input_types": {k: ["text"] for k in cats},
            }
        )
    return {"id": f"modr-{secrets.token_hex(12)}", "model": req.model or MODEL, "results": results}
