"""Read and validate PEFT LoRA adapters for Qwen v1.

Targets: the PEFT modules of the model's LORA_TARGETS, dispatched by the full key path (`c_proj` alone
names two modules). read_adapter folds the scale alpha/r (alpha/sqrt(r) with rsLoRA) into B; the fast
byte reader (worker/adapters/host.py) leaves that to the slot fill. Only safetensors are read unless
`allow_bin` permits a weights-only `.bin` (torch.load(weights_only=True)).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from worker.config import QwenConfig
from worker.errors import FailedPrecondition, InvalidArgument, NotFound
from worker.models.lora_targets import LORA_TARGETS
from worker.pb import generate_pb2 as pb

MODULES: tuple[str, ...] = tuple(m for modules in LORA_TARGETS.values() for m in modules)  # PEFT names
CONFIG_FILE, WEIGHTS_FILE, BIN_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_KEY = re.compile(
    r"^base_model\.model\.transformer\.h\.(\d+)\.("
    + "|".join(re.escape(m) for m in MODULES)
    + r")\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
# Medusa head tensors (worker/adapters/medusa.py reads them; a joint LoRA + Medusa file holds both kinds):
# head i, block j: `{i}.{j}.linear.weight|bias`; v1's projection `{i}.{num_layers}.weight`.
MEDUSA_KEY = re.compile(r"^(?:medusa_head\.)?(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


@dataclass
class LoraAdapter:
    """Full (unsharded) LoRA weights on the host, scale folded into B (fp32 unless read for a pool dtype)."""

    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A [r, in], B [out, r])

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def module_dims(config: QwenConfig, module: str) -> tuple[int, int]:
    """(in, out) of a PEFT target module in the adapter file (full size, unsharded)."""
    H, w = config.hidden_size, config.mlp_width
    return {"attn.c_attn": (H, 3 * H), "attn.c_proj": (H, H), "mlp.c_proj": (w, H), "mlp.w1": (H, w), "mlp.w2": (H, w)}[
        module
    ]


def resolve_adapter_dir(root: str, adapter_id: str) -> str:
    """The adapter directory for `adapter_id` under `root`; rejects anything that escapes the root
    (`..`, absolute paths elsewhere, symlinks pointing out)."""
    if not adapter_id or "\x00" in adapter_id:
        raise InvalidArgument(f"invalid adapter id {adapter_id!r}")
    if ".." in adapter_id.replace("\\", "/").split("/"):
        raise InvalidArgument(
            f"adapter id {adapter_id!r} contains '..': adapters load only from under the adapter root"
        )
    root_real = os.path.realpath(root)
    candidate = adapter_id if os.path.isabs(adapter_id) else os.path.join(root_real, adapter_id)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real, root_real]) != root_real:
        raise InvalidArgument(f"adapter id {adapter_id!r} resolves outside the adapter root {root}")
    if not os.path.isdir(real):
        raise NotFound(f"adapter {adapter_id!r} not found under the adapter root {root}")
    for name in (CONFIG_FILE, WEIGHTS_FILE, BIN_FILE):
        check_inside_root(root, os.path.join(real, name), f"adapter {adapter_id!r}")
    return real


def check_inside_root(root: str, file: str, what: str) -> None:
    """Refuse `file` (when it exists) if it is a link resolving outside `root`; links may point elsewhere
    under the root (an HF cache's blobs)."""
    root_real = os.path.realpath(root)
    if os.path.lexists(file) and os.path.commonpath([os.path.realpath(file), root_real]) != root_real:
        raise InvalidArgument(
            f"{what}: {os.path.basename(file)} is a link that resolves outside the adapter root {root}"
        )


def adapter_dir(root: str, adapter_id: str, source: int) -> str:
    """The directory of `adapter_id` from `source` (pb.AdapterSource): a local copy under `root` only (this
    worker has no network access)."""
    try:
        return resolve_adapter_dir(root, adapter_id)
    except NotFound:
        if source != pb.AdapterSource.LOCAL:
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: source {pb.AdapterSource.Name(source)} needs network access, "
                f"which this worker does not have, and no local copy is under {root}"
            ) from None
        raise


def adapter_config(path: str, max_rank: int) -> tuple[int, float]:
    """(rank r, scale) from the adapter's adapter_config.json, refusing what this worker cannot serve."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise NotFound(f"adapter at {path} has no adapter_config.json")
    try:
        with open(cfg_path) as f:
            acfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{cfg_path} is not valid JSON: {exc}") from exc
    if acfg.get("peft_type", "LORA") != "LORA":
        raise FailedPrecondition(f"adapter {path}: peft_type {acfg.get('peft_type')!r} is not supported (LORA only)")
    if acfg.get("use_dora"):
        raise FailedPrecondition(f"adapter {path}: DoRA (use_dora=true) is not supported")
    if acfg.get("modules_to_save"):
        raise FailedPrecondition(
            f"adapter {path}: modules_to_save {acfg['modules_to_save']} (full replacement matrices) is not supported"
        )
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise FailedPrecondition(f"adapter {path}: per-module rank_pattern/alpha_pattern is not supported")
    if acfg.get("fan_in_fan_out"):
        raise FailedPrecondition(f"adapter {path}: fan_in_fan_out=true does not apply to Qwen's Linear layers")
    r = int(acfg.get("r", 0))
    if r < 1:
        raise InvalidArgument(f"adapter {path}: rank r={r} must be positive")
    if r > max_rank:
        raise FailedPrecondition(f"adapter {path}: rank {r} exceeds the configured maximum --max-lora-rank {max_rank}")
    alpha = float(acfg.get("lora_alpha", r))
    return r, alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r


def pair_keys(
    path: str, config: QwenConfig, r: int, shapes: dict[str, tuple[int, ...]]
) -> dict[tuple[int, str], tuple[str, str]]:
    """(layer, module) -> (key of lora_A, key of lora_B), each name and shape checked against the base model."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        if MEDUSA_KEY.match(key):  # a joint LoRA + Medusa adapter's heads
            continue
        m = _KEY.match(key)
        if m is None:
            raise FailedPrecondition(f"adapter {path}: unsupported tensor {key!r} (LoRA on {', '.join(MODULES)} only)")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if layer >= config.num_hidden_layers:
            raise InvalidArgument(
                f"adapter {path}: {key} names layer {layer}; the base model has {config.num_hidden_layers} layers"
            )
        pairs.setdefault((layer, module), {})[which] = key
    if not pairs:
        raise InvalidArgument(f"adapter {path}: no LoRA tensors found")
    out = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise InvalidArgument(f"adapter {path}: layer {layer} {module} has lora_{next(iter(ab))} but not both")
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        d_in, d_out = module_dims(config, module)
        if tuple(a) != (r, d_in) or tuple(b) != (d_out, r):
            raise InvalidArgument(
                f"adapter {path}: layer {layer} {module}: lora_A {tuple(a)} / lora_B "
                f"{tuple(b)} do not match the base model (expected {(r, d_in)} / {(d_out, r)})"
                " — was it trained for another base model?"
            )
        out[(layer, module)] = (ab["A"], ab["B"])
    return out


def read_adapter(
    path: str, config: QwenConfig, max_rank: int, allow_bin: bool = False, dtype: torch.dtype = torch.float32
) -> LoraAdapter:
    """The adapter at `path`, validated, in `dtype` (B scaled in fp32, then rounded once to `dtype`)."""
    r, scale = adapter_config(path, max_rank)
    tensors = _read_tensors(path, allow_bin)
    pairs = pair_keys(path, config, r, {k: tuple(t.shape) for k, t in tensors.items()})
    return LoraAdapter(
        r,
        {
            key: (tensors[ka].to(dtype).contiguous(), (tensors[kb].float() * scale).to(dtype).contiguous())
            for key, (ka, kb) in pairs.items()
        },
    )


def _read_tensors(path: str, allow_bin: bool) -> dict[str, torch.Tensor]:
    st = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(st):
        try:  # mmap'd (measured on an H200 host, page cache dropped: faster than one read() + load(bytes))
            with safe_open(st, framework="pt") as h:
                return {k: h.get_tensor(k) for k in h.keys()}
        except Exception as exc:  # truncated or corrupt
            raise InvalidArgument(f"cannot read {st}: {exc}") from exc
    binary = os.path.join(path, BIN_FILE)
    if os.path.isfile(binary):
        if not allow_bin:
            raise FailedPrecondition(
                f"{binary} is a pickle; only safetensors are read (start the worker with "
                "--allow-bin-adapters to accept weights-only .bin files)"
            )
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidArgument(f"cannot read {binary} as weights-only: {exc}") from exc
    raise NotFound(f"adapter at {path} has no adapter_model.safetensors")
