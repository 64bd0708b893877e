"""Model folders by name: a local folder as it is, or a Hugging Face Hub id resolved through the Hub cache.

    resolve(name_or_path, revision=None, cache_dir=None, local_files_only=None) -> Path
    resolve_tokenizer(name_or_path, revision=None, cache_dir=None, local_files_only=None) -> Path
    model_files(repo_files) -> list[str]    the files of a repo that a model needs
    cache_dir_from_env() -> Path            where the Hub cache is, read from the environment now
    offline_from_env() -> bool              whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now

Reference: huggingface_hub's ``snapshot_download`` and its cache layout, which transformers and mamba-ssm
share::

    <cache>/models--<org>--<name>/blobs/<hash>                  file contents
                                 /refs/<branch or tag>           the commit hash it points at
                                 /snapshots/<commit>/<file>      symlinks into blobs/

A name that is an existing folder is used as it is. Otherwise a name of the form ``org/name`` is a Hub
id: online, the repo's file list is read and only the files a model needs are fetched — config.json,
generation_config.json, the tokenizer files, and ONE set of weights (model.safetensors, else a sharded
safetensors index and its shards, else pytorch_model.bin and its shards), so a repo that holds both
safetensors and pickles is not downloaded twice. Offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``,
or when the Hub cannot be reached) the snapshot already in the cache is used; an id that is not there is
one FileNotFoundError naming the id, the revision and the cache folder. The environment (``HF_HUB_OFFLINE``,
``HF_HUB_CACHE``, ``HF_HOME``) is read at each call, with huggingface_hub's precedence, so a variable set
after ``import huggingface_hub`` still counts. ``huggingface_hub`` is an optional dependency (``pip install
'ssmkit[hub]'``), imported only when an id is resolved; without it an id is one ImportError saying so.

Glossary: Hub id — "org/name" of a model repository on huggingface.co; revision — a branch, tag or
40-hex commit hash (default "main"); snapshot — the folder of one commit in the cache; cache —
``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import os
import re
from fnmatch import fnmatch
from pathlib import Path

from ssmkit.models.folder import QUANTIZED_WEIGHTS, WEIGHT_FILES, not_a_model_folder

# Files a model folder needs besides its weights: the config, generation defaults, and every tokenizer
# file transformers' AutoTokenizer reads (GPT-NeoX tokenizer.json in the state-spaces repos, BPE or
# sentencepiece files elsewhere, the chat template).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# An id: two parts of letters, digits, "-", "_", "." (not starting with "-" or "."; no "--" or ".."),
# at most 96 characters each — the rule the Hub applies to repo names.
_ID_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
_REPO_ID = re.compile(rf"{_ID_PART}/{_ID_PART}")
_INSTALL = "pip install 'ssmkit[hub]'"


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub model id ("org/name")."""
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith(".")


def offline_from_env() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) set to 1/true/yes/on, read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir_from_env() -> Path:
    """The Hub cache folder the environment names now, with huggingface_hub's precedence:
    HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE (legacy), $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub,
    ~/.cache/huggingface/hub."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.path.expandvars(os.environ[key])).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def model_files(repo_files: list[str]) -> list[str]:
    """The files of a repo (top-level names) that a model folder needs: the config and tokenizer files
    present, and one set of weights — model.int8.safetensors (a quantized folder), else model.safetensors,
    else model.safetensors.index.json with its shards, else pytorch_model.bin.index.json with its shards,
    else pytorch_model.bin."""
    present = set(repo_files)
    wanted = [f for f in (*CONFIG_FILES, *TOKENIZER_FILES) if f in present]
    single_hf, index_hf, shards_hf = WEIGHT_FILES["hf"]
    single_pt, index_pt, shards_pt = WEIGHT_FILES["mamba-ssm"]
    if QUANTIZED_WEIGHTS in present:  # an ssmkit-quantized folder has only this one
        return [*wanted, QUANTIZED_WEIGHTS]
    if single_hf in present:  # the order ssmkit.models.folder.read_weights reads them in
        return [*wanted, single_hf]
    if index_hf in present:
        return [*wanted, index_hf, *sorted(f for f in present if fnmatch(f, shards_hf))]
    if index_pt in present:
        return [*wanted, index_pt, *sorted(f for f in present if fnmatch(f, shards_pt))]
    if single_pt in present:
        return [*wanted, single_pt]
    return wanted


def _import_hub(name: str):
    """``huggingface_hub``, or one ImportError saying how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            f"{name!r} is not a local folder, and loading a model by Hub id needs huggingface_hub: {_INSTALL}"
        ) from None
    return huggingface_hub


def _snapshot(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    files: list[str] | None = None,
    required: str = "config.json",
) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` in the cache, fetched first unless offline.

    ``files`` (default :func:`model_files` of the repo) are fetched; ``required`` must be in the repo."""
    hub = _import_hub(repo_id)
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_dir_from_env()
    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision is not None else "")
    if local_files_only is None:
        offline, why = offline_from_env(), "HF_HUB_OFFLINE is set"
    else:
        offline, why = bool(local_files_only), "local_files_only=True"
    if not offline:
        try:
            listing = hub.HfApi().list_repo_files(repo_id, revision=revision)
        except GatedRepoError:
            raise PermissionError(
                f"Hub model {repo_id!r} is gated: accept its terms on huggingface.co and log in "
                "(`hf auth login`), then retry"
            ) from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"Hub model {repo_id!r} has no revision {revision!r}") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(
                f"{repo_id!r} is neither a local folder nor a model on the Hugging Face Hub (a private "
                "repo needs `hf auth login`)"
            ) from None
        except Exception as err:
            # no network, a proxy, the Hub down: use the cache, as snapshot_download itself does
            first = str(err).splitlines()[0] if str(err) else ""
            offline, why = True, f"the Hub could not be reached: {type(err).__name__}: {first}"
        else:
            wanted = model_files(listing) if files is None else [f for f in files if f in set(listing)]
            if required not in wanted:
                raise FileNotFoundError(
                    f"Hub repo {at} has no {required}, which ssmkit needs "
                    f"(it holds {', '.join(sorted(listing)[:8])}{', ...' if len(listing) > 8 else ''})"
                )
            return Path(
                hub.snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=wanted)
            )
    try:
        folder = hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=True, allow_patterns=[required]
        )
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError (and its IncompleteSnapshotError)
        raise FileNotFoundError(
            f"{at} is not a local folder, and not in the Hugging Face cache {cache} ({why}): download it "
            "once with network access, or set HF_HOME / HF_HUB_CACHE to a cache that holds it"
        ) from None
    folder = Path(folder)
    if not (folder / required).is_file():
        raise FileNotFoundError(
            f"the cached snapshot of {at} in {folder} has no {required} ({why}): download it again "
            "with network access"
        )
    return folder


def _local(name_or_path: str | os.PathLike, revision: str | None) -> Path | None:
    """``name_or_path`` as a local folder; None when it is a Hub id to resolve; an error when it is a
    file, or names nothing and is not an id."""
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids, but {path} is a local folder")
        return path
    if path.exists():
        raise NotADirectoryError(not_a_model_folder(path))
    if isinstance(name_or_path, str) and is_repo_id(name_or_path):
        return None
    raise FileNotFoundError(not_a_model_folder(path))  # a path, not of the form org/name


def resolve(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The local model folder for ``name_or_path``: an existing folder as it is, else the cached snapshot
    of the Hub id ``org/name`` at ``revision`` (fetched first unless offline; see the module docstring).

    Args:
        name_or_path: a folder, or a Hub id such as "state-spaces/mamba-130m-hf".
        revision: branch, tag or commit hash of a Hub id (default "main"); an error for a folder.
        cache_dir: the Hub cache folder (default: the environment's, see :func:`cache_dir_from_env`).
        local_files_only: True never touches the network; None follows ``HF_HUB_OFFLINE``.
    Returns:
        the folder holding config.json, the weights and the tokenizer files.
    Raises:
        FileNotFoundError / NotADirectoryError / ValueError / PermissionError (one line naming the name,
        the revision and the cache), ImportError when an id is given without huggingface_hub.
    """
    folder = _local(name_or_path, revision)
    if folder is not None:
        return folder
    return _snapshot(str(name_or_path), revision, cache_dir, local_files_only)


def resolve_tokenizer(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """:func:`resolve` for a tokenizer: a local file or folder as it is, else the cached snapshot of a Hub
    id holding its tokenizer files only (``tokenizer.json`` required)."""
    path = Path(name_or_path)
    if path.is_file() or path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids, but {path} is a local path")
        return path
    if not (isinstance(name_or_path, str) and is_repo_id(name_or_path)):
        raise FileNotFoundError(
            f"tokenizer {path} does not exist (nor is it a Hub id of the form org/name, e.g. "
            "EleutherAI/gpt-neox-20b)"
        )
    return _snapshot(
        name_or_path,
        revision,
        cache_dir,
        local_files_only,
        files=list(TOKENIZER_FILES),
        required="tokenizer.json",
    )
