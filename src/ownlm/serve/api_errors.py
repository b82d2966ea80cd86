"""OpenAI-shaped errors of the HTTP API, and request bodies parsed into protocol models (400 on
anything that is not UTF-8 JSON or fails validation, naming the field as OpenAI does)."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError


def _template_errors() -> tuple[type[Exception], ...]:
    from jinja2 import TemplateError

    return (TemplateError, ValueError, TypeError, KeyError)


TEMPLATE_ERRORS = _template_errors()  # what a chat template raises when it refuses a conversation


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = {400: "invalid_request_error", 404: "invalid_request_error"}.get(status, "server_error")


def error_response(status: int, message: str, *, type_: str, param=None, code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def api_error_response(e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, type_=e.type, param=e.param, code=e.code)


def _param(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI names a parameter: messages[0].role."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_tag(str(part)):
            out += ("." if out else "") + str(part)
    return out or None


def _is_union_tag(part: str) -> bool:
    """pydantic names the member of a union it tried (`str`, `list[int]`, `function-after[...]`, a
    model's class name); OpenAI's parameter names are lower-case words."""
    return (
        part in {"str", "int", "float", "bool", "dict", "list", "none"} or "[" in part or part[:1].isupper()
    )


async def parse_body(request: Request, model: type[BaseModel]):
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None
