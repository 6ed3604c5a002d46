"""The one writer: every folder and file secateurs produces is built beside its target and swapped
in whole, so the previous output stays complete until the new one is, and nothing outside the
output (least of all the input model) is touched.

Rules (checked by `check_output_dir` / `check_output_file` before any long work starts):
* the output may not be, contain, or lie inside an input; empty and root-like paths (/, the home
  folder, the working directory or one of its parents) are refused;
* an existing folder is replaced only with force, and only when secateurs wrote it (it holds the
  MARKER file or a pruning plan) or it is empty;
* stale temporary folders of killed runs (`.NAME.tmp-PID-*`, `.NAME.old-PID-*` whose process is
  gone) are removed by the next run that writes NAME; an `.old-` folder whose swap was cut short
  is put back when NAME itself is missing;
* nothing non-finite is saved (`check_finite`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from secateurs.errors import OutputExistsError, SecateursError
from secateurs.version import __version__

log = logging.getLogger("secateurs")

MARKER = ".secateurs-output"  # JSON {"writer": "secateurs", "version", "kind"} in every folder we write
LEGACY_MARKERS = ("pruning_plan.json",)  # folders written before the marker existed
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def final_path(path: str | os.PathLike) -> Path:
    """Where `path` will be once the outputs being written around it are swapped in: a folder being
    built inside a demo's temporary folder is shown to the user under its final name."""
    parts = [m.group("name") if (m := _STALE.match(part)) and m.group("kind") == "tmp" else part
             for part in Path(path).parts]
    return Path(*parts)


def _resolve(path: str | os.PathLike, what: str) -> Path:
    if path is None or not str(path).strip():
        raise SecateursError(f"{what} is empty; give a folder or file name")
    return Path(path).expanduser().resolve()


def _refuse_root_like(out: Path, what: str) -> None:
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if out == Path(out.anchor) or out == home or out == cwd or out in cwd.parents or out in home.parents:
        raise SecateursError(f"{what} {out} is the root, the home folder or the working directory (or one of its "
                             "parents); choose a dedicated folder")


def refuse_overlap(out: Path, inputs: Iterable, what: str, existing_only: bool = True) -> None:
    """The output may not be an input, lie inside an input folder, or contain an input (with
    existing_only=False also paths that do not exist yet, e.g. another output of the same run)."""
    for source in inputs:
        if source is None or not str(source).strip():
            continue
        if existing_only and not Path(source).expanduser().exists():
            continue  # a hub id or a name that is not on disk
        src = Path(source).expanduser().resolve()
        if existing_only:
            inside = "the input model and files are never written to"
            contains = "replacing it would destroy the input model or files"
        else:
            inside = contains = "the output folder is replaced whole when the run ends"
        if out == src or src in out.parents:
            raise OutputExistsError(f"{what} {out} is {src} or lies inside it, and {inside}: choose a path outside it")
        if out in src.parents:
            raise OutputExistsError(f"{what} {out} contains {src}; {contains}: choose a path that does not contain it")


def _check_writable(out: Path, what: str) -> None:
    """Fail now, not after the work, when the output's folder cannot be created or written."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SecateursError(f"cannot create {what} {out}: {parent} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".secateurs-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise SecateursError(f"cannot write {what} {out}: {parent} is not writable ({exc.strerror})") from exc


def written_by_secateurs(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (MARKER, *LEGACY_MARKERS))


def check_output_dir(out_dir: str | os.PathLike, force: bool = False, inputs: Iterable = (),
                     what: str = "output folder") -> Path:
    """Validate an output folder before any work (see the module docstring); returns it resolved."""
    out = _resolve(out_dir, what)
    _refuse_root_like(out, what)
    refuse_overlap(out, inputs, what)
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise OutputExistsError(f"{what} {out} exists and is not a folder; secateurs replaces only folders "
                                    "it wrote: remove it or choose another --out")
        if not force:
            raise OutputExistsError(f"{what} {out} already exists; choose another --out or pass --force to "
                                    "replace it")
        if any(out.iterdir()) and not written_by_secateurs(out):
            raise OutputExistsError(f"{what} {out} exists and was not written by secateurs (no {MARKER} or "
                                    f"{LEGACY_MARKERS[0]}); --force replaces only secateurs outputs and empty "
                                    "folders: remove it yourself or choose another --out")
    _check_writable(out, what)
    return out


def check_output_file(path: str | os.PathLike, inputs: Iterable = (), suffixes: tuple[str, ...] = (".json",),
                      what: str = "output file", siblings: tuple[str, ...] = ()) -> Path:
    """Validate an output file before any work: a file name with one of `suffixes`, not a folder,
    not an input, in a writable folder. Inside an input folder only beside a model secateurs wrote
    (eval.json / bench.json next to a pruned model), and never over one of that model's files.
    `siblings`: suffixes of companion files written beside it (bench's .md), checked the same way."""
    out = _resolve(path, what)
    sources = [Path(s).expanduser().resolve() for s in inputs if s and str(s).strip()]
    holding = [src for src in sources if src in out.parents and src.is_dir()]
    for src in holding:  # a result beside a model secateurs wrote (runs/x/eval.json) is the normal case
        if not written_by_secateurs(src):
            raise OutputExistsError(f"{what} {out} lies inside the input {src}, which secateurs did not write; the "
                                    "input model and files are never written to: choose a path outside it")
        for target in (out, *(out.with_suffix(x) for x in siblings)):
            if target.exists() and not _is_result_file(out):
                raise OutputExistsError(f"{what}: {target} is one of the input model's files, not a secateurs "
                                        "result; choose another file name")
    refuse_overlap(out, [s for s in sources if s not in holding], what)
    if suffixes and out.suffix.lower() not in suffixes:
        raise SecateursError(f"{what} {out} must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise SecateursError(f"{what} {out} is a folder; give a file name such as {out / ('result' + suffixes[0])}")
    if out.is_symlink():
        raise SecateursError(f"{what} {out} is a symbolic link; give a plain file name")
    _check_writable(out, what)
    return out


def _is_result_file(path: Path) -> bool:
    """A JSON result secateurs wrote (eval/bench): an object with 'models' and 'machine'."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "models" in data and "machine" in data


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the temp/old folders that killed runs left beside `out` (restoring an old output
    whose swap was cut short); returns what was removed or restored."""
    touched = []
    if not out.parent.is_dir():
        return touched
    for entry in sorted(out.parent.iterdir()):
        match = _STALE.match(entry.name)
        if not match or match["name"] != out.name or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not out.exists() and entry.is_dir() and written_by_secateurs(entry):
            os.replace(entry, out)
            log.warning("secateurs: restored %s from %s (a run was killed while swapping it)", out, entry.name)
        else:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            log.warning("secateurs: removed %s, left by a killed run", entry)
        touched.append(entry)
    return touched


def check_finite(tensors: Mapping, where: str) -> None:
    """Last check before saving: a NaN or inf weight would make a model that loads and is garbage."""
    import torch

    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta":
            if not bool(torch.isfinite(value).all()):
                raise SecateursError(f"{where}: {name} holds NaN or infinite values; nothing was saved")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish_tree(root: Path) -> None:
    """Permissions as for any file the user creates (mkdtemp and some writers make 0600/0700
    files), and everything on disk before the swap."""
    mask = _umask()
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(folder)


def _fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, out: Path) -> None:
    """tmp (complete) becomes out. With an old output present it is exchanged in one step where
    the system allows (no moment without an output), else moved aside first; the old one is
    deleted only after the new one is in place."""
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


@contextmanager
def write_folder(out_dir: str | os.PathLike, force: bool = False, inputs: Iterable = (), kind: str = "model",
                 what: str = "output folder") -> Iterator[Path]:
    """`with write_folder(out) as tmp:` write into tmp; on success it replaces `out` whole (see the
    module docstring); on any failure tmp is removed and `out` is left as it was."""
    out = check_output_dir(out_dir, force, inputs, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"writer": "secateurs", "version": __version__, "kind": kind}) + "\n")
        _finish_tree(tmp)
        check_output_dir(out, force, inputs, what)  # nothing foreign appeared there meanwhile
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write one file atomically (temp file beside it, fsync, rename)."""
    with writing_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def writing_file(path: str | os.PathLike) -> Iterator[Path]:
    """`with writing_file(p) as tmp:` for writers that need a path (safetensors, matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(name)
        with open(name, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(name, 0o666 & ~_umask())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
