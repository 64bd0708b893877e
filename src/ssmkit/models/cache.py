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

from torch import Tensor


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

    def check(self, n_layers: int, batch_size: int) -> None:
        """ValueError unless this cache fits a model of ``n_layers`` layers and a batch of ``batch_size``."""
        if len(self.layers) != n_layers:
            raise ValueError(f"cache holds {len(self.layers)} layer states, the model has {n_layers} layers")
        if self.batch_size != batch_size:
            raise ValueError(
                f"cache holds batch size {self.batch_size}, input_ids has batch size {batch_size}"
            )
