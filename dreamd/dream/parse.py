"""Parsing what the model wrote: a situation in tagged sections, and a self-check verdict.

Every function here takes any string (random bytes, truncated output, a 10k-token ramble) and
either returns a parsed value or raises ParseError with a short, stable message; nothing else
escapes (tests/test_parse_fuzz.py runs thousands of garbage cases). Garbage still becomes a
stored, rejected scenario (`garbage_scenario`): its messages hold the request the model was
given, its target the raw output (cut to RAW_CHARS), and meta['parse_error'] the message, which
the screener's first rule turns into the reason 'parse: ...'.

Situation format (docs/dreaming.md "Prompts"): only tagged sections, whitespace between them,
optionally inside one ``` fence:

    <system>optional persona prompt</system>
    <user>...</user> <assistant>...</assistant> ... <user>the final message (the direction)</user>
    <flaw>...</flaw> <evidence>...</evidence>          pushback
    <check>expression = value</check>                   a calculation (optional; required for
                                                        flaws marked check=true)
    <injection>...</injection> <marker>...</marker>     derail

Verdict format: <q1>yes|no</q1> <q2>yes|no</q2> <reason>one sentence</reason>.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dreamd.dream.scenario import Message, Scenario, ScenarioKind, normalize_text

MAX_OUTPUT_CHARS = 40_000
"""Longer outputs are rejected unparsed (a 10k-token ramble is ~40k characters)."""
MAX_SECTION_CHARS = 6_000
MAX_USER_TURNS = 8
RAW_CHARS = 4_000
"""How much of a garbage output is stored in the rejected row's target."""
TURN_TAGS = ("system", "user", "assistant")
META_TAGS = {
    ScenarioKind.ACCEPT: ("check",),
    ScenarioKind.PUSHBACK: ("flaw", "evidence", "check"),
    ScenarioKind.DERAIL: ("injection", "marker"),
    ScenarioKind.SELF: (),
}
ALL_TAGS = TURN_TAGS + ("flaw", "evidence", "check", "injection", "marker")

_SECTION = re.compile(r"<([A-Za-z_]+)>(.*?)</\1\s*>", re.S)
_FENCE = re.compile(r"\A\s*```[\w-]*[ \t]*\n(.*?)\n?```\s*\Z", re.S)


class ParseError(ValueError):
    """What the model wrote does not have the required format; the message is the reason."""


def clean_text(text: str) -> str:
    """Text safe to store anywhere: NUL (PostgreSQL text and JSONB refuse it) becomes U+FFFD,
    lone surrogates (not encodable as UTF-8) become '?'."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _shorten(text: str, n: int = 40) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[:n] + "..."


def sections(text: str) -> list[tuple[str, str]]:
    """(tag, content) pairs of a strictly tagged output; ParseError for anything else."""
    if not text.strip():
        raise ParseError("empty output")
    if len(text) > MAX_OUTPUT_CHARS:
        raise ParseError(f"output of {len(text)} chars > {MAX_OUTPUT_CHARS}")
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _SECTION.finditer(text):
        gap = text[pos:m.start()]
        if gap.strip():
            raise ParseError(f"text outside the tags: {_shorten(gap)!r}")
        tag = m.group(1).lower()
        if tag not in ALL_TAGS:
            raise ParseError(f"unknown section <{tag}>")
        content = m.group(2).strip()
        if not content:
            raise ParseError(f"empty <{tag}> section")
        if len(content) > MAX_SECTION_CHARS:
            raise ParseError(f"<{tag}> section of {len(content)} chars > {MAX_SECTION_CHARS}")
        out.append((tag, content))
        pos = m.end()
    rest = text[pos:]
    if rest.strip():
        unclosed = re.search(r"<([A-Za-z_]+)>", rest)
        if unclosed and not out:
            raise ParseError(f"<{unclosed.group(1).lower()}> is never closed")
        raise ParseError(f"text outside the tags: {_shorten(rest)!r}")
    if not out:
        raise ParseError("no tagged sections")
    return out


@dataclass
class Situation:
    messages: list[Message]
    meta: dict[str, str] = field(default_factory=dict)
    """flaw, evidence, check, injection, marker: whichever the kind uses and the model wrote."""


def parse_situation(kind: ScenarioKind | str, text: str, needs_check: bool = False) -> Situation:
    """The conversation and the kind's extra sections; ParseError says what is wrong."""
    kind = ScenarioKind(kind)
    if kind is ScenarioKind.GENERAL:
        raise ParseError("general data is never model-written")
    messages: list[Message] = []
    meta: dict[str, str] = {}
    allowed = META_TAGS[kind]
    for tag, content in sections(text):
        if tag in TURN_TAGS:
            if meta:
                raise ParseError(f"<{tag}> after the closing sections; the conversation comes first")
            if tag == "system" and messages:
                raise ParseError("<system> is only allowed as the first section")
            if messages and messages[-1]["role"] == tag:
                raise ParseError(f"two <{tag}> turns in a row")
            if tag == "assistant" and not [m for m in messages if m["role"] == "user"]:
                raise ParseError("the conversation must start with a <user> turn")
            messages.append({"role": tag, "content": content})
        elif tag not in allowed:
            raise ParseError(f"<{tag}> does not belong to a {kind.value} situation")
        elif tag in meta:
            raise ParseError(f"two <{tag}> sections")
        else:
            meta[tag] = content
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise ParseError("no <user> turn")
    if messages[-1]["role"] != "user":
        raise ParseError("the conversation must end with the user's <user> turn")
    if len(users) > MAX_USER_TURNS:
        raise ParseError(f"{len(users)} user turns > {MAX_USER_TURNS}")
    final = normalize_text(messages[-1]["content"])
    if kind is ScenarioKind.SELF and len(users) != 1:
        raise ParseError("a self situation is one <user> question")
    if kind is ScenarioKind.PUSHBACK:
        if "flaw" not in meta:
            raise ParseError("no <flaw> section (pushback needs one)")
        if needs_check and "check" not in meta:
            raise ParseError("no <check> section (this flaw is a calculation)")
        if "evidence" not in meta and "check" not in meta:
            raise ParseError("no <evidence> section (pushback needs one unless it has a <check>)")
        if "evidence" in meta and len(meta["evidence"]) > 80:
            raise ParseError("<evidence> longer than 80 chars; it must be a short exact string")
    if kind is ScenarioKind.DERAIL:
        if "injection" not in meta:
            raise ParseError("no <injection> section (derail needs one)")
        if normalize_text(meta["injection"]) not in final:
            raise ParseError("the <injection> line is not inside the final user turn")
    if "check" in meta:
        # The claim must be the one this conversation relies on, not any calculation.
        from dreamd.dream.checks import parse_value, split_claim

        parts = split_claim(meta["check"])
        if parts is None:
            raise ParseError("<check> is not of the form 'expression = value'")
        claimed = re.sub(r"(?<=\d),(?=\d{3})", "", normalize_text(str(parts[1])).rstrip("."))
        said = re.sub(r"(?<=\d),(?=\d{3})", "", normalize_text(" ".join(m["content"] for m in messages)))
        if claimed not in said and normalize_text(str(parse_value(parts[1]))) not in said:
            raise ParseError(f"the <check> value {_shorten(parts[1], 20)!r} does not appear in the conversation")
    return Situation(messages, meta)


@dataclass(frozen=True)
class Verdict:
    q1: bool
    q2: bool
    reason: str

    @property
    def passed(self) -> bool:
        return self.q1 and self.q2


_ANSWER = re.compile(r"<(q1|q2|reason)>(.*?)</\1\s*>", re.S | re.I)


def parse_verdict(text: str) -> Verdict:
    """The self-check: both questions answered yes or no (the first word decides)."""
    if not text.strip():
        raise ParseError("empty verdict")
    if len(text) > MAX_OUTPUT_CHARS:
        raise ParseError(f"verdict of {len(text)} chars > {MAX_OUTPUT_CHARS}")
    found: dict[str, str] = {}
    for m in _ANSWER.finditer(text):
        found.setdefault(m.group(1).lower(), m.group(2).strip())
    answers = {}
    for q in ("q1", "q2"):
        if q not in found:
            raise ParseError(f"verdict has no <{q}>")
        word = re.match(r"[A-Za-z]+", found[q])
        if word is None or word.group().lower() not in ("yes", "no"):
            raise ParseError(f"verdict <{q}> is {_shorten(found[q], 20)!r}, not yes or no")
        answers[q] = word.group().lower() == "yes"
    return Verdict(answers["q1"], answers["q2"], " ".join(found.get("reason", "").split())[:300])


def garbage_scenario(kind: ScenarioKind | str, request: list[Message], raw: str, error: str,
                     meta: dict[str, Any]) -> Scenario:
    """A stored, rejected record of unparseable output: the request, the raw output (cut to
    RAW_CHARS) and meta['parse_error']. The screener's 'parse' rule rejects it first."""
    raw = clean_text(raw)
    return Scenario(kind=kind, source="model", messages=[dict(m) for m in request],
                    target=raw[:RAW_CHARS], spec=None,
                    meta={**meta, "parse_error": error, "raw_chars": len(raw)})
