"""MambaLM: mamba-ssm state-dict keys, vocabulary padding, initialisation, cache equivalence, bad input."""

import math

import pytest
import torch

from ssmkit import MambaConfig, MambaLM


def small(**kw):
    base = dict(d_model=32, n_layer=2, vocab_size=100)
    base.update(kw)
    return MambaConfig(**base)


def test_state_dict_keys_are_mamba_ssm():
    model = MambaLM(small(n_layer=2))
    expected = ["backbone.embedding.weight"]
    for i in range(2):
        expected += [
            f"backbone.layers.{i}.mixer.{k}"
            for k in (
                "A_log",
                "D",
                "in_proj.weight",
                "conv1d.weight",
                "conv1d.bias",
                "x_proj.weight",
                "dt_proj.weight",
                "dt_proj.bias",
                "out_proj.weight",
            )
        ] + [f"backbone.layers.{i}.norm.weight"]
    expected += ["backbone.norm_f.weight", "lm_head.weight"]
    assert sorted(model.state_dict()) == sorted(expected)
    sd = model.state_dict()
    assert sd["backbone.embedding.weight"].shape == (104, 32)  # 100 padded to a multiple of 8
    assert sd["lm_head.weight"].shape == (104, 32)
    assert sd["backbone.layers.0.mixer.x_proj.weight"].shape == (math.ceil(32 / 16) + 32, 64)


def test_tied_and_untied_head():
    tied = MambaLM(small())
    assert tied.lm_head.weight is tied.backbone.embedding.weight
    untied = MambaLM(small(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    assert not torch.equal(untied.lm_head.weight, untied.backbone.embedding.weight)


@pytest.mark.parametrize("vocab,multiple,padded", [(100, 8, 104), (96, 8, 96), (50277, 8, 50280), (7, 1, 7)])
def test_vocab_padding(vocab, multiple, padded):
    assert (
        MambaConfig(
            d_model=8, n_layer=1, vocab_size=vocab, pad_vocab_size_multiple=multiple
        ).padded_vocab_size
        == padded
    )


def test_init_statistics():
    torch.manual_seed(0)
    n_layer = 4
    model = MambaLM(small(d_model=64, n_layer=n_layer, vocab_size=1000, bias=True, tie_embeddings=False))
    emb = model.backbone.embedding.weight.detach()
    assert abs(emb.std().item() - 0.02) < 0.02 * 0.03 and abs(emb.mean().item()) < 1e-3
    d_inner = 128
    bound = 1 / math.sqrt(d_inner) / math.sqrt(n_layer)  # kaiming_uniform(a=√5) bound, rescaled by 1/√n_layer
    for layer in model.backbone.layers:
        mixer = layer.mixer
        w = mixer.out_proj.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.97 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound
        # Linear biases zeroed by the model init, dt_proj.bias kept (softplus in [dt_min, dt_max])
        assert torch.count_nonzero(mixer.in_proj.bias) == 0 and torch.count_nonzero(mixer.out_proj.bias) == 0
        dt = torch.nn.functional.softplus(mixer.dt_proj.bias.detach())
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
        torch.testing.assert_close(
            mixer.A_log.detach(), torch.log(torch.arange(1.0, 17.0)).expand(d_inner, 16)
        )
        torch.testing.assert_close(mixer.D.detach(), torch.ones(d_inner))
        # in_proj keeps PyTorch's default U(±1/√fan_in)
        assert mixer.in_proj.weight.abs().max() <= 1 / math.sqrt(64)
        torch.testing.assert_close(layer.norm.weight.detach(), torch.ones(64))
    # untied head keeps nn.Linear's default (mamba-ssm's _init_weights leaves it alone)
    assert model.lm_head.weight.abs().max() <= 1 / math.sqrt(64)


@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 13, 1], [2, 18]])
def test_cache_equals_full_forward(chunks):
    torch.manual_seed(1)
    model = MambaLM(small()).eval()
    ids = torch.randint(0, 100, (2, sum(chunks)))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        parts, start = [], 0
        for c in chunks:
            parts.append(model(ids[:, start : start + c], cache=cache))
            start += c
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.seqlen_offset == sum(chunks)
    # constant memory: the cache size does not depend on the length
    sizes = [t.numel() for s in cache.layers for t in (s.conv_state, s.ssm_state)]
    assert sizes == [2 * 64 * 4, 2 * 64 * 16] * 2


def test_batch_rows_are_independent():
    torch.manual_seed(2)
    model = MambaLM(small()).eval()
    ids = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        batched = model(ids)
        single = torch.cat([model(ids[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_num_last_tokens_and_logits_dtype():
    model = MambaLM(small()).eval()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, num_last_tokens=2)
    assert full.dtype == torch.float32 and full.shape == (1, 6, 104)
    torch.testing.assert_close(last, full[:, -2:], rtol=1e-5, atol=1e-6)


def test_residual_stream_is_float32():
    model = MambaLM(small()).to(torch.bfloat16)
    block = model.backbone.layers[0]
    out = block(torch.randn(1, 3, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    block.residual_in_fp32 = False
    assert block(torch.randn(1, 3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "ids,match",
    [
        (torch.tensor([[1.0, 2.0]]), "dtype"),
        (torch.tensor([[1, 2]], dtype=torch.uint8), "dtype"),  # the embedding would fail on uint8
        (torch.tensor([1, 2, 3]), "shape"),
        (torch.zeros(1, 0, dtype=torch.long), "shape"),
        ([[1, 2]], "torch.Tensor"),
    ],
)
def test_bad_input_ids(ids, match):
    model = MambaLM(small())
    with pytest.raises(ValueError, match=match):
        model(ids)


@pytest.mark.parametrize("ids", [torch.tensor([[1, 2, 100]]), torch.tensor([[1, -1, 3]])])
def test_ids_out_of_range_are_caught_once_by_generate(ids):
    """forward does no host sync per call (no range check); generate checks the prompt once."""
    model = MambaLM(small())
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate(ids, max_new_tokens=1)


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_bad_num_last_tokens(n):
    with pytest.raises(ValueError, match="num_last_tokens"):
        MambaLM(small())(torch.zeros(1, 3, dtype=torch.long), num_last_tokens=n)


def test_float64_model_returns_float64_logits():
    model = MambaLM(small()).double()
    assert model(torch.zeros(1, 3, dtype=torch.long)).dtype == torch.float64


def test_bad_cache():
    model = MambaLM(small())
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.new_cache(1))
    other = MambaLM(small(n_layer=3))
    with pytest.raises(ValueError, match="cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=other.new_cache(1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=0), "d_model"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(dt_rank=0), "dt_rank"),
        (dict(dt_min=0.5, dt_max=0.1), "dt_min"),
        (dict(dt_init="xavier"), "dt_init"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(bias=1), "bias"),
        (dict(expand=1.5), "expand"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(5)
    model = MambaLM(small()).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = model(ids)
        gpu = model.cuda()
        full = gpu(ids.cuda())
        cache = gpu.new_cache(2)
        parts = [gpu(ids[:, :5].cuda(), cache=cache), gpu(ids[:, 5:].cuda(), cache=cache)]
    torch.testing.assert_close(full.cpu(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(parts, 1).cpu(), expected, rtol=1e-4, atol=1e-4)
    out = gpu.generate(
        ids.cuda(), 5, temperature=0.8, generator=torch.Generator(device="cuda").manual_seed(0)
    )
    assert out.shape == (2, 17) and out.device.type == "cuda"
