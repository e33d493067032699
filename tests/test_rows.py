"""Tests for tasks.rows, the streaming CSV reader. Each test writes its files to tmp_path."""

from __future__ import annotations

import csv
import io
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.rows import (
    MAX_FIELD_CHARS,
    MAX_LINE_BYTES,
    MAX_PHRASE_BYTES,
    MAX_VALUE_CHARS,
    InputFileError,
    ReadOptions,
    Row,
    RowProblem,
    find_input_files,
    parse_delimiter,
    read_rows,
    shorten_value,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

MEMORY_SMALL_ROWS = 100_000
MEMORY_LARGE_ROWS = 1_000_000
MAX_RSS_GROWTH_KIB = 8 * 1024  # allowed peak RSS growth from the small to the large file


def write_csv(tmp_path: Path, data: bytes | str, name: str = "input.csv") -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def read_all(path: Path, **options: object) -> list[Row | RowProblem]:
    return list(read_rows(path, ReadOptions(**options)))  # type: ignore[arg-type]


def rows_of(items: list[Row | RowProblem]) -> list[tuple[int, str]]:
    return [(item.line, item.phrase) for item in items if isinstance(item, Row)]


def problems_of(items: list[Row | RowProblem]) -> list[RowProblem]:
    return [item for item in items if isinstance(item, RowProblem)]


def read_error(path: Path, **options: object) -> InputFileError:
    with pytest.raises(InputFileError) as caught:
        read_all(path, **options)
    return caught.value


# find_input_files


def test_find_files_sorted_and_ignored(tmp_path: Path) -> None:
    for name in ["b.csv", "a.csv", "C.CSV", "notes.txt", ".hidden.csv", "._a.csv"]:
        (tmp_path / name).write_text("phrase\nx\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "broken.csv").symlink_to(tmp_path / "missing.csv")
    (tmp_path / "link.csv").symlink_to(tmp_path / "a.csv")

    csv_files, ignored = find_input_files(tmp_path)

    assert [path.name for path in csv_files] == ["C.CSV", "a.csv", "b.csv", "link.csv"]
    assert sorted(path.name for path in ignored) == sorted(
        [".hidden.csv", "._a.csv", "broken.csv", "folder.csv", "notes.txt", "sub"]
    )


def test_find_files_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InputFileError) as caught:
        find_input_files(tmp_path / "nope")

    assert caught.value.file == str(tmp_path / "nope")
    assert "cannot list the data directory" in str(caught.value)


# Encoding, BOM, line endings, quoting


def test_bom_crlf_quoted_fields(tmp_path: Path) -> None:
    data = '\ufeffphrase,note\r\n"a, b","plain"\r\n"say ""hi""","two\r\nlines"\r\nlast,x\r\n'
    path = write_csv(tmp_path, data)

    items = read_all(path)

    assert rows_of(items) == [(2, "a, b"), (3, 'say "hi"'), (5, "last")]
    assert problems_of(items) == []
    assert all(item.file == str(path) for item in items)


def test_bom_not_in_single_column_name(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "\ufeffphrase\r\n\ufeffinner\r\n")

    items = read_all(path, column="phrase")

    assert rows_of(items) == [(2, "\ufeffinner")]


def test_multiline_phrase_reports_start_line(tmp_path: Path) -> None:
    data = 'phrase\r\n"one\r\ntwo"\r\n"three\nb\nc\nd\ne"\nlast\n'
    path = write_csv(tmp_path, data)

    items = read_all(path)

    assert rows_of(items) == [(2, "one\r\ntwo"), (4, "three\nb\nc\nd\ne"), (9, "last")]
    assert problems_of(items) == []


def test_line_numbers_after_multiline_records(tmp_path: Path) -> None:
    data = 'id,phrase\r\n1,"a"\r\n"2\r\n\r\n",b\r\n3,"c"\n4,"d\ne"\n5,f\r\n'
    path = write_csv(tmp_path, data)

    items = read_all(path)

    assert rows_of(items) == [(2, "a"), (3, "b"), (6, "c"), (7, "d\ne"), (9, "f")]
    assert problems_of(items) == []


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_random_records_match_csv_writer(tmp_path: Path, line_end: str) -> None:
    generator = random.Random(line_end)
    phrase_alphabet = "ab ,;\"'|\té日😀"
    note_alphabet = phrase_alphabet + "\n"
    expected: list[tuple[int, str]] = []
    chunks: list[str] = []
    line = 1
    for number in range(-1, 60_000):
        phrase = "p" + "".join(generator.choices(phrase_alphabet, k=generator.randrange(30)))
        note = "".join(generator.choices(note_alphabet, k=generator.randrange(40)))
        fields = ["id", "phrase", "note"] if number < 0 else [str(number), phrase, note]

        record = io.StringIO()
        csv.writer(record, lineterminator=line_end).writerow(fields)
        chunks.append(record.getvalue())

        if number >= 0:
            expected.append((line, phrase.strip()))
        line += record.getvalue().count("\n")
    path = write_csv(tmp_path, "".join(chunks))

    items = read_all(path)

    assert path.stat().st_size > 2 * 1024 * 1024
    assert problems_of(items) == []
    assert rows_of(items) == expected


def test_cr_only_line_endings(tmp_path: Path) -> None:
    path = write_csv(tmp_path, 'phrase\r"a\rb"\rc\r')

    items = read_all(path)

    assert rows_of(items) == [(2, "a\rb"), (4, "c")]
    assert problems_of(items) == []


def test_lone_cr_in_unquoted_field(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\na\rb\nc\n")

    items = read_all(path)

    assert rows_of(items) == [(3, "c")]
    assert problems_of(items)[0].line == 2
    assert "carriage return" in problems_of(items)[0].reason


def test_cp1252_without_encoding_raises(tmp_path: Path) -> None:
    path = write_csv(tmp_path, b"phrase\nplain\ncaf\xe9 au lait\n")

    items: list[Row | RowProblem] = []
    with pytest.raises(InputFileError) as caught:
        for item in read_rows(path, ReadOptions()):
            items.append(item)

    error = caught.value
    assert rows_of(items) == [(2, "plain")]
    assert error.file == str(path)
    assert error.line == 3
    assert error.byte_offset == len(b"phrase\nplain\ncaf")
    message = str(error)
    assert message.startswith(f"{path}: not valid UTF-8")
    assert "byte offset 16 (line 3)" in message
    assert "--encoding cp1252" in message
    assert "Reading stopped after line 2" in message


def test_cp1252_with_encoding_decodes(tmp_path: Path) -> None:
    path = write_csv(tmp_path, b"phrase\ncaf\xe9\n\x93quoted\x94\n")

    items = read_all(path, encoding="cp1252")

    assert rows_of(items) == [(2, "café"), (3, "\u201cquoted\u201d")]


def test_bad_byte_after_many_rows(tmp_path: Path) -> None:
    good = b"".join(b"row %d\n" % number for number in range(5000))
    path = write_csv(tmp_path, b"phrase\n" + good + b"ok \xff\n")

    items: list[Row | RowProblem] = []
    with pytest.raises(InputFileError) as caught:
        for item in read_rows(path, ReadOptions()):
            items.append(item)

    assert len(items) == 5000
    assert items[-1] == Row(str(path), 5001, "row 4999")
    assert caught.value.line == 5002
    assert caught.value.byte_offset == len(b"phrase\n" + good + b"ok ")


def test_bad_byte_after_chunk_boundary(tmp_path: Path) -> None:
    good = b"".join(b"row number %07d\n" % number for number in range(200_000))
    path = write_csv(tmp_path, b"phrase\n" + good + b"caf\xe9\nnever\n")

    items: list[Row | RowProblem] = []
    with pytest.raises(InputFileError) as caught:
        for item in read_rows(path, ReadOptions()):
            items.append(item)

    assert len(good) > 2 * 1024 * 1024
    assert len(items) == 200_000
    assert caught.value.line == 200_002
    assert caught.value.byte_offset == len(b"phrase\n" + good + b"caf")
    assert "in 'caf\ufffd'" in str(caught.value)


def test_multibyte_characters_across_chunks(tmp_path: Path) -> None:
    phrases = ["é" * (number % 300 + 1) + "日本" for number in range(20_000)]
    path = write_csv(tmp_path, "phrase\n" + "".join(f"{phrase}\n" for phrase in phrases))

    items = read_all(path, max_phrase_bytes=4096)

    assert path.stat().st_size > 2 * 1024 * 1024
    assert [phrase for _, phrase in rows_of(items)] == phrases


def test_bad_byte_in_header_raises_first(tmp_path: Path) -> None:
    path = write_csv(tmp_path, b"phr\xe4se\nx\n")

    rows = read_rows(path, ReadOptions())
    with pytest.raises(InputFileError) as caught:
        next(rows)

    assert caught.value.line == 1
    assert "Reading stopped" not in str(caught.value)


def test_utf16_bom_without_encoding(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\nx\n".encode("utf-16"))

    error = read_error(path)

    assert "--encoding utf-16" in str(error)


def test_utf16_with_encoding(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "id\tphrase\r\n1\tcafé\r\n2\t日本\r\n".encode("utf-16"))

    items = read_all(path, encoding="utf-16")

    assert rows_of(items) == [(2, "café"), (3, "日本")]


def test_utf16_invalid_names_line(tmp_path: Path) -> None:
    text = "phrase\nabc\n\ud800x\n"
    path = write_csv(tmp_path, text.encode("utf-16-le", "surrogatepass"))

    error = read_error(path, encoding="utf-16-le")

    assert error.line == 3
    assert error.byte_offset == len("phrase\nabc\n".encode("utf-16-le"))
    assert "not valid UTF-16-LE" in str(error)


def test_utf8_bom_with_other_encoding(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "\ufeffphrase\nx\n")

    error = read_error(path, encoding="cp1252")

    assert "Drop --encoding" in str(error)


def test_utf8_file_with_cp1252_encoding(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\ncafé\n")

    message = str(read_error(path, encoding="cp1252"))

    assert "is UTF-8 text" in message
    assert "Drop --encoding" in message


def test_ascii_file_with_cp1252_encoding(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\ncafe\n")

    assert rows_of(read_all(path, encoding="cp1252")) == [(2, "cafe")]


def test_utf8_sig_encoding_accepted(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "\ufeffphrase\nx\n")

    assert rows_of(read_all(path, encoding="utf-8-sig")) == [(2, "x")]


# Delimiters


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_delimiter_detected(tmp_path: Path, delimiter: str) -> None:
    lines = [["id", "phrase", "note"], ["1", "alpha", "x, y"], ["2", "beta", ""]]
    data = "".join(delimiter.join(fields) + "\n" for fields in lines)
    if delimiter == ",":
        data = data.replace("x, y", '"x, y"')
    path = write_csv(tmp_path, data)

    assert rows_of(read_all(path)) == [(2, "alpha"), (3, "beta")]


def test_delimiter_explicit(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase;note\na,b;c\n")

    assert rows_of(read_all(path, delimiter=";")) == [(2, "a,b")]


def test_delimiter_semicolon_beats_decimal_comma(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase;price\napple;1,50\npear;2,00\n")

    assert rows_of(read_all(path)) == [(2, "apple"), (3, "pear")]


def test_one_column_header_over_split_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\nalpha;1\nbeta;2\ngamma\n")

    error = read_error(path)

    assert error.line == 1
    assert "--delimiter ';'" in str(error)
    assert "2 of the next 3 rows" in str(error)


def test_one_column_tab_rows_raise(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\nalpha\t1\nbeta\t2\n")

    assert "--delimiter tab" in str(read_error(path))


def test_one_column_quoted_commas_ok(tmp_path: Path) -> None:
    path = write_csv(tmp_path, 'country\n"Korea, Republic of"\n"Bonaire, Sint Eustatius"\nChad\n')

    assert rows_of(read_all(path)) == [
        (2, "Korea, Republic of"),
        (3, "Bonaire, Sint Eustatius"),
        (4, "Chad"),
    ]


def test_one_column_few_unquoted_commas(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\nParis, France\nBerlin\nRome\n")

    items = read_all(path)

    assert rows_of(items) == [(3, "Berlin"), (4, "Rome")]
    assert problems_of(items)[0].reason == "row has 2 fields, header has 1"


def test_sep_hint_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "sep=;\r\nid;phrase\r\n1;a,b\r\n")

    assert rows_of(read_all(path)) == [(3, "a,b")]


# Header and whole-file problems


def test_missing_column_lists_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "id,term,note\n1,a,b\n")

    message = str(read_error(path))

    assert "none is named 'phrase'" in message
    assert "'id', 'term', 'note'" in message
    assert "--column" in message


def test_explicit_column_not_found(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\nx\n")

    message = str(read_error(path, column="term"))

    assert "column 'term' not found" in message
    assert "'phrase'" in message


def test_explicit_column_chosen(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "id, Term ,phrase\n1,alpha,beta\n")

    assert rows_of(read_all(path, column="term")) == [(2, "alpha")]


def test_duplicate_phrase_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase,id,phrase\na,1,b\n")

    assert "columns 1, 3" in str(read_error(path))


def test_header_only_raises(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\r\n\r\n\r\n")

    assert "has a header (line 1) but no data rows" in str(read_error(path))


def test_empty_file_raises(tmp_path: Path) -> None:
    path = write_csv(tmp_path, b"")

    assert str(read_error(path)).startswith(f"{path}: empty file")


def test_blank_lines_only_raise(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "\n  \r\n\n")

    assert "empty file" in str(read_error(path))


def test_bom_only_raises(tmp_path: Path) -> None:
    path = write_csv(tmp_path, b"\xef\xbb\xbf")

    assert "empty file" in str(read_error(path))


def test_blank_first_line_raises(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "\nphrase\nx\n")

    assert "line 1 is blank" in str(read_error(path))


def test_zip_file_not_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path, b"PK\x03\x04\x14\x00\x06\x00" + bytes(200))

    message = str(read_error(path))

    assert "not a text CSV file" in message
    assert ".xlsx" in message


def test_random_bytes_not_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path, random.Random(7).randbytes(4096))

    assert "not a text CSV file" in str(read_error(path))


def test_random_bytes_not_csv_with_encoding(tmp_path: Path) -> None:
    path = write_csv(tmp_path, random.Random(8).randbytes(4096))

    assert "not a text CSV file" in str(read_error(path, encoding="latin-1"))


def test_utf16_without_bom_not_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\nalpha\nbeta\n".encode("utf-16-le"))

    assert "--encoding utf-16-le" in str(read_error(path))


def test_directory_path_raises(tmp_path: Path) -> None:
    error = read_error(tmp_path)

    assert error.file == str(tmp_path)
    assert "cannot be opened" in str(error)


def test_missing_file_raises(tmp_path: Path) -> None:
    assert "No such file" in str(read_error(tmp_path / "gone.csv"))


# Row problems


def test_ragged_rows_are_problems(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "id,phrase\n1,a\n2,b,extra\n3\n4,d\n")

    items = read_all(path)

    assert rows_of(items) == [(2, "a"), (5, "d")]
    reasons = [(problem.line, problem.reason) for problem in problems_of(items)]
    assert reasons == [(3, "row has 3 fields, header has 2"), (4, "row has 1 fields, header has 2")]
    assert problems_of(items)[0].value == "2,b,extra"


def test_blank_phrase_is_problem(tmp_path: Path) -> None:
    path = write_csv(tmp_path, 'phrase\n   \n""\n\n x \n')

    items = read_all(path)

    assert rows_of(items) == [(5, "x")]
    problems = problems_of(items)
    assert [(problem.line, problem.reason, problem.value) for problem in problems] == [
        (2, "blank phrase", "   "),
        (3, "blank phrase", ""),
    ]


def test_nul_in_quoted_field_yielded(tmp_path: Path) -> None:
    path = write_csv(tmp_path, b'phrase\n"a\x00b"\nok\n')

    items = read_all(path)

    assert rows_of(items) == [(2, "a\x00b"), (3, "ok")]
    assert problems_of(items) == []


@pytest.mark.parametrize(
    "char", ["\x00", "\x01", "\x08", "\x0b", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"]
)
def test_control_characters_yielded(tmp_path: Path, char: str) -> None:
    path = write_csv(tmp_path, f"phrase\nx{char}y\nafter\n")

    items = read_all(path)

    assert rows_of(items) == [(2, f"x{char}y"), (3, "after")]
    assert problems_of(items) == []


def test_legal_phrases_unchanged(tmp_path: Path) -> None:
    phrases = [
        "../../etc/passwd",
        "a/b\\c",
        "tab\tinside",
        "emoji 😀 👩‍👩‍👧",
        "café naïve Ærø",
        "日本語のフレーズ",
        "\u202eright-to-left override",
        "zero\u200bwidth",
        "; DROP TABLE x; --",
        "=cmd|' /C calc'!A0",
    ]
    data = "phrase\n" + "".join(f'"{phrase}"\n' for phrase in phrases)
    path = write_csv(tmp_path, data)

    assert [phrase for _, phrase in rows_of(read_all(path))] == phrases


def test_phrase_over_byte_limit(tmp_path: Path) -> None:
    at_limit = "é" * (MAX_PHRASE_BYTES // 2)
    over_limit = at_limit + "x"
    path = write_csv(tmp_path, f"phrase\n{at_limit}\n{over_limit}\n")

    items = read_all(path)

    assert rows_of(items) == [(2, at_limit)]
    problem = problems_of(items)[0]
    assert (
        problem.reason == f"phrase is {MAX_PHRASE_BYTES + 1} bytes; the limit is {MAX_PHRASE_BYTES}"
    )
    assert len(problem.value) == MAX_VALUE_CHARS
    assert problem.value.endswith("…")


def test_custom_byte_limit(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "phrase\nabcd\nabcde\n")

    items = read_all(path, max_phrase_bytes=4)

    assert rows_of(items) == [(2, "abcd")]
    assert problems_of(items)[0].reason == "phrase is 5 bytes; the limit is 4"


def test_megabyte_field_is_problem(tmp_path: Path) -> None:
    big = "x" * (1024 * 1024)
    path = write_csv(tmp_path, f'id,phrase\n1,{big}\n2,"{big}"\n3,ok\n')

    items = read_all(path)

    assert rows_of(items) == [(4, "ok")]
    assert [problem.line for problem in problems_of(items)] == [2, 3]
    assert problems_of(items)[0].reason == "phrase is 1048576 bytes; the limit is 1024"


def test_line_over_limit_raises(tmp_path: Path) -> None:
    path = write_csv(tmp_path, b"phrase\nok\n" + b"x" * (MAX_LINE_BYTES + 10) + b"\nafter\n")

    items: list[Row | RowProblem] = []
    with pytest.raises(InputFileError) as caught:
        for item in read_rows(path, ReadOptions()):
            items.append(item)

    assert rows_of(items) == [(2, "ok")]
    assert caught.value.line == 3
    assert f"line 3 is longer than {MAX_LINE_BYTES} bytes" in str(caught.value)


def test_quoted_field_over_limit_raises(tmp_path: Path) -> None:
    line = b"y" * (1024 * 1024 - 1) + b"\n"
    lines_needed = MAX_FIELD_CHARS // len(line) + 2
    path = write_csv(tmp_path, b'phrase\nok\n"' + line * lines_needed + b'"\n')

    error = read_error(path)

    assert error.line == 3
    assert f"longer than {MAX_FIELD_CHARS} characters" in str(error)


# Values, options and messages


def test_problem_str_format() -> None:
    problem = RowProblem("data/x.csv", 12, "blank phrase", "   ")

    assert str(problem) == "data/x.csv:12: skipped: blank phrase ('   ')"


def test_shorten_value_cases() -> None:
    assert shorten_value("plain") == "plain"
    assert shorten_value("a\x00b\n\\") == "a\\x00b\\n\\\\"
    assert shorten_value("😀" * 60) == "😀" * 60
    assert shorten_value("x" * 61) == "x" * 59 + "…"
    assert shorten_value("\x00" * 20) == "\\x00" * 14 + "…"
    assert len(shorten_value("\x00" * 20)) <= MAX_VALUE_CHARS


def test_read_options_validation() -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        ReadOptions(encoding="no-such-codec")
    with pytest.raises(ValueError, match="not a text encoding"):
        ReadOptions(encoding="base64")
    with pytest.raises(ValueError, match="one character"):
        ReadOptions(delimiter=";;")
    with pytest.raises(ValueError, match="not allowed"):
        ReadOptions(delimiter='"')
    with pytest.raises(ValueError, match="at least 1"):
        ReadOptions(max_phrase_bytes=0)
    with pytest.raises(ValueError, match="blank"):
        ReadOptions(column=" ")


def test_read_options_delimiter_name(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "id\tphrase\n1\ta;b\n")

    assert ReadOptions(delimiter="\\t").delimiter == "\t"
    assert rows_of(read_all(path, delimiter="tab")) == [(2, "a;b")]


def test_parse_delimiter_names() -> None:
    assert parse_delimiter("tab") == "\t"
    assert parse_delimiter("\\t") == "\t"
    assert parse_delimiter("TAB") == "\t"
    assert parse_delimiter(";") == ";"
    assert parse_delimiter("pipe") == "|"
    with pytest.raises(ValueError):
        parse_delimiter("ab")


def test_countries_fixture_reads() -> None:
    path = PROJECT_ROOT / "data" / "countries.csv"
    if not path.exists():
        pytest.skip("data/countries.csv is not in this checkout")

    items = read_all(path)

    assert problems_of(items) == []
    assert len(items) > 100


# Memory and speed


# The child reports VmHWM from /proc/self/status, the peak RSS of its own address space.
# ru_maxrss from resource.getrusage survives execve on Linux, so in a child of this pytest
# process it can report the parent's peak instead. It is printed for comparison only.
MEASURE_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time
    from pathlib import Path
    from tasks.rows import ReadOptions, Row, read_rows

    started = time.perf_counter()
    rows = 0
    for item in read_rows(Path(sys.argv[1]), ReadOptions()):
        rows += isinstance(item, Row)
    seconds = time.perf_counter() - started

    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    peak_kib = int(fields["VmHWM"].split()[0])
    print(rows, seconds, peak_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def measure_read(path: Path) -> tuple[int, float, int, int]:
    """Read ``path`` in a fresh interpreter.

    Returns (rows, seconds, VmHWM peak RSS in KiB, ru_maxrss in KiB).
    """
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
        timeout=120,
    )
    rows, seconds, peak_kib, maxrss_kib = completed.stdout.split()
    return int(rows), float(seconds), int(peak_kib), int(maxrss_kib)


def write_generated(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("phrase\n")
        for number in range(rows):
            handle.write(f"search phrase number {number}\n")


def test_memory_flat_for_million_rows(tmp_path: Path) -> None:
    small = tmp_path / "small.csv"
    large = tmp_path / "large.csv"
    write_generated(small, MEMORY_SMALL_ROWS)
    write_generated(large, MEMORY_LARGE_ROWS)

    small_rows, small_seconds, small_peak, small_maxrss = measure_read(small)
    large_rows, large_seconds, large_peak, large_maxrss = measure_read(large)

    for rows, seconds, peak, maxrss in [
        (small_rows, small_seconds, small_peak, small_maxrss),
        (large_rows, large_seconds, large_peak, large_maxrss),
    ]:
        print(
            f"\n{rows} rows: VmHWM {peak} KiB, ru_maxrss {maxrss} KiB, "
            f"{seconds:.2f} s, {rows / seconds:,.0f} rows/s",
            end="",
        )
    assert small_rows == MEMORY_SMALL_ROWS
    assert large_rows == MEMORY_LARGE_ROWS
    assert large_peak - small_peak < MAX_RSS_GROWTH_KIB
