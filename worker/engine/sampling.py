"""Next-token choice for one batch: penalties, warpers and per-request seeded sampling.

Semantics follow LoRAX's `HeterogeneousNextTokenChooser` (itself TGI's):
- A request samples when `do_sample` is set or any warper is active (temperature not 1, top_k not 0,
  top_p < 1, typical_p < 1); otherwise it is greedy. Temperature 0 (the proto default) means greedy.
- Processors run in TGI's order: repetition penalty, frequency and presence penalties, then for
  sampling requests temperature, top-k, top-p, typical-p (HF semantics, at least one token kept).
- The reported logprob is the log-softmax of these processed scores at the chosen id.

Every operation is row-wise, and each sampling request draws from its own `torch.Generator` with
only its own row's probabilities, so a seeded request's token stream does not depend on which
requests it is batched with, nor on filter/concatenate.
"""

from __future__ import annotations

import logging
import math
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from worker.engine.logits_processors import apply_token_bitmask, top_k_warp, top_p_warp, typical_warp

Device = str | torch.device
MAX_ALTERNATIVES = 100
# Ranges that keep the processed scores finite in fp32 for logits up to ~1e4 in size (beyond them a score
# overflows to inf and the row's probabilities to NaN). router_client/messages.py checks the same.
MIN_TEMPERATURE = 1e-4  # of a sampling row; 0 means greedy
MAX_PENALTY_FACTOR = 1e4  # repetition_penalty in [1 / this, this]
MAX_ADDITIVE_PENALTY = 1e4  # |frequency_penalty|, |presence_penalty|
log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    typical_p: float = 1.0  # 1: off
    do_sample: bool = False
    seed: int = 0  # 0 while sampling: the sampler draws a random seed and reports it
    repetition_penalty: float = 1.0  # 1: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    return_k_alternatives: int = 0

    @property
    def has_warpers(self) -> bool:
        return self.temperature not in (0.0, 1.0) or self.top_k != 0 or self.top_p < 1.0 or self.typical_p < 1.0

    @property
    def is_greedy(self) -> bool:
        """TGI's rule `sampling = do_sample or has_warpers`; temperature 0 is greedy whatever else is set."""
        return self.temperature == 0.0 or not (self.do_sample or self.has_warpers)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its value."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        additive = f"in [-{MAX_ADDITIVE_PENALTY:g}, {MAX_ADDITIVE_PENALTY:g}]"
        checks = [
            (
                "temperature",
                self.temperature == 0 or self.temperature >= _as_fp32(MIN_TEMPERATURE),
                f"0 (greedy) or >= {MIN_TEMPERATURE:g}",
            ),
            ("top_k", self.top_k >= 0, ">= 0 (0 disables top-k)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("typical_p", 0 < self.typical_p <= 1, "in (0, 1]"),
            (
                "repetition_penalty",
                _as_fp32(1 / MAX_PENALTY_FACTOR) <= self.repetition_penalty <= MAX_PENALTY_FACTOR,
                f"in [{1 / MAX_PENALTY_FACTOR:g}, {MAX_PENALTY_FACTOR:g}] (1 disables it)",
            ),
            ("frequency_penalty", abs(self.frequency_penalty) <= MAX_ADDITIVE_PENALTY, additive),
            ("presence_penalty", abs(self.presence_penalty) <= MAX_ADDITIVE_PENALTY, additive),
            (
                "return_k_alternatives",
                0 <= self.return_k_alternatives <= MAX_ALTERNATIVES,
                f"in [0, {MAX_ALTERNATIVES}]",
            ),
            ("seed", 0 <= self.seed < 2**64, "in [0, 2^64)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")


def _as_fp32(x: float) -> float:
    """`x` as a protobuf float carries it: a value the router accepts in fp64 passes here after the wire."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


@dataclass
class SampleOutput:
    next_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32, processed log-prob of next_ids
    top_ids: list[list[int]]  # per row, return_k_alternatives ids by decreasing processed log-prob
    top_logprobs: list[list[float]]  # parallel to top_ids


def _random_seed() -> int:
    return 1 + secrets.randbits(63)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class BatchSampler:
    """Per-request sampling state of one batch (row i is request i).

    `generators[i]` is None for greedy rows. `seeds[i]` is the seed a sampling row uses (drawn at
    random when its params gave 0), to be reported back; greedy rows keep their params' seed.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        vocab_size: int,
        n_real_vocab: int,
        device: Device = "cpu",
        *,
        generators: list[torch.Generator | None] | None = None,
        seeds: list[int] | None = None,
    ):
        if not 0 < n_real_vocab <= vocab_size:
            raise ValueError(f"n_real_vocab must be in (0, vocab_size={vocab_size}], got {n_real_vocab}")
        self.params = list(params)
        self.vocab_size = vocab_size
        self.n_real_vocab = n_real_vocab
        self.device = torch.device(device)
        self.sampling = [not p.is_greedy for p in self.params]
        if generators is None:
            seeds = [(p.seed or _random_seed()) if s else p.seed for p, s in zip(self.params, self.sampling)]
            generators = [_generator(seed, self.device) if s else None for seed, s in zip(seeds, self.sampling)]
        assert seeds is not None and len(seeds) == len(generators) == len(self.params)
        self.seeds: list[int] = list(seeds)
        self.generators: list[torch.Generator | None] = list(generators)
        self._build_tensors()

    def _build_tensors(self) -> None:
        """Per-row parameters as [B, 1] tensors; rows that do not use a processor get its neutral value."""
        ps, sampling = self.params, self.sampling

        def col(values: list[float]) -> torch.Tensor:
            host = torch.tensor(values, dtype=torch.float32).unsqueeze(1)
            if self.device.type != "cuda":
                return host.to(self.device)
            # pinned and asynchronous: a batch filtered while a (look-ahead) forward runs does not wait for it
            return host.pin_memory().to(self.device, non_blocking=True)

        self._use_penalty = any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in ps)
        self._repetition = col([p.repetition_penalty for p in ps])
        self._frequency = col([p.frequency_penalty for p in ps])
        self._presence = col([p.presence_penalty for p in ps])
        temps = [p.temperature if s else 1.0 for p, s in zip(ps, sampling)]
        self._temperature = col(temps) if any(t != 1.0 for t in temps) else None
        top_k = [p.top_k if s and p.top_k < self.vocab_size else 0 for p, s in zip(ps, sampling)]
        self._top_k = top_k if any(top_k) else None
        top_p = [p.top_p if s else 1.0 for p, s in zip(ps, sampling)]
        self._top_p = col(top_p) if any(x < 1.0 for x in top_p) else None
        typical = [p.typical_p if s else 1.0 for p, s in zip(ps, sampling)]
        self._typical = col(typical) if any(x < 1.0 for x in typical) else None
        self._ks = [min(p.return_k_alternatives, self.n_real_vocab) for p in ps]  # alternatives per row

    def __len__(self) -> int:
        return len(self.params)

    def __call__(
        self, logits: torch.Tensor, prev_ids: Sequence[Sequence[int]], allowed: torch.Tensor | None = None
    ) -> SampleOutput:
        """logits: [B, vocab_size] any float dtype; prev_ids: prompt + generated ids per row; allowed: None, or the
        tokens each row may take as a bitmask [B, ceil(n_real_vocab / 32)] int32 (see apply_token_bitmask)."""
        batch = len(self.params)
        if tuple(logits.shape) != (batch, self.vocab_size) or len(prev_ids) != batch:
            raise ValueError(
                f"sampler for {batch} rows x {self.vocab_size} got logits {tuple(logits.shape)} "
                f"and {len(prev_ids)} id lists"
            )
        scores = logits.to(device=self.device, dtype=torch.float32, copy=True)  # [B, V]
        scores[:, self.n_real_vocab :] = -math.inf  # padded vocab rows of lm_head are never chosen
        if allowed is not None:  # constrained decoding: before penalties, warpers and the choice
            apply_token_bitmask(scores, allowed, self.n_real_vocab)
        if self._use_penalty:
            scores = self._penalize(scores, prev_ids)
        if self._temperature is not None:
            scores.div_(self._temperature)
        if self._top_k is not None:
            scores = top_k_warp(scores, self._top_k)
        if self._top_p is not None:
            scores = top_p_warp(scores, self._top_p)
        if self._typical is not None:
            scores = typical_warp(scores, self._typical)
        fell_back = self._fall_back(scores, logits)
        if allowed is not None and any(fell_back):  # raw logits replaced those rows: constrain them again
            apply_token_bitmask(scores, allowed, self.n_real_vocab)
        logprobs = torch.log_softmax(scores, dim=-1)  # [B, V]
        next_ids = scores.argmax(dim=-1)  # [B]
        for i, g in enumerate(self.generators):
            if g is not None and not fell_back[i]:  # one draw from this row alone: independent of the batch
                next_ids[i : i + 1] = torch.multinomial(torch.softmax(scores[i], dim=-1), 1, generator=g)
        chosen = logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)  # [B]
        top_ids, top_lps = self._alternatives(logprobs)
        return SampleOutput(next_ids=next_ids, logprobs=chosen, top_ids=top_ids, top_logprobs=top_lps)

    def _fall_back(self, scores: torch.Tensor, logits: torch.Tensor) -> list[bool]:
        """Rows whose processed scores are no distribution (a NaN, a +inf, nothing finite: an extreme value got
        past validation) take their raw logits instead and are chosen greedily, so that one row cannot fail the
        batch. Edits `scores` in place; returns which rows fell back."""
        bad = ~torch.isfinite(scores.amax(dim=-1))  # [B]: the max of such a row is NaN, +inf or -inf
        if not bool(bad.any()):
            return [False] * len(self.params)
        raw = logits[bad].to(device=self.device, dtype=torch.float32)
        raw = raw.nan_to_num(nan=-math.inf, posinf=torch.finfo(torch.float32).max)
        raw[:, self.n_real_vocab :] = -math.inf
        scores[bad] = raw
        rows = bad.nonzero().flatten().tolist()
        log.warning("sampling rows %s went non-finite: greedy on their raw logits instead", rows)
        return bad.tolist()

    def _penalize(self, scores: torch.Tensor, prev_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        batch, vocab = scores.shape
        width = max(1, max(len(ids) for ids in prev_ids))
        padded = torch.tensor(
            [list(ids) + [vocab] * (width - len(ids)) for ids in prev_ids], dtype=torch.int64, device=scores.device
        )  # [B, L]; pad = extra column
        counts = torch.zeros(batch, vocab + 1, dtype=torch.float32, device=scores.device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
        counts = counts[:, :vocab]  # [B, V] occurrences of each id
        seen = counts > 0
        rep = self._repetition
        scores = torch.where(seen, torch.where(scores < 0, scores * rep, scores / rep), scores)
        return scores - self._frequency * counts - self._presence * seen

    def _alternatives(self, logprobs: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
        ks = self._ks
        if not any(ks):
            return [[] for _ in ks], [[] for _ in ks]
        top = torch.topk(logprobs[:, : self.n_real_vocab], max(ks), dim=-1)  # sorted, largest first
        ids, vals = top.indices.tolist(), top.values.tolist()
        return [row[:k] for row, k in zip(ids, ks)], [row[:k] for row, k in zip(vals, ks)]

    def filter(self, indices: Sequence[int]) -> BatchSampler:
        """Rows `indices` in that order; the new sampler takes over their generators (state kept)."""
        return BatchSampler(
            [self.params[i] for i in indices],
            self.vocab_size,
            self.n_real_vocab,
            self.device,
            generators=[self.generators[i] for i in indices],
            seeds=[self.seeds[i] for i in indices],
        )

    @classmethod
    def concatenate(cls, samplers: Sequence[BatchSampler]) -> BatchSampler:
        """All rows in order; generators are carried over, so each request's stream continues."""
        first = samplers[0]
        for s in samplers[1:]:
            if (s.vocab_size, s.n_real_vocab, s.device) != (first.vocab_size, first.n_real_vocab, first.device):
                raise ValueError("cannot concatenate samplers with different vocab sizes or devices")
        return cls(
            [p for s in samplers for p in s.params],
            first.vocab_size,
            first.n_real_vocab,
            first.device,
            generators=[g for s in samplers for g in s.generators],
            seeds=[x for s in samplers for x in s.seeds],
        )
