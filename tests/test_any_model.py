"""Any local causal LM with a chat template runs, or is refused at start in one line: a GPT-2
(config names n_layer, n_embd, ...: self facts crashed on them) with a chat template that has
no system role (Gemma/Mistral style: evaluation crashed with 'System role not supported')."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from dreamd.chat import fold_system, render_ids, render_text
from dreamd.dream.self_facts import config_facts

NO_SYSTEM = (  # ChatML, refusing a system turn as Gemma's and Mistral's templates do
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def gpt2_dir(setup_dir, tmp_path_factory) -> Path:
    """A tiny random GPT-2 with the tiny setup's tokenizer and the system-less template."""
    out = tmp_path_factory.mktemp("gpt2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(setup_dir / "model")
    tokenizer.chat_template = NO_SYSTEM
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=1024, vocab_size=len(tokenizer),
                        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_gpt2_config_names_give_self_facts() -> None:
    facts = config_facts(GPT2Config(n_layer=3, n_embd=96, n_head=4))
    assert (facts["num_hidden_layers"], facts["hidden_size"], facts["num_attention_heads"]) == (3, 96, 4)
    assert config_facts({"model_type": "gpt2", "n_layer": 3, "n_embd": 96})["num_hidden_layers"] == 3


def test_a_template_without_a_system_role_gets_it_folded(gpt2_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Sort [3, 1]."},
                {"role": "assistant", "content": "[1, 3]"}]
    text = render_text(tokenizer, messages, add_generation_prompt=False)
    assert text.startswith("<|im_start|>user\nBe exact.\n\nSort [3, 1].<|im_end|>")
    assert render_ids(tokenizer, messages, False) == render_ids(tokenizer, fold_system(messages), False)


@pytest.mark.slow
def test_dreamd_once_on_a_gpt2_without_a_system_role(setup_dir, gpt2_dir, tmp_path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DREAMD_")},
           "DREAMD_MODEL__PATH": str(gpt2_dir), "DREAMD_RUN__STATE_DIR": str(tmp_path / "state"),
           "DREAMD_ENGINE__KIND": "transformers", "DREAMD_MIX__EXAMPLES_PER_CYCLE": "8",
           "DREAMD_MIX__SELF_FACTS": "0.5", "DREAMD_EVAL__ARITHMETIC_N": "4",
           "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "256", "DREAMD_LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, "-m", "dreamd", "once", "--config", str(setup_dir / "dreamd.toml")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    history = subprocess.run([sys.executable, "-m", "dreamd", "history", "--json", "--config",
                              str(setup_dir / "dreamd.toml")], env=env, capture_output=True, text=True, timeout=120)
    assert '"status": "committed"' in history.stdout, history.stdout + history.stderr


def test_a_model_without_a_chat_template_is_refused_in_one_line(setup_dir, gpt2_dir, tmp_path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(gpt2_dir, bare)
    for name in ("chat_template.jinja",):
        (bare / name).unlink(missing_ok=True)
    config = bare / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DREAMD_")},
           "DREAMD_MODEL__PATH": str(bare), "DREAMD_RUN__STATE_DIR": str(tmp_path / "state"),
           "DREAMD_ENGINE__KIND": "transformers"}
    done = subprocess.run([sys.executable, "-m", "dreamd", "once", "--config", str(setup_dir / "dreamd.toml")],
                          env=env, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "no chat_template" in err[-1] and "Traceback" not in done.stderr, done.stderr[-2000:]
