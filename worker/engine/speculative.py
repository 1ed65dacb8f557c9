"""Speculative decoding: how many drafts a step verifies, the acceptance of a verify row, the next drafts.

A verify row computes [last, d_1..d_S] in one forward (engine/chunks.py, the runner's span path). At each of
its positions j the batch's normal chooser (penalties seeing the tokens accepted before j in this step,
warpers, greedy or the request's seeded generator) picks x_j; d_{j+1} is accepted while it equals x_j. The
tokens a row yields are x_0..x_a, where a is its number of accepted drafts: each is exactly the token a step
without drafts would have chosen there (a seeded stream draws once per token either way), so the output,
greedy or sampled, does not depend on the drafts. The rounds of choices are taken on every rank from rank 0's
broadcast ids, so every rank accepts the same tokens and its forwards stay in step.

Drafts come from the Medusa heads (argmax of the speculative logits at the row's last chosen position) for
requests whose adapter or the base carries heads, else from prompt lookup (engine/prompt_lookup.py) when
--speculative-tokens is set; constrained (JSON-schema) requests and requests still prefilling get none. A
request never drafts past its own budget: at most max_new_tokens - generated - 1 drafts, so the positions a
verify row writes stay inside the slots of prompt + max_new_tokens - 1 tokens the request holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

import torch

from worker.distributed import ParallelContext
from worker.engine.batch import RequestState
from worker.engine.prompt_lookup import MAX_NGRAM, MIN_RATE, WINDOW, PromptLookup
from worker.engine.sampling import BatchSampler

MAX_SPECULATIVE_TOKENS = 16  # drafts per step beyond this only cost verify rows


@dataclass(frozen=True)
class Speculation:
    """The shard's setting: prompt-lookup drafts per step (0: off) and the Medusa heads attached."""

    lookup_tokens: int = 0  # --speculative-tokens
    medusa_heads: int = 0  # K (0: no heads attached)

    @property
    def tokens(self) -> int:
        """S, drafts per step (Info.speculate): K with Medusa, capped by --speculative-tokens when both are set."""
        if self.medusa_heads and self.lookup_tokens:
            return min(self.medusa_heads, self.lookup_tokens)
        return self.medusa_heads or self.lookup_tokens

    def describe(self) -> str:
        lookup = (
            f"prompt lookup (n-grams {MAX_NGRAM}..1; off for a request after {WINDOW} drafted steps with under "
            f"{MIN_RATE:.0%} of their drafts accepted)"
        )
        if self.medusa_heads and self.lookup_tokens:
            return (
                f"{self.tokens} drafts per step (the fewer of {self.medusa_heads} Medusa heads and "
                f"--speculative-tokens {self.lookup_tokens}) from the heads, for requests without heads from {lookup}"
            )
        if self.medusa_heads:
            return f"{self.tokens} drafts per step from {self.medusa_heads} Medusa heads (requests without heads: none)"
        if self.lookup_tokens:
            return f"{self.tokens} drafts per step from {lookup}"
        return "off"


def check_tokens(n: int) -> int:
    """--speculative-tokens, validated (ValueError naming the bound)."""
    if not 0 <= n <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"speculative tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {n}")
    return n


@dataclass
class Choice:
    """One sampling row's tokens of a step, in order (the first is the step's usual token)."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)  # per token, return_k_alternatives ids
    top_logprobs: list[list[float]] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        """Drafts accepted: every token but the last was a draft."""
        return len(self.ids) - 1


def choose(
    sampler: BatchSampler,
    rows: Sequence[torch.Tensor],
    drafts: Sequence[Sequence[int]],
    prev_ids: Sequence[list[int]],
    allowed: torch.Tensor | None,
    pctx: ParallelContext,
    first: torch.Tensor | None = None,
) -> list[Choice]:
    """Each row's tokens of the step. rows[i]: [1 + len(drafts[i]), V] logits of row i's positions (the sampler's
    rows, in order); prev_ids[i]: its prompt + generated ids; allowed: the rows' token bitmask at position 0
    (constrained rows have no drafts); first: position 0's logits [B, V] when given (rows[i][0], stacked).

    Rounds pick, in one sampler call each, a position of every row whose drafts so far were all accepted (round
    j, position j). A greedy row's choice at position j, given its drafts before j as generated, is the one it
    makes if it gets there (then they were all accepted), so all its positions are picked in round 0: a batch
    without sampling rows takes one call and one broadcast. A sampling row draws once per position reached,
    as without drafts, so that its seeded stream stays the same."""
    if not any(drafts):  # a plain decode step: one round, one token per row
        picked = _pick(sampler, [(a, 0) for a in range(len(rows))], rows, drafts, prev_ids, allowed, pctx, first)
        return [Choice([i], [lp], [t], [tl]) for i, lp, t, tl in zip(*picked)]
    choices = [Choice() for _ in rows]
    flat = [a for a in range(len(rows)) if drafts[a] and sampler.generators[a] is None]
    todo = [(a, 0) for a in range(len(rows))] + [(a, j) for a in flat for j in range(1, len(drafts[a]) + 1)]
    alive = set(range(len(rows)))  # rows whose drafts so far were all accepted
    while todo:
        ids, logprobs, top_ids, top_lps = _pick(sampler, todo, rows, drafts, prev_ids, allowed, pctx, first)
        for k, (a, j) in enumerate(todo):  # a row's positions come in order
            if a not in alive:
                continue
            c = choices[a]
            c.ids.append(ids[k])
            c.logprobs.append(logprobs[k])
            c.top_ids.append(top_ids[k])
            c.top_logprobs.append(top_lps[k])
            if not (j < len(drafts[a]) and ids[k] == drafts[a][j]):
                alive.discard(a)
        todo = [(a, len(choices[a].ids)) for a in sorted(alive) if a not in flat]
        allowed = first = None
    return choices


def _pick(
    sampler: BatchSampler,
    positions: list[tuple[int, int]],
    rows: Sequence[torch.Tensor],
    drafts: Sequence[Sequence[int]],
    prev_ids: Sequence[list[int]],
    allowed: torch.Tensor | None,
    pctx: ParallelContext,
    first: torch.Tensor | None,
) -> tuple[list[int], list[float], list[list[int]], list[list[float]]]:
    """The chooser at (row, position) pairs: ids (rank 0's, so that every rank accepts the same tokens), logprobs
    and alternatives. Position j of a row sees its drafts before j as generated (they were accepted)."""
    index = [a for a, _ in positions]
    sub = sampler if index == list(range(len(sampler))) else sampler.filter(index)  # shares the rows' generators
    if first is not None and len(positions) == first.shape[0]:
        logits = first
    else:
        logits = torch.stack([rows[a][j] for a, j in positions])  # [P, V]
    if allowed is not None and allowed.shape[0] < len(positions):  # later positions: unconstrained rows
        allowed = torch.cat([allowed, allowed.new_full((len(positions) - allowed.shape[0], allowed.shape[1]), -1)])
    out = sub(logits, _History(prev_ids, drafts, positions), allowed)
    ids = pctx.broadcast(out.next_ids.clone()).tolist()
    return ids, out.logprobs.tolist(), out.top_ids, out.top_logprobs


class _History(Sequence[Sequence[int]]):
    """The ids before each (row, position): the row's ids, then its drafts before the position (accepted, if the
    position is reached). Built when read: only penalties read them, and a copy per position costs O(context)."""

    def __init__(
        self, prev_ids: Sequence[list[int]], drafts: Sequence[Sequence[int]], positions: list[tuple[int, int]]
    ):
        self.prev_ids, self.drafts, self.positions = prev_ids, drafts, positions

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, k: int) -> Sequence[int]: ...
    @overload
    def __getitem__(self, k: slice) -> Sequence[Sequence[int]]: ...
    def __getitem__(self, k: int | slice) -> Sequence[int] | Sequence[Sequence[int]]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        a, j = self.positions[k]
        return self.prev_ids[a] + list(self.drafts[a][:j]) if j else self.prev_ids[a]


def medusa_drafts(
    spec: Sequence[torch.Tensor | None], positions: Sequence[int], n_real_vocab: int, pctx: ParallelContext
) -> list[list[int]]:
    """Per row the heads' argmax at `positions[i]` of its speculative logits spec[i] [n, K, V] ([] without
    heads); rank 0's, so that every rank verifies the same drafts next step."""
    have = [i for i, s in enumerate(spec) if s is not None]
    out: list[list[int]] = [[] for _ in spec]
    if not have:
        return out
    picked = torch.stack([s[p] for s, p in zip(spec, positions) if s is not None])  # [R, K, V]
    ids = pctx.broadcast(picked[..., :n_real_vocab].argmax(dim=-1).contiguous()).tolist()  # [R, K]
    for i, row in zip(have, ids):
        out[i] = row
    return out


def budget(r: RequestState, s: int) -> int:
    """Drafts request r may verify next: S, at most the tokens it may still add after the next one, and the
    positions its slots hold after its last token."""
    return max(0, min(s, r.stopping.max_new_tokens - r.n_generated - 1, len(r.slots) - len(r.ids)))


def next_drafts(r: RequestState, medusa: list[int], setting: Speculation) -> list[int]:
    """The drafts request r verifies in its next step (r has its tokens of this step appended)."""
    if r.finished or r.prefilling or r.grammar is not None:
        return []
    n = budget(r, setting.tokens)
    if medusa:
        return medusa[:n]
    if not setting.lookup_tokens:
        return []
    if r.lookup is None:
        r.lookup = PromptLookup()
    return r.lookup.propose(r.ids, n)
