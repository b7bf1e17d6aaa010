"""What a run needs from the Hugging Face hub: whether a model or dataset is in the local
cache, whether the hub can be reached, and the one-line refusal when neither holds (instead
of minutes of download retries ending in a traceback)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from tokcomp.errors import UsageError

#: A hub repository id: 'llava-hf/llava-1.5-7b-hf', 'lmms-lab/VQAv2'.
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
#: How long the reachability probe waits (seconds).
PROBE_TIMEOUT = 5.0
_TRUE = ("1", "true", "yes", "on")


def is_repo_id(text: str) -> bool:
    """Whether `text` has the form of a hub repository id (owner/name)."""
    return bool(_REPO_ID.fullmatch(text))


def is_cached(repo: str, kind: str) -> bool:
    """Whether the local Hugging Face caches hold `repo` (kind 'model' or 'dataset')."""
    from huggingface_hub import constants

    hub_cache = Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo.replace('/', '--')}"
    if kind == "model":
        return (hub_cache / "snapshots").is_dir()
    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()
    return hub_cache.is_dir() or (datasets_cache / repo.replace("/", "___")).is_dir()


def offline_setting() -> str | None:
    """The environment variable that puts Hugging Face libraries offline, if one is set."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


@functools.cache
def reachable() -> bool:
    """Whether the hub answers within PROBE_TIMEOUT (asked once per process, no retries)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT)
    except Exception:  # any failure to get an answer means: not reachable from here
        return False
    return True


def require(repo: str, kind: str, alternative: str, needed_by: str = "this run") -> None:
    """Refuse in one line when `repo` (a 'model' or 'dataset') is not cached and the hub
    cannot be reached; the message names the download and `alternative` (the local way)."""
    if is_cached(repo, kind):
        return
    setting = offline_setting()
    if setting is None and reachable():
        return
    why = f"{setting} is set" if setting else "the hub cannot be reached from here"
    option = " --repo-type dataset" if kind == "dataset" else ""
    raise UsageError(
        f"{needed_by} needs the {kind} {repo} from the Hugging Face hub: it is not in "
        f"the local cache and {why}; download it once where there is network access (hf "
        f"download {repo}{option}) into this machine's cache (HF_HOME), or {alternative}"
    )
