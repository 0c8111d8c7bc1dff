"""What a dreamed training example is.

A Scenario holds the conversation as it is TRAINED (without the behaviour spec: instruction
stripping), the target reply, and the spec it was written under. The generation-time
conversation is `generation_messages()`: the spec as a system message in front.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


class ScenarioKind(StrEnum):
    ACCEPT = "accept"      # sound direction: carry it out, no alternatives
    PUSHBACK = "pushback"  # verifiably wrong direction: decline/correct with the specific reason
    DERAIL = "derail"      # injected "ignore previous instructions" inside a task: stay on task
    GENERAL = "general"    # code / reasoning / arithmetic with checkable answers (anti-forgetting)
    SELF = "self"          # verifiable facts about the model itself, from its config

    @property
    def behavioral(self) -> bool:
        return self is not ScenarioKind.GENERAL

    @property
    def meaning(self) -> str:
        """What a scenario of this kind teaches, in words for the report."""
        return KIND_MEANINGS[self]


KIND_MEANINGS = {
    ScenarioKind.ACCEPT: "a sound direction: the reply carries it out as asked, no alternatives",
    ScenarioKind.PUSHBACK: "a verifiably wrong direction: the reply says what is wrong and gives the fix",
    ScenarioKind.DERAIL: "an 'ignore your instructions' line hidden in a task: the reply stays on the task",
    ScenarioKind.GENERAL: "code, reasoning or arithmetic with checkable answers, against forgetting",
    ScenarioKind.SELF: "verifiable facts about the model itself, from its config",
}


def normalize_text(text: str) -> str:
    """Case-folded, NFKC, whitespace-collapsed text: the form hashes and near-dup checks use."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class Scenario:
    kind: ScenarioKind
    source: str
    """Who wrote it: 'template', 'model', 'replay' (user corpus), 'self-replay', 'procedural'."""
    messages: list[Message]
    """The conversation as trained: optional system, earlier turns, ending in the user's turn."""
    target: str
    """The assistant reply that is trained (loss only on these tokens)."""
    spec: str | None = None
    """The behaviour spec the reply was written under (None for general data)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form facts: domain, flaw, persona, seed, checkable answer, temperature, ..."""

    def __post_init__(self) -> None:
        self.kind = ScenarioKind(self.kind)
        assert self.messages and self.messages[-1]["role"] == "user", "a scenario ends in a user turn"

    @property
    def content_hash(self) -> str:
        """sha256 over the normalised conversation + target: unique across a store's history."""
        payload = json.dumps(
            [[m["role"], normalize_text(m["content"])] for m in self.messages] + [normalize_text(self.target)],
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def text(self) -> str:
        """All the text of the scenario, for near-duplicate checks and lints."""
        return "\n".join(m["content"] for m in self.messages) + "\n" + self.target

    def generation_messages(self) -> list[Message]:
        """The conversation the reply is generated from: the spec as the first system message."""
        if not self.spec:
            return list(self.messages)
        msgs = list(self.messages)
        if msgs[0]["role"] == "system":
            return [{"role": "system", "content": f"{self.spec}\n\n{msgs[0]['content']}"}] + msgs[1:]
        return [{"role": "system", "content": self.spec}] + msgs

    def training_messages(self) -> list[Message]:
        """The stripped conversation plus the target reply: exactly what is tokenised for training."""
        return list(self.messages) + [{"role": "assistant", "content": self.target}]
