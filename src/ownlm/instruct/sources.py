"""Real instruction data, installed by package name (no hub downloads).

- `chatterbot-corpus` (BSD-3-Clause, `pip install chatterbot-corpus`): YAML files
  `chatterbot_corpus/data/<language>/<topic>.yml`, each with `categories` and `conversations`, a
  list of turn lists. A pair becomes a single-turn record; a longer list a multi-turn chat with
  alternating user/assistant turns (a trailing unanswered user turn is dropped).
- The Python FAQ (PSF-2.0) from Debian's `python3.11-doc`, `_sources/faq/*.rst.txt`: each heading
  ending in "?" is a question and the text up to the next heading its answer, with reST markup
  reduced to plain text. Absent on most machines; the stage then records a note and goes on.

Ids are content hashes so a corpus upgrade keeps the ids (and splits) of unchanged examples;
`meta.split_group` is the first user turn, so the several answers chatterbot gives to one question
all land in the same split and a held-out question was never seen in training.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import re
from pathlib import Path
from typing import Any

import yaml

from ownlm.core.errors import OwnlmError
from ownlm.instruct.formats import to_chat, validate_chat

Record = dict[str, Any]
CHATTERBOT = "chatterbot-corpus"
FAQ_DIR = Path("/usr/share/doc/python3.11/html/_sources/faq")
_HEADING = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")


def _hid(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def chatterbot_data_dir() -> Path:
    try:
        root = importlib.resources.files("chatterbot_corpus") / "data"
    except ModuleNotFoundError:
        raise OwnlmError(f"instruct: the chatterbot source needs `pip install {CHATTERBOT}`") from None
    return Path(str(root))


def _turns(conv: Any) -> list[str]:
    # YAML turns "yes"/"42" into bools and numbers; chatterbot means the text.
    if not isinstance(conv, list):
        return []
    return [str(t).strip() for t in conv if t is not None and str(t).strip()]


def chatterbot_records(languages: list[str] | tuple[str, ...] = ("english",)) -> list[Record]:
    """Chat records from the installed chatterbot corpus, deduplicated by content ("all": every language).

    Deduplication matters: english/tech_support.yml repeats 10 pairs about a thousand times.
    """
    root = chatterbot_data_dir()
    out: dict[str, Record] = {}
    if "all" in languages:
        languages = sorted(p.name for p in root.iterdir() if p.is_dir())
    for lang in languages:
        folder = root / lang
        if not folder.is_dir():
            known = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir()))
            raise OwnlmError(f"instruct: chatterbot has no language '{lang}' (it has: {known})")
        for path in sorted(folder.glob("*.yml")):
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise OwnlmError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
            cats = doc.get("categories") or [path.stem]
            for conv in doc.get("conversations") or []:
                turns = _turns(conv)
                turns = turns[: len(turns) // 2 * 2]
                if not turns:
                    continue
                rid = "chatterbot-" + _hid(lang, *turns)
                meta = {"source": CHATTERBOT, "license": "BSD-3-Clause", "task": "chat.chitchat",
                        "category": str(cats[0]), "language": lang,
                        "split_group": turns[0].casefold()}  # fmt: skip
                if len(turns) == 2:
                    rec = to_chat(
                        {"id": rid, "instruction": turns[0], "input": "", "output": turns[1], "meta": meta}
                    )
                else:
                    roles = ("user", "assistant")
                    msgs = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
                    rec = validate_chat({"id": rid, "messages": msgs, "meta": meta}, str(path))
                out.setdefault(rid, rec)
    return list(out.values())


def _plain(text: str) -> str:
    """reST → plain text: roles and literals unwrapped, links as 'text (url)', directives dropped."""
    text = re.sub(r"`([^`<]+?)\s*<([^`>]+)>`__?", r"\1 (\2)", text)
    text = re.sub(r":[\w:.-]+:`~?([^`<]+?)(?:\s*<[^`>]*>)?`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    lines, skipping = [], False
    for line in text.split("\n"):
        if re.match(r"\s*\.\. (?!code-block|code::|sourcecode)", line) or re.match(r"\s*\.\. _", line):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t")) and re.match(r"\s+:\w", line)):
            continue
        skipping = False
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def parse_faq(text: str, name: str) -> list[tuple[str, str, str]]:
    """(section, question, answer) triples from one FAQ reST file."""
    lines = text.split("\n")
    heads = [
        i
        for i in range(len(lines) - 1)
        if lines[i].strip() and not lines[i][0].isspace() and _HEADING.match(lines[i + 1])
        and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 1
    ]  # fmt: skip
    out, section = [], name
    for k, i in enumerate(heads):
        title = lines[i].strip()
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        if not title.endswith("?"):
            section = title
            continue
        body = lines[i + 2 : end]
        if body and _HEADING.match(body[-1] or "-"):
            body = body[:-1]  # the overline of the next heading
        answer = _plain("\n".join(body))
        if len(answer) >= 20:
            out.append((section, title, answer))
    return out


def python_faq_records(root: Path = FAQ_DIR) -> list[Record]:
    """Single-turn Q&A records from the Python FAQ sources; [] when the docs are not installed."""
    root = Path(root)
    out: dict[str, Record] = {}
    for path in sorted(root.glob("*.rst.txt")) if root.is_dir() else []:
        name = path.name.removesuffix(".rst.txt")
        for section, q, a in parse_faq(path.read_text(encoding="utf-8", errors="replace"), name):
            rid = "pyfaq-" + _hid(q, a)
            meta = {"source": "python-faq", "license": "PSF-2.0", "task": "qa.python_faq",
                    "category": f"{name}/{section}", "split_group": q.casefold()}  # fmt: skip
            out.setdefault(
                rid, to_chat({"id": rid, "instruction": q, "input": "", "output": a, "meta": meta})
            )
    return list(out.values())
