"""A ZIP's central directory, walked by hand within bounds, before :mod:`zipfile` sees it.

Both stages of reading an upload need it: the API's sniffing (``ingestion.detect``) tells a DOCX
from other ZIP-based formats by the names in the directory, and the worker's extraction
(``ingestion.extract``) walks the same directory before it lets :mod:`zipfile` and python-docx
open the file. :mod:`zipfile` builds one object per directory record however many a crafted file
holds, so the walk here refuses a ZIP at the first record past :data:`MAX_ZIP_ENTRIES`, and a
format version :mod:`zipfile` cannot unpack, without inflating anything.
"""

from __future__ import annotations

import struct

from atrium.ingestion.exceptions import BadDocument

#: Parts a DOCX may have (Word writes a few dozen; thousands only come from crafted files).
MAX_ZIP_ENTRIES = 5000
_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CD_RECORD = b"PK\x01\x02"
_EOCD_SIZE = 22
_EOCD64_LOCATOR_SIZE = 20
_EOCD64_SIZE = 56
_CD_RECORD_SIZE = 46
#: The newest ZIP format version (6.3) :mod:`zipfile` unpacks; it refuses a later one.
_MAX_ZIP_EXTRACT_VERSION = 63


def damaged_zip(label: str) -> BadDocument:
    """The refusal of a ZIP whose directory cannot be read."""
    return BadDocument(
        f"{label} looks like a ZIP or Word file but is damaged; save it again and upload it"
    )


def too_many_parts(label: str, count: str) -> BadDocument:
    """The refusal of a ZIP with more parts than a Word document has (``count``, as written)."""
    return BadDocument(
        f"{label} is a ZIP with {count} parts; a Word document has at most {MAX_ZIP_ENTRIES:,}. "
        "Open it in Word, save it again as .docx and upload the new file"
    )


def _unsupported_zip(label: str, version: int) -> BadDocument:
    return BadDocument(
        f"{label} is a ZIP that needs version {version / 10:.1f} of the format to unpack, which "
        "Word does not write; open it in Word, save it again as .docx and upload the new file"
    )


def _zip_directory_span(data: bytes, label: str) -> tuple[int, int, int]:
    """Where a ZIP's central directory lies, from its end records alone.

    Found exactly as :mod:`zipfile` finds it (the end record at the very end, else the last one
    in the final 64 KiB; a ZIP64 end record right before its locator), so the walk below reads
    the same bytes the worker's ``zipfile`` will.

    Returns:
        The number of entries the end record announces, where the directory starts and its
        declared size in bytes.

    Raises:
        BadDocument: no end record, a multi-disk ZIP, or records that do not fit the file.
    """
    size = len(data)
    if size >= _EOCD_SIZE and data.startswith(_EOCD, size - _EOCD_SIZE) and data.endswith(b"\0\0"):
        at = size - _EOCD_SIZE
    else:
        at = data.rfind(_EOCD, max(0, size - 0x10000 - _EOCD_SIZE))
        if at < 0 or size - at < _EOCD_SIZE:
            raise damaged_zip(label)
    count, directory_size = struct.unpack_from("<10xHI", data, at)
    end = at
    if at >= _EOCD64_LOCATOR_SIZE and data.startswith(_EOCD64_LOCATOR, at - _EOCD64_LOCATOR_SIZE):
        disk, _, disks = struct.unpack_from("<4xIQI", data, at - _EOCD64_LOCATOR_SIZE)
        if disk != 0 or disks > 1:
            raise damaged_zip(label)
        record = at - _EOCD64_LOCATOR_SIZE - _EOCD64_SIZE
        if record >= 0 and data.startswith(_EOCD64, record):
            count, directory_size = struct.unpack_from("<32xQQ", data, record)
            end = record
    # Like zipfile, the directory is taken to end where the end records begin, whatever offset
    # they claim (bytes before the ZIP, as in a self-extracting archive, shift every offset).
    start = end - directory_size
    if start < 0:
        raise damaged_zip(label)
    return int(count), start, int(directory_size)


def zip_walk(data: bytes, label: str, wanted: frozenset[bytes] = frozenset()) -> set[bytes]:
    """Walk a ZIP's central directory by hand, at most ``MAX_ZIP_ENTRIES`` records of it.

    Neither the entry count nor the size in the end record bounds what :mod:`zipfile` builds: it
    makes one object per record in the directory's declared size, so a 10 MB file whose end
    record says "1 entry" holds 200,000 of them. This walk refuses the ZIP at the first record
    past the limit, keeps only the names asked for (nothing per entry otherwise), and refuses a
    format version ``zipfile`` cannot open; a directory it accepts is one ``zipfile`` can list
    in bounded memory.

    Args:
        data: the whole ZIP.
        label: how messages name the upload.
        wanted: the names (as stored bytes) to report when present.

    Returns:
        The names of ``wanted`` found in the directory.

    Raises:
        BadDocument: more entries than a Word document has, a damaged directory or an
            unsupported format version (all 422).
    """
    count, start, size = _zip_directory_span(data, label)
    if count > MAX_ZIP_ENTRIES:
        raise too_many_parts(label, f"{count:,}")
    longest = max((len(name) for name in wanted), default=0)
    found: set[bytes] = set()
    records = 0
    walked = 0
    while walked < size:
        at = start + walked
        if at + _CD_RECORD_SIZE > len(data) or not data.startswith(_CD_RECORD, at):
            raise damaged_zip(label)
        records += 1
        if records > MAX_ZIP_ENTRIES:
            raise too_many_parts(label, f"more than {MAX_ZIP_ENTRIES:,}")
        version = data[at + 6]
        if version > _MAX_ZIP_EXTRACT_VERSION:
            raise _unsupported_zip(label, version)
        name_length, extra_length, comment_length = struct.unpack_from("<3H", data, at + 28)
        name_at = at + _CD_RECORD_SIZE
        if name_at + name_length > len(data):
            raise damaged_zip(label)
        if name_length <= longest:
            name = data[name_at : name_at + name_length]
            if name in wanted:
                found.add(name)
        walked += _CD_RECORD_SIZE + name_length + extra_length + comment_length
    return found
