"""The redirectable view of the machine that every probe reads through.

An :class:`Env` holds a filesystem root (``/`` for the real machine), an
environment mapping (``os.environ``) and a way to run commands. Tests point
the root at a fixture tree; then everything that is not a file (environment
variables, command output, facts about the Python process) comes from a
``_fixture/`` directory inside that tree:

``_fixture/env.json``
    the environment variables (a JSON object of strings).
``_fixture/commands/<name>.txt`` or ``<name>.json``
    the output of command ``<name>`` (``nvidia-smi``, ``ldconfig``); the
    command itself counts as installed only if its file exists in the tree
    (e.g. ``usr/lib/wsl/lib/nvidia-smi``, ``sbin/ldconfig``). The ``.json``
    form is ``{"returncode": 0, "stdout": "...", "timed_out": false}``.
``_fixture/torch.json``, ``_fixture/gpu.json``
    facts the probes would otherwise learn from torch and from the GPU.

Nothing here raises for a missing, unreadable or odd file, and nothing can
block: only regular files are opened (never a FIFO or a device), reads are
bounded, and commands run with a timeout and are abandoned if they do not die.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["CommandResult", "Env", "FileRead", "FIXTURE_DIR", "real_env"]

#: Name of the directory, inside a redirected root, holding non-file facts.
FIXTURE_DIR = "_fixture"

#: Largest file a probe reads (the /proc files we read are a few KiB).
MAX_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class FileRead:
    """The text of a file, or why there is none (``error`` is None on success)."""

    text: str | None
    error: str | None


@dataclass(frozen=True)
class CommandResult:
    """The outcome of running a command with a time bound.

    ``returncode`` is None when the command could not start or did not finish
    (``timed_out``); ``error`` then says why.
    """

    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


Runner = Callable[[Sequence[str], float, Mapping[str, str]], CommandResult]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return "not a regular file"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}: {errno.errorcode.get(exc.errno, exc.errno)}"
    return f"{type(exc).__name__}: {exc}"


def _open_regular(path: str) -> int:
    """Open ``path`` read-only without blocking; refuse anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_host(host_path: str, limit: int) -> FileRead:
    """Read up to ``limit`` bytes of a regular file on this host; never raises."""
    try:
        fd = _open_regular(host_path)
    except (OSError, ValueError) as e:
        return FileRead(None, _describe(e))
    try:
        chunks = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return FileRead(b"".join(chunks).decode(errors="replace"), None)
    except OSError as e:
        return FileRead(None, _describe(e))
    finally:
        os.close(fd)


def run_bounded(argv: Sequence[str], timeout: float, environ: Mapping[str, str]) -> CommandResult:
    """Run ``argv`` and return its output; never waits much longer than ``timeout`` seconds.

    On timeout the whole process group is killed; a process that will not die
    (a driver call stuck in the kernel) is abandoned rather than waited for.
    """
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(environ),
            start_new_session=True,
        )
    except (OSError, ValueError) as e:
        return CommandResult(None, error=_describe(e))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            out, err = proc.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            out, err = b"", b""
        return CommandResult(
            None,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            timed_out=True,
            error=f"timed out after {timeout:g} s",
        )
    return CommandResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


class Env:
    """A filesystem root, an environment and a command runner, as seen by the probes.

    ``Env()`` is the real machine. ``Env(root="tests/fixtures/env/wsl2_gpu")``
    reads files under that directory, and takes its environment variables
    from ``_fixture/env.json`` there unless ``environ`` is given.

    Paths passed to the methods are absolute paths *on the probed machine*
    (``"/proc/meminfo"``); they are resolved under the root.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        environ: Mapping[str, str] | None = None,
        *,
        runner: Runner | None = None,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        #: True when this is the machine the code runs on (root "/").
        self.is_real = self.root == os.path.abspath(os.sep)
        if environ is None:
            environ = os.environ if self.is_real else self._fixture_environ()
        self.environ: Mapping[str, str] = environ
        self._runner = runner

    def __repr__(self) -> str:
        return f"Env(root={self.root!r})"

    # -- files ---------------------------------------------------------------

    def path(self, path: str) -> str:
        """The host path of ``path`` on the probed machine."""
        if self.is_real:
            return path
        return os.path.join(self.root, path.lstrip("/"))

    def read(self, path: str, limit: int = MAX_READ_BYTES) -> FileRead:
        """Read a text file; on any failure return ``FileRead(None, reason)``."""
        got = _read_host(self.path(path), limit)
        if got.error is not None:
            return FileRead(None, f"{path}: {got.error}")
        return got

    def read_text(self, path: str) -> str | None:
        """The text of ``path``, or None when it is missing or unreadable."""
        return self.read(path).text

    def exists(self, path: str) -> bool | None:
        """True/False, or None when it cannot be told (permission denied, I/O error)."""
        return self._stat_ok(os.stat, path)

    def lexists(self, path: str) -> bool | None:
        """Like :meth:`exists`, but a dangling symlink counts as present."""
        return self._stat_ok(os.lstat, path)

    def _stat_ok(self, stat, path: str) -> bool | None:
        try:
            stat(self.path(path))
            return True
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return False
        except OSError:
            return None

    def listdir(self, path: str) -> list[str] | None:
        """Sorted entries of a directory, or None when it cannot be listed."""
        try:
            return sorted(os.listdir(self.path(path)))
        except (OSError, ValueError):
            return None

    def statvfs_size(self, path: str) -> int | None:
        """Size in bytes of the filesystem holding ``path`` (real machine only)."""
        if not self.is_real:
            return None
        try:
            st = os.statvfs(path)
        except OSError:
            return None
        return st.f_frsize * st.f_blocks

    def which(self, name: str, extra_dirs: Sequence[str] = ()) -> str | None:
        """Find a command on ``PATH`` (and ``extra_dirs``); the path on the probed machine."""
        dirs = [d for d in self.environ.get("PATH", "").split(":") if d] + list(extra_dirs)
        for d in dirs:
            candidate = os.path.join(d, name)
            host = self.path(candidate)
            try:
                st = os.stat(host)
            except (OSError, ValueError):
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if self.is_real and not os.access(host, os.X_OK):
                continue
            return candidate
        return None

    # -- commands and facts --------------------------------------------------

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run a command on the probed machine with a time bound.

        On a redirected root the command's output comes from
        ``_fixture/commands/<basename>.txt`` (or ``.json``); the command must
        also exist in the tree.
        """
        if self._runner is not None:
            return self._runner(argv, timeout, self.environ)
        if self.is_real:
            return run_bounded(argv, timeout, self.environ)
        if not self.lexists(argv[0]):
            return CommandResult(None, error=f"{argv[0]}: missing")
        name = os.path.basename(argv[0])
        base = os.path.join(self.root, FIXTURE_DIR, "commands", name)
        data = self._load_json(base + ".json")
        if isinstance(data, dict):
            return CommandResult(
                data.get("returncode"),
                str(data.get("stdout", "")),
                str(data.get("stderr", "")),
                bool(data.get("timed_out", False)),
                data.get("error"),
            )
        got = _read_host(base + ".txt", MAX_READ_BYTES)
        if got.text is None:
            return CommandResult(None, error=f"{name}: no fixture output ({got.error})")
        return CommandResult(0, got.text)

    def fixture(self, name: str) -> dict | None:
        """``_fixture/<name>.json`` of a redirected root (None for the real machine or if absent)."""
        if self.is_real:
            return None
        data = self._load_json(os.path.join(self.root, FIXTURE_DIR, name + ".json"))
        return data if isinstance(data, dict) else None

    @staticmethod
    def _load_json(host_path: str) -> object:
        got = _read_host(host_path, MAX_READ_BYTES)
        if got.text is None:
            return None
        try:
            return json.loads(got.text)
        except ValueError:
            return None

    def _fixture_environ(self) -> dict[str, str]:
        data = self.fixture("env")
        if not data:
            return {}
        return {str(k): str(v) for k, v in data.items()}


def real_env() -> Env:
    """The machine this process runs on (root ``/``, ``os.environ``)."""
    return Env()
