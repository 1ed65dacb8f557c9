"""Bad Medusa checkpoints are refused with InvalidArgument naming the file and what was wrong, as the base
speculator and as per-request adapters; a refused adapter leaves nothing behind and the pool keeps serving."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import pytest
import torch

from helpers import TINY
from lora_helpers import attach_manager, load, shapes_only
from medusa_helpers import medusa_tensors, write_medusa
from worker.adapters.medusa import load_speculator
from worker.config import ConfigError, QwenConfig
from worker.errors import InvalidArgument

CONFIG = QwenConfig.from_dict(TINY)
H, V = CONFIG.hidden_size, CONFIG.vocab_size


def good(path: str, K: int = 3, L: int = 1, v1: bool = False) -> str:
    return write_medusa(path, medusa_tensors(H, V, K, L, v1, seed=0), K, L)


def wrong_head_count(path: str) -> str:
    write_medusa(path, medusa_tensors(H, V, 3, 1, False, 0), 4, 1)
    return "tensors for 3 heads, config.json says medusa_num_heads=4"


def wrong_hidden_size(path: str) -> str:
    write_medusa(path, medusa_tensors(32, V, 3, 1, False, 0), 3, 1)
    return "0.0.linear.bias has shape (32,), expected (64,)"


def wrong_hidden_size_in_config(path: str) -> str:
    write_medusa(path, medusa_tensors(H, V, 3, 1, False, 0), 3, 1, hidden_size=32)
    return "hidden_size 32 does not match the base model's 64"


def wrong_vocab(path: str) -> str:
    write_medusa(path, medusa_tensors(H, V + 1, 2, 1, True, 0), 2, 1)
    return f"0.1.weight has shape ({V + 1}, {H}), expected ({V}, {H})"


def missing_tensor(path: str) -> str:
    tensors = medusa_tensors(H, V, 3, 2, True, 0)
    del tensors["1.1.linear.bias"]
    write_medusa(path, tensors, 3, 2)
    return "missing tensor '1.1.linear.bias'"


def unexpected_tensor(path: str) -> str:
    tensors = medusa_tensors(H, V, 2, 1, False, 0)
    tensors["1.1.linear.weight"] = torch.zeros(H, H)
    write_medusa(path, tensors, 2, 1)
    return "unexpected tensor '1.1.linear.weight'"


def pickle_file(path: str) -> str:
    os.makedirs(path)
    torch.save(medusa_tensors(H, V, 2, 1, False, 0), os.path.join(path, "medusa_lm_head.pt"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"medusa_num_heads": 2, "medusa_num_layers": 1}, f)
    return "medusa_lm_head.pt is a pickle; Medusa heads are read from safetensors only"


def link_out_of_root(path: str) -> str:
    outside = good(os.path.join(os.path.dirname(os.path.dirname(path)), "outside"))
    os.makedirs(path)
    for name in ("config.json", "medusa_lm_head.safetensors"):
        os.symlink(os.path.join(outside, name), os.path.join(path, name))
    return "config.json is a link that resolves outside the adapter root"


def corrupt_file(path: str) -> str:
    good(path)
    with open(os.path.join(path, "medusa_lm_head.safetensors"), "r+b") as f:
        f.truncate(100)
    return "cannot read"


def bad_config(path: str) -> str:
    write_medusa(path, medusa_tensors(H, V, 2, 1, False, 0), 2, 1, medusa_num_layers=0)
    return "medusa_num_layers must be a positive integer, got 0"


BAD: dict[str, Callable[[str], str]] = {
    f.__name__: f
    for f in (
        wrong_head_count,
        wrong_hidden_size,
        wrong_hidden_size_in_config,
        wrong_vocab,
        missing_tensor,
        unexpected_tensor,
        pickle_file,
        link_out_of_root,
        corrupt_file,
        bad_config,
    )
}


@pytest.fixture
def root(tmp_path) -> str:
    path = tmp_path / "root"
    path.mkdir()
    return str(path)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_speculator_is_refused_naming_the_file(root, case):
    message = BAD[case](os.path.join(root, "bad"))
    with pytest.raises(InvalidArgument) as err:
        load_speculator(root, "bad", CONFIG)
    assert message in str(err.value) and os.path.join(root, "bad") in str(err.value)


@pytest.mark.parametrize("case", ["v1", "head_count", *BAD])
def test_bad_per_request_adapter_is_refused_and_the_pool_keeps_serving(root, case):
    model = shapes_only(CONFIG)
    model.attach_medusa(load_speculator(root, good(os.path.join(root, "base"), K=3), CONFIG))
    mgr, _ = attach_manager(model, root)
    path = os.path.join(root, "bad")
    if case == "v1":
        good(path, K=3, L=1, v1=True)
        message = "Medusa v1 heads (a vocab projection per head) can only be the base speculator"
    elif case == "head_count":
        good(path, K=2)
        message = "2 Medusa heads, but the loaded ones have 3"
    else:
        message = BAD[case](path)
    with pytest.raises(InvalidArgument) as err:
        load(mgr, 1, "bad")
    assert message in str(err.value) and path in str(err.value)
    assert 1 not in mgr.entries and not model.medusa.slots and model.medusa_heads == 3
    good(os.path.join(root, "ok"), K=3)
    load(mgr, 1, "ok")
    assert model.medusa_rows([0, mgr.entries[1].slot]) == [True, True] and len(model.medusa.slots) == 1


def test_escaping_ids_are_refused(root, tmp_path):
    good(str(tmp_path / "elsewhere"))
    for spec in ("../elsewhere", str(tmp_path / "elsewhere")):
        with pytest.raises(InvalidArgument, match="adapter root"):
            load_speculator(root, spec, CONFIG)


def test_heads_cannot_be_merged(root):
    good(os.path.join(root, "a"))
    good(os.path.join(root, "b"))
    mgr, _ = attach_manager(shapes_only(CONFIG), root)
    with pytest.raises(InvalidArgument, match="Medusa heads cannot be merged"):
        load(mgr, 1, "a", "b", weights=[0.5, 0.5])


def test_cli_refuses_a_bad_speculator_at_start(root):
    from worker.cli import attach_speculator

    wrong_head_count(os.path.join(root, "bad"))
    args = argparse.Namespace(adapter_root=root, speculative_adapter="bad")
    with pytest.raises(ConfigError, match="--speculative-adapter bad: .*medusa_num_heads=4"):
        attach_speculator(args, shapes_only(CONFIG))


def test_without_a_speculator_the_first_adapter_sets_the_head_count(root):
    """Even while that adapter is offloaded (its heads off the model, its entry kept to reload)."""
    from worker.pb import generate_pb2 as pb

    model = shapes_only(CONFIG)
    mgr, _ = attach_manager(model, root)
    load(mgr, 1, os.path.basename(good(os.path.join(root, "k3"), K=3)))
    mgr.offload(pb.OffloadAdapterRequest(adapter_parameters=mgr.entries[1].params, adapter_index=1))
    assert model.medusa_heads == 0
    message = "k2/medusa_lm_head.safetensors: 2 Medusa heads, but the loaded ones have 3"
    with pytest.raises(InvalidArgument, match=message):
        load(mgr, 2, os.path.basename(good(os.path.join(root, "k2"), K=2)))
    assert 2 not in mgr.entries


def test_no_adapter_id_is_refused_clearly(root):
    """LoadAdapter and DownloadAdapter without an adapter id: InvalidArgument naming adapter_ids (the gRPC
    fuzz test found an IndexError in the Medusa check, answered INTERNAL)."""
    from worker.pb import generate_pb2 as pb

    mgr, _ = attach_manager(shapes_only(CONFIG), root)
    with pytest.raises(InvalidArgument, match="adapter_ids is empty"):
        load(mgr, 1)
    params = pb.AdapterParameters(adapter_ids=[])
    with pytest.raises(InvalidArgument, match="adapter_ids is empty"):
        mgr.download(pb.DownloadAdapterRequest(adapter_parameters=params, adapter_source=pb.AdapterSource.LOCAL))
    assert not mgr.entries
