"""TransformersEngine on real tiny models of both architectures (Llama and the Qwen3.5 hybrid)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamd.config import ModelConfig
from dreamd.engines.base import Engine, Sampling
from dreamd.engines.hf import TransformersEngine, decode_completion, encode_chat
from dreamd.models import load_model
from dreamd.tiny import write_tiny_model_dir

ARCHS = ["llama", "qwen3.5"]
# Prompts of very different lengths, so batches carry 0..~60 tokens of left padding.
CONVS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Sort the list [3, 1, 2] in place and return None, as list.sort does."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 * 8?"}],
    [{"role": "user", "content": "Explain " + "why the sky is blue and " * 6 + "stop."}],
    [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}, {"role": "user", "content": "go"}],
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {arch: write_tiny_model_dir(tmp_path_factory.mktemp(arch.replace(".", "")), arch) for arch in ARCHS}


def _engine(model_dirs: dict[str, Path], arch: str, **kw) -> TransformersEngine:
    model, tok = load_model(ModelConfig(path=model_dirs[arch]), "cpu")
    return TransformersEngine(model, tok, **kw)


def _teach(engine: TransformersEngine, conv: list[dict], reply: str, steps: int = 60) -> None:
    """Overfit the model to answer `conv` with `reply` + end of turn (so it really stops)."""
    tok, model = engine.tokenizer, engine.model
    prompt = encode_chat(tok, conv)
    target = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()


def _no_cache_greedy(engine: TransformersEngine, conv: list[dict], steps: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no cache at all)."""
    ids = encode_chat(engine.tokenizer, conv)
    out: list[int] = []
    with torch.no_grad():
        engine.model.eval()
        for _ in range(steps):
            logits = engine.model(input_ids=torch.tensor([ids + out]), use_cache=False).logits
            out.append(int(logits[0, -1].argmax()))
            if out[-1] in engine.stop_ids:
                break
        engine.model.train()
    return out


def test_implements_the_engine_protocol(model_dirs: dict[str, Path]) -> None:
    assert isinstance(_engine(model_dirs, "llama"), Engine)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_equals_uncached_and_batch_equals_single(model_dirs: dict[str, Path], arch: str) -> None:
    engine = _engine(model_dirs, arch, max_batch_size=16)
    greedy = Sampling(max_tokens=10)
    batched = [c[0] for c in engine.generate(CONVS, greedy)]
    engine.max_batch_size = 1
    single = [c[0] for c in engine.generate(CONVS, greedy)]
    # The hybrid's cache holds conv + recurrent state for linear layers, KV for full ones.
    assert list(batched[1].token_ids) == _no_cache_greedy(engine, CONVS[1], 10)
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in batched)


@pytest.mark.parametrize("arch", ARCHS)
def test_stops_at_end_of_turn(model_dirs: dict[str, Path], arch: str) -> None:
    engine = _engine(model_dirs, arch)
    conv = [{"role": "user", "content": "Name a prime."}]
    _teach(engine, conv, "Seven is prime.")
    [[done]] = engine.generate([conv], Sampling(max_tokens=40))
    assert done.text == "Seven is prime." and done.finish_reason == "stop"
    assert done.token_ids[-1] == engine.tokenizer.eos_token_id, "stop token kept in ids, as vLLM does"
    [[cut]] = engine.generate([conv], Sampling(max_tokens=2))
    assert cut.finish_reason == "length" and len(cut.token_ids) == 2
    assert cut.token_ids == done.token_ids[:2]
    # In a batch, rows stop at different steps; each equals its own single-row result.
    alone = engine.generate([CONVS[3]], Sampling(max_tokens=40))[0][0]
    rows = engine.generate([conv, CONVS[3]], Sampling(max_tokens=40))
    assert rows == [[done], [alone]]


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_mixed_gives_each_row_its_own_budget_in_one_call(model_dirs: dict[str, Path], arch: str) -> None:
    """The evaluation's one call: rows with different max_tokens in one model.generate, each
    equal to what generate() gives it alone, cut at its own budget; a taught row still stops."""
    engine = _engine(model_dirs, arch)
    budgets = [3, 12, 1, 7, 12]
    untaught = engine.generate_mixed(CONVS, [Sampling(max_tokens=b, seed=0) for b in budgets])
    assert [len(c.token_ids) for c in untaught] == budgets  # a random model never ends its turn
    assert all(c.finish_reason == "length" for c in untaught)
    conv = [{"role": "user", "content": "Name a prime."}]
    _teach(engine, conv, "Seven is prime.")
    convs, budgets = [conv, *CONVS], [40, *budgets]
    calls = []
    original = engine.model.generate
    engine.model.generate = lambda **kw: calls.append(kw) or original(**kw)
    mixed = engine.generate_mixed(convs, [Sampling(max_tokens=b, seed=0) for b in budgets])
    engine.model.generate = original
    assert len(calls) == 1, "one model.generate call for up to EVAL_BATCH rows"
    alone = [engine.generate([c], Sampling(max_tokens=b, seed=0))[0][0] for c, b in zip(convs, budgets)]
    assert mixed == alone
    assert mixed[0].text == "Seven is prime." and mixed[0].finish_reason == "stop"
    assert all(len(c.token_ids) == b if c.finish_reason == "length" else len(c.token_ids) <= b
               for c, b in zip(mixed, budgets))


def test_generate_mixed_is_greedy_only(model_dirs: dict[str, Path]) -> None:
    engine = _engine(model_dirs, "llama")
    with pytest.raises(ValueError, match="greedy"):
        engine.generate_mixed(CONVS[:1], [Sampling(temperature=0.7)])
    with pytest.raises(ValueError, match="one Sampling per conversation"):
        engine.generate_mixed(CONVS[:2], [Sampling()])
    with pytest.raises(ValueError, match="one seed"):
        engine.generate_mixed(CONVS[:2], [Sampling(seed=1), Sampling(seed=2)])
    assert engine.generate_mixed([], []) == []


def test_seed_reproducible_and_trainer_rng_untouched(model_dirs: dict[str, Path]) -> None:
    engine = _engine(model_dirs, "llama", max_batch_size=4)
    hot = Sampling(n=3, temperature=1.0, top_p=0.95, max_tokens=8, seed=7)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = engine.generate(CONVS, hot)
    assert torch.equal(torch.rand(3), expected_next), "generation must not advance the global RNG"
    assert engine.generate(CONVS, hot) == first
    assert engine.generate(CONVS, Sampling(n=3, temperature=1.0, top_p=0.95, max_tokens=8, seed=8)) != first
    unseeded = Sampling(n=3, temperature=1.0, max_tokens=8)
    assert engine.generate(CONVS, unseeded) != engine.generate(CONVS, unseeded)
    assert all(len(per_conv) == 3 for per_conv in first)
    assert len({c.token_ids for c in first[0]}) > 1, "n samples at temperature 1 should differ"


def test_greedy_n_copies_and_chunking(model_dirs: dict[str, Path]) -> None:
    engine = _engine(model_dirs, "qwen3.5", max_batch_size=2)
    out = engine.generate(CONVS, Sampling(n=3, max_tokens=6))
    assert [len(per_conv) for per_conv in out] == [3] * len(CONVS)
    assert all(len(set(per_conv)) == 1 for per_conv in out)
    assert engine.generate([], Sampling()) == []


def test_model_generation_config_does_not_leak(model_dirs: dict[str, Path]) -> None:
    """A model file's top_k / repetition_penalty must not change dreamd's sampling."""
    engine = _engine(model_dirs, "llama")
    clean_greedy = engine.generate(CONVS[:2], Sampling(max_tokens=12))
    hot = Sampling(n=4, temperature=1.0, max_tokens=6, seed=3)
    clean_hot = engine.generate(CONVS[:2], hot)
    engine.model.generation_config.top_k = 1
    engine.model.generation_config.repetition_penalty = 5.0
    engine.model.generation_config.no_repeat_ngram_size = 1
    assert engine.generate(CONVS[:2], Sampling(max_tokens=12)) == clean_greedy
    assert engine.generate(CONVS[:2], hot) == clean_hot


def test_train_mode_restored_per_module(model_dirs: dict[str, Path]) -> None:
    engine = _engine(model_dirs, "llama")
    engine.model.train()
    engine.model.model.layers[0].eval()  # a trainer may freeze a part on purpose
    engine.generate(CONVS[:1], Sampling(max_tokens=2))
    engine.prompt_logprobs([[1, 2, 3]])
    assert engine.model.training and engine.model.model.layers[1].training
    assert not engine.model.model.layers[0].training


def test_garbage_tolerant_decoding(model_dirs: dict[str, Path]) -> None:
    engine = _engine(model_dirs, "llama")
    tok = engine.tokenizer
    im_start, pad, eos = tok.convert_tokens_to_ids("<|im_start|>"), tok.pad_token_id, tok.eos_token_id
    lead_byte = tok.convert_tokens_to_ids("â")  # byte 0xE2 alone: the start of a 3-byte character
    hello = tok("hello", add_special_tokens=False)["input_ids"]
    row = [im_start, lead_byte, *hello, pad, eos, pad, pad]
    done = decode_completion(tok, row, engine.stop_ids, max_tokens=len(row))
    assert done.finish_reason == "stop" and done.token_ids == tuple(row[:-2])
    assert done.text == "\ufffdhello"
    cut = decode_completion(tok, [lead_byte, im_start], engine.stop_ids, max_tokens=2)
    assert cut.finish_reason == "length" and cut.text == "\ufffd"
    # Garbage in the conversation itself still renders, encodes and generates.
    weird = [[{"role": "user", "content": "\x00\x07\u200b\U0001F600 <|im_end|> \ud7ff" + "ü" * 50}]]
    [[c]] = engine.generate(weird, Sampling(temperature=2.0, max_tokens=32, seed=0))
    assert isinstance(c.text, str) and "<|" not in c.text


def test_prompt_logprobs_match_the_model_loss(model_dirs: dict[str, Path]) -> None:
    engine = _engine(model_dirs, "qwen3.5")
    seqs = [encode_chat(engine.tokenizer, conv) for conv in CONVS[:3]] + [[5], []]
    out = engine.prompt_logprobs(seqs)
    assert [len(x) for x in out] == [len(s) - 1 for s in seqs[:3]] + [0, 0]
    with torch.no_grad():
        engine.model.eval()
        ids = torch.tensor([seqs[1]])
        loss = engine.model(input_ids=ids, labels=ids).loss.item()
    assert -sum(out[1]) / len(out[1]) == pytest.approx(loss, rel=1e-5)
    assert all(lp <= 0 for lp in out[0])


def test_load_weights_shares_storage_or_copies(model_dirs: dict[str, Path]) -> None:
    engine = _engine(model_dirs, "llama")
    other, _ = load_model(ModelConfig(path=model_dirs["llama"]), "cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n = len(list(engine.model.parameters()))
    engine.load_weights(engine.model.named_parameters())
    assert (engine.last_push_copied, engine.last_push_shared) == (0, n), "same object: nothing to copy"
    engine.load_weights(other.named_parameters())
    assert (engine.last_push_copied, engine.last_push_shared) == (n, 0)
    for (name, mine), theirs in zip(engine.model.named_parameters(), other.parameters()):
        assert torch.equal(mine, theirs) and mine.data_ptr() != theirs.data_ptr(), name
    reference = TransformersEngine(other, engine.tokenizer)
    assert engine.generate(CONVS[:2], Sampling(max_tokens=8)) == reference.generate(CONVS[:2], Sampling(max_tokens=8))
    with pytest.raises(ValueError, match="not a parameter"):
        engine.load_weights([("model.no_such.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="has shape"):
        engine.load_weights([("lm_head.weight", torch.zeros(3, 3))])


def test_sleep_wake_state_machine(model_dirs: dict[str, Path]) -> None:
    engine = _engine(model_dirs, "qwen3.5")
    greedy = Sampling(max_tokens=3)
    engine.sleep(level=1)
    assert engine.weights_valid and engine.asleep_tags == {"weights", "kv_cache"}
    with pytest.raises(RuntimeError, match="sleeps"):
        engine.generate(CONVS[:1], greedy)
    engine.wake()
    assert engine.asleep_tags == frozenset()
    engine.generate(CONVS[:1], greedy)

    engine.sleep(level=2)
    assert not engine.weights_valid
    with pytest.raises(RuntimeError, match="wake"):
        engine.load_weights(engine.model.named_parameters())
    engine.wake(["weights"])
    params = list(engine.model.named_parameters())
    engine.load_weights(params[: len(params) // 2])
    assert not engine.weights_valid, "half a push leaves the rest garbage"
    engine.load_weights(params[len(params) // 2:])
    assert engine.weights_valid
    with pytest.raises(RuntimeError, match="kv_cache"):
        engine.generate(CONVS[:1], greedy)
    engine.wake(["kv_cache"])
    engine.generate(CONVS[:1], greedy)
    with pytest.raises(ValueError, match="unknown wake tags"):
        engine.wake(["scheduler"])
    with pytest.raises(ValueError):
        engine.sleep(level=3)
    # The same state machine as vLLM's (engines.base.SleepState): no sleeping twice, no waking
    # what is awake.
    engine.sleep(level=1)
    with pytest.raises(RuntimeError, match="already sleep"):
        engine.sleep(level=1)
    engine.wake()
    with pytest.raises(RuntimeError, match="not asleep"):
        engine.wake(["kv_cache"])


def test_generate_refuses_bad_sampling(model_dirs: dict[str, Path]) -> None:
    engine = _engine(model_dirs, "llama")
    for bad in (Sampling(n=0), Sampling(max_tokens=0), Sampling(temperature=-1.0), Sampling(top_p=0.0)):
        with pytest.raises(ValueError):
            engine.generate(CONVS[:1], bad)


def test_tied_embeddings_count_once_in_a_full_push(model_dirs: dict[str, Path]) -> None:
    from dreamd.tiny import build_tiny_model, tiny_config

    engine = _engine(model_dirs, "llama")
    config = tiny_config("llama", len(engine.tokenizer), layers=2, tokenizer=engine.tokenizer)
    config.tie_word_embeddings = True
    tied = TransformersEngine(build_tiny_model(config), engine.tokenizer)
    assert tied.model.lm_head.weight is tied.model.model.embed_tokens.weight
    tied.sleep(level=2)
    tied.wake()
    names = [name for name, _ in tied.model.named_parameters()]  # one name per tensor
    assert "lm_head.weight" not in names
    tied.load_weights((name, p.detach().clone()) for name, p in tied.model.named_parameters())
    assert tied.weights_valid
    tied.generate(CONVS[:1], Sampling(max_tokens=2))
