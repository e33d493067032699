"""Write-once (WORM) store of API results, one JSON file per request, with a hash manifest.

Layout under the store root:

- ``results/<key[:2]>/<slug>-<key[:32]>.json``: one read-only file per request identity.
- ``manifest.jsonl``: one line per stored file with its SHA-256, size and time of storage.

Many processes, on one machine or on several sharing the directory, may write at once.
A file is created with ``os.link``, which fails if the name exists, so exactly one writer
wins and an existing file is never replaced. ``verify`` compares the manifest with the
files on disk and reports what was lost, altered or added.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

#: Directory under the store root that contains the result files.
RESULTS_DIR = "results"

#: Append-only manifest under the store root, one JSON object per line.
MANIFEST_NAME = "manifest.jsonl"

#: Maximum length of the readable phrase part of a file name, in characters (all ASCII).
SLUG_MAX_CHARS = 40

#: Number of hex digits of the key in a file name (128 bits).
KEY_NAME_HEX_DIGITS = 32

#: Name prefix of the store's own temporary files, which ``verify`` reports as leftovers.
TEMP_PREFIX = ".tmp-"

#: Permission bits of a stored result file: read-only for everyone.
RESULT_FILE_MODE = 0o444

#: Permission bits of a new manifest or ledger file.
LOG_FILE_MODE = 0o644

#: UTF-8 error handler for JSON text. A lone surrogate (from text decoded with
#: surrogateescape) cannot be UTF-8, and "backslashreplace" turns it into a valid JSON
#: escape such as \udc80, because it can only occur inside a JSON string.
JSON_ENCODE_ERRORS = "backslashreplace"

#: Request parameters that carry credentials and so must never be part of a result key.
SECRET_PARAMETER_NAMES = frozenset({"api_key", "apikey", "key", "token", "access_token", "secret"})

#: Bytes that start every manifest line, because the writer keeps "path" as the first key.
MANIFEST_LINE_START = b'{"path":'

logger = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SLUG_WORD = re.compile(r"[A-Za-z0-9]+")

#: errno values for which ``Path.exists`` (Python 3.11) returns False instead of raising.
_MISSING_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


class StoreError(Exception):
    """An I/O operation on the store failed. ``path`` is the file or directory involved."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(f"{message}: {path}")
        self.path = path
        self._message = message

    def __reduce__(self) -> tuple[type, tuple[str, Path]]:
        # Celery pickles exceptions between processes; the default would call
        # StoreError with the formatted text alone and fail.
        return (StoreError, (self._message, self.path))


@dataclass
class VerifyReport:
    """Result of comparing the manifest with the files under ``results/``.

    Each list entry is a store-relative path followed by details in parentheses.
    ``leftover`` lists temporary files of writes that never finished. They hold no stored
    result, so they do not make the report unclean.
    """

    missing: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    ok: int = 0

    @property
    def clean(self) -> bool:
        """True when nothing is missing, altered, unlisted or malformed."""
        return not (self.missing or self.altered or self.unlisted or self.malformed)

    @property
    def checked(self) -> int:
        """Number of distinct result paths seen in the manifest or on disk."""
        return self.ok + len(self.altered) + len(self.missing) + len(self.unlisted)


def result_key(identity: Mapping[str, str]) -> str:
    """Return the SHA-256 hex digest of the canonical JSON of a request identity.

    The identity is the phrase plus the request parameters, without the API key, such as
    ``{"phrase": "Chad", "per_page": "20", "start_date": "", "end_date": ""}``. Canonical
    JSON has sorted keys, no spaces and UTF-8 text. Raises TypeError if a name or value is
    not a str (``20`` and ``"20"`` would give different keys), and ValueError if a name is
    in SECRET_PARAMETER_NAMES. The error names the parameter, never its value.
    """
    for name, value in identity.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"request identity parameter {name!r} must map a str to a str")

        if name.lower() in SECRET_PARAMETER_NAMES:
            raise ValueError(f"request identity must not contain the credential {name!r}")

    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def slugify(phrase: str) -> str:
    """Return up to SLUG_MAX_CHARS of lowercase ASCII letters and digits from the phrase.

    Every other run of characters becomes one ``-``, and the slug never starts or ends
    with ``-``. The result may be empty. Only the start of a long phrase is scanned.
    """
    words: list[str] = []
    length = 0

    for match in _SLUG_WORD.finditer(phrase):
        words.append(match.group().lower())
        length += len(match.group()) + 1
        if length > SLUG_MAX_CHARS:
            break

    return "-".join(words)[:SLUG_MAX_CHARS].rstrip("-")


def _file_name(phrase: str, key: str) -> str:
    """Return a result's file name, ``<slug>-<key[:32]>.json``. Raises ValueError for a bad key."""
    if not isinstance(key, str) or not _SHA256_HEX.fullmatch(key):
        raise ValueError(f"invalid result key {key!r}: expected 64 lowercase hex digits")

    slug = slugify(phrase)
    stem = key[:KEY_NAME_HEX_DIGITS]
    return f"{slug}-{stem}.json" if slug else f"{stem}.json"


def utc_timestamp() -> str:
    """Return the current time as ISO-8601 UTC with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def append_json_line(path: Path, entry: Mapping[str, Any]) -> None:
    """Append one JSON object as one line to ``path``, durably, safe with concurrent writers.

    The line is written by a single ``os.write`` on an O_APPEND descriptor, under an
    exclusive ``lockf`` lock, then fsynced. Raises StoreError if the file cannot be opened,
    locked, written or synced.
    """
    text = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
    line = text.encode("utf-8", JSON_ENCODE_ERRORS)
    created = not path.exists()

    # NOTE: a single O_APPEND write is atomic against other appenders only on a local
    # file system. NFS clients emulate O_APPEND, so the lock is what keeps lines from
    # several machines apart there, and it works only if the NFS server supports locking.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_FILE_MODE)
    except OSError as error:
        raise StoreError(f"failed to open for appending ({error.strerror})", path) from error

    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        written = os.write(fd, line)
        if written != len(line):
            raise StoreError(f"short write of {written} of {len(line)} bytes", path)
        os.fsync(fd)
    except OSError as error:
        raise StoreError(f"failed to append a line ({error.strerror})", path) from error
    finally:
        os.close(fd)

    if created:
        fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk. Raises StoreError on failure."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise StoreError(f"failed to open directory ({error.strerror})", directory) from error

    try:
        os.fsync(fd)
    except OSError as error:
        raise StoreError(f"failed to sync directory ({error.strerror})", directory) from error
    finally:
        os.close(fd)


def make_directories(directory: Path) -> None:
    """Create ``directory`` and its missing parents, fsyncing each parent that gained an entry.

    Safe when other processes create the same directories at once. Raises StoreError.
    """
    if directory.is_dir():
        return

    make_directories(directory.parent)

    try:
        directory.mkdir(exist_ok=True)
    except OSError as error:
        raise StoreError(f"failed to create directory ({error.strerror})", directory) from error

    fsync_directory(directory.parent)


def _remove_temp(temp_path: Path) -> None:
    """Delete a temp file. A failure is logged, because verify reports the leftover file."""
    try:
        temp_path.unlink(missing_ok=True)
    except OSError as error:
        logger.warning("failed to delete temp file %s: %s", temp_path, error.strerror)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _encode_record(record: Mapping[str, Any]) -> bytes:
    # No `indent`: with it, json runs its pure-Python encoder, about four times slower.
    text = json.dumps(record, ensure_ascii=False, sort_keys=True, allow_nan=False)
    return (text + "\n").encode("utf-8", JSON_ENCODE_ERRORS)


class ResultStore:
    """Write-once store of result records under ``root``, laid out as the module docstring says."""

    def __init__(self, root: Path) -> None:
        """Open the store at ``root``. Directories are created by the first ``put``."""
        self.root = Path(root)
        self.results = self.root / RESULTS_DIR
        self.manifest = self.root / MANIFEST_NAME

    def path_for(self, phrase: str, key: str) -> Path:
        """Return the file path of a result: ``results/<key[:2]>/<slug>-<key[:32]>.json``.

        The key alone decides uniqueness, and the slug only helps a reader. Any phrase gives
        a name of at most 78 ASCII bytes inside ``results/``. Raises ValueError unless
        ``key`` is 64 lowercase hex digits, as returned by ``result_key``.
        """
        return self.results / key[:2] / _file_name(phrase, key)

    def exists(self, phrase: str, key: str) -> bool:
        """Return True if a result file for this phrase and key exists.

        Raises ValueError for an invalid key, as ``path_for`` does. Like ``Path.exists``,
        returns False when the path or a parent is missing, and raises OSError for other
        failures, such as a directory without search permission.
        """
        # enqueue.py checks every row. A str path with os.stat takes about 9 microseconds
        # with the slug, against 14 through pathlib (Python 3.11).
        path = os.path.join(self.results, key[:2], _file_name(phrase, key))
        try:
            os.stat(path)
        except OSError as error:
            if error.errno in _MISSING_PATH_ERRNOS:
                return False
            raise
        return True

    def get(self, phrase: str, key: str) -> dict | None:
        """Read and return a stored record, or None if there is none.

        Raises StoreError if the file cannot be read or is not a JSON object.
        """
        path = self.path_for(phrase, key)

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StoreError(f"failed to read ({error.strerror})", path) from error

        try:
            record = json.loads(data)
        except ValueError as error:
            raise StoreError(f"stored file is not valid JSON ({error})", path) from error

        if not isinstance(record, dict):
            raise StoreError("stored file is not a JSON object", path)
        return record

    def put(self, phrase: str, key: str, record: Mapping[str, Any]) -> bool:
        """Store ``record`` once and append its manifest line.

        Returns True if this call wrote the file and False if a file for the key was
        already there, in which case that file is left untouched and ``record`` is
        discarded. The file is written to a temp file in the target directory, fsynced,
        made read-only and then hard-linked into place, so it appears complete or not at
        all. Raises StoreError (naming the path) on an I/O failure, and TypeError or
        ValueError if ``record`` cannot be encoded as standard JSON.
        """
        path = self.path_for(phrase, key)
        if path.exists():
            return False

        data = _encode_record(record)
        make_directories(path.parent)

        temp_path = self._write_temp(path.parent, data)
        try:
            linked = self._link_into_place(temp_path, path)
        finally:
            _remove_temp(temp_path)

        if not linked:
            return False

        fsync_directory(path.parent)

        # NOTE: a crash or I/O error between the link above and this append leaves a stored
        # file with no manifest line, and a retried put returns False without adding one.
        # verify reports the file as unlisted, which can mean an interrupted write. Its
        # bytes are complete, because the link happens only after the fsync.
        self._append_manifest(path, data)
        return True

    def verify(self) -> VerifyReport:
        """Compare the manifest with the files under ``results/`` and return the findings.

        A manifest entry whose file is gone is missing. A file whose SHA-256 differs from
        its entry, or a path listed twice with different hashes, is altered. A file that no
        entry lists is unlisted, and a temp file of the store is a leftover. A manifest line
        that is not valid JSON or names a path outside ``results/`` is malformed. Raises
        StoreError if the manifest or a file cannot be read.

        NOTE: run it while no worker writes to the store. A put in progress shows up as a
        leftover temp file, or as unlisted between its link and its manifest append.
        """
        report = VerifyReport()
        expected = self._load_manifest(report)

        for relative, absolute in self._walk_results():
            if absolute.name.startswith(TEMP_PREFIX):
                report.leftover.append(f"{relative} (temp file of a write that did not finish)")
            elif relative not in expected:
                report.unlisted.append(
                    f"{relative} (not in the manifest, which can mean an interrupted write)"
                )
            else:
                _check_file(relative, absolute, expected.pop(relative), report)

        for relative in expected:
            report.missing.append(f"{relative} (listed in the manifest, not on disk)")

        for findings in (report.missing, report.altered, report.unlisted, report.leftover):
            findings.sort()
        return report

    def _write_temp(self, directory: Path, data: bytes) -> Path:
        """Write ``data`` to a new read-only, fsynced temp file in ``directory``."""
        try:
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=directory)
        except OSError as error:
            raise StoreError(
                f"failed to create a temp file ({error.strerror})", directory
            ) from error

        temp_path = Path(name)
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fchmod(stream.fileno(), RESULT_FILE_MODE)
                os.fsync(stream.fileno())
        except OSError as error:
            _remove_temp(temp_path)
            raise StoreError(
                f"failed to write a temp file ({error.strerror})", temp_path
            ) from error

        return temp_path

    @staticmethod
    def _link_into_place(temp_path: Path, path: Path) -> bool:
        """Hard-link the temp file to ``path``. Return False if ``path`` already exists."""
        try:
            os.link(temp_path, path)
        except FileExistsError:
            return False
        except OSError as error:
            # NOTE: the store needs a file system with hard links. Some FUSE and SMB mounts
            # reject them with EPERM or ENOTSUP, and every put then fails here.
            message = f"failed to link a result file ({error.strerror})"
            if error.errno in (errno.EPERM, errno.ENOTSUP):
                message += "; the store's file system must support hard links"
            raise StoreError(message, path) from error

        return True

    def _append_manifest(self, path: Path, data: bytes) -> None:
        entry = {
            "path": path.relative_to(self.root).as_posix(),
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "stored_at": utc_timestamp(),
        }
        append_json_line(self.manifest, entry)

    def _load_manifest(self, report: VerifyReport) -> dict[str, str | None]:
        """Return a map of path to expected SHA-256, or None for a path listed with two hashes.

        Conflicting entries are added to ``report.altered`` here.
        """
        # NOTE: this map keeps every listed path in memory. tracemalloc measured 281 bytes
        # per entry for 60-character paths on CPython 3.11, so 4 million files need ~1.1 GB.
        expected: dict[str, str | None] = {}

        for line_number, entry in self._manifest_entries(report):
            relative = entry["path"]
            sha = entry["sha256"]

            if relative not in expected:
                expected[relative] = sha
            elif expected[relative] not in (None, sha):
                report.altered.append(
                    f"{relative} (listed twice with different sha256 {expected[relative]} "
                    f"and {sha}, second at manifest line {line_number})"
                )
                expected[relative] = None

        return expected

    def _manifest_entries(self, report: VerifyReport) -> Iterator[tuple[int, dict]]:
        """Yield (line number, entry) for each valid manifest line and report the others."""
        try:
            stream = self.manifest.open("rb")
        except FileNotFoundError:
            return
        except OSError as error:
            raise StoreError(
                f"failed to read the manifest ({error.strerror})", self.manifest
            ) from error

        with stream:
            for line_number, raw in enumerate(stream, start=1):
                entry = _parse_manifest_line(raw)
                if entry is not None:
                    yield line_number, entry
                    continue

                report.malformed.append(f"{MANIFEST_NAME} line {line_number} (not a valid entry)")

                # A writer that died inside its write can leave a line without its newline,
                # and the next append then continues that line. Recover the appended entry.
                start = raw.rfind(MANIFEST_LINE_START, 1)
                entry = _parse_manifest_line(raw[start:]) if start > 0 else None
                if entry is not None:
                    yield line_number, entry

    def _walk_results(self) -> Iterator[tuple[str, Path]]:
        """Yield (store-relative POSIX path, absolute path) of every file under ``results/``."""
        for directory, subdirectories, files in os.walk(self.results, onerror=_raise_walk_error):
            subdirectories.sort()
            for name in sorted(files):
                absolute = Path(directory) / name
                yield absolute.relative_to(self.root).as_posix(), absolute


def _check_file(
    relative: str, absolute: Path, expected_sha: str | None, report: VerifyReport
) -> None:
    """Hash one listed file and count it as ok or altered. None means already reported."""
    if expected_sha is None:
        return

    try:
        if not stat.S_ISREG(os.lstat(absolute).st_mode):
            report.altered.append(f"{relative} (replaced by something that is not a regular file)")
            return
        found_sha = _file_sha256(absolute)
    except OSError as error:
        raise StoreError(f"failed to read ({error.strerror})", absolute) from error

    if found_sha == expected_sha:
        report.ok += 1
    else:
        report.altered.append(f"{relative} (sha256 expected {expected_sha}, found {found_sha})")


def _raise_walk_error(error: OSError) -> None:
    if isinstance(error, FileNotFoundError):
        return
    directory = Path(error.filename or RESULTS_DIR)
    raise StoreError(f"failed to list directory ({error.strerror})", directory) from error


def _parse_manifest_line(raw: bytes) -> dict | None:
    """Return the manifest entry of one line, or None if it is not a valid entry."""
    try:
        entry = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None

    if not isinstance(entry, dict):
        return None

    relative = entry.get("path")
    sha = entry.get("sha256")
    if not isinstance(relative, str) or not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
        return None

    parts = relative.split("/")
    if len(parts) < 2 or parts[0] != RESULTS_DIR or "\x00" in relative:
        return None
    if any(part in ("", ".", "..") for part in parts):
        return None
    return entry
