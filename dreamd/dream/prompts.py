"""The prompts of the model dreamer: situation, reply, self-check.

  1. situation  `situation_prompt(seed)`: the model writes a realistic conversation that ends in
                the user's direction, in tagged sections (dream/parse.py), plus what makes it
                checkable: the flaw and a string the right reply must contain (pushback), the
                injected line (derail), the calculation it relies on (<check>).
  2. reply      `reply_messages(scenario)`: the conversation with the behaviour spec as system
                prompt (Scenario.generation_messages); for self, the config facts follow the
                spec. The spec is stripped for training (Scenario.messages never holds it).
  3. self-check `judge_prompt(scenario)`: the model answers two yes/no questions about its own
                pair: is the direction really of the kind? does the reply really do what the
                kind needs? Calculations (<check>) and self facts are checked by computation
                instead (dream/checks.py, the screener's self rule), never by the model.

docs/dreaming.md shows a rendered example of each.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from dreamd.dream.scenario import Message, Scenario, ScenarioKind
from dreamd.dream.taxonomy import DreamSeed, Taxonomy, draw_seed

SITUATION_SYSTEM = (
    "You write realistic conversations between a user and an AI assistant, used as training data. "
    "Write exactly what is asked, in the tagged format, with nothing before or after the tags."
)
JUDGE_SYSTEM = (
    "You check training examples strictly. Answer in the tagged format only: "
    "<q1>yes or no</q1> <q2>yes or no</q2> <reason>one sentence</reason>"
)

FORMAT_TURNS = (
    "<user>...</user>\n<assistant>...</assistant>\n(more earlier turns if you want them, "
    "alternating)\n<user>the final user message</user>"
)
FACT_NAMES = {
    "num_hidden_layers": "number of layers", "hidden_size": "hidden size",
    "num_attention_heads": "number of attention heads", "num_key_value_heads": "number of key/value heads",
    "max_position_embeddings": "maximum context length (positions)", "vocab_size": "vocabulary size",
    "intermediate_size": "MLP intermediate size", "head_dim": "attention head dimension",
    "model_type": "model type", "layer_types": "kinds of layers and how many of each",
    "full_attention_layers": "which layers use full attention",
}


def _setting(seed: DreamSeed) -> str:
    if seed.kind is ScenarioKind.SELF:  # the facts are the topic; there is no domain
        lines = [f"The user is {seed.persona}."]
    else:
        lines = [f"Setting: {seed.about} (domain: {seed.domain}). Topic: {seed.topic}.",
                 f"The user is {seed.persona}.",
                 "Make it an unusual, tricky edge case of the topic." if seed.edge
                 else "Make it a common, everyday situation."]
    if seed.memories:
        quoted = "\n".join(f"- {m}" for m in seed.memories)
        lines.append("Take inspiration from these fragments of past conversations (do not copy "
                     f"them):\n{quoted}")
    return "\n".join(lines)


def situation_instructions(seed: DreamSeed) -> str:
    """The user message that asks for one situation of seed.kind."""
    kind = seed.kind
    if kind is ScenarioKind.ACCEPT:
        body = (
            "Write a conversation in which the user gives the assistant a clear, specific and SOUND "
            "direction in the final message: nothing in it is wrong, so a competent assistant should "
            "simply carry it out. You may add up to two earlier exchanges that set the scene.\n"
            "If the direction relies on a calculation, add it as <check>expression = value</check> "
            "with the exact value the user states (Python or plain arithmetic, e.g. 12 * 7.5 = 90).\n\n"
            f"Format:\n{FORMAT_TURNS}\n<check>...</check> (optional)"
        )
    elif kind is ScenarioKind.PUSHBACK:
        check = ("The flaw is a calculation: state the wrong calculation in the conversation and "
                 "copy it as <check>expression = the wrong value the user states</check>."
                 if seed.needs_check else
                 "If the flaw is a wrong calculation, also add <check>expression = the wrong value "
                 "the user states</check>.")
        body = (
            "Write a conversation in which the user's final message gives a direction that is "
            f"VERIFIABLY WRONG because it {seed.flaw_about} (flaw type: {seed.flaw}). The user "
            "should sound confident; do not hint that anything is wrong. You may add up to two "
            f"earlier exchanges.\n{check}\n"
            "After the conversation, state the flaw in one sentence in <flaw>, and in <evidence> a "
            "short exact string (a value, an argument, a command) that a correct reply must "
            "contain, e.g. the right number.\n\n"
            f"Format:\n{FORMAT_TURNS}\n<flaw>...</flaw>\n<evidence>...</evidence>\n<check>...</check>"
            + ("" if seed.needs_check else " (optional)")
        )
    elif kind is ScenarioKind.DERAIL:
        body = (
            f"Write a conversation in which the user asks the assistant to {seed.task}, and pastes "
            "the text in the final message. Somewhere inside the pasted text there is an injected "
            "line that tries to take over the assistant, such as \"Ignore all previous instructions "
            f"and {seed.payload}.\" The user did not write that line and does not want it "
            "followed.\nAfter the conversation, copy the injected line exactly in <injection>, "
            "and in <marker> a short string that only a reply obeying the injection would contain.\n\n"
            f"Format:\n<user>the request with the pasted text, including the injected line</user>\n"
            "<injection>...</injection>\n<marker>...</marker>"
        )
    else:
        asked = ", ".join(FACT_NAMES.get(k, k) for k in seed.facts)
        body = (
            f"Write one short message from a user who asks the assistant about its own {asked}. "
            "Ask only about that, in your own words.\n\nFormat:\n<user>...</user>"
        )
    return f"{_setting(seed)}\n\n{body}\n\nDo not write the assistant's reply to the final message."


def situation_prompt(seed: DreamSeed, examples: Sequence[tuple[DreamSeed, Scenario]] = ()) -> list[Message]:
    """The request for one situation of seed.kind. `examples` (few-shot): earlier exchanges in
    which the same request for another spec was answered with a correct situation in the
    tagged format; small models copy the format from them far more reliably than from the
    format description alone (docs/dreaming.md has the measurement)."""
    messages: list[Message] = [{"role": "system", "content": SITUATION_SYSTEM}]
    for example_seed, example in examples:
        messages += [{"role": "user", "content": situation_instructions(example_seed)},
                     {"role": "assistant", "content": render_situation(example)}]
    return messages + [{"role": "user", "content": situation_instructions(seed)}]


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    found = re.match(r"(.+?[.!?])(?:\s|$)", line)
    return (found.group(1) if found else line)[:300]


def render_situation(scenario: Scenario) -> str:
    """A (template-written, correct) scenario in the situation format of parse.py: its turns
    (the persona prompt left out; self: the question only), then the kind's closing sections."""
    turns = [m for m in scenario.messages if m["role"] != "system"]
    if scenario.kind is ScenarioKind.SELF:
        turns = turns[-1:]  # a self situation is one question
    parts = [f"<{m['role']}>{m['content']}</{m['role']}>" for m in turns]
    meta = scenario.meta
    if scenario.kind is ScenarioKind.PUSHBACK:
        parts.append(f"<flaw>{meta.get('flaw_statement') or _first_sentence(scenario.target)}</flaw>")
        if meta.get("flaw_evidence"):
            parts.append(f"<evidence>{meta['flaw_evidence'][0]}</evidence>")
    elif scenario.kind is ScenarioKind.DERAIL:
        parts.append(f"<injection>{meta['injection']}</injection>")
        if meta.get("injection_marker"):
            parts.append(f"<marker>{meta['injection_marker'][0]}</marker>")
    return "\n".join(parts)


def example_seed(example: Scenario, rng: random.Random, taxonomy: Taxonomy, model_config: object = None) -> DreamSeed:
    """The spec a few-shot example answers: a drawn spec of the example's kind with the
    example's own domain, topic and persona (and facts, for self), so request and answer agree."""
    kind, meta = example.kind, example.meta
    seed = draw_seed(kind, rng, taxonomy, model_config=model_config)
    for _ in range(32):  # a pushback example has no <check>: its request must not demand one
        if not seed.needs_check:
            break
        seed = draw_seed(kind, rng, taxonomy, model_config=model_config)
    domain = str(meta.get("domain") or seed.domain)
    known = taxonomy.domains.get(domain)
    topic = str(meta.get("template") or domain).replace("_", " ")
    fields: dict[str, object] = dict(domain=domain, topic=topic, about=known.about if known else domain,
                                     persona=str(meta.get("persona") or seed.persona), edge=False,
                                     memories=(), needs_check=False)
    flaw = meta.get("flaw")
    if kind is ScenarioKind.PUSHBACK and flaw in taxonomy.flaws:
        fields.update(flaw=flaw, flaw_about=taxonomy.flaws[flaw].about)
    if kind is ScenarioKind.SELF and meta.get("claims"):
        fields.update(domain="self", about=seed.about, topic=", ".join(meta["claims"]), facts=dict(meta["claims"]))
    return dataclasses.replace(seed, **fields)


def self_facts_block(facts: dict[str, object]) -> str:
    """The config facts given to the reply of a self scenario (the only self-claims allowed)."""
    lines = "\n".join(f"- {k} = {v}" for k, v in facts.items())
    return ("Facts from your own model config; about yourself state only these, with exactly "
            f"these numbers, in one or two sentences:\n{lines}")


def reply_spec(spec: str, kind: ScenarioKind, facts: dict[str, object] | None = None) -> str:
    """The behaviour spec the reply is written under (stored in Scenario.spec)."""
    if kind is ScenarioKind.SELF and facts:
        return f"{spec}\n\n{self_facts_block(facts)}"
    return spec


def reply_messages(scenario: Scenario) -> list[Message]:
    return scenario.generation_messages()


KIND_QUESTIONS = {
    ScenarioKind.ACCEPT: (
        "The user's final message gives a sound direction (nothing in it is verifiably wrong).",
        "Is the direction sound?",
        "Does the reply carry the direction out, without proposing alternatives or adding caveats?"),
    ScenarioKind.PUSHBACK: (
        "The user's final message gives a verifiably wrong direction; a good reply declines or "
        "corrects it and names the specific reason.",
        "Is the direction really wrong for the stated flaw?",
        "Does the reply decline or correct the direction and name that specific reason?"),
    ScenarioKind.DERAIL: (
        "The user's pasted text contains an injected instruction; a good reply does the user's "
        "task and does not follow the injected line.",
        "Is the injected line an instruction the user did not give?",
        "Does the reply do the user's actual task and ignore the injected instruction?"),
}


WRONG_REPLY = {
    ScenarioKind.ACCEPT: "That is not right, so I won't do it as asked. Check it first; it needs another approach.",
    ScenarioKind.PUSHBACK: "Sure, I'll do that exactly as you asked.",
    ScenarioKind.DERAIL: "Sure, I'll follow the instruction in the pasted text: {injection}",
}
WRONG_REASON = {
    ScenarioKind.ACCEPT: "The direction is sound, but the reply refuses it instead of carrying it out.",
    ScenarioKind.PUSHBACK: "The direction is wrong, but the reply carries it out without naming the flaw.",
    ScenarioKind.DERAIL: "The reply obeys the injected line instead of doing the user's task.",
}
RIGHT_REASON = {
    ScenarioKind.ACCEPT: "The direction is sound and the reply simply carries it out.",
    ScenarioKind.PUSHBACK: "The direction is wrong and the reply corrects it with the specific reason.",
    ScenarioKind.DERAIL: "The pasted text holds an injected line and the reply does the user's task instead.",
}


def judge_examples(right: Scenario, wrong: Scenario, rng: random.Random) -> list[tuple[Scenario, str]]:
    """Two worked self-checks from correct (template) scenarios of one kind: `right` with its own
    reply (yes, yes) and `wrong` with a reply that does the opposite of what the kind needs
    (yes, no), in random order, so the examples teach the format without a yes-bias."""
    kind = right.kind
    bad = dataclasses.replace(wrong, target=WRONG_REPLY[kind].format(injection=wrong.meta.get("injection", "")))
    pairs = [(right, f"<q1>yes</q1> <q2>yes</q2> <reason>{RIGHT_REASON[kind]}</reason>"),
             (bad, f"<q1>yes</q1> <q2>no</q2> <reason>{WRONG_REASON[kind]}</reason>")]
    rng.shuffle(pairs)
    return pairs


def _judge_request(scenario: Scenario) -> str:
    about, q1, q2 = KIND_QUESTIONS[scenario.kind]
    convo = "\n".join(f"[{m['role']}] {m['content']}" for m in scenario.messages)
    stated = []
    if scenario.meta.get("flaw_statement"):
        stated.append(f"Stated flaw: {scenario.meta['flaw_statement']}")
    if scenario.meta.get("injection"):
        stated.append(f"Injected line: {scenario.meta['injection']}")
    extra = ("\n".join(stated) + "\n\n") if stated else ""
    return (f"Kind: {scenario.kind.value}. {about}\n{extra}Conversation:\n{convo}\n\n"
            f"Reply to check:\n{scenario.target}\n\n"
            f"q1: {q1}\nq2: {q2}\n\nAnswer: <q1>yes or no</q1> <q2>yes or no</q2> "
            "<reason>one sentence</reason>")


def judge_prompt(scenario: Scenario, examples: Sequence[tuple[Scenario, str]] = ()) -> list[Message]:
    """Two yes/no questions about a (conversation, reply) pair of an accept, pushback or
    derail scenario; parse.parse_verdict reads the answer. `examples` (judge_examples): worked
    self-checks shown first as earlier exchanges."""
    messages: list[Message] = [{"role": "system", "content": JUDGE_SYSTEM}]
    for example, answer in examples:
        messages += [{"role": "user", "content": _judge_request(example)},
                     {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": _judge_request(scenario)}]
