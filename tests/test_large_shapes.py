"""The published large Mamba shapes: Mamba-2.8B, Codestral Mamba 7B (Mamba-2) and Falcon-Mamba 7B build on
the meta device with their published parameter counts, and a sharded safetensors folder of each is
recognised and shape-checked from the files' headers without reading a tensor.

Shapes (from the models' published config.json / GGUF metadata): mamba-2.8b — d_model 2560, 64 layers,
vocab 50277 padded to 50280, tied; Mamba-Codestral-7B-v0.1 — d_model 4096, 64 layers, Mamba-2 with
ngroups 8, headdim 64 (128 heads), d_state 128, vocab 32768, untied; falcon-mamba-7b — d_model 4096,
64 layers, d_state 16, vocab 65024, untied, mixer_rms_eps 1e-6. Published sizes: 2.77B, 7.29B, 7.27B
parameters (the Hub's model pages).
"""

import dataclasses
import json
import struct

import pytest
import torch

from ssmkit import MambaLM
from ssmkit.models import checkpoint
from ssmkit.models.config import Mamba2Config, MambaConfig
from ssmkit.utils import count_parameters

SHAPES = {
    "mamba-2.8b": (MambaConfig(d_model=2560, n_layer=64, vocab_size=50277), 2.77),
    "mamba-codestral-7b": (
        Mamba2Config(d_model=4096, n_layer=64, vocab_size=32768, d_state=128, headdim=64, ngroups=8,
                     tie_embeddings=False),
        7.29,
    ),
    "falcon-mamba-7b": (
        MambaConfig(d_model=4096, n_layer=64, vocab_size=65024, mixer_rms_eps=1e-6, tie_embeddings=False),
        7.27,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SHAPES))
def test_published_parameter_counts_on_the_meta_device(name):
    config, billions = SHAPES[name]
    with torch.device("meta"):
        model = MambaLM(config)
    n = count_parameters(model)
    assert round(n / 1e9, 2) == billions, n
    assert n == sum(torch.Size(s).numel() for k, s in checkpoint.expected_shapes(config).items()
                    if not (config.tie_embeddings and k == "lm_head.weight"))  # fmt: skip


def _write_header_only_safetensors(path, shapes):
    """A safetensors file of bf16 tensors with a real header and its data left as a hole (sparse)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)  # no data written: the file system keeps a hole


@pytest.mark.parametrize("name", list(SHAPES))
def test_a_sharded_folder_is_checked_from_headers_alone(name, tmp_path):
    config, _ = SHAPES[name]
    hf = (
        checkpoint.config2_to_hf(config)
        if isinstance(config, Mamba2Config)
        else checkpoint.config_to_hf(config)
    )
    (tmp_path / "config.json").write_text(json.dumps(hf))
    shapes = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v
              for k, v in checkpoint.expected_shapes(config).items()}  # fmt: skip
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")
    names = list(shapes)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for shard, keys in halves.items():
        _write_header_only_safetensors(tmp_path / shard, {k: shapes[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    found, got = checkpoint.inspect_checkpoint(tmp_path)
    # HF stores the padded vocabulary only
    assert found.padded_vocab_size == config.padded_vocab_size
    same = dataclasses.replace(
        found, vocab_size=config.vocab_size, pad_vocab_size_multiple=config.pad_vocab_size_multiple
    )
    assert same == config
    assert got["backbone.embedding.weight"] == (config.padded_vocab_size, config.d_model)
    # a wrong shape in one shard is named, from the header
    bad = dict(shapes)
    bad["backbone.layers.3.mixer.out_proj.weight"] = (config.d_model, 8)
    keys = halves["model-00001-of-00002.safetensors"]
    _write_header_only_safetensors(tmp_path / "model-00001-of-00002.safetensors", {k: bad[k] for k in keys})
    with pytest.raises(ValueError, match=r"mis-shaped keys \[backbone.layers.3.mixer.out_proj.weight"):
        checkpoint.inspect_checkpoint(tmp_path)


# tiiuae/falcon-mamba-7b's config.json as published on the Hub (transformers 4.43.0.dev0 wrote it): note
# "expand": 16 beside "intermediate_size": 8192 = 2 × 4096 — transformers builds from intermediate_size.
FALCON_MAMBA_7B_CONFIG = {
    "architectures": ["FalconMambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "eos_token_id": 11,
    "expand": 16, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.1,
    "intermediate_size": 8192, "layer_norm_epsilon": 1e-05, "model_type": "falcon_mamba",
    "num_hidden_layers": 64, "pad_token_id": 11, "rescale_prenorm_residual": False, "residual_in_fp32": True,
    "state_size": 16, "tie_word_embeddings": False, "time_step_floor": 0.0001,
    "time_step_init_scheme": "random", "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 256,
    "time_step_scale": 1.0, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
    "use_bias": False, "use_cache": True, "use_conv_bias": True, "vocab_size": 65024,
}  # fmt: skip


def test_the_published_falcon_mamba_7b_config_reads_as_transformers_reads_it():
    """intermediate_size decides the inner width (expand 16 in the file is not used by transformers)."""
    config = checkpoint.config_from_hf(FALCON_MAMBA_7B_CONFIG, "falcon-mamba-7b/config.json")
    assert config.d_inner == 8192 and config.expand == 2 and config.mixer_rms_eps == 1e-6
    same = dict(dt_rank=256, pad_vocab_size_multiple=1)  # the file states the rank; its vocab is unpadded
    assert dataclasses.replace(config, **same) == dataclasses.replace(SHAPES["falcon-mamba-7b"][0], **same)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.FalconMambaConfig(**FALCON_MAMBA_7B_CONFIG)
    assert theirs.intermediate_size == config.d_inner and theirs.time_step_rank == 256
    with pytest.raises(ValueError, match="intermediate_size=8000 must be a positive multiple of hidden_size"):
        checkpoint.config_from_hf({**FALCON_MAMBA_7B_CONFIG, "intermediate_size": 8000})
