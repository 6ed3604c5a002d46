"""The one writer: every folder and file secateurs produces is built beside its target and swapped
in whole, so the previous output stays complete until the new one is, and nothing outside the
output (least of all the input model) is touched.

Rules (checked by `check_output_dir` / `check_output_file` before any long work starts):
* the output may not be, contain, or lie inside an input; empty and root-like paths (/, the home
  folder, the working directory or one of its parents) are refused;
* a symbolic link at the output path is refused (checked on the path as given, before resolving);
* an existing output is replaced only with force, and only when secateurs wrote it as the same
  kind of output (the MARKER file of a folder, with its "kind": a model is never replaced by a
  report, a checkpoint never by a model; a pruning plan alone marks a model folder written before
  the marker existed), or it is an empty folder; a single result file carries the same marker
  under the key "written_by";
* nothing is deleted that the run did not create, except the one output being replaced;
* one run at a time per output: a run claims its outputs (an exclusive lock held until it ends),
  and a second run that would write the same one is refused;
* stale temporary folders of killed runs (`.NAME.tmp-PID-*`, `.NAME.old-PID-*` whose process is
  gone) are removed by the next run that writes NAME; an `.old-` folder whose swap was cut short
  is put back when NAME itself is missing;
* nothing non-finite is saved (`check_finite`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from secateurs.errors import OutputExistsError, SecateursError
from secateurs.runtime import threads
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
    """The path resolved, refusing an empty name and a symbolic link at the path itself (checked on
    the path as given: after resolving, the link is gone)."""
    if path is None or not str(path).strip():
        raise SecateursError(f"{what} is empty; give a folder or file name")
    given = Path(path).expanduser()
    if given.is_symlink():
        raise OutputExistsError(f"{what} {given} is a symbolic link; secateurs writes only to plain paths (the link "
                                "and what it points to are left alone): give the real path or another name")
    return given.resolve()


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
    return output_kind(folder) is not None


def output_kind(folder: Path) -> str | None:
    """The kind of output secateurs wrote in `folder` ('model', 'report', 'recovery-checkpoint', ...),
    'model' for a folder with a pruning plan written before the marker existed, None otherwise (also
    for a marker that is not secateurs' JSON)."""
    marker = folder / MARKER
    if marker.is_file() and not marker.is_symlink():
        record = marker_record(folder)
        return str(record.get("kind") or "model") if record is not None else None
    if any((folder / name).is_file() for name in LEGACY_MARKERS):
        return "model"
    return None


def marker_record(folder: Path) -> dict | None:
    """The marker's JSON ({"writer": "secateurs", "version", "kind", ...}) or None."""
    try:
        with open(folder / MARKER, "rb") as handle:
            record = json.loads(handle.read(65536).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("writer") == "secateurs" else None


def _refuse_other_kind(out: Path, kind: str | None, what: str) -> None:
    found = output_kind(out)
    if found is None:
        raise OutputExistsError(f"{what} {out} exists and was not written by secateurs (no {MARKER} or "
                                f"{LEGACY_MARKERS[0]}); --force replaces only secateurs outputs and empty "
                                "folders: remove it yourself or choose another path")
    if kind is not None and found != kind:
        raise OutputExistsError(f"{what} {out} holds a secateurs {found} output, not a {kind}; --force replaces "
                                f"only an output of the same kind: choose another path")


# -- one run per output: an exclusive lock per resolved path, held until the run ends ---------------
_CLAIMS: dict[Path, int] = {}


def _lock_folder() -> Path:
    folder = Path(tempfile.gettempdir()) / f"secateurs-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def claim(out: Path, what: str = "output") -> None:
    """Hold `out` (a resolved path) for this process until `release(out)` or the process ends; a path
    another running secateurs process holds is refused. Locks live in the system's temporary folder,
    one file per path (nothing is written beside the output), and die with the process that holds
    them, so a killed run never blocks the next one."""
    if out in _CLAIMS:
        return
    lock = _lock_folder() / (hashlib.sha256(os.fsencode(out)).hexdigest()[:40] + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise OutputExistsError(f"{what} {out} is being written by another secateurs run ({holder}); wait for it "
                                "to end or choose another path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    _CLAIMS[out] = fd


def release(out: Path) -> None:
    fd = _CLAIMS.pop(out, None)
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    """End of a command: every output this process claimed is free again."""
    for out in list(_CLAIMS):
        release(out)


def check_output_dir(out_dir: str | os.PathLike, force: bool = False, inputs: Iterable = (),
                     what: str = "output folder", kind: str | None = "model") -> Path:
    """Validate an output folder before any work (see the module docstring) and claim it for this
    run; returns it resolved. `kind`: what the run writes there (an existing folder is replaced only
    when it holds secateurs' output of that kind; None: any kind)."""
    out = _resolve(out_dir, what)
    _refuse_root_like(out, what)
    refuse_overlap(out, inputs, what)
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise OutputExistsError(f"{what} {out} exists and is not a folder; secateurs replaces only folders "
                                    "it wrote: remove it or choose another path")
        if not force:
            raise OutputExistsError(f"{what} {out} already exists; choose another path or pass --force to "
                                    "replace it (only an output secateurs wrote is replaced)")
        if any(out.iterdir()):
            _refuse_other_kind(out, kind, what)
    _check_writable(out, what)
    claim(out, what)
    return out


def check_output_file(path: str | os.PathLike, inputs: Iterable = (), suffixes: tuple[str, ...] = (".json",),
                      what: str = "output file", force: bool = False, kind: str | None = None,
                      replaceable=None) -> Path:
    """Validate an output file before any work and claim it for this run: a file name with one of
    `suffixes`, not a folder, not a symbolic link, not an input, in a writable folder; inside an input
    folder only beside a model secateurs wrote (eval.json next to a pruned model). An existing file is
    replaced only with force and only when it is secateurs' result of this `kind` (`replaceable(path)`
    decides for formats that are not JSON results). Only this one path is ever written."""
    out = _resolve(path, what)
    sources = [Path(s).expanduser().resolve() for s in inputs if s and str(s).strip()]
    holding = [src for src in sources if src in out.parents and src.is_dir()]
    for src in holding:  # a result beside a model secateurs wrote (runs/x/eval.json) is the normal case
        if not written_by_secateurs(src):
            raise OutputExistsError(f"{what} {out} lies inside the input {src}, which secateurs did not write; the "
                                    "input model and files are never written to: choose a path outside it")
    refuse_overlap(out, [s for s in sources if s not in holding], what)
    if suffixes and out.suffix.lower() not in suffixes:
        raise SecateursError(f"{what} {out} must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise SecateursError(f"{what} {out} is a folder; give a file name such as {out / ('result' + suffixes[0])}")
    if out.exists():
        ours = replaceable(out) if replaceable is not None else result_kind(out) in (kind, "legacy-result")
        if not ours:
            raise OutputExistsError(f"{what} {out} exists and is not a secateurs {kind or 'output'} file; it is never "
                                    "replaced, even with --force: choose another file name")
        if not force:
            raise OutputExistsError(f"{what} {out} already exists; choose another file name or pass --force to "
                                    "replace it")
    _check_writable(out, what)
    claim(out, what)
    return out


def result_marker(kind: str) -> dict:
    """What a JSON result secateurs writes carries under "written_by" (see result_kind)."""
    return {"writer": "secateurs", "version": __version__, "kind": kind}


def result_kind(path: Path) -> str | None:
    """The kind of a JSON result secateurs wrote ("eval", "bench", ...), 'legacy-result' for one written
    before results carried a marker (an object with 'models' and 'machine'), None otherwise."""
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read(64 * 2**20).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    marker = data.get("written_by")
    if isinstance(marker, dict) and marker.get("writer") == "secateurs" and isinstance(marker.get("kind"), str):
        return marker["kind"]
    return "legacy-result" if "models" in data and "machine" in data and "written_by" not in data else None


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


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the file system holding `path` (or its nearest existing parent)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def check_finite(tensors: Mapping, where: str) -> None:
    """Last check before saving: a NaN or inf weight would make a model that loads and is garbage."""
    import torch  # noqa: PLC0415 (torch-free for secateurs --help, 0.06 s; torch + transformers take 4 s)

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


# -- faults while writing: which output, how big, so that a full disk is reported in one line -------
_LAST_FAILED_WRITE: dict = {}
_DISK_FULL = re.compile(r"no space left on device|os error 28|storagefull|disk quota exceeded", re.IGNORECASE)
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")  # numpy's tofile on a full disk


def _failed_write(target: Path, expected_bytes: int | None) -> None:
    _LAST_FAILED_WRITE.clear()
    _LAST_FAILED_WRITE.update(target=target, expected_bytes=expected_bytes)


def disk_full_message(exc: BaseException) -> str | None:
    """One line for a write that failed because the disk (or quota) is full, whatever raised it (an
    OSError, safetensors' or numpy's own errors): the output, the bytes it needed where known, the
    bytes free there. None for any other failure."""
    text = str(exc)
    short = _SHORT_WRITE.search(text)
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or bool(_DISK_FULL.search(text))
    if not (full or (short and isinstance(exc, OSError))):
        return None
    target = _LAST_FAILED_WRITE.get("target") or (Path(exc.filename) if isinstance(exc, OSError) and
                                                  exc.filename else None)
    needed = _LAST_FAILED_WRITE.get("expected_bytes")
    free = free_bytes(target) if target is not None else None
    amounts = [f"about {needed / 2**20:,.1f} MiB needed" if needed else None,
               f"{free / 2**20:,.1f} MiB free there" if free is not None else None]
    detail = "; ".join(a for a in amounts if a)
    return (f"disk full while writing {target or 'the output'}" + (f" ({detail})" if detail else "") +
            "; nothing was written at the output and any previous output is intact: free some space (or choose "
            "another path) and run again")


@contextmanager
def write_folder(out_dir: str | os.PathLike, force: bool = False, inputs: Iterable = (), kind: str = "model",
                 what: str = "output folder", marker: Mapping | None = None,
                 expected_bytes: int | None = None) -> Iterator[Path]:
    """`with write_folder(out) as tmp:` write into tmp; on success it replaces `out` whole (see the
    module docstring); on any failure tmp is removed and `out` is left as it was. The folder's
    marker records `kind` and the entries of `marker` (a checkpoint's run identity);
    `expected_bytes` (its size, where the writer knows it) goes into a disk-full message."""
    out = check_output_dir(out_dir, force, inputs, what, kind=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp

        record = {**(marker or {}), "writer": "secateurs", "version": __version__, "kind": kind,
                  "threads": threads.describe()}  # the torch threads of each kind of work that made it
        (tmp / MARKER).write_text(json.dumps(record) + "\n")
        _finish_tree(tmp)
        check_output_dir(out, force, inputs, what, kind=kind)  # nothing foreign appeared there meanwhile
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _failed_write(out, expected_bytes)
        raise
    release(out)


def remove_own_folder(folder: str | os.PathLike, kind: str, identity: Mapping) -> bool:
    """Delete `folder` only if it is secateurs' output of `kind` whose marker carries every entry of
    `identity` (a checkpoint folder of this very run); True when removed."""
    path = Path(folder).expanduser()
    if path.is_symlink() or not path.is_dir():
        return False
    record = marker_record(path)
    if record is None or record.get("kind") != kind or any(record.get(k) != v for k, v in identity.items()):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write one file atomically (temp file beside it, fsync, rename)."""
    with writing_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def writing_file(path: str | os.PathLike, expected_bytes: int | None = None) -> Iterator[Path]:
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
        _failed_write(path, expected_bytes)  # an enclosing write_folder names its folder instead
        raise
