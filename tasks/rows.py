"""Stream phrases from the CSV files in a data directory.

``read_rows`` turns one CSV file into ``Row`` objects (one per good record) and
``RowProblem`` objects (one per skipped record). It raises ``InputFileError`` when the
whole file cannot be used. It streams the file in chunks, so memory is bounded by the
chunk, line and field limits below, whatever the row count.

Rules:

- Encoding: strict UTF-8 unless ``ReadOptions.encoding`` is set. A UTF-8 byte order mark
  (BOM) is accepted and stripped. A byte sequence that does not decode stops the file
  with an ``InputFileError`` that names the byte offset and line. If rows were already
  yielded, that error is raised mid-stream and names the last line read.
  A file whose start is valid UTF-8 with non-ASCII text is rejected when another
  encoding is set, because decoding it as, say, cp1252 would garble every accent.
- Header: line 1 names the columns, or line 2 when line 1 is Excel's ``sep=;`` hint. The
  phrase column is the only column, else the column named ``phrase``. A header without
  records raises ``InputFileError``.
- Delimiter: detected from the header among comma, semicolon, TAB and ``|``. A header with
  one column over lines that split on one of those raises ``InputFileError``.
- Records: empty lines are skipped silently. A record whose field count differs from the
  header's is a ``RowProblem``.
- Phrase: stripped of surrounding whitespace. It is a ``RowProblem`` when it is blank or
  when its UTF-8 form is longer than ``max_phrase_bytes``. Any other text is yielded
  unchanged: line breaks from quoted fields, control characters, NUL, ``../``, slashes,
  emoji and right-to-left marks are legal in a phrase, and the store gives every phrase a
  safe file name.
- NOTE: an unmatched double quote swallows the following lines into one field. That
  field is reported when it exceeds the phrase limit or MAX_FIELD_CHARS; a few short
  lines before the end of the file are sent as one multi-line phrase.
- Line numbers are 1-based physical lines ending in LF or CRLF. A record reports the line
  where it starts. Files with CR-only line endings, and files in encodings where LF is
  not the byte 0x0A (UTF-16, UTF-32, EBCDIC) are read with universal newlines.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAX_PHRASE_BYTES = 1024
"""Default maximum length of one phrase, in bytes of UTF-8."""

MAX_FIELD_CHARS = 16 * 1024 * 1024
"""Maximum length of one CSV field, in characters, set as ``csv.field_size_limit``."""

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Maximum length of one physical line, in bytes (characters on the universal-newline path)."""

MAX_VALUE_CHARS = 60
"""Maximum length of the shortened value in a ``RowProblem`` or an error, in characters."""

SAMPLE_MAX_LINES = 100
"""Maximum number of lines read ahead to detect the delimiter."""

SAMPLE_MAX_CHARS = 64 * 1024
"""Read-ahead for delimiter detection stops after the line that crosses this many characters."""

HEAD_BYTES = 64 * 1024
"""Bytes read from the start of a file to check its format and line endings."""

BINARY_CHECK_BYTES = 1024
"""Bytes at the start of a file in which control bytes mark the file as binary."""

BINARY_MIN_CONTROL_BYTES = 8
"""Control bytes (not TAB, LF, VT, FF, CR or ESC) in BINARY_CHECK_BYTES that mark a file binary."""

OBVIOUS_DELIMITER_SHARE = 0.5
"""Share of sampled records that split on a delimiter, to reject a one-column header."""

DELIMITER_CANDIDATES = (",", ";", "\t", "|")
"""Delimiters that detection chooses from, in order of preference for ties."""

DEFAULT_COLUMN = "phrase"
"""Name of the phrase column when the header has several columns and none is chosen."""

DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
"""Names that ``parse_delimiter`` accepts besides a single character."""

_DELIMITER_LABELS = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}

_BINARY_BYTES = bytes(
    [*range(0x00, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20)]
)  # C0 control bytes except TAB, LF, VT, FF, CR and ESC.

_TEXT_BYTES = bytes(byte for byte in range(256) if byte not in _BINARY_BYTES)

_SIGNATURES = (
    (b"PK\x03\x04", "a ZIP archive (an .xlsx or .ods workbook is one)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an OLE2 file (an .xls workbook is one)"),
    (b"%PDF-", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
)

_UTF8_BOM = codecs.BOM_UTF8

_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)  # UTF-32 first, because the UTF-32-LE BOM starts with the UTF-16-LE BOM.

_STATEFUL_CODEC_PREFIXES = ("utf-7", "iso2022", "hz")

_LINE_SAFE_PROBE = '\n\r,;|\t"'

_SEP_HINT = re.compile(r"sep=(.)\r?\n?")

_DECODE_CHUNK_BYTES = 1024 * 1024  # must not exceed MAX_LINE_BYTES


@dataclass(frozen=True, slots=True)
class Row:
    """One good record: the phrase and where it starts."""

    file: str
    line: int
    phrase: str


# The frozen dataclass __init__ calls object.__setattr__ once per field, which is a large
# share of the time per row. _read_records builds rows with object.__new__ and the slot
# descriptors instead, with the same result. Keep it in step if Row gains fields.
_ROW_BUILDERS = (
    object.__new__,
    Row.file.__set__,  # type: ignore[attr-defined]
    Row.line.__set__,  # type: ignore[attr-defined]
    Row.phrase.__set__,  # type: ignore[attr-defined]
)


@dataclass(frozen=True, slots=True)
class RowProblem:
    """One skipped record, with the reason and the offending value shortened by shorten_value."""

    file: str
    line: int
    reason: str
    value: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: skipped: {self.reason} ('{self.value}')"


class InputFileError(Exception):
    """A file that cannot be read as a whole. ``str()`` names the file, the cause and the fix.

    ``line`` and ``byte_offset`` are set when the cause has a position, else None.
    """

    def __init__(
        self, file: str, message: str, *, line: int | None = None, byte_offset: int | None = None
    ) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file
        self.line = line
        self.byte_offset = byte_offset


@dataclass(frozen=True)
class ReadOptions:
    """Options for ``read_rows``. ``__post_init__`` raises ValueError on invalid values.

    ``column`` is the phrase column: None means the only column, else the column named
    ``phrase``. ``encoding`` is a Python codec name, None means strict UTF-8 with an
    optional BOM. ``delimiter`` is one character or a name that ``parse_delimiter``
    accepts (stored as the character), None means detect it from the header.
    ``max_phrase_bytes`` is the maximum phrase length in bytes of UTF-8.
    """

    column: str | None = None
    encoding: str | None = None
    delimiter: str | None = None
    max_phrase_bytes: int = MAX_PHRASE_BYTES

    def __post_init__(self) -> None:
        if self.column is not None and not self.column.strip():
            raise ValueError("column must not be blank. Omit it to use the default.")

        if self.encoding is not None:
            _lookup_text_codec(self.encoding)

        if self.delimiter is not None:
            object.__setattr__(self, "delimiter", parse_delimiter(self.delimiter))

        if self.max_phrase_bytes < 1:
            raise ValueError(f"max_phrase_bytes must be at least 1, not {self.max_phrase_bytes}")


@dataclass(frozen=True)
class _Layout:
    reader: Iterator[list[str]]  # a csv.reader, positioned after the header
    width: int
    column_index: int
    header_end_line: int


class _DecodeFailure(Exception):
    def __init__(
        self, encoding: str, offset: int, bad: bytes, context: str = "", line: int | None = None
    ) -> None:
        super().__init__(offset)
        self.encoding = encoding
        self.offset = offset
        self.bad = bad
        self.context = context  # the decodable text around the bad bytes, or ""
        self.line = line  # None means the line after the last one the csv.reader received


class _LineTooLong(Exception):
    def __init__(self, line: int | None = None) -> None:
        super().__init__(line)
        self.line = line  # None means the line after the last one the csv.reader received


def parse_delimiter(text: str) -> str:
    """Convert a command-line delimiter to one character and return it.

    Accepts one character, or ``tab``, ``\\t``, ``comma``, ``semicolon`` or ``pipe``.
    Raises ValueError for anything else, so it can serve as an argparse ``type``.
    """
    delimiter = DELIMITER_NAMES.get(text.lower(), text)
    _validate_delimiter(delimiter)

    return delimiter


def shorten_value(text: str, max_chars: int = MAX_VALUE_CHARS) -> str:
    """Return ``text`` escaped like ``repr`` (without quotes) and cut to ``max_chars``.

    Printable characters other than the backslash stay as they are. A cut value ends
    with an ellipsis, which counts towards ``max_chars``.
    """
    pieces = [_escape_char(char) for char in text[: max_chars + 1]]
    if len(text) <= max_chars and sum(map(len, pieces)) <= max_chars:
        return "".join(pieces)

    shortened: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > max_chars - 1:
            break
        shortened.append(piece)
        used += len(piece)

    return "".join(shortened) + "…"


def find_input_files(data_dir: Path) -> tuple[list[Path], list[Path]]:
    """Return (CSV files sorted by name, ignored entries sorted by name) in ``data_dir``.

    A CSV file is a regular file, or a symbolic link to one, whose name ends in ``.csv``
    in any letter case and does not start with a dot. Everything else is ignored:
    subfolders, other files, hidden files (such as macOS ``._x.csv`` and LibreOffice lock
    files) and broken links. Subfolders are not searched.
    Raises InputFileError when ``data_dir`` is missing or is not a directory.
    """
    try:
        entries = sorted(data_dir.iterdir(), key=lambda entry: entry.name)
    except OSError as error:
        raise InputFileError(
            str(data_dir),
            f"cannot list the data directory: {error.strerror or error}. "
            "Create it, or point the command at the directory that contains the CSV files.",
        ) from None

    csv_files: list[Path] = []
    ignored: list[Path] = []
    for entry in entries:
        if _is_csv_file(entry):
            csv_files.append(entry)
        else:
            ignored.append(entry)

    return csv_files, ignored


def read_rows(path: Path, options: ReadOptions = ReadOptions()) -> Iterator[Row | RowProblem]:
    """Stream the records of one CSV file as Row and RowProblem objects, in file order.

    Whole-file problems (unreadable, empty, binary, wrong encoding in the header, no
    phrase column, ambiguous delimiter, no records) raise InputFileError before anything
    is yielded. A decoding error, a line over MAX_LINE_BYTES, a field over MAX_FIELD_CHARS
    or a read error later in the file raises InputFileError mid-stream. Its message names
    the line where reading stopped.

    NOTE: this sets the process-wide ``csv.field_size_limit`` to MAX_FIELD_CHARS.
    """
    file = str(path)
    csv.field_size_limit(MAX_FIELD_CHARS)

    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the with block below
    except OSError as error:
        raise InputFileError(file, _os_error_message(error, "opened")) from None

    with stream:
        layout = _open_layout(file, stream, options)
        yield from _read_records(file, layout, options.max_phrase_bytes)


def _read_records(file: str, layout: _Layout, max_phrase_bytes: int) -> Iterator[Row | RowProblem]:
    # This loop runs once per record, so it keeps checks inline and calls helpers only for
    # problems.
    reader = layout.reader
    width = layout.width
    column_index = layout.column_index
    max_safe_chars = max_phrase_bytes // 4  # UTF-8 needs at most 4 bytes per character
    new_row, set_file, set_line, set_phrase = _ROW_BUILDERS
    last_line = layout.header_end_line
    records = 0

    while True:
        try:
            for fields in reader:
                start_line = last_line + 1
                last_line = reader.line_num  # type: ignore[attr-defined]

                if len(fields) != width:
                    if not fields:
                        continue
                    records += 1
                    yield _field_count_problem(file, start_line, fields, width)
                    continue

                records += 1
                phrase = fields[column_index].strip()
                if not phrase:
                    yield RowProblem(
                        file, start_line, "blank phrase", shorten_value(fields[column_index])
                    )
                    continue

                if len(phrase) > max_safe_chars:
                    size = len(phrase.encode("utf-8"))
                    if size > max_phrase_bytes:
                        reason = f"phrase is {size} bytes; the limit is {max_phrase_bytes}"
                        yield RowProblem(file, start_line, reason, shorten_value(phrase))
                        continue

                row = new_row(Row)
                set_file(row, file)
                set_line(row, start_line)
                set_phrase(row, phrase)
                yield row
            break

        except csv.Error as error:
            start_line = last_line + 1
            last_line = reader.line_num  # type: ignore[attr-defined]
            records += 1
            yield _csv_error_problem(file, start_line, error)

        except (_DecodeFailure, _LineTooLong, OSError) as error:
            lines_read = reader.line_num  # type: ignore[attr-defined]
            raise _stream_error(file, error, lines_read, last_line) from None

    if records == 0:
        raise InputFileError(
            file,
            f"has a header (line {layout.header_end_line}) but no data rows. "
            "Add one phrase per line below the header, or remove the file.",
        )


def _open_layout(file: str, stream: BinaryIO, options: ReadOptions) -> _Layout:
    # Check the file format, read the header and return a csv.reader positioned after it.
    try:
        head = stream.read(HEAD_BYTES)
        stream.seek(0)
    except OSError as error:
        raise InputFileError(file, _os_error_message(error, "read")) from None

    encoding = _choose_encoding(file, head, options.encoding)
    line_safe = _is_line_safe(encoding)
    if line_safe:
        _check_text(file, head)

    if line_safe and not (b"\r" in head and b"\n" not in head):
        lines = _binary_lines(stream, encoding)
    else:
        lines = _text_lines(stream, encoding)

    sample, pending_error = _read_sample(file, lines)
    if not sample:
        raise InputFileError(
            file, "empty file: it contains only a byte order mark. Add a header line."
        )

    sample[0] = sample[0].removeprefix("\ufeff")
    _check_not_blank(file, sample, pending_error)

    sep_hint = _SEP_HINT.fullmatch(sample[0])
    header_index = 1 if sep_hint else 0
    if header_index >= len(sample):
        raise InputFileError(file, "contains only a 'sep=' line and no header. Add the header.")

    delimiter = options.delimiter or (sep_hint.group(1) if sep_hint else None)
    if delimiter is None:
        delimiter = _detect_delimiter(sample[header_index], sample[header_index + 1 :])

    rest: Iterable[str] = lines if pending_error is None else _raise_later(pending_error)
    reader = csv.reader(itertools.chain(sample, rest), delimiter=delimiter)
    header = _read_header(file, reader, skip_first=sep_hint is not None)
    header_end_line = reader.line_num

    column_index = _choose_column(file, header, options.column, header_end_line)
    if options.delimiter is None and sep_hint is None and len(header) == 1:
        _check_one_column(file, sample[header_end_line:], header_end_line)

    return _Layout(reader, len(header), column_index, header_end_line)


def _choose_encoding(file: str, head: bytes, requested: str | None) -> str:
    # Return the codec name to decode with, after checking the start of the file.
    if not head:
        raise InputFileError(file, "empty file. Add a header line and one phrase per line.")

    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            raise InputFileError(
                file,
                f"not a text CSV file: it starts like {kind}. "
                "Export it from its application as CSV (CSV UTF-8 in Excel).",
            )

    if requested is None:
        for bom, codec_name in _WIDE_BOMS:
            if head.startswith(bom):
                raise InputFileError(
                    file,
                    f"is {codec_name.upper()} text (it starts with a {codec_name.upper()} byte "
                    f"order mark). Pass --encoding {codec_name}, or save it as CSV UTF-8.",
                )
        return "utf-8"

    encoding = _lookup_text_codec(requested)
    if encoding == "utf-8" or not _is_line_safe(encoding):
        return encoding

    if head.startswith(_UTF8_BOM):
        reason = "starts with a UTF-8 byte order mark"
    elif _looks_like_utf8(head):
        reason = (
            f"is UTF-8 text (its first {len(head)} bytes decode as UTF-8 and are not all ASCII)"
        )
    else:
        return encoding

    raise InputFileError(
        file,
        f"{reason}, but --encoding {requested} was given. Reading it as {requested} would "
        "garble non-ASCII characters. Drop --encoding for this file.",
    )


def _looks_like_utf8(head: bytes) -> bool:
    # True when head has non-ASCII bytes and all of them decode as UTF-8. A multi-byte
    # character cut at the end of head counts as valid.
    if head.isascii():
        return False

    try:
        codecs.utf_8_decode(head, "strict", False)
    except UnicodeDecodeError:
        return False

    return True


def _check_text(file: str, head: bytes) -> None:
    # Raise InputFileError when the start of the file looks binary. The check allows a few
    # control bytes, so that a NUL inside a quoted field becomes a RowProblem instead.
    sample = head[:BINARY_CHECK_BYTES]
    control_bytes = len(sample.translate(None, _TEXT_BYTES))
    first_line = sample.split(b"\n", 1)[0]
    if control_bytes < BINARY_MIN_CONTROL_BYTES and b"\x00" not in first_line:
        return

    hint = ""
    if b"\x00" in sample:
        hint = (
            " UTF-16 text without a byte order mark also looks like this; if so, pass "
            "--encoding utf-16-le."
        )
    raise InputFileError(
        file,
        f"not a text CSV file: its first {len(sample)} bytes contain {control_bytes} control "
        f"bytes.{hint} Export it from its application as CSV (CSV UTF-8 in Excel).",
    )


def _binary_lines(stream: BinaryIO, encoding: str) -> Iterator[str]:
    # StringIO and itertools split and hand out the lines in C, which is faster than a
    # Python generator that yields each line.
    return itertools.chain.from_iterable(_decoded_chunks(stream, encoding))


def _decoded_chunks(stream: BinaryIO, encoding: str) -> Iterator[io.StringIO]:
    # Yield the file as decoded runs of whole LF-terminated lines. On a decoding error, yield
    # the lines before the bad one, so every good line is read, then raise _DecodeFailure
    # with the exact byte offset and line.
    carry = b""  # the start of a line that continues in the next chunk
    carry_offset = 0  # byte offset of carry in the file
    carry_line = 1  # line number of carry
    while True:
        chunk = stream.read(_DECODE_CHUNK_BYTES)
        data = carry + chunk if carry else chunk

        first_end = data.find(b"\n") + 1
        if chunk and first_end == 0:
            if len(data) > MAX_LINE_BYTES:
                raise _LineTooLong(carry_line)
            carry = data
            continue
        if first_end > MAX_LINE_BYTES:
            raise _LineTooLong(carry_line)

        end = data.rfind(b"\n") + 1 if chunk else len(data)
        complete, carry = data[:end], data[end:]
        try:
            text = complete.decode(encoding)
        except UnicodeDecodeError as error:
            bad_line_start = complete.rfind(b"\n", 0, error.start) + 1
            yield io.StringIO(complete[:bad_line_start].decode(encoding), newline="\n")
            raise _decode_failure(
                encoding, complete, error, bad_line_start, carry_offset, carry_line
            ) from None

        yield io.StringIO(text, newline="\n")
        if not chunk:
            return

        carry_offset += end
        carry_line += complete.count(b"\n")


def _decode_failure(
    encoding: str,
    data: bytes,
    error: UnicodeDecodeError,
    line_start: int,
    data_offset: int,
    data_line: int,
) -> _DecodeFailure:
    # Describe a decoding error in data, a run of whole lines that starts at byte data_offset
    # of the file and on line data_line.
    line_end = data.find(b"\n", error.end)
    if line_end < 0:
        line_end = len(data)

    context_start = max(line_start, error.start - MAX_VALUE_CHARS // 2)
    context = data[context_start:line_end].rstrip(b"\r").decode(encoding, "replace")
    bad = data[error.start : error.end]
    line = data_line + data.count(b"\n", 0, line_start)

    return _DecodeFailure(encoding, data_offset + error.start, bad, context, line)


def _text_lines(stream: BinaryIO, encoding: str) -> Iterator[str]:
    # Decode with universal newlines for CR-only files and encodings that do not keep LF
    # as the byte 0x0A.
    # NOTE: TextIOWrapper decodes 8 KiB ahead, so a decoding error can stop the file a few
    # lines before the bad byte. The error message names the last line yielded.
    text_stream = io.TextIOWrapper(stream, encoding=encoding, errors="strict", newline="")
    readline = text_stream.readline
    while True:
        try:
            text = readline(MAX_LINE_BYTES)
        except UnicodeDecodeError:
            raise _locate_decode_error(stream, encoding) from None

        if not text:
            return

        if len(text) == MAX_LINE_BYTES and text[-1] not in "\r\n":
            raise _LineTooLong()

        yield text


def _locate_decode_error(stream: BinaryIO, encoding: str) -> _DecodeFailure:
    # Decode the file again from the start, counting line breaks, to find where the first
    # decoding error is.
    stream.seek(0)
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset = 0
    line_breaks = 0
    ends_with_cr = False
    while True:
        chunk = stream.read(_DECODE_CHUNK_BYTES)
        state = decoder.getstate()
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as error:
            pending = len(state[0])
            decoder.setstate(state)
            text = decoder.decode(chunk[: max(0, error.start - pending)])
            line_breaks += _count_line_breaks(text, ends_with_cr)
            bad = error.object[error.start : error.end]
            return _DecodeFailure(
                encoding, offset - pending + error.start, bad, line=line_breaks + 1
            )

        if not chunk:
            return _DecodeFailure(encoding, offset, b"", line=line_breaks + 1)  # not reached

        line_breaks += _count_line_breaks(text, ends_with_cr)
        if text:
            ends_with_cr = text.endswith("\r")
        offset += len(chunk)


def _count_line_breaks(text: str, after_cr: bool) -> int:
    # Count LF, CR and CRLF line ends, where a CRLF split across chunks counts once.
    count = text.count("\n") + text.count("\r") - text.count("\r\n")
    if after_cr and text.startswith("\n"):
        count -= 1

    return count


def _read_sample(file: str, lines: Iterator[str]) -> tuple[list[str], Exception | None]:
    # Read the first lines for header and delimiter detection. A stream error after the
    # first line is returned, so that the records before it are still yielded.
    sample: list[str] = []
    chars = 0
    try:
        for text in lines:
            sample.append(text)
            chars += len(text)
            if len(sample) >= SAMPLE_MAX_LINES or chars >= SAMPLE_MAX_CHARS:
                break
    except (_DecodeFailure, _LineTooLong, OSError) as error:
        if not sample:
            raise _stream_error(file, error, 0, 0) from None
        return sample, error

    return sample, None


def _raise_later(error: Exception) -> Iterator[str]:
    raise error
    yield  # makes this function a generator, so the error is raised when the csv.reader gets here


def _check_not_blank(file: str, sample: list[str], pending_error: Exception | None) -> None:
    # Raise InputFileError when the file has no text or its first line is blank.
    if sample[0].strip():
        return

    if pending_error is None and len(sample) < SAMPLE_MAX_LINES and not "".join(sample).strip():
        raise InputFileError(file, "empty file: it contains only blank lines. Add a header line.")

    raise InputFileError(
        file,
        f"line 1 is blank, but the first line must be the header naming the columns "
        f"(for example '{DEFAULT_COLUMN}'). Remove the blank lines at the top.",
        line=1,
    )


def _detect_delimiter(header_text: str, data_lines: list[str]) -> str:
    # Choose the candidate that splits the header into the most columns that the sampled
    # records agree with. A header that no candidate splits is one column, read with ','.
    best = ","
    best_key = (0, 0, 0)
    for preference, candidate in enumerate(reversed(DELIMITER_CANDIDATES)):
        header_width = len(next(csv.reader([header_text], delimiter=candidate), []))
        if header_width < 2:
            continue

        records = _parse_sample(data_lines, candidate)
        matching = sum(1 for record in records if len(record) == header_width)
        key = (matching, header_width, preference)
        if key > best_key:
            best, best_key = candidate, key

    return best


def _parse_sample(lines: list[str], delimiter: str) -> list[list[str]]:
    # Parse sampled lines, skipping records that csv.reader rejects. The main loop reports
    # those as RowProblems later.
    reader = csv.reader(lines, delimiter=delimiter)
    records: list[list[str]] = []
    while True:
        try:
            records.append(next(reader))
        except StopIteration:
            return records
        except csv.Error:
            continue


def _check_one_column(file: str, data_lines: list[str], header_end_line: int) -> None:
    # Raise InputFileError when a one-column header sits above records that mostly split
    # on a candidate delimiter, because those are probably several columns.
    records = sum(1 for record in _parse_sample(data_lines, ",") if record)
    for candidate in DELIMITER_CANDIDATES:
        split = sum(1 for record in _parse_sample(data_lines, candidate) if len(record) > 1)
        if not records or split < records * OBVIOUS_DELIMITER_SHARE:
            continue

        label = _DELIMITER_LABELS[candidate]
        raise InputFileError(
            file,
            f"the header (line {header_end_line}) has one column, but {split} of the next "
            f"{records} rows contain the delimiter {label}. If those rows have several "
            f"columns, add the column names to the header or pass --delimiter {label}. If each "
            "line is one phrase, quote the phrases or pass a --delimiter that the file does not "
            "contain.",
            line=header_end_line,
        )


def _read_header(file: str, reader: Iterator[list[str]], skip_first: bool) -> list[str]:
    # Return the stripped column names from the first record (the second after a sep= line).
    try:
        if skip_first:
            next(reader)
        fields = next(reader, [])
    except csv.Error as error:
        raise InputFileError(
            file, f"invalid header: {error}. Fix the header line.", line=1
        ) from None
    except (_DecodeFailure, _LineTooLong, OSError) as error:
        raise _stream_error(file, error, reader.line_num, 0) from None  # type: ignore[attr-defined]

    return [name.strip() for name in fields]


def _choose_column(file: str, header: list[str], column: str | None, header_line: int) -> int:
    # Return the index of the phrase column, or raise InputFileError listing the columns.
    if column is None and len(header) == 1:
        return 0

    requested = DEFAULT_COLUMN if column is None else column.strip()
    matches = [index for index, name in enumerate(header) if name == requested]
    if not matches:
        matches = [
            index for index, name in enumerate(header) if name.casefold() == requested.casefold()
        ]

    if len(matches) == 1:
        return matches[0]

    found = _format_columns(header)
    if matches:
        positions = ", ".join(str(index + 1) for index in matches)
        message = (
            f"column '{requested}' appears more than once in the header (columns {positions}). "
            "Rename the duplicates."
        )
    elif column is None:
        message = (
            f"the header has {len(header)} columns and none is named '{DEFAULT_COLUMN}'. "
            f"Columns found: {found}. Pass --column NAME to choose the phrase column."
        )
    else:
        message = (
            f"column '{requested}' not found in the header. Columns found: {found}. "
            "Pass --column with one of them."
        )

    raise InputFileError(file, message, line=header_line)


def _format_columns(header: list[str], max_columns: int = 20) -> str:
    names = ", ".join(f"'{shorten_value(name)}'" for name in header[:max_columns])
    if len(header) > max_columns:
        names += f" and {len(header) - max_columns} more"

    return names


def _field_count_problem(file: str, line: int, fields: list[str], width: int) -> RowProblem:
    reason = f"row has {len(fields)} fields, header has {width}"

    return RowProblem(file, line, reason, shorten_value(",".join(fields)))


def _csv_error_problem(file: str, line: int, error: csv.Error) -> RowProblem:
    # csv.Error messages are fixed strings in CPython's _csv module, so matching on them is
    # the only way to tell the causes apart.
    message = str(error)
    if "field limit" in message:
        raise InputFileError(
            file,
            f"the record that starts on line {line} has a field longer than {MAX_FIELD_CHARS} "
            "characters. Check that line for an unmatched double quote.",
            line=line,
        )

    if "new-line character seen in unquoted field" in message:
        message = "carriage return (U+000D) inside an unquoted field"

    return RowProblem(file, line, f"invalid CSV: {message}", "")


def _stream_error(file: str, error: Exception, lines_read: int, last_line: int) -> InputFileError:
    # Convert an error from the line source into InputFileError. lines_read is the number of
    # lines the csv.reader received. last_line is the end of the last record yielded.
    stopped = f" Reading stopped after line {last_line}." if last_line else ""

    if isinstance(error, _DecodeFailure):
        return _decode_error(file, error, lines_read, stopped)

    if isinstance(error, _LineTooLong):
        line = error.line if error.line is not None else lines_read + 1
        return InputFileError(
            file,
            f"line {line} is longer than {MAX_LINE_BYTES} bytes.{stopped} "
            "Check that the file is CSV with line breaks between records.",
            line=line,
        )

    return InputFileError(file, _os_error_message(error, "read") + stopped)


def _decode_error(
    file: str, error: _DecodeFailure, lines_read: int, stopped: str
) -> InputFileError:
    line = error.line if error.line is not None else lines_read + 1
    message = (
        f"not valid {error.encoding.upper()}: invalid bytes {error.bad!r} at byte offset "
        f"{error.offset} (line {line})"
    )
    if error.context:
        message += f" in '{shorten_value(error.context)}'"
    message += f".{stopped}"

    if error.encoding == "utf-8":
        message += (
            " The file is probably in a legacy encoding. If Excel on Windows saved it, "
            "pass --encoding cp1252, or save it again as CSV UTF-8."
        )
    else:
        message += " Check that --encoding names the encoding the file was saved in."

    return InputFileError(file, message, line=line, byte_offset=error.offset)


def _os_error_message(error: BaseException, action: str) -> str:
    reason = getattr(error, "strerror", None) or str(error)

    return f"cannot be {action}: {reason}. Check that the file exists and is readable."


def _lookup_text_codec(encoding: str) -> str:
    # Return the canonical codec name, or raise ValueError for unknown or non-text codecs.
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise ValueError(
            f"unknown encoding {encoding!r}. Use a Python codec name such as utf-8 or cp1252."
        ) from None

    if not codec._is_text_encoding:  # type: ignore[attr-defined]
        raise ValueError(f"{encoding!r} is not a text encoding. Use one such as utf-8 or cp1252.")

    if codec.name == "utf-8-sig":
        return "utf-8"  # the reader strips a leading BOM itself

    return codec.name


def _is_line_safe(encoding: str) -> bool:
    # True when each LF-terminated line can be decoded on its own.
    if encoding.startswith(_STATEFUL_CODEC_PREFIXES):
        return False

    try:
        return _LINE_SAFE_PROBE.encode(encoding) == _LINE_SAFE_PROBE.encode("ascii")
    except UnicodeEncodeError:
        return False


def _validate_delimiter(delimiter: str) -> None:
    if len(delimiter) != 1:
        raise ValueError(
            f"delimiter must be one character or one of {', '.join(DELIMITER_NAMES)}, "
            f"not {delimiter!r}."
        )

    if delimiter in '"\r\n\x00':
        raise ValueError(f"delimiter {delimiter!r} is not allowed. Use , ; | or tab.")


def _is_csv_file(entry: Path) -> bool:
    if entry.name.startswith(".") or not entry.name.lower().endswith(".csv"):
        return False

    return entry.is_file()


def _escape_char(char: str) -> str:
    if char.isprintable() and char != "\\":
        return char

    return repr(char)[1:-1]
