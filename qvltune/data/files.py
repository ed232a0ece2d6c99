"""Read dataset files into raw JSON values, one at a time, with the line each starts on.

Accepted: JSONL, a JSON list, either one gzip-compressed (``.jsonl.gz``, ``.json.gz``, or any file
starting with gzip's magic bytes), UTF-8 with or without a byte-order mark. Files are streamed, never
read whole: a JSON list of millions of records is decoded element by element from a bounded buffer,
and a single line longer than ``MAX_RECORD_BYTES`` is reported and skipped without being held in
memory. A line that cannot be read (malformed JSON, invalid UTF-8, a NUL byte, too long) is an error
on that line and reading goes on; UTF-16/32 files are refused up front, naming the encoding.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from qvltune.data.record import Problem, RawItem

# One record (a JSONL line, or one element of a JSON list) may be at most this large. SFT records
# are text plus media paths: even a 100k-token conversation is well under 1 MiB; 32 MiB leaves room
# for anything legitimate while a corrupt multi-GB "line" is refused without being loaded.
MAX_RECORD_BYTES = 32 * 1024 * 1024
CHUNK = 1 << 20  # read size of a JSON list
SKIP_CHUNK = 16 << 20  # read size while skipping an over-long line

_BOMS = [  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian)"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)"),
]
# Ends the message of a problem after which nothing more of the file is read (ends_the_file).
READ_STOPS = "the rest of the file cannot be read"
_UTF8_FIX = "save the file as UTF-8 (e.g. iconv -f WINDOWS-1252 -t UTF-8 IN > OUT, or your editor's 'save as UTF-8')"


def ends_the_file(problem) -> bool:
    """Whether a reading problem lost the rest of its file (a truncated archive, a JSON list cut
    short, a file that cannot be opened): not one bad record that on_bad_sample: skip may drop."""
    return problem.code == "unreadable-file" or problem.message.endswith(READ_STOPS)


def read_items(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawItem]:
    """Yield the raw JSON values of a ``.json`` list or a ``.jsonl`` file (optionally gzip'd).

    Items that could not be read carry a ``problem`` with their line and index; a problem with
    ``index`` None concerns the whole file (nothing, or nothing more, can be read from it).
    """
    name = str(path)

    def file_problem(message: str, fix: str, code: str, line: int | None = None) -> RawItem:
        return RawItem(0, line, None, Problem("error", name, line, None, "", message, fix, code))

    try:
        raw = open(path, "rb")
    except OSError as e:
        yield file_problem(f"cannot open the file ({e.strerror})", "check the path and permissions", "unreadable-file")
        return
    with raw:
        size = max(1, path.stat().st_size)
        stream: BinaryIO = raw
        if raw.peek(2)[:2] == b"\x1f\x8b" or path.suffix == ".gz":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")

        def progress() -> float:
            return min(1.0, raw.tell() / size)

        try:
            yield from _read_stream(stream, name, max_record_bytes, progress, file_problem)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            yield file_problem(f"the gzip data is corrupt or truncated ({e}); {READ_STOPS}", "re-create the archive (gzip FILE.jsonl) or decompress what is left", "corrupt-gzip")
        except OSError as e:
            yield file_problem(f"cannot read the file ({e.strerror or e})", "check the file", "unreadable-file")


def _read_stream(stream: BinaryIO, name: str, limit: int, progress, file_problem) -> Iterator[RawItem]:
    # Leading blank lines are skipped to find the first character: '[' starts a JSON list.
    plain = isinstance(stream, io.BufferedReader)  # byte offsets are kept for plain files (not gzip)
    line_no = 0
    first = b""
    offset = -1
    while True:
        offset = stream.tell() if plain else -1
        first = stream.readline(limit + 1)
        line_no += 1
        if line_no == 1:
            for bom, encoding in _BOMS:
                if first.startswith(bom):
                    yield file_problem(f"the file is {encoding} text, not UTF-8", _UTF8_FIX.replace("WINDOWS-1252", encoding.split(" ")[0]), "encoding")
                    return
            if first.startswith(codecs.BOM_UTF8):
                first = first[len(codecs.BOM_UTF8) :]  # what Windows tools and spreadsheet exports write: harmless
                offset += len(codecs.BOM_UTF8) if plain else 0
            elif order := _utf16_without_bom(first):
                yield file_problem(f"the file looks like UTF-16 ({order}) text, not UTF-8", _UTF8_FIX.replace("WINDOWS-1252", "UTF-16"), "encoding")
                return
        if not first or first.strip():
            break
    if not first:
        yield file_problem("the file is empty", "add records, one JSON object per line", "empty-file")
        return
    if first.lstrip().startswith(b"["):
        yield from _read_json_list(stream, name, first, line_no, limit, progress)
    else:
        yield from _read_jsonl(stream, name, first, line_no, limit, progress, offset)


def _utf16_without_bom(head: bytes) -> str | None:
    """'little-endian' / 'big-endian' when the text starts like ASCII in UTF-16 (every other byte NUL)."""
    pairs = [head[i : i + 2] for i in range(0, min(len(head), 16) - 1, 2)]
    if len(pairs) < 2:
        return None
    if all(p[0] != 0 and p[1] == 0 for p in pairs):
        return "little-endian"
    if all(p[0] == 0 and p[1] != 0 for p in pairs):
        return "big-endian"
    return None


def _read_jsonl(stream: BinaryIO, name: str, first: bytes, first_no: int, limit: int, progress, offset: int = -1, index: int = 0, end: int | None = None) -> Iterator[RawItem]:
    """The records of JSONL lines from ``first`` on; ``offset`` >= 0 (a plain file): each item gets
    its line's byte offset, and reading stops at byte ``end`` (a part of the file, see ``read_part``)."""
    line_no = first_no
    line = first
    while line:
        if line.strip():
            item = _decode_line(line, name, line_no, index, limit, stream, progress)
            item.offset = offset
            yield item
            index += 1
        if offset >= 0:
            offset = stream.tell()
            if end is not None and offset >= end:
                return
        line = stream.readline(limit + 1)
        line_no += 1


def _decode_line(line: bytes, name: str, line_no: int, index: int, limit: int, stream: BinaryIO, progress) -> RawItem:
    def bad(message: str, fix: str, code: str) -> RawItem:
        return RawItem(index, line_no, None, Problem("error", name, line_no, index, "", message, fix, code), progress())

    if len(line) > limit and not line.endswith(b"\n"):
        skipped = len(line) + _skip_line(stream)
        return bad(f"line is {skipped:,} bytes, over the {limit:,}-byte limit for one record", "a record is one conversation on one line: check that the file is not binary or missing its line breaks", "line-too-long")
    nul = line.find(b"\x00")
    if nul >= 0:
        return bad(f"a NUL byte at column {nul + 1}", "the line is binary or corrupt: re-export the file as UTF-8 text", "nul-byte")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad(f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})", _UTF8_FIX, "encoding")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return bad(f"malformed JSON: {e.msg} at column {e.colno}", "each line of a .jsonl file must be one complete JSON object", "malformed-json")
    except RecursionError:
        return bad("malformed JSON: nested too deeply", "a record is an object of turns, not deeply nested lists", "malformed-json")
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        return bad(f"malformed JSON: {e}", "each line of a .jsonl file must be one complete JSON object", "malformed-json")
    return RawItem(index, line_no, value, None, progress())


def _skip_line(stream: BinaryIO) -> int:
    """Discard the rest of the current line in bounded chunks (a 2 GB line is never held whole);
    the number of bytes skipped, its line break included."""
    skipped = 0
    if isinstance(stream, io.BufferedReader):
        # Plain files: big reads and a search for the line break, then step back to just after it
        # (readline would copy and scan the same bytes in small pieces, several times slower).
        while True:
            chunk = stream.read(SKIP_CHUNK)
            if not chunk:
                return skipped
            nl = chunk.find(b"\n")
            if nl >= 0:
                stream.seek(nl + 1 - len(chunk), io.SEEK_CUR)
                return skipped + nl + 1
            skipped += len(chunk)
    while True:  # gzip: seeking back would decompress from the start again
        rest = stream.readline(SKIP_CHUNK)
        skipped += len(rest)
        if not rest or rest.endswith(b"\n"):
            return skipped


_WS = re.compile(r"\s*")


def _read_json_list(stream: BinaryIO, name: str, first: bytes, first_no: int, limit: int, progress) -> Iterator[RawItem]:
    """Decode ``[ {...}, {...} ]`` element by element from a bounded buffer (``raw_decode``), so a
    huge list is never loaded whole and each element gets the line it starts on."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    eof = False
    buf = ""
    line, last = first_no, 0  # buf[last] is on line `line`

    def more() -> bool:
        nonlocal buf, eof
        if eof:
            return False
        chunk = stream.read(CHUNK)
        if not chunk:
            eof = True
            buf += utf8.decode(b"", final=True)
            return False
        buf += utf8.decode(chunk)
        return True

    def skip_ws(pos: int) -> int:
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf) or not more():
                return pos

    def problem(at: int, index: int | None, message: str, fix: str) -> RawItem:
        where = line + buf.count("\n", last, at)
        return RawItem(index or 0, where, None, Problem("error", name, where, index, "", message, fix, "malformed-json"), progress())

    index = 0
    try:
        buf = utf8.decode(first)
        pos = skip_ws(buf.index("[") + 1)
        if buf.startswith("]", pos):
            pos += 1
        else:
            while True:
                line += buf.count("\n", last, pos)
                last = pos
                if pos > max(CHUNK, len(buf) // 2):  # drop what is decoded (amortised: the buffer stays bounded)
                    buf, pos, last = buf[pos:], 0, 0
                while True:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                    except json.JSONDecodeError as e:
                        if len(buf) - pos <= limit and more():
                            continue  # the element may only be cut by the buffer's end
                        if len(buf) - pos > limit:
                            yield problem(pos, index, f"record is over the {limit:,}-byte limit for one record; {READ_STOPS}", "split the file, or check that it is a list of conversation records")
                        else:
                            nul = " (a NUL byte)" if e.pos < len(buf) and buf[e.pos] == "\x00" else ""
                            yield problem(e.pos, index, f"malformed JSON: {e.msg}{nul}; {READ_STOPS}", "fix the JSON syntax (a validator such as `python -m json.tool FILE` shows it)")
                        return
                    except RecursionError:
                        yield problem(pos, index, f"malformed JSON: nested too deeply; {READ_STOPS}", "a record is an object of turns, not deeply nested lists")
                        return
                    except ValueError as e:  # e.g. an integer of more than 4300 digits
                        yield problem(pos, index, f"malformed JSON: {e}; {READ_STOPS}", "fix the JSON syntax")
                        return
                    if end == len(buf) and more():
                        continue  # a number at the buffer's end may go on in the next chunk
                    break
                yield RawItem(index, line, value, None, progress())
                index += 1
                pos = skip_ws(end)
                if buf.startswith(",", pos):
                    pos = skip_ws(pos + 1)
                    continue
                if buf.startswith("]", pos):
                    pos += 1
                    break
                yield problem(pos, index, f"expected ',' or ']' between records; {READ_STOPS}", "fix the JSON syntax")
                return
        while True:  # only whitespace may follow the closing ]
            if buf[pos:].strip():
                yield problem(pos + len(buf[pos:]) - len(buf[pos:].lstrip()), None, "unexpected text after the closing ]", "a .json dataset must be a single list")
                return
            pos = len(buf)
            if not more():
                return
    except UnicodeDecodeError as e:
        yield problem(len(buf), None, f"not UTF-8 text ({e.reason}); {READ_STOPS}", _UTF8_FIX)


# ----------------------------------------------------------------------------------------------
# Parts of a plain JSONL file, read in parallel (check-data --workers, training's first index build)


def jsonl_parts(path: Path, parts: int, max_record_bytes: int = MAX_RECORD_BYTES) -> list[tuple[int, int]] | None:
    """About ``parts`` byte ranges of a plain JSONL file, each starting at a line start, for workers
    to read on their own (``count_part``, then ``read_part``); None when the file must be read in one
    pass by ``read_items`` (gzip, a JSON list, UTF-16/32 text, an empty or unreadable file), which
    then also reports what is wrong with it."""
    try:
        f = open(path, "rb")
    except OSError:
        return None
    with f:
        size = path.stat().st_size
        if f.peek(2)[:2] == b"\x1f\x8b" or path.suffix == ".gz":
            return None
        first = f.readline(max_record_bytes + 1)
        if any(first.startswith(bom) for bom, _ in _BOMS) or _utf16_without_bom(first.removeprefix(codecs.BOM_UTF8)):
            return None
        head = first.removeprefix(codecs.BOM_UTF8)
        while not head.strip() and f.tell() < size:  # leading blank lines: the first text decides
            head = f.readline(max_record_bytes + 1)
        if not head.strip() or head.lstrip().startswith(b"["):
            return None
        bounds = [0]
        for k in range(1, max(1, parts)):
            target = max(size * k // parts, bounds[-1])
            f.seek(target)
            if target > 0:
                _skip_line(f)  # to the start of the next line
            pos = f.tell()
            if bounds[-1] < pos < size:
                bounds.append(pos)
        bounds.append(size)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _part_lines(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """The lines of bytes [start, end) in bounded pieces (a line longer than SKIP_CHUNK comes as several)."""
    f.seek(start)
    if start == 0 and f.peek(3)[:3] == codecs.BOM_UTF8:
        f.seek(3)
    while f.tell() < end:
        piece = f.readline(min(SKIP_CHUNK, end - f.tell()))
        if not piece:
            return
        yield piece


def count_part(path: Path, start: int, end: int) -> tuple[int, int]:
    """(line breaks, records) in a part from ``jsonl_parts``: the numbering the next part starts from."""
    breaks = records = 0
    text = False  # the current line has something other than whitespace (as read_items' line.strip())
    with open(path, "rb") as f:
        for piece in _part_lines(f, start, end):
            text = text or bool(piece.strip())
            if piece.endswith(b"\n"):
                breaks += 1
                records += text
                text = False
        records += text  # a last line without a line break
    return breaks, records


def read_part(path: Path, start: int, end: int, first_line: int, first_index: int, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawItem]:
    """The items of one part of a plain JSONL file, numbered as ``read_items`` numbers them (the
    line and record numbers the part starts at come from ``count_part`` over the parts before)."""
    name = str(path)
    size = max(1, path.stat().st_size)
    with open(path, "rb") as f:
        f.seek(start)
        if start == 0 and f.peek(3)[:3] == codecs.BOM_UTF8:
            f.seek(3)
        offset = f.tell()
        first = f.readline(max_record_bytes + 1)
        if offset >= end or not first:
            return
        yield from _read_jsonl(f, name, first, first_line, max_record_bytes, lambda: min(1.0, f.tell() / size), offset, first_index, end)


def records_at(path: Path, wanted: list[tuple[int, int, int]], max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawItem]:
    """The items of some records of a file, each given as (index, line, byte offset): read alone at
    their offsets in a plain JSONL file, else picked from one pass over the file (gzip, JSON list)."""
    if not wanted:
        return
    if all(offset >= 0 for _, _, offset in wanted):
        name = str(path)
        with open(path, "rb") as f:
            for index, line, offset in sorted(wanted, key=lambda w: w[2]):
                f.seek(offset)
                item = _decode_line(f.readline(max_record_bytes + 1), name, line, index, max_record_bytes, f, lambda: 0.0)
                item.offset = offset
                yield item
        return
    indices = {index for index, _, _ in wanted}
    for item in read_items(path, max_record_bytes):
        if item.problem is None and item.index in indices:
            yield item
