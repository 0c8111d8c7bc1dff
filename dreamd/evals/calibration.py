"""Verifiable probes: code answers (forgetting) and calibration (P(True)).

forget.code_em        short code questions ("what does `f(9)` return?") answered greedily
                      through the engine; a reply is right when it ends its turn and states
                      the computed answer as a whole token (a random model's noise never ends
                      its turn, so a stray "3" in it does not count). forgetting.py covers
                      held-out text and arithmetic; this adds code.
forget.code_logprob   mean log-prob per token of the probe's target reply: moves smoothly while
                      a small model's exact match is still 0.

calib.auroc           P(True) (Kadavath et al. 2022): each verifiable probe (arithmetic and
                      reasoning with a computed answer) is shown twice with a proposed reply,
                      once with the right answer (the target) and once with a wrong one of the
                      same form (probes.wrong_answer_for), then the model is asked "Is that
                      answer correct? Answer True or False." P(True) is read from the
                      next-token logits of "True" vs "False". AUROC of P(True) for telling the
                      right replies from the wrong ones: 0.5 is chance, 1 perfect. Right and
                      wrong claims are balanced by construction, so the AUROC is defined even
                      when the model itself never answers correctly.
calib.p_true_gap      mean P(True) on right claims minus on wrong ones.
"""

from __future__ import annotations

import re
from typing import Any

from dreamd.engines.base import Completion, Sampling
from dreamd.evals.behaviour import encode_reply, score_replies, two_way_probability
from dreamd.evals.probes import Probe

CODE_MAX_TOKENS = 48
"""Code probe targets are one short sentence ("It returns `1233`."): ~15 tokens."""
P_TRUE_QUESTION = "Is that answer correct? Answer True or False."


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); 0.5 without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return 0.5
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def states_answer(reply: str, answer: str | None) -> bool:
    """The answer appears as a whole token ('12' in "returns `12`", not in "121" or "v12")."""
    return answer is not None and re.search(r"(?<![\w.])" + re.escape(answer) + r"(?![\w])", reply) is not None


def wrong_claim(probe: Probe) -> str:
    """The probe's target with its (last) answer replaced by the wrong one."""
    assert probe.answer is not None and probe.wrong_answer is not None
    head, sep, tail = probe.preferred.rpartition(probe.answer)
    return head + probe.wrong_answer + tail if sep else probe.wrong_answer


def calibration_metrics(model: Any, tokenizer: Any, probes: list[Probe]) -> tuple[dict[str, float], dict[str, Any]]:
    claims = [(p, p.preferred, True) for p in probes] + [(p, wrong_claim(p), False) for p in probes]
    conversations = [p.messages + [{"role": "assistant", "content": text},
                                   {"role": "user", "content": P_TRUE_QUESTION}] for p, text, _ in claims]
    p_true = two_way_probability(model, tokenizer, conversations, "True", "False")
    labels = [right for _, _, right in claims]
    right = [x for x, y in zip(p_true, labels) if y]
    wrong = [x for x, y in zip(p_true, labels) if not y]
    metrics = {"calib.auroc": auroc(p_true, labels),
               "calib.p_true_gap": sum(right) / len(right) - sum(wrong) / len(wrong)}
    details = {"calib.auroc": {"p_true_right": [round(x, 4) for x in right],
                               "p_true_wrong": [round(x, 4) for x in wrong]}}
    return metrics, details


def code_sampling(seed: int) -> Sampling:
    """How a code probe is answered: greedy, CODE_MAX_TOKENS."""
    return Sampling(n=1, temperature=0.0, max_tokens=CODE_MAX_TOKENS, seed=seed)


def code_answer_metrics(model: Any, tokenizer: Any, engine: Any, probes: list[Probe], seed: int, *,
                        replies: list[Completion] | None = None, exact: bool = True
                        ) -> tuple[dict[str, float], dict[str, Any]]:
    """forget.code_em (greedy through `engine`, or the given `replies` made by code_sampling) and
    forget.code_logprob. exact=False: the log-prob alone (no generation)."""
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    if exact:
        if replies is None:
            replies = [r[0] for r in engine.generate([p.messages for p in probes], code_sampling(seed))]
        right = [states_answer(r.text, p.answer) and r.finish_reason == "stop" for p, r in zip(probes, replies)]
        metrics["forget.code_em"] = sum(right) / len(right)
        details["forget.code_em"] = {"replies": [{"answer": p.answer, "reply": r.text[:120], "right": ok}
                                                 for p, r, ok in zip(probes, replies, right)]}
    scored = score_replies(model, tokenizer, [encode_reply(tokenizer, p, p.preferred) for p in probes])
    metrics["forget.code_logprob"] = sum(s.mean_logprob for s in scored) / len(scored)
    return metrics, details
