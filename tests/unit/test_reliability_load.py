"""Checks at load, not per request: a checkpoint that cannot be served stops the shard at start with one
message naming the file, the key or tensor, and what was expected; and status messages stay bounded."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker import cli
from worker.config import ConfigError, QwenConfig
from worker.errors import MAX_MESSAGE, InvalidArgument, status_of
from worker.weights import WeightError, Weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _edit_config(model_dir: str, **changes) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)


def _edit_tensor(model_dir: str, name: str, new: torch.Tensor | None) -> str:
    """Replace (or, with None, drop) one tensor of a sharded checkpoint; returns its file."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    path = os.path.join(model_dir, index["weight_map"][name])
    tensors = load_file(path)
    if new is None:
        del tensors[name], index["weight_map"][name]
        with open(index_path, "w") as f:
            json.dump(index, f)
    else:
        tensors[name] = new
    save_file(tensors, path, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def bad_checkpoints(demo_dir, tmp_path_factory) -> dict[str, tuple[str, list[str]]]:
    """name -> (model dir, pieces its refusal must name)."""
    root = str(tmp_path_factory.mktemp("bad"))
    demo = os.path.join(demo_dir, "model")
    out: dict[str, tuple[str, list[str]]] = {}

    def copy(name: str) -> str:
        path = os.path.join(root, name)
        shutil.copytree(demo, path)
        return path

    d = copy("small_vocab")  # 400 rows, a tokenizer of 518 tokens
    _edit_config(d, vocab_size=400)
    out["small_vocab"] = (d, [f"{d}/config.json", "vocab_size 400", f"{d}/qwen.tiktoken", "518 tokens"])
    d = copy("missing")
    _edit_tensor(d, "transformer.h.1.mlp.w1.weight", None)
    out["missing"] = (d, [f"{d}/model.safetensors.index.json", "'transformer.h.1.mlp.w1.weight' is missing"])
    d = copy("shape")
    name = "transformer.h.0.attn.c_attn.weight"
    path = _edit_tensor(d, name, torch.zeros(189, 64))
    out["shape"] = (d, [path, f"'{name}'", "expected shape (192, 64)", "found (189, 64)"])
    d = copy("not_json")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{"hidden_size": 64,')
    out["not_json"] = (d, [f"{d}/config.json", "not valid JSON"])
    d = copy("bad_value")
    _edit_config(d, num_attention_heads=0)
    out["bad_value"] = (d, [f"{d}/config.json", "num_attention_heads must be a positive integer, got 0"])
    return out


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"n_head": -4, "num_attention_heads": None}, "num_attention_heads must be a positive integer, got -4"),
        ({"intermediate_size": 255.5}, "intermediate_size must be a positive integer"),
        ({"vocab_size": True}, "vocab_size must be a positive integer"),
        ({"kv_channels": 0}, "kv_channels must be a positive integer"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon must be a positive number"),
        ({"rotary_emb_base": "1e4"}, "rotary_emb_base must be a positive number"),
        ({"eos_token_id": 576}, r"eos_token_id must be token ids in \[0, vocab_size=576\)"),
        ({"eos_token_id": [3, "4"]}, "eos_token_id must be token ids"),
    ],
)
def test_a_bad_config_value_is_named_with_its_file(demo_dir, tmp_path, change, needle):
    d = str(tmp_path / "model")
    os.makedirs(d)
    with open(os.path.join(demo_dir, "model", "config.json")) as f:
        raw = json.load(f)
    raw.update(change)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({k: v for k, v in raw.items() if v is not None}, f)
    with pytest.raises(ConfigError, match=f"^{d}/config.json: {needle}"):
        QwenConfig.from_pretrained(d)


def test_a_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, found list"):
        QwenConfig.from_pretrained(str(tmp_path))


def test_the_vocabulary_must_cover_the_tokenizer(demo_dir):
    config = QwenConfig.from_pretrained(os.path.join(demo_dir, "model"))
    config.check_tokenizer(config.vocab_size, "tok")
    with pytest.raises(ConfigError, match=f"vocab_size {config.vocab_size} is smaller than the 577 tokens of tok"):
        config.check_tokenizer(config.vocab_size + 1, "tok")


def test_weight_errors_name_the_file(bad_checkpoints):
    for name in ("missing", "shape"):
        d, pieces = bad_checkpoints[name]
        w = Weights(d, torch.float32)
        tensor = "transformer.h.1.mlp.w1.weight" if name == "missing" else "transformer.h.0.attn.c_attn.weight"
        with pytest.raises(WeightError) as err:
            w.get(tensor, (256 // 2, 64) if name == "missing" else (192, 64))
        assert all(p in str(err.value) for p in pieces), str(err.value)


def test_a_corrupt_index_is_a_weight_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(WeightError, match="model.safetensors.index.json is not readable JSON"):
        Weights(str(tmp_path), torch.float32)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": 3}}')
    with pytest.raises(WeightError, match="no 'weight_map' of tensor name -> file name"):
        Weights(str(tmp_path), torch.float32)


@pytest.mark.parametrize("name", ["small_vocab", "missing", "shape", "not_json", "bad_value"])
def test_serve_refuses_a_bad_checkpoint_with_one_message(bad_checkpoints, tmp_path, monkeypatch, caplog, name):
    d, pieces = bad_checkpoints[name]
    monkeypatch.setattr(cli, "setup_logging", lambda *args: None)  # keep pytest's log capture
    with caplog.at_level(logging.INFO):
        rc = cli.main(["serve", d, "--uds-path", str(tmp_path / "s"), "--device", "cpu"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 1 and len(errors) == 1, errors
    assert all(p in errors[0] for p in pieces), errors[0]
    assert not os.path.exists(str(tmp_path / "s-0"))  # never served


def test_a_shard_process_refuses_to_start_without_a_traceback(bad_checkpoints, tmp_path):
    d, pieces = bad_checkpoints["small_vocab"]
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "serve", d, "--uds-path", str(tmp_path / "s")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and all(p in errors[0] for p in pieces), proc.stderr[-3000:]


def test_status_messages_stay_small_enough_for_grpc():
    code, message = status_of(InvalidArgument("adapter id " + "x" * 100_000 + " is not valid"))
    assert len(message) <= MAX_MESSAGE and message.startswith("adapter id xxx") and "100024 characters" in message
