"""The steering direction: where "follows" and "pushes back" differ inside the model.

Per layer l, the direction is the mean hidden state over the content tokens of FOLLOW replies
minus that of PUSH-BACK replies, on the same probe conversations:

    follow replies     accept probes' targets, pushback probes' "Sure, I'll ..." replies
    push-back replies  pushback probes' targets, accept probes' "That is not right ..." replies

so each side holds both kinds of conversation and the difference is the behaviour, not the
topic. Content tokens only: the end-of-turn token (and any special token) is left out, because
its state encodes "end of turn" and is the same for both sides (it would pull every direction
towards the end-of-turn state).

Per cycle:
  steer.consistency   cosine between the directions computed on the two halves of the probes
                      (even / odd probe of each family), averaged over layers: near 1 when the
                      direction is a property of the model, near 0 when it is noise.
  steer.own_sound     the model's OWN Q1 replies to sound directions, content states projected
  steer.own_flawed    on the direction at the most consistent layer, scaled so that +1 is the
                      follow replies' mean and -1 the push-back replies' mean.
  steer.separation    own_sound - own_flawed: 2 when the model's replies sit on the follow side
                      for sound directions and on the push-back side for flawed ones.
The per-layer numbers and the chosen layer are in evals.detail_json.
"""

from __future__ import annotations

from typing import Any

import torch

from dreamd.evals.behaviour import BehaviourResult, ScoredReply, probe_key, score_replies
from dreamd.chat import encode_chat
from dreamd.evals.probes import ProbeSet


def _mean(states: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(states).mean(0)


def directions(follow: list[torch.Tensor], push: list[torch.Tensor]) -> torch.Tensor:
    """[layers, hidden] mean(follow) - mean(push)."""
    return _mean(follow) - _mean(push)


def layer_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()


def steering_metrics(model: Any, tokenizer: Any, probes: ProbeSet, behaviour: BehaviourResult) -> tuple[
        dict[str, float], dict[str, Any]]:
    """Steering metrics from the behaviour pass's scored pairs and the model's own replies."""
    sides: dict[str, list[list[torch.Tensor]]] = {"follow": [[], []], "push": [[], []]}
    sound_keys, flawed_keys = [], []
    for index, p in enumerate(probes.probes):
        if p.family not in ("accept", "pushback"):
            continue
        key = probe_key(p, index)
        (sound_keys if p.family == "accept" else flawed_keys).append(key)
        preferred, dispreferred = behaviour.pairs[key]
        follow, push = (preferred, dispreferred) if p.family == "accept" else (dispreferred, preferred)
        half = (len(sound_keys) if p.family == "accept" else len(flawed_keys)) % 2
        if follow.states is not None and push.states is not None:
            sides["follow"][half].append(follow.states)
            sides["push"][half].append(push.states)
    if not all(sides[s][h] for s in sides for h in (0, 1)):
        return {}, {}
    whole = directions(sides["follow"][0] + sides["follow"][1], sides["push"][0] + sides["push"][1])
    cosines = layer_cosines(directions(sides["follow"][0], sides["push"][0]),
                            directions(sides["follow"][1], sides["push"][1]))
    layer = max(range(len(cosines)), key=lambda i: cosines[i])
    midpoint = (_mean(sides["follow"][0] + sides["follow"][1]) + _mean(sides["push"][0] + sides["push"][1]))[layer] / 2
    d = whole[layer]
    half_gap = d.norm() / 2

    # The model's own replies: content states of conversation + generated tokens.
    keys = sound_keys + flawed_keys
    by_key = {probe_key(p, i): p for i, p in enumerate(probes.probes)}
    items = []
    for key in keys:
        prompt = encode_chat(tokenizer, by_key[key].messages)
        items.append((prompt + list(behaviour.replies[key].token_ids), len(prompt)))
    own: dict[str, ScoredReply] = dict(zip(keys, score_replies(model, tokenizer, items, with_states=True)))

    def projection(group: list[str]) -> float | None:
        values = [float(torch.dot(own[k].states[layer] - midpoint, d) / (d.norm() * half_gap))
                  for k in group if own[k].states is not None]
        return sum(values) / len(values) if values else None

    sound, flawed = projection(sound_keys), projection(flawed_keys)
    metrics = {"steer.consistency": sum(cosines) / len(cosines)}
    if sound is not None and flawed is not None:
        metrics.update({"steer.own_sound": sound, "steer.own_flawed": flawed, "steer.separation": sound - flawed})
    details = {"steer.consistency": {"per_layer": [round(c, 4) for c in cosines], "layer": layer,
                                     "direction_norm": [round(float(n), 4) for n in whole.norm(dim=-1)]}}
    return metrics, details
