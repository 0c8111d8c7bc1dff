"""What the model dreamer dreams about: the taxonomy, memory seeds and the scenario spec.

    taxonomy = load_taxonomy(cfg.dream.taxonomy_file)      # bundled + the user's extension
    memories = load_memories(cfg.dream.seed_corpus)        # [] when not set
    seed = draw_seed("pushback", rng, taxonomy, memories, edge_share=0.3, memory_share=0.5,
                     model_config=model.config)

A scenario spec (`DreamSeed`) = kind + domain + topic + persona (+ a flaw type for pushback, a
task and payload for derail, config facts for self) + its own 64-bit seed, plus optional
"memory seeds": 1-2 lines drawn from past conversations (dream.seed_corpus), which ground the
situation in what users really ask. `edge` asks for an unusual case instead of an everyday one
(the temperature controller raises the edge share when few candidates fail).

The bundled taxonomy is dreamd/dream/data/taxonomy.json (18 domains, 100 topics, 24 personas,
5 flaw types, 9 derail tasks x 8 payloads). A user file of the same shape (JSON or TOML) adds
domains and extends the lists of existing ones; docs/dreaming.md shows one.
"""

from __future__ import annotations

import json
import random
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dreamd.dream.scenario import ScenarioKind
from dreamd.dream.self_facts import QUESTIONS, config_facts
from dreamd.errors import UsageError

NonEmpty = Annotated[str, Field(min_length=1, max_length=300)]
MEMORY_CHARS = 300
"""A memory seed is cut to this many characters: enough for the gist of a request."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Domain(_Strict):
    about: NonEmpty
    """What the domain is, as a phrase ('writing, fixing and running Python code')."""
    topics: list[NonEmpty] = Field(min_length=1)
    """Everyday topics (drawn when the dreamer is cautious)."""
    edge_topics: list[NonEmpty] = []
    """Unusual or tricky topics (drawn with the edge share)."""
    flaws: list[str] | None = None
    """Flaw types that make sense here; None: all of them."""


class Flaw(_Strict):
    about: NonEmpty
    """What makes the direction wrong, as a clause ('relies on a calculation whose result is wrong')."""
    check: bool = False
    """True: the situation must state the wrong calculation in <check> (checked by computation)."""


class Derail(_Strict):
    tasks: list[NonEmpty] = Field(min_length=1)
    payloads: list[NonEmpty] = Field(min_length=1)


class Taxonomy(_Strict):
    domains: dict[str, Domain] = Field(min_length=1)
    personas: list[NonEmpty] = Field(min_length=1)
    flaws: dict[str, Flaw] = Field(min_length=1)
    derail: Derail

    @model_validator(mode="after")
    def _known_flaws(self) -> Taxonomy:
        for name, domain in self.domains.items():
            unknown = set(domain.flaws or ()) - set(self.flaws)
            if unknown:
                raise ValueError(f"domain {name!r} lists unknown flaw types {sorted(unknown)}; "
                                 f"known: {sorted(self.flaws)}")
            if domain.flaws == []:
                raise ValueError(f"domain {name!r} has an empty flaws list; leave it out for all")
        return self

    def flaws_for(self, domain: str) -> list[str]:
        return list(self.domains[domain].flaws or self.flaws)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Dicts merge by key, lists are extended (without repeats), other values are replaced."""
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = _merge(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            out[key] = old + [v for v in value if v not in old]
        else:
            out[key] = value
    return out


def bundled_taxonomy_data() -> dict[str, Any]:
    data = json.loads(resources.files("dreamd.dream").joinpath("data/taxonomy.json").read_text("utf-8"))
    data.pop("_about", None)
    return data


def load_taxonomy(extra: Path | None = None) -> Taxonomy:
    """The bundled taxonomy, extended by `extra` (dream.taxonomy_file). UsageError with one
    line when the file cannot be read or does not have the taxonomy's shape."""
    data = bundled_taxonomy_data()
    where = "the bundled taxonomy"
    if extra is not None:
        where = f"dream.taxonomy_file {extra}"
        try:
            raw = Path(extra).read_text(encoding="utf-8")
            user = tomllib.loads(raw) if Path(extra).suffix == ".toml" else json.loads(raw)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{where} cannot be read ({type(exc).__name__}: {exc}); point it at a "
                             "JSON or .toml file shaped like dreamd/dream/data/taxonomy.json") from None
        if not isinstance(user, dict):
            raise UsageError(f"{where} must hold an object with domains / personas / flaws / derail")
        user.pop("_about", None)
        data = _merge(data, user)
    try:
        return Taxonomy.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"{where}: {loc}: {err['msg']}; see docs/dreaming.md 'Extending the "
                         "taxonomy'") from None


def load_memories(path: Path | None) -> list[str]:
    """Memory seeds from a JSONL of past conversations: one line per record, either
    {"messages": [{"role", "content"}, ...]} (its user turns are taken) or {"text": "..."}.
    Each seed is cut to MEMORY_CHARS. UsageError naming the line for anything else."""
    if path is None:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"dream.seed_corpus {path} cannot be read ({type(exc).__name__}); point "
                         "it at a UTF-8 JSONL file or remove the setting") from None
    out: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        texts = _record_texts(record)
        if texts is None:
            raise UsageError(f"dream.seed_corpus {path} line {n}: expected a JSON object with "
                             "'messages' (a list of {role, content}) or 'text'; fix or remove the line")
        out += [" ".join(t.split())[:MEMORY_CHARS] for t in texts if t.strip()]
    if not out:
        raise UsageError(f"dream.seed_corpus {path} holds no user text; add records or remove the setting")
    return out


def _record_texts(record: Any) -> list[str] | None:
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return [record["text"]]
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return None
    return [m["content"] for m in messages if m.get("role") == "user"]


@dataclass(frozen=True)
class DreamSeed:
    """One scenario spec: what the model is asked to write."""

    kind: ScenarioKind
    seed: int
    domain: str
    topic: str
    about: str
    persona: str
    edge: bool = False
    flaw: str | None = None
    flaw_about: str | None = None
    needs_check: bool = False
    task: str | None = None
    payload: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    """self: the config facts the question is about (key -> value)."""
    memories: tuple[str, ...] = ()

    def meta(self) -> dict[str, Any]:
        """What goes into Scenario.meta (JSON)."""
        out: dict[str, Any] = {"seed": self.seed, "domain": self.domain, "topic": self.topic,
                               "persona": self.persona, "edge": self.edge}
        for name in ("flaw", "task", "payload"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.memories:
            out["memories"] = list(self.memories)
        return out


def draw_seed(kind: ScenarioKind | str, rng: random.Random, taxonomy: Taxonomy,
              memories: list[str] | None = None, *, edge_share: float = 0.0,
              memory_share: float = 0.5, model_config: Any = None) -> DreamSeed:
    """A scenario spec for `kind`: 64 bits from `rng` seed a private Random, so the same rng
    state gives the same spec (and meta['seed'] rebuilds it with the same arguments)."""
    kind = ScenarioKind(kind)
    if kind is ScenarioKind.GENERAL:
        raise ValueError("general data is procedural or replayed, never model-written")
    seed = rng.getrandbits(64)
    r = random.Random(seed)
    edge = r.random() < edge_share
    persona = r.choice(taxonomy.personas)
    picked = tuple(r.sample(memories, min(len(memories), r.choice((1, 2)))) if memories
                   and r.random() < memory_share else ())
    if kind is ScenarioKind.SELF:
        facts = config_facts(model_config)
        keys = [k for k in QUESTIONS if k in facts]
        chosen = r.sample(keys, min(len(keys), r.choice((1, 1, 2))))
        return DreamSeed(kind, seed, "self", ", ".join(chosen), "the assistant's own model config",
                         persona, edge, facts={k: facts[k] for k in chosen}, memories=picked)
    name = r.choice(sorted(taxonomy.domains))
    domain = taxonomy.domains[name]
    topics = domain.edge_topics if edge and domain.edge_topics else domain.topics
    topic = r.choice(topics)
    if kind is ScenarioKind.PUSHBACK:
        flaw = r.choice(taxonomy.flaws_for(name))
        return DreamSeed(kind, seed, name, topic, domain.about, persona, edge, flaw=flaw,
                         flaw_about=taxonomy.flaws[flaw].about,
                         needs_check=taxonomy.flaws[flaw].check, memories=picked)
    if kind is ScenarioKind.DERAIL:
        return DreamSeed(kind, seed, name, topic, domain.about, persona, edge,
                         task=r.choice(taxonomy.derail.tasks), payload=r.choice(taxonomy.derail.payloads),
                         memories=picked)
    return DreamSeed(kind, seed, name, topic, domain.about, persona, edge, memories=picked)
