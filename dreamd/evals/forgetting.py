"""Forgetting: does the model still do what it did before the dream loop started training it?

Fine-tuning forgets what it does not practise (catastrophic forgetting in fine-tuned LLMs: Luo
et al. 2023, arXiv 2308.08747), so every cycle measures two general abilities on probes fixed
for all runs and all models:

- forget.perplexity: perplexity on held-out general text (CPython docstrings of modules that are
  NOT in the tokenizer corpus, dreamd/evals/data/heldout.txt, or eval.heldout_text), first
  eval.perplexity_max_tokens tokens, in windows of 512. forget.nll is its log (mean NLL/token).
- forget.arith_em: exact match on eval.arithmetic_n arithmetic questions, greedy decoding
  through the engine; the reply's number is parsed tolerantly (`parse_answer`).
- forget.arith_logprob: mean log-prob of the correct answer string given the question. It moves
  smoothly from the first steps even while a small model's exact match is stuck at 0 (binary
  behaviour flips late; continuous metrics move first, docs/efficacy.md).

Disjointness: a probe that is trained on stops measuring forgetting. The questions come from a
fixed seed (PROBE_SEED, independent of run.seed), so `forgetting_prompts()` and
`arithmetic_probes()` give the exact texts and problems; the screener must reject a scenario
for which `touches_forgetting_probe(scenario.text)` is True, and procedural general data must
avoid `(a, op, b)` triples of `arithmetic_probes(n)`. The held-out text must never be put in a
replay corpus.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dreamd.config import EvalConfig
from dreamd.engines.base import Completion, Engine, Sampling
from dreamd.chat import encode_chat, eval_mode
from dreamd.errors import UsageError

PROBE_SEED = 0x5EED_F0E7
"""Seed of the arithmetic questions. Fixed for ever: every run of every model sees the same set."""
WINDOW_TOKENS = 512
"""Perplexity window. 512 keeps the logits of one window of a 152k-vocab model at ~300 MB fp32."""
ANSWER_MAX_TOKENS = 24
"""Enough for "The answer is 1,234." with room to spare; longer replies are cut (and parsed)."""
ANSWER_BATCH = 16
"""Questions scored per forward for forget.arith_logprob."""


@dataclass(frozen=True)
class ArithmeticProbe:
    a: int
    op: str  # '+', '-' or '*'
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b if self.op == "-" else self.a * self.b

    @property
    def prompt(self) -> str:
        return f"What is {self.a} {self.op} {self.b}? Answer with the number only."

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def arithmetic_probes(n: int) -> list[ArithmeticProbe]:
    """The first n of one fixed sequence of distinct problems (so n=16 is a prefix of n=32).
    Two-digit sums and differences (differences kept >= 0) and products of 2..19."""
    rng = random.Random(PROBE_SEED)
    seen: set[ArithmeticProbe] = set()
    out: list[ArithmeticProbe] = []
    while len(out) < n:
        op = "+-*"[len(out) % 3]
        if op == "*":
            probe = ArithmeticProbe(rng.randint(2, 19), op, rng.randint(2, 19))
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            probe = ArithmeticProbe(max(a, b), op, min(a, b)) if op == "-" else ArithmeticProbe(a, op, b)
        if probe not in seen:
            seen.add(probe)
            out.append(probe)
    return out


def forgetting_prompts(eval_cfg: EvalConfig | None = None) -> list[str]:
    """The user prompts of every forgetting probe (for the screener's exclusion check)."""
    return [p.prompt for p in arithmetic_probes((eval_cfg or EvalConfig()).arithmetic_n)]


_EXPR = re.compile(r"(\d+)\s*([-+*×x−])\s*(\d+)")


def touches_forgetting_probe(text: str, eval_cfg: EvalConfig | None = None) -> bool:
    """True when `text` states one of the probe problems (e.g. '37+58', '37 + 58'), in any
    wording: such a scenario must not be trained, or arith_em would measure memory."""
    probes = {(p.a, p.op, p.b) for p in arithmetic_probes((eval_cfg or EvalConfig()).arithmetic_n)}
    canon = {"×": "*", "x": "*", "−": "-"}
    for m in _EXPR.finditer(text):
        if (int(m.group(1)), canon.get(m.group(2), m.group(2)), int(m.group(3))) in probes:
            return True
    return False


def screen_rule(eval_cfg: EvalConfig) -> Callable[[Any], str | None]:
    """The screener's 'forgetting_probe' rule (dream/screen.py): rejects a scenario whose text
    states one of the fixed arithmetic probes. Builds the probes now, so a config that cannot
    build them fails at start-up, not mid-cycle."""
    n = eval_cfg.arithmetic_n
    arithmetic_probes(n)

    def rule(scenario: Any) -> str | None:
        if touches_forgetting_probe(scenario.text, eval_cfg):
            return f"states one of the {n} fixed arithmetic probes (evals/forgetting.py)"
        return None

    return rule


_INT = re.compile(r"[-−]?\d{1,3}(?:,\d{3})+(?!\d)|[-−]?\d+")


def parse_answer(reply: str) -> int | None:
    """The number a reply gives: the integer after the last '=' when the reply restates the
    problem ("37 + 58 = 95"), else the first integer ("The answer is 95."). Thousands commas
    and a Unicode minus are accepted. None when the reply has no integer."""
    tail = reply.rsplit("=", 1)[1] if "=" in reply else None
    match = (_INT.search(tail) if tail is not None else None) or _INT.search(reply)
    if match is None:
        return None
    return int(match.group(0).replace(",", "").replace("−", "-"))


def heldout_text(eval_cfg: EvalConfig) -> str:
    """eval.heldout_text when set, else the bundled held-out docstrings."""
    if eval_cfg.heldout_text is None:
        return resources.files("dreamd.evals").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    try:
        return eval_cfg.heldout_text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"eval.heldout_text = {eval_cfg.heldout_text} cannot be read ({exc.__class__.__name__}); "
                         "point it at a UTF-8 text file or remove it to use the bundled set") from None


@torch.no_grad()
def heldout_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str,
                max_tokens: int, window: int = WINDOW_TOKENS) -> tuple[float, int]:
    """(mean NLL per scored token, number of scored tokens) over the first `max_tokens` tokens.

    Non-overlapping windows. With a BOS token each window starts with BOS and all its tokens
    are scored; without one (Qwen/ChatML tokenizers) the first token of each window is context
    only. One window per forward: the logits, not the model, dominate memory at 152k vocab."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    window = min(window, int(model.config.get_text_config().max_position_embeddings))
    bos = tokenizer.bos_token_id
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            x = torch.tensor([([bos] if bos is not None else []) + chunk], device=device)
            if x.shape[1] < 2:
                continue
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    if count == 0:
        raise ValueError(f"held-out text has {len(ids)} tokens; perplexity needs at least 2")
    return total / count, count


@torch.no_grad()
def answer_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    probes: list[ArithmeticProbe]) -> list[float]:
    """log P(answer string | chat-rendered question) per probe. The answer is tokenised on its
    own after the generation prompt, as the model would emit it. Rows are right-padded: a
    causal model's earlier positions cannot see padding that comes after them."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[float] = []
    with eval_mode(model):
        for start in range(0, len(probes), ANSWER_BATCH):
            rows = []
            for probe in probes[start:start + ANSWER_BATCH]:
                prompt = encode_chat(tokenizer, probe.messages)
                answer = tokenizer(str(probe.answer), add_special_tokens=False)["input_ids"]
                rows.append((prompt, answer))
            width = max(len(p) + len(a) for p, a in rows)
            ids = torch.tensor([p + a + [pad] * (width - len(p) - len(a)) for p, a in rows], device=device)
            mask = torch.tensor([[1] * (len(p) + len(a)) + [0] * (width - len(p) - len(a)) for p, a in rows],
                                device=device)
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
            for i, (prompt, answer) in enumerate(rows):
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=device)
                out.append(logprobs[i, positions, ids[i, positions + 1]].sum().item())
    return out


def arithmetic_sampling(seed: int) -> Sampling:
    """How an arithmetic probe is answered: greedy, ANSWER_MAX_TOKENS."""
    return Sampling(n=1, temperature=0.0, max_tokens=ANSWER_MAX_TOKENS, seed=seed)


def forgetting_metrics(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, engine: Engine,
                       eval_cfg: EvalConfig, seed: int, *, replies: list[Completion] | None = None,
                       exact: bool = True) -> dict[str, float]:
    """All forgetting metrics of one evaluation (keys in the module docstring).

    `model` is the trainer's model (perplexity and log-probs are computed on it, exactly);
    `engine` must be awake with valid weights (exact match is generated through it, greedy),
    unless `replies` (one per arithmetic probe, made by arithmetic_sampling) are given.
    exact=False: no exact match (no generation): perplexity, nll and arith_logprob only.
    `seed` only seeds the engine's sampler, which greedy decoding does not use: the probes and
    the held-out tokens never depend on it. Deterministic for fixed weights."""
    nll, _ = heldout_nll(model, tokenizer, heldout_text(eval_cfg), eval_cfg.perplexity_max_tokens)
    probes = arithmetic_probes(eval_cfg.arithmetic_n)
    metrics = {"forget.perplexity": math.exp(nll), "forget.nll": nll}
    if exact:
        if replies is None:
            replies = [r[0] for r in engine.generate([p.messages for p in probes], arithmetic_sampling(seed))]
        metrics["forget.arith_em"] = sum(parse_answer(r.text) == p.answer for p, r in zip(probes, replies)) / len(probes)
    logprobs = answer_logprobs(model, tokenizer, probes)
    metrics["forget.arith_logprob"] = sum(logprobs) / len(logprobs)
    return metrics
