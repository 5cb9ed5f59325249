"""Hub ids: which files of a repo the analysis needs, fetched through huggingface_hub's cache.

What is fetched (:func:`weight_files`, applied to the repo's file list at the resolved commit):

1. ``config.json`` (when the repo has one) and the safetensors weights: ``model.safetensors.index.json`` and the
   shards it names, else ``model.safetensors``, else every top-level ``*.safetensors``;
2. otherwise, for a GGUF repo, exactly one ``.gguf`` file: the one named by ``gguf_file`` (CLI ``--gguf-file``),
   else the highest-precision one by :data:`GGUF_PREFERENCE` (the analysis dequantises, so the finest storage
   loses least; ties go to the alphabetically first name); split GGUF files (``-00001-of-0000N.gguf``) are not read;
3. otherwise pickle weights (``pytorch_model.bin.index.json`` + shards, or ``pytorch_model.bin``) only with
   ``allow_pickle=True``.

Tokenizers, READMEs, optimizer states and every other file are never downloaded.

Order of resolution: with ``HF_HUB_OFFLINE`` set (huggingface_hub's own switch) only the local cache is used; else
the revision (default ``main``) is resolved to a commit sha with one API call, and each file is fetched with
``hf_hub_download`` at that sha, which returns a cached file without any network request.  When the Hub cannot be
reached, a revision already in the cache is used.  Tokens come from huggingface_hub (``HF_TOKEN``, the stored
login) and pass through no hf-flag code.  Every failure is one :class:`~hf_flag.errors.WeightSourceError` line
naming the repo and what to do.  A download interrupted by a dropped connection is resumed by huggingface_hub
(HTTP ``Range``); files completed before a crash stay in the cache and are not fetched again.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from hf_flag.errors import WeightSourceError

CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
#: GGUF storage types, finest first: the default choice among several ``.gguf`` files of a repo
GGUF_PREFERENCE = ("F32", "BF16", "F16", "Q8_0", "Q8_K", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M",
                   "Q4_K_S", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


@dataclass(frozen=True)
class HubSnapshot:
    """A resolved Hub model: the commit it was read at and the local files (in huggingface_hub's cache)."""

    repo_id: str
    revision: Optional[str]  # as asked (None: the default branch)
    sha: str  # the commit the files belong to
    files: tuple[str, ...]  # repo paths fetched, config first
    folder: Path  # the snapshot folder holding them
    sizes: dict  # repo path -> bytes (None where the Hub did not say), every file of the commit

    def provenance(self, file_format: str) -> dict:
        return {"source": "hub", "repo_id": self.repo_id, "revision": self.revision or "main", "sha": self.sha,
                "files": list(self.files), "format": file_format}


def gguf_choice(names: Sequence[str]) -> Optional[str]:
    """The ``.gguf`` file a repo is read through when none is named: finest storage by :data:`GGUF_PREFERENCE`."""
    ggufs = sorted(n for n in names if n.endswith(".gguf") and "/" not in n and not _SPLIT_GGUF.search(n))
    if not ggufs:
        return None

    def rank(name: str) -> int:
        tags = re.split(r"[-._]", name.upper().removesuffix(".GGUF"))
        joined = "_".join(tags)
        for i, tag in enumerate(GGUF_PREFERENCE):
            if re.search(rf"(^|_){re.escape(tag)}($|_)", joined):
                return i
        return len(GGUF_PREFERENCE)

    return min(ggufs, key=lambda n: (rank(n), n))


def weight_files(repo_id: str, names: Sequence[str], *, gguf_file: Optional[str] = None,
                 allow_pickle: bool = False) -> list[str]:
    """Repo paths to fetch first (see the module docstring); shards named by an index are added after it is read.

    Raises :class:`WeightSourceError` when the repo has none of the weight files the analysis reads.
    """
    names = set(names)
    config = [CONFIG] if CONFIG in names else []
    if gguf_file is not None:
        if gguf_file not in names:
            listed = ", ".join(sorted(n for n in names if n.endswith(".gguf"))) or "none"
            raise WeightSourceError(f"Hub model {repo_id!r} has no file {gguf_file!r} (GGUF files: {listed}); "
                                    f"pass one of them to --gguf-file")
        return [gguf_file]
    if SAFETENSORS_INDEX in names:
        return config + [SAFETENSORS_INDEX]
    if SAFETENSORS_SINGLE in names:
        return config + [SAFETENSORS_SINGLE]
    top = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    if top:
        return config + top
    chosen = gguf_choice(list(names))
    if chosen is not None:
        return [chosen]
    pickles = [PICKLE_INDEX] if PICKLE_INDEX in names else [PICKLE_SINGLE] if PICKLE_SINGLE in names else []
    if pickles and allow_pickle:
        return config + pickles
    if pickles:
        raise WeightSourceError(f"Hub model {repo_id!r} has only pickle weights ({pickles[0]}), which can run code "
                                f"when loaded; pass --allow-pickle (allow_pickle=True) to read them with "
                                f"torch.load(weights_only=True)")
    raise WeightSourceError(f"Hub model {repo_id!r} has no weights hf-flag reads (*.safetensors, one *.gguf, or "
                            f"pytorch_model.bin with --allow-pickle); check the repo id or pass a local folder")


def shard_names(index_path: Path) -> list[str]:
    """The shard files a ``*.index.json`` names, sorted (``model-00001-of-0000N...``: the checkpoint's layer order)."""
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightSourceError(f"shard index {Path(index_path).name!r} is not a valid index ({exc}); the repo's "
                                f"index is broken, pass a local folder instead") from None


def offline() -> bool:
    """huggingface_hub's offline switch (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def resolve(repo_id: str, *, revision: Optional[str] = None, gguf_file: Optional[str] = None,
            allow_pickle: bool = False, shards: bool = True) -> HubSnapshot:
    """Fetch (or find in the cache) the files the analysis reads; see the module docstring.

    ``shards=False`` fetches the config and the index only (the streaming source fetches shards itself).
    """
    if offline():
        sha, names = _cached_listing(repo_id, revision, reason="HF_HUB_OFFLINE is set")
    else:
        try:
            sha, names = _remote_listing(repo_id, revision)
        except transport_errors() as exc:
            sha, names = _cached_listing(repo_id, revision, reason=f"the Hub is unreachable ({_first_line(exc)})")
    files = weight_files(repo_id, list(names), gguf_file=gguf_file, allow_pickle=allow_pickle)
    paths = [download(repo_id, sha, f) for f in files]
    _remember_ref(repo_id, revision or "main", sha)
    if shards and files[-1].endswith(".index.json"):
        for shard in shard_names(paths[-1]):
            files.append(shard)
            paths.append(download(repo_id, sha, shard))
    return HubSnapshot(repo_id, revision, sha, tuple(files), Path(paths[0]).parent, names)


def _remote_listing(repo_id: str, revision: Optional[str]) -> tuple[str, dict[str, Optional[int]]]:
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)  # sizes: --max-disk
    except transport_errors():
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to one line below, or re-raised (internal errors)
        raise _hub_error(repo_id, revision, exc) from None
    return info.sha, {s.rfilename: s.size for s in info.siblings or []}


def _cached_listing(repo_id: str, revision: Optional[str], *, reason: str) -> tuple[str, dict[str, Optional[int]]]:
    """Commit sha and files of ``repo_id`` at ``revision`` in the local cache, or a one-line error.

    huggingface_hub's ``snapshot_download(local_files_only=True)`` finds the snapshot (a branch or tag through the
    cache's ``refs/``, a sha directly); ``allow_patterns=[]`` because only the folder is wanted here: the files the
    analysis reads are checked one by one (:func:`download`), and huggingface_hub 2.x would otherwise refuse a
    snapshot that lacks files hf-flag never reads (tokenizers) when it has the repo's file listing cached."""
    from huggingface_hub import errors, snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(hf_cache_dir()),
                                        local_files_only=True, allow_patterns=[]))
    except errors.LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        raise WeightSourceError(f"Hub model {repo_id!r}{at} is not in the HF cache ({hf_cache_dir()}) and "
                                f"{reason}; {'unset HF_HUB_OFFLINE' if offline() else 'connect'} to download it, or "
                                f"pass a local folder") from None
    return folder.name, {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _remember_ref(repo_id: str, revision: str, sha: str) -> None:
    """Record ``revision -> sha`` in the cache's ``refs/`` (huggingface_hub's cache layout), so an offline run finds
    the branch or tag; files are fetched at the sha, for which huggingface_hub records no ref.

    Written here because huggingface_hub has no public call that records a ref for a sha already resolved: its
    writer (``file_download._cache_commit_hash_for_specific_revision``) is private, ``hf_hub_download`` and
    ``snapshot_download`` record one only when given the branch name (a second resolution, which could land on a
    newer commit than the listing), and ``HfApi.resolve_revision`` (huggingface_hub >= 1.26) would be a second API
    call per model, the listing needing ``files_metadata``."""
    from hf_flag.atomic import atomic_write_text

    ref = _storage(repo_id) / "refs" / revision
    if revision == sha or (ref.is_file() and ref.read_text() == sha):
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ref, sha)


def _storage(repo_id: str) -> Path:
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def download(repo_id: str, sha: str, filename: str) -> str:
    """Local path of ``filename`` of ``repo_id`` at commit ``sha``, fetched into the HF cache if needed."""
    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id, sha, filename):
        return hf_hub_download(repo_id, filename, revision=sha, cache_dir=str(hf_cache_dir()),
                               local_files_only=offline())


def safetensors_header(repo_id: str, sha: str, filename: str):
    """The parsed header (``huggingface_hub.utils.SafetensorsFileMetadata``) of safetensors file ``filename`` of
    ``repo_id`` at ``sha``, read with HTTP range requests (no download of the data)."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id, sha, filename):
        return HfApi().parse_safetensors_file_metadata(repo_id, filename, revision=sha)


@contextlib.contextmanager
def hub_errors(repo_id: str, sha: str, filename: str) -> Iterator[None]:
    """Inside the block, a dropped connection and huggingface_hub's errors (401/403/404, gated, a bad safetensors
    header) become one :class:`WeightSourceError` line naming the repo, the file and what to do; other exceptions
    pass unchanged (internal errors keep their traceback)."""
    try:
        yield
    except transport_errors() as exc:
        raise WeightSourceError(f"download of {filename!r} from Hub model {repo_id!r} failed: the connection dropped "
                                f"({_first_line(exc)}); rerun the same command to resume (finished files stay in the "
                                f"HF cache)") from None
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(repo_id, sha, exc, filename) from None


def delete_cached_file(path: Path) -> None:
    """Remove the snapshot entry ``path`` (a file of one cached commit) from the HF cache, and its blob only when no
    other cached file links to it (another revision's snapshot, or another repo through huggingface_hub's shared
    blob store): huggingface_hub's ``HFCacheInfo.delete_files``.  Clients older than that method keep blobs in the
    repo's own ``blobs/`` only, so there the same rule is applied to the scanned revisions here."""
    from huggingface_hub import scan_cache_dir

    def entry(file: Path) -> tuple[Path, str]:  # the scan's paths are resolved folders, the caller's may not be
        return file.parent.resolve(), file.name

    info = scan_cache_dir(hf_cache_dir())
    every = [f for repo in info.repos for rev in repo.revisions for f in rev.files]
    mine = [f for f in every if entry(f.file_path) == entry(path)]
    if not mine:  # the scan skipped its repo (a broken link in it: see info.warnings): keep the blob, to be safe
        path.unlink(missing_ok=True)
        return
    if hasattr(info, "delete_files"):
        info.delete_files(*mine).execute()
        return
    others = {f.blob_path for f in every if f not in mine}
    path.unlink(missing_ok=True)
    if mine[0].blob_path != path and mine[0].blob_path not in others:
        mine[0].blob_path.unlink(missing_ok=True)


def _hub_error(repo_id: str, revision: Optional[str], exc: Exception, filename: Optional[str] = None) -> Exception:
    """huggingface_hub's exception -> one :class:`WeightSourceError` line naming the repo and the remedy; other
    exceptions are returned unchanged (internal errors keep their traceback)."""
    from huggingface_hub import errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    what = f"Hub model {repo_id!r}"
    if isinstance(exc, errors.GatedRepoError):
        return WeightSourceError(f"{what} is gated (HTTP {status}): accept its conditions on its Hub page with your "
                                 f"account, then use that account's token (HF_TOKEN or `hf auth login`)")
    if isinstance(exc, errors.RepositoryNotFoundError) or (isinstance(exc, errors.HfHubHTTPError) and status == 401):
        return WeightSourceError(f"{what} was not found, or is private and your token may not read it (HTTP "
                                 f"{status}); check the id, or log in with a token that can read it (HF_TOKEN or "
                                 f"`hf auth login`)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return WeightSourceError(f"{what} has no revision {revision!r} (HTTP {status}); pass a branch, tag or commit "
                                 f"sha that exists to --revision")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return WeightSourceError(f"{what} lists {filename!r} but the Hub does not serve it (HTTP {status}); "
                                 f"retry later or pass a local folder")
    if isinstance(exc, errors.HfHubHTTPError) and status == 403:
        return WeightSourceError(f"{what}: your token may not read it (HTTP {status}); use a token with read access "
                                 f"(HF_TOKEN or `hf auth login`)")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return WeightSourceError(f"{what}: {filename or 'a file'} is not in the HF cache and HF_HUB_OFFLINE is set; "
                                 f"unset HF_HUB_OFFLINE to download it")
    if isinstance(exc, errors.HfHubHTTPError):
        return WeightSourceError(f"{what}: the Hub answered HTTP {status} ({_first_line(exc)}); retry later")
    if isinstance(exc, errors.SafetensorsParsingError):
        return WeightSourceError(f"{what}: the safetensors header of {filename!r} is not valid ({_first_line(exc)}); "
                                 f"the repo's file is broken, pass a local folder instead")
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return WeightSourceError(f"download of {filename!r} from {what} was cut short ({_first_line(exc)}); rerun "
                                 f"the same command")
    return exc


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2, httpx or requests)."""
    classes: list[type[BaseException]] = []
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            classes.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, read from the environment *now* (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)

