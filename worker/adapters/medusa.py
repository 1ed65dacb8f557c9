"""Read and validate Medusa head checkpoints (LoRAX's layout), v1 and v2.

A Medusa directory has a config.json with `medusa_num_heads` (K) and `medusa_num_layers` and its tensors
in safetensors: `medusa_lm_head.safetensors` (upstream), else the Medusa keys of a joint LoRA + Medusa
adapter's `adapter_model.safetensors`. Pickles (.bin/.pt/.pth) are never read. v1 or v2 is decided from
the weights as LoRAX does: v1 when there is more than one block or a per-head projection. Every file is
read only from under the adapter root; every error is InvalidArgument naming the file.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import safe_open

from worker.adapters.peft import CONFIG_FILE as ADAPTER_CONFIG
from worker.adapters.peft import MEDUSA_KEY, WEIGHTS_FILE, check_inside_root, resolve_adapter_dir
from worker.config import QwenConfig
from worker.errors import InvalidArgument
from worker.layers.medusa import MedusaCheckpoint

log = logging.getLogger(__name__)
CONFIG_FILE, MEDUSA_FILE = "config.json", "medusa_lm_head.safetensors"
PICKLES = (".bin", ".pt", ".pth")


def medusa_config(path: str) -> dict | None:
    """The Medusa keys of `path`/config.json, or None when the directory carries no Medusa heads."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict) or "medusa_num_heads" not in cfg:
        return None
    for key in ("medusa_num_heads", "medusa_num_layers"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise InvalidArgument(f"{file}: {key} must be a positive integer, got {cfg.get(key)!r}")
    return cfg


def read_medusa(root: str, path: str, config: QwenConfig) -> MedusaCheckpoint | None:
    """The validated Medusa heads of the directory `path` (already resolved under `root`), or None when
    its config.json has no `medusa_num_heads`."""
    check_inside_root(root, os.path.join(path, CONFIG_FILE), f"Medusa adapter {path}")
    cfg = medusa_config(path)
    if cfg is None:
        return None
    file = _weights_file(root, path)
    K, L, H = cfg["medusa_num_heads"], cfg["medusa_num_layers"], config.hidden_size
    if cfg.get("hidden_size", H) != H:
        raise InvalidArgument(
            f"{os.path.join(path, CONFIG_FILE)}: hidden_size {cfg['hidden_size']} does not match the base "
            f"model's {H} — were these heads trained for another model?"
        )
    tensors = _read(file)
    found = {}  # (head, block, kind) -> key
    for key in tensors:
        m = MEDUSA_KEY.match(key)
        if m is not None:
            found[(int(m.group(1)), int(m.group(2)), m.group(3))] = key
    if not found:
        raise InvalidArgument(f"{file}: no Medusa tensors (`{{head}}.{{block}}.linear.weight`) found")
    heads = 1 + max(i for i, _, _ in found)
    if heads != K:
        raise InvalidArgument(f"{file}: tensors for {heads} heads, config.json says medusa_num_heads={K}")
    v1 = L > 1 or any(kind == "weight" for _, _, kind in found)
    expected = {(i, j, kind): shape for i in range(K) for j in range(L) for kind, shape in _block(H)}
    if v1:
        expected.update({(i, L, "weight"): (config.vocab_size, H) for i in range(K)})
    extra = sorted(set(found) - set(expected))
    if extra:
        raise InvalidArgument(f"{file}: unexpected tensor {found[extra[0]]!r} for {K} heads of {L} layers")
    for name, shape in sorted(expected.items()):
        if name not in found:
            raise InvalidArgument(f"{file}: missing tensor {_key(name)!r} ({K} heads of {L} layers)")
        got = tuple(tensors[found[name]].shape)
        if got != shape:
            raise InvalidArgument(
                f"{file}: {found[name]} has shape {got}, expected {shape} (hidden size {H}, vocab "
                f"{config.vocab_size}) — were these heads trained for another model?"
            )

    def stack(kind: str, blocks: range) -> torch.Tensor:  # in the file's dtype (MedusaHeads casts)
        return torch.stack([torch.stack([tensors[found[(i, j, kind)]] for j in blocks]) for i in range(K)])

    return MedusaCheckpoint(
        path=file,
        version=1 if v1 else 2,
        num_heads=K,
        num_layers=L,
        weights=stack("linear.weight", range(L)),
        biases=stack("linear.bias", range(L)),
        projections=stack("weight", range(L, L + 1))[:, 0] if v1 else None,
    )


def check_per_request(ckpt: MedusaCheckpoint, num_heads: int) -> None:
    """Refuse heads that cannot ride on an adapter id: v1 (its own projections; only a base speculator),
    or a head count other than the attached heads' (`num_heads`, 0: none attached)."""
    if ckpt.version != 2:
        raise InvalidArgument(
            f"{ckpt.path}: Medusa v1 heads (a vocab projection per head) can only be the base speculator "
            "(--speculative-adapter), not a per-request adapter; use v2 heads (one block, no projection)"
        )
    if num_heads and ckpt.num_heads != num_heads:
        raise InvalidArgument(
            f"{ckpt.path}: {ckpt.num_heads} Medusa heads, but the loaded ones have {num_heads}; "
            "every Medusa adapter must have as many heads as the speculator and the others"
        )


def medusa_only(path: str) -> bool:
    """Whether the adapter directory `path` holds Medusa heads and no LoRA (no adapter_config.json)."""
    return not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and medusa_config(path) is not None


def adapter_heads(root: str, paths: list[str], config: QwenConfig, num_heads: int) -> MedusaCheckpoint | None:
    """The Medusa heads an adapter id brings (Medusa-only v2 or joint LoRA + Medusa), checked for riding
    on requests beside heads of `num_heads` (0: none yet); None when it has none. `paths`: the resolved
    directory of each id of the request (several: a merge, which cannot merge heads)."""
    if not paths:
        return None  # no adapter id: the LoRA reader refuses the request, naming the empty adapter_ids
    heads = [read_medusa(root, p, config) for p in paths]
    if len(paths) > 1:
        for ckpt in heads:
            if ckpt is not None:
                raise InvalidArgument(f"{ckpt.path}: Medusa heads cannot be merged; load this adapter alone")
        return None
    if heads[0] is not None:
        check_per_request(heads[0], num_heads)
    return heads[0]


def load_speculator(root: str | None, spec: str, config: QwenConfig) -> MedusaCheckpoint:
    """The base speculator `--speculative-adapter spec`: relative to the adapter root, or absolute under it
    (without an adapter root, its own directory is the root: no file may link out of it)."""
    if root is None:
        root = os.path.dirname(os.path.abspath(spec).rstrip(os.sep)) or os.sep
    ckpt = read_medusa(root, resolve_adapter_dir(root, spec), config)
    if ckpt is None:
        raise InvalidArgument(f"--speculative-adapter {spec}: its config.json has no medusa_num_heads")
    log.info("speculator loaded: %s", ckpt.describe())
    return ckpt


def _block(H: int) -> list[tuple[str, tuple[int, ...]]]:
    return [("linear.weight", (H, H)), ("linear.bias", (H,))]


def _key(name: tuple[int, int, str]) -> str:
    return f"{name[0]}.{name[1]}.{name[2]}"


def _weights_file(root: str, path: str) -> str:
    """The safetensors file holding the heads; a pickle in its place is refused, naming it."""
    for name in (MEDUSA_FILE, WEIGHTS_FILE):
        file = os.path.join(path, name)
        check_inside_root(root, file, f"Medusa adapter {path}")
        if os.path.isfile(file):
            return file
    pickles = sorted(n for n in os.listdir(path) if n.endswith(PICKLES))
    if pickles:
        raise InvalidArgument(
            f"{os.path.join(path, pickles[0])} is a pickle; Medusa heads are read from safetensors only ({MEDUSA_FILE})"
        )
    raise InvalidArgument(f"Medusa adapter {path} has no {MEDUSA_FILE}")


def _read(file: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(file, framework="pt") as h:
            return {k: h.get_tensor(k) for k in h.keys() if MEDUSA_KEY.match(k)}
    except Exception as exc:  # truncated or corrupt
        raise InvalidArgument(f"cannot read {file}: {exc}") from exc
