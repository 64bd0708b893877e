"""Models by Hugging Face Hub id, from a real Hub cache built here in tmp_path, offline.

The cache is huggingface_hub's layout exactly as ``snapshot_download`` leaves it (huggingface_hub has no
API that writes a cache without the network, so it is written by hand and then checked with
huggingface_hub's own reader, ``scan_cache_dir``)::

    <HF_HOME>/hub/models--org--name/blobs/<sha256 of a weight file | git blob sha1 of any other file>
                                   /refs/<branch>                (the commit hash, no newline)
                                   /snapshots/<commit>/<file>    -> ../../blobs/<hash> (relative symlink)

Its repos hold random small models written by ``save_pretrained`` (transformers format, mamba-ssm
format, Mamba-2, ssmkit's Transformer) and by transformers itself (a sharded checkpoint with an index).
Every socket connection fails during these tests, so any attempt to reach the network is an error.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmkit import Mamba2Config, MambaConfig, MambaLM, TransformerLM
from ssmkit.cli import main
from ssmkit.data.tokenizer import load_tokenizer
from ssmkit.models import hub
from ssmkit.models.folder import generation_defaults
from ssmkit.models.load import load_model
from ssmkit.models.transformer_lm import TransformerConfig

huggingface_hub = pytest.importorskip("huggingface_hub")

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


# ---------------------------------------------------------------------------- building a Hub cache
def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",)) -> Path:
    """Put every file of ``folder`` into ``cache`` as commit ``commit`` of ``repo_id`` (pointed at by
    ``refs``), laid out as huggingface_hub's snapshot_download leaves it. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        lfs = file.suffix in (".safetensors", ".bin")  # LFS files are stored by sha256, others by git id
        digest = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        blob = repo / "blobs" / digest
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with every parameter moved off its structured initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def mamba(seed: int = 0, vocab_size: int = 256) -> MambaLM:
    torch.manual_seed(seed)
    return perturbed(MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=vocab_size, d_state=4)), seed)


def transformer(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return perturbed(TransformerLM(TransformerConfig(d_model=16, n_layer=2, vocab_size=256, n_head=2)), seed)


SOURCES = {}  # repo id -> the model its main revision holds


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """HF_HOME of a Hub cache holding one repo per format (see the module docstring)."""
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    work = tmp_path_factory.mktemp("folders")

    def put(repo_id, model, commit=COMMIT_A, refs=("main",), **save):
        model.save_pretrained(work / repo_id / commit, **save)
        add_to_cache(cache, repo_id, work / repo_id / commit, commit, refs)

    SOURCES["org/mamba-tiny-hf"] = mamba(0)
    put("org/mamba-tiny-hf", SOURCES["org/mamba-tiny-hf"])
    put("org/mamba-tiny-hf", mamba(1), commit=COMMIT_B, refs=("v2",))  # a second revision, on branch v2
    SOURCES["org/mamba-tiny"] = mamba(2)
    put("org/mamba-tiny", SOURCES["org/mamba-tiny"], format="mamba-ssm")
    torch.manual_seed(3)
    SOURCES["org/mamba2-tiny"] = perturbed(
        MambaLM(Mamba2Config(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=16, chunk_size=8)), 3
    )
    put("org/mamba2-tiny", SOURCES["org/mamba2-tiny"])
    SOURCES["org/transformer-tiny"] = transformer(4)
    put("org/transformer-tiny", SOURCES["org/transformer-tiny"])
    return home


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection is an error: these tests must never reach the network."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def offline(hub_home, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 with HF_HOME at the cache (and no variable that would override it)."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_home / "hub"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_the_cache_is_huggingface_hubs_layout(hub_home):
    info = huggingface_hub.scan_cache_dir(hub_home / "hub")
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == set(SOURCES)
    revisions = {r.commit_hash: r for r in repos["org/mamba-tiny-hf"].revisions}
    assert set(revisions) == {COMMIT_A, COMMIT_B}
    assert revisions[COMMIT_A].refs == frozenset({"main"}) and revisions[COMMIT_B].refs == frozenset({"v2"})
    assert {f.file_name for f in revisions[COMMIT_A].files} == {"config.json", "model.safetensors"}
    found = huggingface_hub.try_to_load_from_cache(
        "org/mamba-tiny", "pytorch_model.bin", cache_dir=hub_home / "hub"
    )
    assert found == str(
        hub_home / "hub" / "models--org--mamba-tiny" / "snapshots" / COMMIT_A / "pytorch_model.bin"
    )


# ---------------------------------------------------------------------------- loading by id
@pytest.mark.parametrize(
    "repo_id", ["org/mamba-tiny-hf", "org/mamba-tiny", "org/mamba2-tiny", "org/transformer-tiny"]
)
def test_load_by_id_offline(offline, repo_id):
    model = load_model(repo_id).eval()
    source = SOURCES[repo_id]
    assert type(model) is type(source) and type(model.config) is type(source.config)
    same_weights(model, source)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids), source(ids), rtol=0, atol=0)
    cls = type(source)
    same_weights(cls.from_pretrained(repo_id), source)


def test_resolve_returns_the_snapshot_folder(offline):
    folder = hub.resolve("org/mamba-tiny-hf")
    assert folder == offline / "models--org--mamba-tiny-hf" / "snapshots" / COMMIT_A
    assert (folder / "model.safetensors").is_symlink()


def test_revision_branch_and_commit(offline):
    v2 = MambaLM.from_pretrained("org/mamba-tiny-hf", revision="v2")
    same_weights(v2, mamba(1))
    same_weights(load_model("org/mamba-tiny-hf", revision=COMMIT_B), mamba(1))
    same_weights(load_model("org/mamba-tiny-hf", revision=COMMIT_A), SOURCES["org/mamba-tiny-hf"])
    same_weights(load_model("org/mamba-tiny-hf", revision="main"), SOURCES["org/mamba-tiny-hf"])
    with pytest.raises(FileNotFoundError) as err:
        load_model("org/mamba-tiny-hf", revision="v3")
    msg = str(err.value)
    assert "\n" not in msg and "'org/mamba-tiny-hf' at revision 'v3'" in msg and str(offline) in msg


def test_cache_dir_argument_and_local_files_only(hub_home, tmp_path, monkeypatch):
    """cache_dir= wins over the environment; local_files_only=True needs no HF_HUB_OFFLINE."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # other test modules set it
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    model = load_model("org/mamba-tiny", cache_dir=hub_home / "hub", local_files_only=True)
    same_weights(model, SOURCES["org/mamba-tiny"])
    with pytest.raises(FileNotFoundError, match="local_files_only=True"):
        load_model("org/mamba-tiny", local_files_only=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_home / "hub"))  # HF_HUB_CACHE wins over HF_HOME
    same_weights(load_model("org/mamba-tiny", local_files_only=True), SOURCES["org/mamba-tiny"])


def test_missing_id_offline_is_one_line(offline):
    for load in (load_model, MambaLM.from_pretrained, TransformerLM.from_pretrained, hub.resolve):
        with pytest.raises(FileNotFoundError) as err:
            load("org/not-downloaded")
        msg = str(err.value)
        assert "\n" not in msg, msg
        for fragment in (
            "'org/not-downloaded'",
            "not in the Hugging Face cache",
            str(offline),
            "HF_HUB_OFFLINE",
        ):
            assert fragment in msg, (fragment, msg)


def test_names_that_are_neither_folders_nor_ids(tmp_path, hub_home):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_model(tmp_path / "nope")  # a path, not an id
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("a/b/c")  # three parts: not an id
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="revision='main' applies to Hub ids"):
        load_model(hub_home, revision="main")


@pytest.mark.parametrize(
    "name,is_id",
    [
        ("state-spaces/mamba-130m-hf", True),
        ("tiiuae/falcon-mamba-7b", True),
        ("mistralai/Mamba-Codestral-7B-v0.1", True),
        ("mamba-130m", False),
        ("./org/name", False),
        ("/abs/path", False),
        ("org/na--me", False),
        ("org/../name", False),
        ("-org/name", False),
    ],
)
def test_is_repo_id(name, is_id):
    assert hub.is_repo_id(name) is is_id


def test_without_huggingface_hub_an_id_is_one_line(offline, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ImportError) as err:
        load_model("org/mamba-tiny-hf")
    assert "\n" not in str(err.value) and "pip install 'ssmkit[hub]'" in str(err.value)
    assert main(["generate", "org/mamba-tiny-hf", "--prompt", "x"]) == 1
    out = capsys.readouterr().err
    assert out.startswith("error: ") and out.count("\n") == 1 and "pip install 'ssmkit[hub]'" in out
    same_weights(
        load_model(offline / "models--org--mamba-tiny" / "snapshots" / COMMIT_A), SOURCES["org/mamba-tiny"]
    )


# ---------------------------------------------------------------------------- the online path, simulated
def test_model_files_picks_one_set_of_weights():
    tok = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    extra = ["README.md", ".gitattributes", "flax_model.msgpack", "consolidated.safetensors", "params.json"]
    assert hub.model_files(["config.json", "model.safetensors", "pytorch_model.bin", *tok, *extra]) == [
        "config.json",
        *tok,
        "model.safetensors",
    ]
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    bins = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    listing = [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        *shards,
        *bins,
        *extra,
    ]
    listing += ["pytorch_model.bin.index.json"]
    assert hub.model_files(listing) == [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        *shards,
    ]
    assert hub.model_files(["config.json", "pytorch_model.bin.index.json", *bins]) == [
        "config.json",
        "pytorch_model.bin.index.json",
        *bins,
    ]
    assert hub.model_files(["config.json", "pytorch_model.bin", *extra]) == [
        "config.json",
        "pytorch_model.bin",
    ]
    # an ssmkit-quantized folder: its one weights file (ssmkit.models.folder.QUANTIZED_WEIGHTS)
    assert hub.model_files(["config.json", "model.int8.safetensors", *extra]) == [
        "config.json",
        "model.int8.safetensors",
    ]


def test_online_fetches_only_the_files_a_model_needs(hub_home, monkeypatch):
    """With the network allowed, the repo's listing decides the files; snapshot_download gets exactly
    those (its own download is replaced here: it returns the cached snapshot)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # other test modules set it
    listing = ["config.json", "model.safetensors", "pytorch_model.bin", "README.md"]
    calls = []
    snapshot = hub_home / "hub" / "models--org--mamba-tiny-hf" / "snapshots" / COMMIT_A
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: listing
    )

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    same_weights(load_model("org/mamba-tiny-hf", cache_dir=hub_home / "hub"), SOURCES["org/mamba-tiny-hf"])
    assert calls == [
        (
            "org/mamba-tiny-hf",
            {
                "revision": None,
                "cache_dir": hub_home / "hub",
                "allow_patterns": ["config.json", "model.safetensors"],
            },
        )
    ]


def test_hub_unreachable_falls_back_to_the_cache(hub_home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # other test modules set it

    def unreachable(self, repo_id, revision=None):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    cache = hub_home / "hub"
    same_weights(load_model("org/mamba-tiny", cache_dir=cache), SOURCES["org/mamba-tiny"])
    with pytest.raises(FileNotFoundError) as err:
        load_model("org/elsewhere", cache_dir=cache)
    msg = str(err.value)
    assert "\n" not in msg and "could not be reached: ConnectionError: Name or service not known)" in msg


# ---------------------------------------------------------------------------- dtypes
def test_loaded_model_keeps_ties_and_parameter_metadata(offline):
    """Built on the meta device and given the checkpoint's tensors: the head is still the embedding and
    A_log / D still carry their no-weight-decay mark (the optimiser groups read it)."""
    model = load_model("org/mamba-tiny-hf")
    assert model.lm_head.weight is model.backbone.embedding.weight
    fresh = MambaLM(model.config)
    assert [n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)] == [
        n for n, p in fresh.named_parameters() if getattr(p, "_no_weight_decay", False)
    ]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in fresh.parameters())
    assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters())
    t = load_model("org/transformer-tiny")
    assert t.lm_head.weight is t.embedding.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_round_trip_through_a_folder(tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    for model in (mamba(5).to(dtype), transformer(5).to(dtype)):
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder)
        assert json.loads((folder / "config.json").read_text())["dtype"] == name
        loaded = load_model(folder)
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        same_weights(loaded, model)
        assert {p.dtype for p in load_model(folder, dtype="float32").parameters()} == {torch.float32}


def test_a_float64_folder_gives_float64_logits(tmp_path):
    model = mamba(6).double()
    model.save_pretrained(tmp_path / "f64")
    loaded = load_model(tmp_path / "f64").eval()
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    logits = loaded(ids)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=0)


def test_dtype_argument_wins_over_the_config(tmp_path):
    mamba(7).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = MambaLM.from_pretrained(tmp_path / "bf16", dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert load_model(tmp_path / "bf16", dtype="float16").lm_head.weight.dtype == torch.float16
    for bad in ("fp32", "torch.float32", torch.int8, 32):
        with pytest.raises(ValueError, match="dtype must be one of") as err:
            load_model(tmp_path / "bf16", dtype=bad)
        assert "\n" not in str(err.value)


def test_torch_dtype_of_transformers_4_and_bad_config_dtype(tmp_path):
    folder = tmp_path / "m"
    mamba(8).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    assert load_model(folder).lm_head.weight.dtype == torch.float16
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "int8"}))
    with pytest.raises(ValueError, match=r"config.json: torch_dtype must be one of .* got 'int8'"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(config))  # neither key: float32
    assert load_model(folder).lm_head.weight.dtype == torch.float32


def test_mamba_ssm_format_holds_the_dtype_in_its_weights(tmp_path):
    """mamba-ssm's config.json has no dtype key (its loader refuses unknown keys): the weights keep
    theirs, and the folder loads as float32 unless dtype= is given (as mamba-ssm's from_pretrained)."""
    model = mamba(9).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ssm", format="mamba-ssm")
    assert "dtype" not in json.loads((tmp_path / "ssm" / "config.json").read_text())
    sd = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert load_model(tmp_path / "ssm").lm_head.weight.dtype == torch.float32
    same_weights(load_model(tmp_path / "ssm", dtype="bfloat16"), model)


def test_transformers_reads_the_dtype_we_write(tmp_path):
    transformers = pytest.importorskip("transformers")
    mamba(10).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path / "bf16")
    assert theirs.dtype == torch.bfloat16 and theirs.config.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- sharded checkpoints
def test_sharded_checkpoint_written_by_transformers_loads_by_id(offline, tmp_path):
    """transformers writes 2+ shards and model.safetensors.index.json; loaded by id from the cache, the
    model gives transformers' logits."""
    transformers = pytest.importorskip("transformers")
    mamba(11, vocab_size=256).save_pretrained(tmp_path / "single")
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path / "single").eval()
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    add_to_cache(offline, "org/mamba-sharded", tmp_path / "sharded", COMMIT_A)
    ours = load_model("org/mamba-sharded").eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(ids).logits
    torch.testing.assert_close(ours(ids)[..., : expected.shape[-1]], expected, rtol=1e-5, atol=1e-5)


def test_sharded_transformer_folder_loads(tmp_path):
    from safetensors.torch import save_file

    model = transformer(13)
    model.save_pretrained(tmp_path / "single")
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(tmp_path / "single" / "config.json", folder)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        save_file({k: state[k].contiguous() for k in keys}, folder / file)
    index = {"metadata": {}, "weight_map": {k: file for file, keys in parts.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    same_weights(load_model(folder), model)


# ---------------------------------------------------------------------------- generation_config.json
def test_generation_defaults_read_as_transformers_does(tmp_path):
    file = tmp_path / "generation_config.json"
    assert generation_defaults(tmp_path) == {}
    file.write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0, "_from_model_config": True}))
    assert generation_defaults(tmp_path) == {"temperature": 0.0, "eos_token_id": 0}  # greedy
    file.write_text(json.dumps({"do_sample": False, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7}))
    assert generation_defaults(tmp_path) == {"temperature": 0.0, "max_new_tokens": 7}
    file.write_text(json.dumps({"do_sample": True, "repetition_penalty": 1.2, "eos_token_id": [2, 3]}))
    assert generation_defaults(tmp_path) == {
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "repetition_penalty": 1.2,
        "eos_token_id": 2,
    }
    file.write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": None, "min_p": 0.1})
    )
    assert generation_defaults(tmp_path) == {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.1}
    for bad, fragment in (
        ({"do_sample": "yes"}, "do_sample must be true or false"),
        ({"temperature": -1}, "temperature must be a number in [0.0, ∞)"),
        ({"top_p": 0}, "top_p must be a number in (0.0, 1.0]"),
        ({"top_k": 2.5}, "top_k must be an int >= 0"),
        ({"max_new_tokens": True}, "max_new_tokens must be an int >= 0"),
        ({"eos_token_id": "</s>"}, "eos_token_id must be an int >= 0"),
    ):
        file.write_text(json.dumps(bad))
        with pytest.raises(ValueError) as err:
            generation_defaults(tmp_path)
        assert str(file) in str(err.value) and fragment in str(err.value), err.value


# ---------------------------------------------------------------------------- the CLI
def cli_out(capsys, argv) -> str:
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def expected_text(model, prompt: str, n: int, **sampling) -> str:
    ids = model.generate(
        torch.tensor([list(prompt.encode())]), n, generator=torch.Generator().manual_seed(0), **sampling
    )
    return bytes(ids[0].tolist()).decode("utf-8", errors="replace")


@pytest.mark.parametrize("repo_id", ["org/mamba-tiny-hf", "org/mamba-tiny", "org/transformer-tiny"])
def test_cli_generate_by_id_offline(offline, capsys, repo_id):
    out = cli_out(capsys, ["generate", repo_id, "--prompt", "ab", "--max-new-tokens", "3"])
    assert out == expected_text(SOURCES[repo_id], "ab", 3, temperature=0) + "\n"  # greedy by default


def test_cli_generate_by_id_and_revision(offline, capsys):
    out = cli_out(
        capsys,
        ["generate", "org/mamba-tiny-hf", "--revision", "v2", "--prompt", "ab", "--max-new-tokens", "3"],
    )
    assert out == expected_text(mamba(1), "ab", 3, temperature=0) + "\n"


def test_cli_missing_id_offline_is_one_line(offline, capsys):
    assert main(["generate", "org/not-downloaded", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert (
        "'org/not-downloaded'" in err and "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    )


def test_cli_honours_generation_config_under_flags(offline, capsys, tmp_path):
    """flags > generation_config.json > defaults, and the model's tokenizer files come with the id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "words"
    vocab = {w: i for i, w in enumerate(["<eos>", "the", "cat", "sat", "on", "mat", "a", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = mamba(12, vocab_size=8)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 5, "max_new_tokens": 6, "eos_token_id": 7}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    add_to_cache(offline, "org/words", folder, COMMIT_A)

    def expected(n, **sampling):
        ids = model.generate(
            torch.tensor([[1, 2]]), n, generator=torch.Generator().manual_seed(0), **sampling
        )
        return "the cat" + load_tokenizer(folder).decode(ids[0, 2:].tolist()) + "\n"

    argv = ["generate", "org/words", "--prompt", "the cat"]
    sampled = dict(temperature=0.7, top_k=5, top_p=1.0, eos_token_id=7)
    assert cli_out(capsys, argv) == expected(6, **sampled)
    assert cli_out(capsys, [*argv, "--top-k", "2", "--max-new-tokens", "3"]) == expected(
        3, **{**sampled, "top_k": 2}
    )
    assert cli_out(capsys, [*argv, "--temperature", "0"]) == expected(6, temperature=0, eos_token_id=7)


def test_cli_convert_from_id(offline, capsys, tmp_path):
    cli_out(capsys, ["convert", "org/mamba-tiny", str(tmp_path / "hf"), "--to", "hf"])
    same_weights(load_model(tmp_path / "hf"), SOURCES["org/mamba-tiny"])
    assert not (tmp_path / "hf" / "model.safetensors").is_symlink()


def test_cli_in_a_fresh_process_reads_the_environment(hub_home, tmp_path):
    """`python -m ssmkit generate ID` with only HF_HOME and HF_HUB_OFFLINE set (nothing patched)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hub_home), HF_HUB_OFFLINE="1")
    argv = [
        sys.executable,
        "-m",
        "ssmkit",
        "generate",
        "org/mamba-tiny-hf",
        "--prompt",
        "ab",
        "--max-new-tokens",
        "3",
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_text(SOURCES["org/mamba-tiny-hf"], "ab", 3, temperature=0) + "\n"


# ---------------------------------------------------------------------------- tokenizers by id
def test_resolve_tokenizer_by_id_offline(offline, tmp_path):
    """A tokenizer repo in the cache resolves to its snapshot (tokenizer.json required); a local file
    or folder is returned as it is."""
    from tokenizers import Tokenizer, models

    folder = tmp_path / "tok"
    folder.mkdir()
    Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token="<eos>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    snapshot = add_to_cache(offline, "org/tok", folder, COMMIT_A)
    assert hub.resolve_tokenizer("org/tok") == snapshot
    assert load_tokenizer(hub.resolve_tokenizer("org/tok"), required=True).eos_token_id == 0
    assert hub.resolve_tokenizer(folder / "tokenizer.json") == folder / "tokenizer.json"
    with pytest.raises(FileNotFoundError) as err:
        hub.resolve_tokenizer("org/mamba-tiny-hf")  # cached, but holds no tokenizer.json
    assert "\n" not in str(err.value) and "has no tokenizer.json" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        hub.resolve_tokenizer("org/no-tokenizer")


def test_importing_ssmkit_models_does_not_import_huggingface_hub():
    code = "import sys, ssmkit.models.load, ssmkit.cli.generate; print('huggingface_hub' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "False\n"


def test_a_snapshot_with_only_the_files_a_model_needs_loads_offline(offline, tmp_path):
    """huggingface_hub (2.x) records a commit's whole file list in ``trees/<commit>.json`` and, offline,
    refuses a snapshot that lacks a file the request's patterns match. What ssmkit fetched online is one
    set of weights, so offline it must ask for no more than config.json: a repo that also holds
    pytorch_model.bin (never fetched) still loads."""
    folder = tmp_path / "partial"
    model = mamba(14)
    model.save_pretrained(folder)
    add_to_cache(offline, "org/partial", folder, COMMIT_A)
    listing = {
        name: {"size": 1, "blob_id": git_blob_sha1(name.encode())}
        for name in ("config.json", "model.safetensors", "pytorch_model.bin", "README.md")
    }
    trees = offline / "models--org--partial" / "trees"
    trees.mkdir()
    (trees / f"{COMMIT_A}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    same_weights(load_model("org/partial"), model)


def test_cli_notes_sampling_flags_that_greedy_decoding_ignores(offline, capsys):
    out = cli_out(
        capsys, ["generate", "org/mamba-tiny-hf", "--prompt", "ab", "--max-new-tokens", "2", "--top-k", "3"]
    )
    assert out == expected_text(SOURCES["org/mamba-tiny-hf"], "ab", 2, temperature=0) + "\n"
    assert (
        main(["generate", "org/mamba-tiny-hf", "--prompt", "ab", "--max-new-tokens", "2", "--top-p", "0.5"])
        == 0
    )
    assert capsys.readouterr().err == (
        "note: greedy decoding (temperature 0) ignores --top-p; give --temperature > 0 to sample\n"
    )


def test_cli_tokenizer_flag_by_id_and_the_byte_fallback_note(offline, capsys, tmp_path):
    """state-spaces/mamba-* (mamba-ssm format) ship no tokenizer: --tokenizer names one, by id too; without
    it, a model with more than 256 tokens is read as bytes, and the CLI says so."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<eos>", "the", "cat", "sat", "on", "mat", "a", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    add_to_cache(offline, "org/words-tokenizer", tmp_path / "tok", COMMIT_A)
    model = mamba(15, vocab_size=300)
    model.save_pretrained(tmp_path / "ssm", format="mamba-ssm")
    add_to_cache(offline, "org/mamba-300", tmp_path / "ssm", COMMIT_A)

    argv = ["generate", "org/mamba-300", "--prompt", "the cat", "--max-new-tokens", "4"]
    ids = model.generate(torch.tensor([[1, 2]]), 4, temperature=0)
    expected = "the cat" + load_tokenizer(tmp_path / "tok").decode(ids[0, 2:].tolist()) + "\n"
    for name in ("org/words-tokenizer", str(tmp_path / "tok"), str(tmp_path / "tok" / "tokenizer.json")):
        assert main([*argv, "--tokenizer", name]) == 0
        out, err = capsys.readouterr()
        assert out == expected and err == ""
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == expected_text(model, "the cat", 4, temperature=0) + "\n"
    assert err.startswith("note: org/mamba-300 has no tokenizer.json") and "--tokenizer" in err
    assert main([*argv, "--tokenizer", "org/not-downloaded"]) == 1
    assert "not in the Hugging Face cache" in capsys.readouterr().err


def test_device_argument_on_cpu(offline):
    model = load_model("org/mamba-tiny-hf", device="cpu", dtype="float64")
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float64)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_argument_puts_the_weights_on_cuda(offline):
    model = load_model("org/mamba-tiny-hf", device="cuda", dtype=torch.bfloat16).eval()
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.bfloat16)}
    assert model.lm_head.weight is model.backbone.embedding.weight
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = mamba(0).to(torch.bfloat16)(ids)  # the model the repo holds, in bf16 on the CPU
        got = model(ids.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def hub_error(name: str) -> Exception:
    """An instance of huggingface_hub's ``name`` error (built without the HTTP response it wraps)."""
    cls = getattr(huggingface_hub.utils, name)
    err = cls.__new__(cls)
    Exception.__init__(err, f"{name} (simulated)")
    return err


@pytest.mark.parametrize(
    "error,exc_type,fragment",
    [
        (
            "RepositoryNotFoundError",
            FileNotFoundError,
            "is neither a local folder nor a model on the Hugging Face Hub",
        ),
        ("RevisionNotFoundError", FileNotFoundError, "has no revision 'nope'"),
        ("GatedRepoError", PermissionError, "is gated"),
    ],
)
def test_online_errors_are_one_line(hub_home, monkeypatch, capsys, error, exc_type, fragment):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # other test modules set it

    def listing(self, repo_id, revision=None):
        raise hub_error(error)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", listing)
    with pytest.raises(exc_type) as err:
        load_model("org/mamba-tiny-hf", revision="nope", cache_dir=hub_home / "hub")
    assert "\n" not in str(err.value) and fragment in str(err.value)
    assert main(["generate", "org/elsewhere", "--revision", "nope", "--prompt", "x"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_online_repo_without_a_config_is_one_line(hub_home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # other test modules set it
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "list_repo_files",
        lambda self, repo_id, revision=None: ["README.md", "data.csv"],
    )
    with pytest.raises(FileNotFoundError) as err:
        load_model("org/a-dataset", cache_dir=hub_home / "hub")
    assert str(err.value) == (
        "Hub repo 'org/a-dataset' has no config.json, which ssmkit needs (it holds README.md, data.csv)"
    )
