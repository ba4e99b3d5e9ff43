"""Weights from the Hugging Face Hub: `--hf-repo ORG/NAME [--revision REV]` and `hf://ORG/NAME/FILE` paths.

    resolve_path("hf://kyutai/moshiko-pytorch-bf16/model.safetensors")   # -> a file in the local HF cache
    resolve_path("/local/model.safetensors")                              # -> unchanged (local paths work as before)
    resolve_repo("kyutai/moshiko-pytorch-bf16", revision="main")         # -> the snapshot dir (config.json + files)

Everything goes through `huggingface_hub`, which owns the cache layout (`$HF_HUB_CACHE`, default
`$HF_HOME/hub`: `models--ORG--NAME/{blobs,snapshots/<commit>,refs/<branch>}`), offline mode (`HF_HUB_OFFLINE=1`:
the cache only, no network) and revisions (a branch, tag or commit hash; a commit pins the exact files). A file
already in the cache is never downloaded again. As the reference's `hf_get`, `file://PATH` forces a local path.

A repository, revision or file that cannot be found is a `HubError` (a ValueError) with a one-line message
naming it; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("moshi_jax.hub")

SCHEME = "hf://"
# The released names, used when a repository's config.json does not name its files (reference loaders.py).
MOSHI_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TEXT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
LORA_NAME = "lora.safetensors"  # moshi-finetune's adapter file name


class HubError(ValueError):
    """A Hugging Face repository / revision / file that cannot be resolved (one-line message naming it)."""


def is_hub_path(spec: str | Path | None) -> bool:
    return isinstance(spec, str) and spec.startswith(SCHEME)


def split_hub_path(spec: str) -> tuple[str, str, str | None]:
    """`hf://ORG/NAME/PATH/IN/REPO[@REV]` -> (repo_id, filename, revision or None). The filename may be empty
    (`hf://ORG/NAME`: the repository itself)."""
    rest = spec.removeprefix(SCHEME)
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision:
            raise HubError(f"{spec}: empty revision after '@'")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise HubError(f"{spec}: expected hf://ORG/NAME/FILE (a Hugging Face repository id and a file in it)")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _label(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _repo_cached(repo_id: str) -> bool:
    from huggingface_hub.file_download import repo_folder_name

    return (Path(_cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir()


def _revision_cached(repo_id: str, revision: str) -> bool:
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(_cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model")
    return (folder / "snapshots" / revision).is_dir() or (folder / "refs" / revision).is_file()


def download(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of a model repository, from the cache or downloaded into it. HubError names what is missing."""
    from huggingface_hub import errors, hf_hub_download

    where = _label(repo_id, revision)
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision))
    except errors.LocalEntryNotFoundError:  # before EntryNotFoundError: it is a subclass
        if not _offline():
            raise HubError(f"cannot download {filename} from Hugging Face repository {where} (no connection?) "
                           f"and it is not in the cache {_cache_dir()}") from None
        if not _repo_cached(repo_id):
            raise HubError(f"Hugging Face repository not in the local cache (offline mode, HF_HUB_OFFLINE=1): "
                           f"{repo_id} (cache {_cache_dir()})") from None
        if revision is not None and not _revision_cached(repo_id, revision):
            raise HubError(f"revision {revision} of Hugging Face repository {repo_id} is not in the local cache "
                           f"(offline mode, HF_HUB_OFFLINE=1)") from None
        raise HubError(f"file not in the local cache of Hugging Face repository {where} (offline mode, "
                       f"HF_HUB_OFFLINE=1): {filename}") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"Hugging Face repository not found: {repo_id} (or it is private / gated)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"Hugging Face repository {repo_id} has no revision {revision!r}") from None
    except errors.EntryNotFoundError:
        raise HubError(f"file not found in Hugging Face repository {where}: {filename}") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"Hugging Face repository {where}, file {filename}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # malformed repo id / filename
        raise HubError(f"Hugging Face repository {where}, file {filename}: {str(e).splitlines()[0]}") from None
    log.info("hf://%s/%s -> %s", where, filename, path)
    return path


def resolve_path(spec: str | Path | None, revision: str | None = None) -> Path | None:
    """A weights / tokenizer path: `hf://ORG/NAME/FILE[@REV]` -> the cached file (`revision` applies when the path
    names none); `file://PATH` or any other path -> Path(PATH) unchanged; None -> None."""
    if spec is None:
        return None
    if isinstance(spec, Path):
        return spec
    if spec.startswith("file://"):
        return Path(spec.removeprefix("file://"))
    if not is_hub_path(spec):
        return Path(spec)
    repo_id, filename, rev = split_hub_path(spec)
    if not filename:
        raise HubError(f"{spec}: names a repository, not a file (expected hf://ORG/NAME/FILE)")
    return download(repo_id, filename, rev or revision)


def _config(repo_id: str, revision: str | None) -> dict | None:
    """The repository's config.json, or None for a legacy repository without one (the Moshi 7B)."""
    from huggingface_hub import errors, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    if _offline() and try_to_load_from_cache(repo_id, "config.json", revision=revision) is _CACHED_NO_EXIST:
        return None
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision)
    except errors.RemoteEntryNotFoundError:
        log.warning("Hugging Face repository %s has no config.json: assuming the Moshi 7B (legacy repository)",
                    repo_id)
        return None
    except Exception:  # every other failure: reported by `download`, with its one-line message
        path = download(repo_id, "config.json", revision)
    return json.loads(Path(path).read_text())


def resolve_repo(repo_id: str, revision: str | None = None, *, lm: bool = True, mimi: bool = True,
                 tokenizer: bool = True) -> Path:
    """A Kyutai model repository as a local directory (its cache snapshot) holding config.json and the files it
    names (`moshi_name`, `mimi_name`, `tokenizer_name`, released names by default), as the reference's
    `CheckpointInfo.from_hf_repo` downloads them; only the kinds asked for are fetched. Reads like a
    downloaded repository (`--weights-dir`)."""
    if is_hub_path(repo_id):
        repo_id, filename, rev = split_hub_path(repo_id)
        if filename:
            raise HubError(f"hf://{repo_id}/{filename}: expected a repository (hf://ORG/NAME), not a file")
        revision = rev or revision
    if repo_id.count("/") != 1:
        raise HubError(f"Hugging Face repository id must be ORG/NAME, got {repo_id!r}")
    conf = _config(repo_id, revision) or {}
    wanted = [(lm, conf.get("moshi_name", MOSHI_NAME)), (mimi, conf.get("mimi_name", MIMI_NAME)),
              (tokenizer, conf.get("tokenizer_name", TEXT_TOKENIZER_NAME))]
    snapshot = None
    for want, name in wanted:
        if want:
            if is_hub_path(name):
                raise HubError(f"{repo_id}: config.json names a file of another repository ({name}); not supported")
            path = download(repo_id, name, revision)
            snapshot = path.parents[len(Path(name).parts) - 1]  # <cache>/snapshots/<commit>
    if snapshot is None:
        snapshot = download(repo_id, "config.json", revision).parent
    return snapshot


def repo_file(repo_id: str, key: str, revision: str | None = None) -> Path:
    """One named file of a repository: `key` is "moshi_name", "mimi_name", "tokenizer_name" or "lora_name" (its
    config.json entry, the released name by default)."""
    defaults = {"moshi_name": MOSHI_NAME, "mimi_name": MIMI_NAME, "tokenizer_name": TEXT_TOKENIZER_NAME,
                "lora_name": LORA_NAME}
    conf = _config(repo_id, revision) or {}
    return download(repo_id, conf.get(key, defaults[key]), revision)


def resolve_weights(spec: str | Path | None, key: str = "moshi_name", revision: str | None = None) -> Path | None:
    """Like `resolve_path`, and a bare repository `hf://ORG/NAME[@REV]` means its file `key` (e.g. the LM weights
    `moshi_name` of its config.json)."""
    if is_hub_path(spec):
        repo_id, filename, rev = split_hub_path(spec)
        if not filename:
            return repo_file(repo_id, key, rev or revision)
    return resolve_path(spec, revision)


def resolve_weights_dir(weights_dir: str | None, hf_repo: str | None, revision: str | None = None, **kinds
                        ) -> str | None:
    """The local repository directory of `--weights-dir DIR` (also `hf://ORG/NAME`) or `--hf-repo ORG/NAME`
    (at most one of them); None when neither is given."""
    if weights_dir is not None and hf_repo is not None:
        raise HubError("give either --weights-dir or --hf-repo, not both")
    repo = hf_repo if hf_repo is not None else weights_dir if is_hub_path(weights_dir) else None
    if repo is None:
        if revision is not None and weights_dir is not None:
            raise HubError("--revision applies to --hf-repo (or hf:// paths), not to a local --weights-dir")
        return weights_dir
    return str(resolve_repo(repo, revision, **kinds))
