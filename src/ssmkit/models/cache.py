"""The cache of a whole sequence model: one layer state per layer, and the count of tokens consumed.

ssmkit has one state protocol (docs/lm.md, "The state protocol"): every stateful layer has
``new_state(batch)`` and ``forward(x, state=None)``, which consumes any number of new tokens and updates
the state it was given; every model has ``new_cache(batch)`` returning a :class:`Cache` of those layer
states and ``forward(ids, cache=None, ...)``. Prefill, chunked prefill and one-token decoding are one
code path, and ``generate``, evaluation and the benchmarks use nothing else. A Mamba layer's state is a
:class:`~ssmkit.layers.mamba.MambaState` (constant size), an attention layer's a
:class:`~ssmkit.layers.attention.KVCache` (grows with the context), an ablation block's its mixer's parts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ssmkit.layers.attention import KVCache


def state_nbytes(state) -> int:
    """Bytes a layer state holds: tensors, dataclasses / tuples / lists of them, or anything with an
    ``nbytes`` property (a KV cache counts its filled part)."""
    if state is None:
        return 0
    if isinstance(state, Tensor) or hasattr(state, "nbytes"):
        return int(state.nbytes)
    if dataclasses.is_dataclass(state):
        return sum(state_nbytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, (tuple, list)):
        return sum(state_nbytes(s) for s in state)
    raise TypeError(f"cannot count the bytes of a {type(state).__name__} state")


def _select(state, rows: Tensor):
    """The layer state of the sequences ``rows`` (a (k,) long tensor), as new tensors."""
    if isinstance(state, Tensor):
        return state.index_select(0, rows.to(state.device))
    if isinstance(state, KVCache):
        return KVCache(
            _select(state.k[:, :, : state.t], rows), _select(state.v[:, :, : state.t], rows), state.t
        )
    if dataclasses.is_dataclass(state):
        return dataclasses.replace(
            state, **{f.name: _select(getattr(state, f.name), rows) for f in dataclasses.fields(state)}
        )
    if isinstance(state, (tuple, list)):
        return type(state)(_select(s, rows) for s in state)
    raise TypeError(f"cannot select rows of a {type(state).__name__} state")


def _cat(states: list):
    """One layer state holding the sequences of ``states`` one after the other (batch dimension 0)."""
    first = states[0]
    if isinstance(first, Tensor):
        return torch.cat(states, 0)
    if isinstance(first, KVCache):
        if len({s.t for s in states}) != 1:
            raise ValueError("KV caches of different lengths cannot be batched (attention keeps every token)")
        return KVCache(
            _cat([s.k[:, :, : s.t] for s in states]), _cat([s.v[:, :, : s.t] for s in states]), first.t
        )
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(
            first, **{f.name: _cat([getattr(s, f.name) for s in states]) for f in dataclasses.fields(first)}
        )
    if isinstance(first, (tuple, list)):
        return type(first)(_cat(list(parts)) for parts in zip(*states, strict=True))
    raise TypeError(f"cannot batch {type(first).__name__} states")


@dataclasses.dataclass
class Cache:
    """Recurrent state of a whole model for a batch of sequences.

    Attributes:
        layers: one layer state per layer (each layer's ``new_state``), updated by the model's forward.
        batch_size: number of sequences b.
        seqlen_offset: number of tokens consumed so far (the position of the next token).
    """

    layers: list
    batch_size: int
    seqlen_offset: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of state held for the whole batch (constant in the length for SSM layers)."""
        return sum(state_nbytes(s) for s in self.layers)

    def select(self, rows) -> Cache:
        """A new cache holding only the sequences ``rows`` (indices into the batch), e.g. to drop the
        finished rows of a batched decode. ``seqlen_offset`` is kept."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)  # (k,)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.batch_size):
            raise ValueError(f"rows must lie in [0, {self.batch_size}), got {rows.tolist()}")
        return Cache([_select(s, rows) for s in self.layers], int(rows.numel()), self.seqlen_offset)

    @staticmethod
    def cat(caches: list[Cache]) -> Cache:
        """One cache holding the sequences of ``caches`` one after the other (each layer's states are
        concatenated along the batch), e.g. to let a freshly prefilled sequence join a running decode batch.

        SSM states do not depend on the position, so sequences at different positions batch freely; the
        result's ``seqlen_offset`` is the largest of the inputs' (only attention layers, whose KV caches
        must then be of equal length, use it)."""
        if not caches:
            raise ValueError("Cache.cat needs at least one cache")
        if len({len(c.layers) for c in caches}) != 1:
            raise ValueError(
                f"caches of different depths cannot be batched: {[len(c.layers) for c in caches]}"
            )
        layers = [_cat(list(states)) for states in zip(*(c.layers for c in caches), strict=True)]
        return Cache(layers, sum(c.batch_size for c in caches), max(c.seqlen_offset for c in caches))

    def check(self, n_layers: int, batch_size: int) -> None:
        """ValueError unless this cache fits a model of ``n_layers`` layers and a batch of ``batch_size``."""
        if len(self.layers) != n_layers:
            raise ValueError(f"cache holds {len(self.layers)} layer states, the model has {n_layers} layers")
        if self.batch_size != batch_size:
            raise ValueError(
                f"cache holds batch size {self.batch_size}, input_ids has batch size {batch_size}"
            )
