"""The scheduler: which sequences run in the next step, and how many of their tokens.

Each step first serves the running sequences, oldest first (a decode takes one token, a prefill that was
cut into chunks takes its next chunk), then admits waiting sequences in order (first come first served,
or by priority), each reusing the longest cached prefix of its prompt and prefilling the rest in chunks
under the step's token budget (`max_num_batched_tokens`) and the sequence limit (`max_num_seqs`). When
the pool has no page left for a running sequence, the most recently admitted one is preempted: its pages
go back and it waits at the head of the queue to be recomputed from its prompt and the tokens it already
generated, so nothing is lost and (for greedy decoding) the output is the same.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections import deque
from typing import Any

from jaxllm.config import EngineConfig
from jaxllm.kv_cache import KVCacheManager
from jaxllm.sampling import SamplingParams


PLACEHOLDER = -1  # a sampled token still on the device (async scheduling)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generated continuation of a request (a request with n > 1 has n of them).

    token_ids is the prompt followed by the generated tokens; the first num_computed_tokens of them have
    their K/V in the pages of block_table.
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int
    seed: int
    arrival: int
    priority: int = 0
    parent: "Sequence | None" = None  # n > 1: the first completion, whose prompt pages this one shares
    extra_key: Any = None  # salts the prefix-cache hashes (e.g. a LoRA or a cache_salt)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_pages: int = 0
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)
    slot: int | None = None  # row of the sampler's per-sequence state while running
    num_pending: int = 0  # trailing PLACEHOLDER tokens: sampled, not yet seen by the host
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    state: Any = None  # the engine's per-sequence output bookkeeping (detokenizer, logprobs)

    @property
    def all_token_ids(self) -> list[int]:
        return self.token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host has (all but the pending placeholders)."""
        return len(self.token_ids) - self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclasses.dataclass
class ScheduledBatch:
    """One step's work: seqs[i] feeds num_new_tokens[i] tokens from its num_computed_tokens on."""

    seqs: list[Sequence] = dataclasses.field(default_factory=list)
    num_new_tokens: list[int] = dataclasses.field(default_factory=list)
    admitted: list[Sequence] = dataclasses.field(default_factory=list)  # took a slot this step
    preempted: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)


class Scheduler:
    """Waiting and running sequences, and the policy that turns them into steps."""

    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config, self.kv = config, kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if self.config.scheduling_policy == "priority":
            keys = [(s.priority, s.arrival) for s in self.waiting]
            self.waiting.insert(bisect.bisect(keys, (seq.priority, seq.arrival)), seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted by an older sequence in this loop
                continue
            if seq.num_output_tokens >= seq.max_tokens:  # its last token is on the way (async scheduling)
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.can_allocate(seq, n):
                victim = self._victim()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            self.kv.allocate(seq, n)
            batch.add(seq, n)
            budget -= n
        if batch.preempted:  # no room for newcomers this step
            return batch

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            parent = seq.parent
            if parent is not None and parent.status is not SeqStatus.FINISHED and (
                    parent.status is SeqStatus.WAITING or parent.num_computed_tokens < parent.num_prompt_tokens):
                break  # n > 1: wait until the first completion has computed the shared prompt
            if parent is not None and parent.status is SeqStatus.RUNNING:
                reuse = parent.block_table[:(min(parent.num_computed_tokens, seq.num_tokens - 1)
                                             // self.kv.page_size)]
            elif seq.params.prompt_logprobs is not None:
                reuse = []  # every prompt token's logits are needed
            else:
                reuse = self.kv.lookup_prefix(seq, seq.extra_key)
            n = min(seq.num_tokens - len(reuse) * self.kv.page_size, budget)
            if not self.kv.can_allocate(seq, n, reuse):
                break
            self.waiting.popleft()
            self.kv.admit(seq, reuse)
            self.kv.allocate(seq, n)
            seq.status, seq.slot = SeqStatus.RUNNING, self.free_slots.pop()
            self.running.append(seq)
            batch.add(seq, n)
            batch.admitted.append(seq)
            budget -= n
        return batch

    def update(self, batch: ScheduledBatch, num_computed: list[int] | None = None) -> None:
        """After a step: the scheduled tokens are computed (num_computed: the tokens each sequence computed when
        the launch ran several decode steps); cache the pages they filled."""
        for seq, n in zip(batch.seqs, num_computed or batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.kv.cache_full_pages(seq, seq.extra_key)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Stop a sequence (finished or aborted) and give back its pages and slot."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.stop_reason = SeqStatus.FINISHED, reason, stop_reason

    def _victim(self) -> Sequence:
        if self.config.scheduling_policy == "priority":
            return max(self.running, key=lambda s: (s.priority, s.arrival))
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.config.scheduling_policy == "priority":
            self.add(seq)
        else:
            self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.kv.free(seq)
        self.free_slots.append(seq.slot)
        seq.slot = None
