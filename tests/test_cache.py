"""ssmkit.models.cache: batching and un-batching states equals running each sequence alone (the basis of
batched decoding and of the server's continuous batching); byte counts against formulas."""

import pytest
import torch

from ssmkit.models.cache import Cache
from ssmkit.models.config import MambaConfig
from ssmkit.models.mamba_lm import MambaLM
from ssmkit.models.sequence import SequenceModel, SequenceModelConfig


def _models():
    torch.manual_seed(0)
    yield MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=20, d_state=4)).double()
    yield SequenceModel(SequenceModelConfig(20, 8, 2, "h3", "s6", d_state=4), dtype=torch.float64)


@pytest.mark.parametrize("model", list(_models()), ids=["mamba_lm", "h3_s6"])
def test_cat_and_select_equal_sequences_alone(model):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 20, (1, 7), generator=g), torch.randint(0, 20, (2, 3), generator=g)
    ca, cb = model.new_cache(1), model.new_cache(2)
    with torch.no_grad():
        model(a, cache=ca)  # prefilled alone, at different lengths
        model(b, cache=cb)
        batch = Cache.cat([ca, cb])
        assert batch.batch_size == 3
        nxt = torch.randint(0, 20, (3, 2), generator=g)
        together = model(nxt, cache=batch)
        alone = torch.cat([model(nxt[:1], cache=ca), model(nxt[1:], cache=cb)])
        torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)
        kept = batch.select([2, 0])  # drop row 1, reorder
        last = torch.randint(0, 20, (2, 1), generator=g)
        torch.testing.assert_close(
            model(last, cache=kept),
            torch.cat([model(last[:1], cache=cb.select([1])), model(last[1:], cache=ca)]),
            rtol=1e-12,
            atol=1e-12,
        )


def test_state_bytes_are_constant_and_match_the_formula():
    cfg = MambaConfig(d_model=16, n_layer=3, vocab_size=20, d_state=4)
    model = MambaLM(cfg)
    cache = model.new_cache(2)
    per_layer = 2 * cfg.d_inner * (cfg.d_conv + cfg.d_state) * 4  # conv + ssm state, float32, batch 2
    assert cache.nbytes == cfg.n_layer * per_layer
    with torch.no_grad():
        model(torch.zeros(2, 50, dtype=torch.long), cache=cache)
    assert cache.nbytes == cfg.n_layer * per_layer


def test_bad_arguments():
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=20, d_state=4))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        model.new_cache(2).select([2])
    with pytest.raises(ValueError, match="different depths"):
        Cache.cat([model.new_cache(1), Cache([], 1)])
    with pytest.raises(ValueError, match="at least one"):
        Cache.cat([])
