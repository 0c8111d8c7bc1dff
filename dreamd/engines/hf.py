"""Generation with transformers' own `generate`, on the very model object the trainer trains.

This is the engine for CPU boxes and anywhere vLLM is absent. There is one copy of the
weights: the trainer updates them in place and the engine sees the update at once, so
`load_weights` copies only tensors that do not already share storage with the model (a no-op
after training on the same object, a real copy when weights come from elsewhere, e.g. a
checkpoint being rolled back to).

Sleep/wake free nothing here (there is no separate engine memory), but the state machine is
kept exactly as the vLLM engine's, so the cycle's sequencing is tested on CPU: after
sleep(level=2) the weights count as garbage until every parameter has been pushed again.

Left padding: batched greedy outputs equal one-at-a-time outputs on both tiny architectures.
For the Qwen3.5 hybrid this holds because its Gated-DeltaNet layers zero the hidden states at
padded positions before the conv and the recurrence, so a left-padded row starts from the same
zero state as an unpadded one (checked in tests/test_engine_hf.py; logits differ by ~2e-7).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from dreamd.dream.scenario import Message
from dreamd.engines.base import Completion, GenerationMeter, Sampling, SleepState, check_mixed

EVAL_BATCH = 64
"""Rows per model.generate call in generate_mixed (the evaluation's one call: Q1, code and
arithmetic probes, ~60-90 rows at defaults). Greedy decoding of a small model on CPU costs
per step far more in overhead than per row, so one wide batch beats max_batch_size chunks."""
from dreamd.chat import encode_chat, eval_mode, generation_stop_ids, prompt_logprobs


class RowBudgets(StoppingCriteria):
    """Per-row max_tokens inside one model.generate call: row i is done after budgets[i] new
    tokens (what follows is padding, cut by generate_mixed)."""

    def __init__(self, budgets: list[int], prompt_width: int) -> None:
        self.budgets = torch.tensor(budgets)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        done = (input_ids.shape[1] - self.prompt_width) >= self.budgets
        return done.to(input_ids.device)


def decode_completion(tokenizer: PreTrainedTokenizerBase, row: list[int], stop_ids: list[int],
                      max_tokens: int) -> Completion:
    """One generated row -> Completion. The row is cut after its first stop token (what follows
    is generate's padding); a row without one ran out of max_tokens. Any id sequence decodes:
    special tokens are dropped from the text, stray UTF-8 fragments become U+FFFD."""
    stop_at = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
    ids = row if stop_at is None else row[: stop_at + 1]
    # transformers stops a row only at a stop token or at max_new_tokens.
    assert stop_at is not None or len(row) == max_tokens, (len(row), max_tokens)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Completion(text=text, token_ids=tuple(ids), finish_reason="length" if stop_at is None else "stop")


class TransformersEngine:
    """Implements dreamd.engines.base.Engine with `model.generate` (see module docstring)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 max_batch_size: int = 16) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.stop_ids = generation_stop_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # Tied weights appear under several names; a push of any alias counts for the tensor.
        self._canonical: dict[str, str] = {}
        first_name: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._canonical[name] = first_name.setdefault(id(param), name)
        self._targets: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        for name, param in model.named_parameters(remove_duplicate=False):
            self._targets.setdefault(name, param)
        self.meter = GenerationMeter()
        self.sleep_state = SleepState(weights_valid=True)
        self._pushed: set[str] = set()
        self.last_push_copied = 0
        """Tensors the last load_weights call copied (0 when they already were the model's)."""
        self.last_push_shared = 0
        """Tensors the last load_weights call skipped because they share the model's storage."""

    # ---- state machine (engines.base.SleepState, shared with the vLLM engine) -------------------
    @property
    def weights_valid(self) -> bool:
        return self.sleep_state.weights_valid

    @property
    def asleep_tags(self) -> frozenset[str]:
        """What is asleep now: a subset of {'weights', 'kv_cache'}; empty when fully awake."""
        return frozenset(self.sleep_state.asleep)

    @property
    def can_sleep(self) -> bool:
        """The state machine runs everywhere (it shares the trainer's weights: nothing to free)."""
        return True

    def sleep(self, level: int = 1) -> None:
        self.sleep_state.begin_sleep(level)
        self.sleep_state.slept(level)
        if level == 2:
            self._pushed = set()

    def wake(self, tags: list[str] | None = None) -> None:
        self.sleep_state.woke(self.sleep_state.begin_wake(tags))

    def _require_ready(self, what: str) -> None:
        self.sleep_state.require_awake(what)
        if not self.sleep_state.weights_valid:
            raise RuntimeError(f"{what} called after sleep(level=2) before every weight was pushed "
                               "with load_weights(); the weights are garbage until then")

    # ---- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the model by HF name. Tensors that already are the model's own
        storage (the CPU case: trainer and engine share one model) are skipped. Unknown names
        and shape mismatches raise ValueError before anything of that tensor is written."""
        if "weights" in self.sleep_state.asleep:
            raise RuntimeError("load_weights called while the weights sleep; call wake(['weights']) first")
        copied = shared = 0
        for name, tensor in named_tensors:
            target = self._targets.get(name)
            if target is None:
                raise ValueError(f"load_weights: {name!r} is not a parameter or buffer of "
                                 f"{type(self.model).__name__}")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"load_weights: {name!r} has shape {tuple(tensor.shape)}, the model's "
                                 f"is {tuple(target.shape)}")
            if (tensor.data_ptr() == target.data_ptr() and tensor.dtype == target.dtype
                    and tensor.device == target.device and tensor.stride() == target.stride()):
                shared += 1
            else:
                target.copy_(tensor)
                copied += 1
            if name in self._canonical:
                self._pushed.add(self._canonical[name])
        self.last_push_copied, self.last_push_shared = copied, shared
        if not self.sleep_state.weights_valid and self._pushed >= set(self._canonical.values()):
            self.sleep_state.weights_valid = True

    # ---- generation --------------------------------------------------------------------------
    def _generation_config(self, sampling: Sampling, copies: int) -> GenerationConfig:
        # Every knob a model's generation_config.json may set (Qwen ships top_k=20,
        # repetition_penalty, ...) is pinned here: transformers fills unset (None) fields from
        # the model's file, and its global default top_k is 50, whereas vLLM's is 'off'. The
        # sampling-only knobs are set only when sampling (greedy would warn that they are unused).
        knobs = dict(num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                     num_return_sequences=copies, max_new_tokens=sampling.max_tokens,
                     eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True)
        if sampling.temperature == 0.0:
            return GenerationConfig(do_sample=False, **knobs)
        return GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                                **knobs)

    def _generate_rows(self, prompts: list[list[int]], sampling: Sampling, copies: int,
                       budgets: list[int] | None = None) -> list[list[int]]:
        """Left-padded model.generate; the new tokens of every row (`budgets`: per-row max_tokens)."""
        width = max(len(p) for p in prompts)
        device = self.model.device
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        stopping = [RowBudgets(budgets, width)] if budgets is not None else None
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=stopping,
                                  generation_config=self._generation_config(sampling, copies))
        return out[:, width:].tolist()

    def _generate_chunk(self, prompts: list[list[int]], sampling: Sampling, copies: int) -> list[Completion]:
        return [decode_completion(self.tokenizer, row, self.stop_ids, sampling.max_tokens)
                for row in self._generate_rows(prompts, sampling, copies)]

    def generate(self, conversations: list[list[Message]], sampling: Sampling) -> list[list[Completion]]:
        """`sampling.n` completions per conversation. temperature 0 is greedy (the n copies are
        then identical and computed once). A seed makes the whole call reproducible for the same
        conversations and max_batch_size; the global torch RNG (the trainer's) is left as it was.
        Completion.token_ids include the end-of-turn token when finish_reason is 'stop' (as
        vLLM's do); Completion.text never contains special tokens."""
        self._require_ready("generate")
        if sampling.n < 1 or sampling.max_tokens < 1:
            raise ValueError(f"sampling needs n >= 1 and max_tokens >= 1, got {sampling}")
        if sampling.temperature < 0 or not 0.0 < sampling.top_p <= 1.0:
            raise ValueError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, got {sampling}")
        prompts = [encode_chat(self.tokenizer, conv) for conv in conversations]
        greedy = sampling.temperature == 0.0
        copies = 1 if greedy else sampling.n
        per_chunk = max(1, self.max_batch_size // copies)
        # No seed: a fresh one per call, so unseeded calls differ from each other even though
        # the RNG state is restored afterwards.
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        device = self.model.device
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        flat: list[Completion] = []
        t0 = time.perf_counter()
        with eval_mode(self.model), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), per_chunk):
                flat += self._generate_chunk(prompts[start:start + per_chunk], sampling, copies)
        result = [flat[i * copies:(i + 1) * copies] * (sampling.n // copies) for i in range(len(prompts))]
        self.meter.add(sum(len(c.token_ids) for cs in result for c in cs), time.perf_counter() - t0)
        return result

    def generate_mixed(self, conversations: list[list[Message]], samplings: list[Sampling]) -> list[Completion]:
        """One greedy completion per conversation under its own max_tokens (engines.base): rows
        sorted by budget, longest first, EVAL_BATCH per model.generate call, each row stopped at
        its own budget (RowBudgets). Greedy rows equal what generate() gives them alone or in
        max_batch_size chunks (left padding; module docstring)."""
        self._require_ready("generate_mixed")
        check_mixed(conversations, samplings)
        prompts = [encode_chat(self.tokenizer, conv) for conv in conversations]
        order = sorted(range(len(prompts)), key=lambda i: -samplings[i].max_tokens)
        out: list[Completion | None] = [None] * len(prompts)
        t0 = time.perf_counter()
        with eval_mode(self.model):
            for start in range(0, len(order), EVAL_BATCH):
                rows = order[start:start + EVAL_BATCH]
                budgets = [samplings[i].max_tokens for i in rows]
                longest = Sampling(n=1, temperature=0.0, max_tokens=max(budgets))
                generated = self._generate_rows([prompts[i] for i in rows], longest, 1, budgets)
                for i, row, budget in zip(rows, generated, budgets):
                    out[i] = decode_completion(self.tokenizer, row[:budget], self.stop_ids, budget)
        done = [c for c in out if c is not None]
        self.meter.add(sum(len(c.token_ids) for c in done), time.perf_counter() - t0)
        return done

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token after the first, given its prefix, in fp32 (chat.prompt_logprobs,
        one sequence per forward)."""
        self._require_ready("prompt_logprobs")
        return [prompt_logprobs(self.model, ids) for ids in token_ids]
