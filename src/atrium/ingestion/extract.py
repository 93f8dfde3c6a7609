"""Recognise a document by its content and extract its text.

The type comes from the bytes, never from the file name: PDF by its ``%PDF-`` header, DOCX as a
ZIP holding ``word/document.xml``, HTML by sniffing its first tag (the WHATWG rules), anything
else that decodes as UTF-8 (or UTF-16/32 with a byte-order mark) is text, Markdown when it
looks like Markdown. A declared ``Content-Type`` that contradicts the content is refused as
mislabelled (415), as is any other binary format; an empty or undecodable text, or a damaged
ZIP, is refused with 422. Every refusal says what to do.

Two stages, for two places (see docs/security.md, "Uploads"):

* :func:`inspect_upload` runs in the API on untrusted bytes, so it only *sniffs*: magic bytes, a
  bounded look at the first bytes, a ZIP's central directory (never inflating a part), and text
  decoded piece by piece without keeping it. Its time is linear in the size and its memory does
  not grow with it.
* :func:`extract` parses the whole document and runs only in the worker, inside the sandbox
  (``ingestion.sandbox``: a child process with a memory and a time limit). It still checks a
  DOCX's parts (count, declared and actual inflated sizes, compression ratio) before handing it to
  python-docx, and caps a PDF's pages. An encrypted, image-only or damaged PDF, a Word file or
  HTML page without text, or a ZIP bomb ends the document ``failed`` with the reason.

Every regular expression here may see user text: each runs in linear time (no nested or
overlapping quantifiers, nothing that crosses lines, possessive quantifiers where a failing match
would otherwise backtrack); tests/test_untrusted_files.py feeds each 1 MB adversarial inputs.

Extraction keeps structure where the chunker can use it: Markdown stays Markdown, and DOCX and
HTML headings, list items and tables become Markdown, so the Markdown splitter cuts at sections.
"""

from __future__ import annotations

import codecs
import io
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import filetype

from atrium.ingestion.exceptions import BadDocument

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"

SUPPORTED = "plain text, Markdown, HTML, PDF or DOCX"

_HUMAN = {
    PDF: "a PDF document",
    DOCX: "a Word (DOCX) document",
    HTML: "HTML",
    MARKDOWN: "Markdown text",
    TEXT: "plain text",
}

# Content types that say nothing about the content; detection decides alone.
_GENERIC_TYPES = frozenset(
    {
        "",
        "application/octet-stream",
        "binary/octet-stream",
        "application/unknown",
        "application/x-unknown",
        "application/binary",
    }
)
_TEXTUAL_APPLICATION_TYPES = frozenset(
    {
        "application/json",
        "application/ld+json",
        "application/xml",
        "application/xhtml+xml",
        "application/yaml",
        "application/x-yaml",
        "application/markdown",
        "application/x-markdown",
        "application/javascript",
        "application/x-javascript",
        "application/x-sh",
        "application/sql",
        "application/rtf",
        "application/csv",
        "application/x-tex",
        "application/toml",
    }
)

_CFB_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_SNIFF_BYTES = 1024
_MAX_TITLE = 300

# WHATWG MIME sniffing: the tags that mark a resource as HTML when they come first.
_HTML_TAG = re.compile(
    rb"^\s*<(?:!doctype\s+html|html|head|script|iframe|h1|div|font|table|a|style|title|b|body"
    rb"|br|p|!--)(?:[\s>/]|$)",
    re.IGNORECASE,
)
# Markdown sniffing and titles. None of these crosses a line (``[ \t]``, not ``\s``), a bracket
# scan stops at the next opening bracket too (so scans from different starts never overlap), and
# quantifiers that would only backtrack into a failure are possessive: linear time on any input.
_MD_HEADING = re.compile(r"^#{1,6}[ \t]++\S", re.MULTILINE)
_MD_FENCE = re.compile(r"^(?:```|~~~)", re.MULTILINE)
_MD_BLOCK = re.compile(
    r"^[ \t]{0,3}+(?:[-*+][ \t]++\S|\d{1,3}+[.)][ \t]++\S|>[ \t]?\S|\|[^\n]*\|[ \t]*+$)",
    re.MULTILINE,
)
_MD_INLINE = re.compile(r"\[[^\[\]\n]++\]\([^()\s]++\)|\*\*[^*\n]++\*\*|`[^`\n]++`")
# An ATX heading: the text after the hashes, to the end of its line (closing hashes cut in code).
_MD_TITLE = re.compile(r"^ {0,3}+#{1,6}[ \t]++(\S[^\n]*+)", re.MULTILINE)
_HTML_FIRST_HEADING = re.compile(r"^# ([^\n]+)", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")
_DOCX_HEADING = re.compile(r"Heading (\d)")

#: Text is checked in pieces of this many bytes at upload (memory stays flat whatever the size).
_TEXT_STEP = 1024 * 1024
#: Characters of text looked at to tell Markdown from plain text.
_MARKDOWN_SAMPLE = 20000
#: The first bytes a fallback title (a JSON text's first line) is taken from.
_FALLBACK_TITLE_BYTES = 4096

#: Parts a DOCX may have (Word writes a few dozen; thousands only come from crafted files).
MAX_ZIP_ENTRIES = 5000
#: A part larger than this once inflated must not be compressed more than ``MAX_ZIP_RATIO`` times.
ZIP_RATIO_FLOOR = 4 * 1024 * 1024
MAX_ZIP_RATIO = 100
_ZIP_READ = 1024 * 1024
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


@dataclass(frozen=True)
class Extracted:
    """A document's text, ready for the chunker."""

    text: str
    markdown: bool
    title: str | None = None
    pages: int | None = None


@dataclass(frozen=True)
class Limits:
    """Bounds of one extraction (the worker passes the configured ones).

    Attributes:
        max_pdf_pages: a PDF with more pages fails (split it).
        max_inflated_bytes: the most a DOCX's parts may inflate to, all together.
    """

    max_pdf_pages: int = 2000
    max_inflated_bytes: int = 256 * 1024 * 1024


def describe(content_type: str) -> str:
    """A person's name for a supported content type."""
    return _HUMAN.get(content_type, content_type)


def _clean(text: str) -> str:
    # PostgreSQL text cannot hold NUL, and UTF-8 cannot hold lone surrogates (some PDFs yield
    # them); newlines are normalised so offsets and splitting behave the same for every source.
    text = text.replace("\x00", "")
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _title(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value[:_MAX_TITLE] or None


_BOMS = (
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


def _text_pieces(data: bytes, label: str) -> Iterator[str]:
    """The text of a text file, decoded a piece at a time, or the reason it is not one.

    Decoding incrementally keeps memory flat at upload, where only a verdict is needed.
    """
    encoding, start, bom = "utf-8", 0, False
    for mark, name in _BOMS:
        if data.startswith(mark):
            encoding, start, bom = name, len(mark), True
            break
    decoder = codecs.getincrementaldecoder(encoding)()
    for offset in range(start, max(len(data), start + 1), _TEXT_STEP):
        end = offset + _TEXT_STEP
        try:
            piece = decoder.decode(data[offset:end], final=end >= len(data))
        except UnicodeDecodeError as exc:
            at = offset + exc.start
            if bom:
                raise BadDocument(
                    f"{label} starts with a {encoding.upper()} byte-order mark but is not valid "
                    f"{encoding.upper()} (bad bytes at offset {at}); "
                    "save it as UTF-8 and upload it again"
                ) from None
            kind = filetype.guess(data[:8192])
            if kind is not None:
                raise BadDocument(
                    f"{label} is {kind.mime} (.{kind.extension}), which is not supported; "
                    f"upload {SUPPORTED}",
                    415,
                ) from None
            if b"\x00" in data[:8192]:
                raise BadDocument(
                    f"{label} is binary data of an unknown type; upload {SUPPORTED}", 415
                ) from None
            raise BadDocument(
                f"{label} is not valid UTF-8 text (undecodable bytes at offset {at}); "
                "save it as UTF-8 and upload it again"
            ) from None
        if "\x00" in piece:
            raise BadDocument(f"{label} is binary data of an unknown type; upload {SUPPORTED}", 415)
        yield piece


def _decode_text(data: bytes, label: str) -> str:
    """The whole text of a text file (worker side)."""
    return "".join(_text_pieces(data, label))


def _scan_text(data: bytes, label: str) -> str:
    """Check a text file without keeping it: the first characters, for sniffing Markdown.

    Raises:
        BadDocument: undecodable, binary, or nothing but whitespace.
    """
    sample = ""
    blank = True
    for piece in _text_pieces(data, label):
        if blank and piece and not piece.isspace():
            blank = False
        if len(sample) < _MARKDOWN_SAMPLE:
            sample += piece[: _MARKDOWN_SAMPLE - len(sample)]
    if blank:
        raise BadDocument(f"{label} contains only whitespace")
    return sample


def _looks_like_markdown(text: str) -> bool:
    sample = text[:_MARKDOWN_SAMPLE]
    if _MD_HEADING.search(sample) or _MD_FENCE.search(sample):
        return True
    return len(_MD_BLOCK.findall(sample)) + len(_MD_INLINE.findall(sample)) >= 3


def _is_html(data: bytes) -> bool:
    head = data[:_SNIFF_BYTES].removeprefix(b"\xef\xbb\xbf")
    if _HTML_TAG.match(head):
        return True
    return head.lstrip().lower().startswith(b"<?xml") and b"<html" in head.lower()


def _damaged_zip(label: str) -> BadDocument:
    return BadDocument(
        f"{label} looks like a ZIP or Word file but is damaged; save it again and upload it"
    )


def _too_many_parts(label: str, count: str) -> BadDocument:
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
            raise _damaged_zip(label)
    count, directory_size = struct.unpack_from("<10xHI", data, at)
    end = at
    if at >= _EOCD64_LOCATOR_SIZE and data.startswith(_EOCD64_LOCATOR, at - _EOCD64_LOCATOR_SIZE):
        disk, _, disks = struct.unpack_from("<4xIQI", data, at - _EOCD64_LOCATOR_SIZE)
        if disk != 0 or disks > 1:
            raise _damaged_zip(label)
        record = at - _EOCD64_LOCATOR_SIZE - _EOCD64_SIZE
        if record >= 0 and data.startswith(_EOCD64, record):
            count, directory_size = struct.unpack_from("<32xQQ", data, record)
            end = record
    # Like zipfile, the directory is taken to end where the end records begin, whatever offset
    # they claim (bytes before the ZIP, as in a self-extracting archive, shift every offset).
    start = end - directory_size
    if start < 0:
        raise _damaged_zip(label)
    return int(count), start, int(directory_size)


def _zip_walk(data: bytes, label: str, wanted: frozenset[bytes] = frozenset()) -> set[bytes]:
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
        raise _too_many_parts(label, f"{count:,}")
    longest = max((len(name) for name in wanted), default=0)
    found: set[bytes] = set()
    records = 0
    walked = 0
    while walked < size:
        at = start + walked
        if at + _CD_RECORD_SIZE > len(data) or not data.startswith(_CD_RECORD, at):
            raise _damaged_zip(label)
        records += 1
        if records > MAX_ZIP_ENTRIES:
            raise _too_many_parts(label, f"more than {MAX_ZIP_ENTRIES:,}")
        version = data[at + 6]
        if version > _MAX_ZIP_EXTRACT_VERSION:
            raise _unsupported_zip(label, version)
        name_length, extra_length, comment_length = struct.unpack_from("<3H", data, at + 28)
        name_at = at + _CD_RECORD_SIZE
        if name_at + name_length > len(data):
            raise _damaged_zip(label)
        if name_length <= longest:
            name = data[name_at : name_at + name_length]
            if name in wanted:
                found.add(name)
        walked += _CD_RECORD_SIZE + name_length + extra_length + comment_length
    return found


_SIGNATURE_PARTS = frozenset(
    {
        b"word/document.xml",
        b"xl/workbook.xml",
        b"ppt/presentation.xml",
        b"mimetype",
        b"content.xml",
    }
)


def _zip_names(data: bytes, label: str) -> set[str]:
    """The names among those that tell Office formats apart that a ZIP's directory holds.

    Bounded (see :func:`_zip_walk`); no part is inflated.
    """
    # Each wanted name is ASCII, which cp437 and UTF-8 (the two name encodings) spell alike.
    return {name.decode("ascii") for name in _zip_walk(data, label, _SIGNATURE_PARTS)}


def _zip_kind(data: bytes, label: str) -> str:
    try:
        names = _zip_names(data, label)
    except BadDocument:
        raise
    except Exception:  # anything else a crafted directory trips is damage, never a 500
        raise _damaged_zip(label) from None
    if "word/document.xml" in names:
        return DOCX
    if "xl/workbook.xml" in names:
        what = "an Excel workbook (.xlsx)"
    elif "ppt/presentation.xml" in names:
        what = "a PowerPoint presentation (.pptx)"
    elif "mimetype" in names and "content.xml" in names:
        what = "an OpenDocument file (.odt/.ods/.odp)"
    else:
        what = "a ZIP archive"
    raise BadDocument(f"{label} is {what}, which is not supported; upload {SUPPORTED}", 415)


def detect(data: bytes, label: str = "The document") -> str:
    """The content type of ``data``, judged from the bytes alone.

    Bounded work only (see the module docstring): safe on untrusted bytes in the API.

    Args:
        data: the uploaded bytes.
        label: how messages name the upload (e.g. ``File 'a.pdf'``).

    Raises:
        BadDocument: 422 when empty, undecodable text or a damaged ZIP, 415 when of an
            unsupported type.
    """
    if not data:
        raise BadDocument(f"{label} is empty")
    if b"%PDF-" in data[:_SNIFF_BYTES]:
        return PDF
    if data.startswith(b"PK\x03\x04"):
        return _zip_kind(data, label)
    if data.startswith(_CFB_MAGIC):
        raise BadDocument(
            f"{label} is a legacy Microsoft Office file (.doc, .xls, .ppt) or a password-protected "
            "Office document; save it as .docx without a password and upload that",
            415,
        )
    if _is_html(data):
        # HTML declares its own charset (meta tags); BeautifulSoup decodes it, so HTML need not be
        # UTF-8.
        return HTML
    sample = _scan_text(data, label)
    return MARKDOWN if _looks_like_markdown(sample) else TEXT


def _family(content_type: str) -> str:
    if content_type in (PDF, "application/x-pdf"):
        return "pdf"
    if content_type in (DOCX, "application/zip", "application/x-zip-compressed"):
        return "docx"
    if content_type.startswith("text/") or content_type in _TEXTUAL_APPLICATION_TYPES:
        return "text"
    return content_type


def check_declared(declared: str | None, detected: str, label: str = "The document") -> None:
    """Refuse an upload whose declared type contradicts its content (mislabelled, 415).

    Generic types (``application/octet-stream``, none) are accepted with any content.
    """
    base = (declared or "").split(";", 1)[0].strip().lower()
    if base in _GENERIC_TYPES:
        return
    if _family(base) != _family(detected):
        raise BadDocument(
            f"{label} was sent as {base} but its content is {describe(detected)}; send it with "
            "the matching Content-Type, or application/octet-stream to let Atrium detect it",
            415,
        )


# ---------------------------------------------------------------------------------------------
# Extraction


def _pdf_reader(data: bytes, label: str) -> Any:
    from pypdf import PasswordType, PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # An owner password alone (printing or copying restrictions) still lets anyone read
            # the text: only a user password makes the document unreadable.
            try:
                readable = reader.decrypt("") != PasswordType.NOT_DECRYPTED
            except Exception:  # pypdf raises several types for unknown or broken encryption
                readable = False
            if not readable:
                raise BadDocument(
                    f"{label} is an encrypted PDF that needs a password to open; save a copy "
                    "without the password and upload that"
                )
        _ = len(reader.pages)
    except BadDocument:
        raise
    except Exception as exc:  # pypdf raises many types on damaged files
        raise BadDocument(
            f"{label} could not be read as a PDF ({type(exc).__name__}: {exc}); it may be "
            "damaged: save or export it again and upload the new file"
        ) from None
    return reader


def _pdf_page_text(page: Any) -> str:
    try:
        return _clean(page.extract_text() or "")
    except Exception:  # one unreadable page must not lose the others
        return ""


def _pdf_title(reader: Any) -> str | None:
    try:
        return _title(reader.metadata.title if reader.metadata else None)
    except Exception:
        return None


def _no_pdf_text(label: str) -> BadDocument:
    return BadDocument(
        f"{label} is a PDF without extractable text (its pages are images, e.g. a scan); run "
        "OCR on it (for example with ocrmypdf) and upload the result"
    )


def _extract_pdf(data: bytes, label: str, limits: Limits) -> Extracted:
    reader = _pdf_reader(data, label)
    count = len(reader.pages)
    if count > limits.max_pdf_pages:
        raise BadDocument(
            f"{label} has {count} pages; at most {limits.max_pdf_pages} are read per document. "
            "Split it into smaller PDFs and upload those"
        )
    pages = [_pdf_page_text(page) for page in reader.pages]
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text.strip():
        raise _no_pdf_text(label)
    return Extracted(text=text, markdown=False, title=_pdf_title(reader), pages=len(pages))


def _docx_block(block: Any) -> str:
    from docx.table import Table

    if isinstance(block, Table):
        rows = []
        for row in block.rows:
            cells = [" ".join(cell.text.split()) for cell in row.cells]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)
    text = block.text.strip()
    if not text:
        return ""
    style = (block.style.name if block.style is not None else "") or ""
    if style == "Title":
        return "# " + text
    match = _DOCX_HEADING.match(style)
    if match:
        return "#" * min(6, int(match.group(1)) + 1) + " " + text
    if style.startswith("List"):
        return "- " + text
    return text


def _zip_bomb(label: str, why: str) -> BadDocument:
    return BadDocument(
        f"{label} is a Word file whose parts {why}; that is what a ZIP bomb does, not Word. "
        "Open it in Word, save it again as .docx and upload the new file"
    )


def check_zip_parts(data: bytes, label: str, limits: Limits) -> None:
    """Refuse a ZIP whose parts would inflate beyond the limits, before anything inflates them.

    The declared sizes are checked first (count, each part, the total, the ratio), then every
    part is inflated as a stream and its real size counted against the same caps: a declared
    size is never trusted alone.

    Raises:
        BadDocument: too many parts, too large once inflated, too compressed, or damaged.
    """
    cap = limits.max_inflated_bytes
    # Walked by hand first: zipfile builds an object per directory record, however many.
    _zip_walk(data, label)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_ZIP_ENTRIES:
                raise _too_many_parts(label, f"{len(infos):,}")
            declared = sum(info.file_size for info in infos)
            if declared > cap:
                raise _zip_bomb(label, f"would inflate to {declared:,} bytes (at most {cap:,})")
            total = 0
            for info in infos:
                size = 0
                with archive.open(info) as part:
                    while piece := part.read(_ZIP_READ):
                        size += len(piece)
                        total += len(piece)
                        if total > cap:
                            raise _zip_bomb(label, f"inflate to more than {cap:,} bytes")
                        if size > ZIP_RATIO_FLOOR and size > MAX_ZIP_RATIO * max(
                            info.compress_size, 1
                        ):
                            raise _zip_bomb(
                                label,
                                f"are compressed more than {MAX_ZIP_RATIO} times ({info.filename})",
                            )
    except BadDocument:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise BadDocument(
            f"{label} is a damaged ZIP or Word file ({type(exc).__name__}: {exc}); save it "
            "again and upload the new file"
        ) from None
    except NotImplementedError as exc:  # an unsupported compression method
        raise BadDocument(
            f"{label} uses a ZIP feature Word does not ({exc}); save it again as .docx and "
            "upload the new file"
        ) from None


def _extract_docx(data: bytes, label: str, limits: Limits) -> Extracted:
    import docx

    check_zip_parts(data, label, limits)
    try:
        document = docx.Document(io.BytesIO(data))
        blocks = [_docx_block(block) for block in document.iter_inner_content()]
        title = _title(document.core_properties.title)
    except Exception as exc:  # python-docx raises many types on damaged files
        raise BadDocument(
            f"{label} could not be read as a Word document ({type(exc).__name__}: {exc}); save "
            "it again as .docx and upload the new file"
        ) from None
    text = _clean("\n\n".join(b for b in blocks if b))
    if not text.strip():
        raise BadDocument(f"{label} is a Word document without any text")
    if title is None:
        first = next((b for b in blocks if b.startswith("# ")), None)
        title = _title(first[2:]) if first else None
    return Extracted(text=text, markdown=True, title=title)


_BLOCK_TAGS = [
    "address",
    "article",
    "aside",
    "blockquote",
    "dd",
    "details",
    "dialog",
    "div",
    "dl",
    "dt",
    "fieldset",
    "figcaption",
    "figure",
    "footer",
    "form",
    "header",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "table",
    "tr",
    "ul",
    "caption",
    "summary",
]
_DROP_TAGS = ["script", "style", "noscript", "template", "svg", "canvas", "iframe", "object"]


def _extract_html(data: bytes, label: str) -> Extracted:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    title = _title(soup.title.get_text()) if soup.title else None
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    if soup.head is not None:
        soup.head.decompose()
    for br in soup.find_all("br"):
        br.replace_with("\n")
    for level in range(1, 7):
        for heading in soup.find_all(f"h{level}"):
            text = " ".join(heading.get_text(" ").split())
            heading.replace_with(f"\n\n{'#' * level} {text}\n\n" if text else "\n\n")
    for cell in soup.find_all(["td", "th"]):
        cell.insert_after(" | ")
    for item in soup.find_all("li"):
        item.insert(0, "- ")
    for block in soup.find_all(_BLOCK_TAGS):
        block.insert_before("\n\n")
        block.insert_after("\n\n")
    raw = _clean(soup.get_text())
    lines = [" ".join(line.split()) for line in raw.split("\n")]
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    if not text:
        raise BadDocument(f"{label} is an HTML page without any text")
    if title is None:
        first = _HTML_FIRST_HEADING.search(text)
        title = _title(first.group(1)) if first else None
    return Extracted(text=text, markdown=True, title=title)


def markdown_title(text: str) -> str | None:
    """The text of the first Markdown (ATX) heading, without its closing hashes.

    Linear time on any input (the regex never backtracks; closing hashes are cut with string
    methods).
    """
    for match in _MD_TITLE.finditer(text):
        content = match.group(1).rstrip()
        bare = content.rstrip("#")
        if bare != content and (not bare or bare[-1] in " \t"):
            content = bare.rstrip()
        title = _title(content)
        if title:
            return title
    return None


def fallback_title(data: bytes) -> str | None:
    """The first non-blank line of a text's first bytes (120 characters at most).

    The title of a JSON text sent without one, until its own title (a first heading) is
    known; the worker recognises it the same way (see ``ingestion.pipeline``).
    """
    head = data[:_FALLBACK_TITLE_BYTES].decode("utf-8", "ignore")
    line = next((line.strip() for line in head.splitlines() if line.strip()), "")
    return line[:120] or None


def _extract_text(data: bytes, content_type: str, label: str) -> Extracted:
    text = _clean(_decode_text(data, label))
    if not text.strip():
        raise BadDocument(f"{label} contains only whitespace")
    markdown = content_type == MARKDOWN
    return Extracted(text=text, markdown=markdown, title=markdown_title(text) if markdown else None)


def extract(
    data: bytes, content_type: str, label: str = "The document", limits: Limits | None = None
) -> Extracted:
    """The full text of a document whose type :func:`detect` found.

    Parses the whole document: call it in the worker's sandbox (``ingestion.sandbox``), never
    in the API.

    Raises:
        BadDocument: when it holds no text, cannot be read, or exceeds ``limits``.
    """
    limits = limits or Limits()
    if content_type == PDF:
        return _extract_pdf(data, label, limits)
    if content_type == DOCX:
        return _extract_docx(data, label, limits)
    if content_type == HTML:
        return _extract_html(data, label)
    return _extract_text(data, content_type, label)


def inspect_upload(data: bytes, declared: str | None, label: str = "The document") -> str:
    """What the API checks at upload, bounded in time and memory; returns the content type.

    Detects the type from the bytes (see :func:`detect`) and refuses a contradicting declared
    type. Nothing is parsed: whether a PDF, DOCX or HTML page holds readable text is found by
    the worker, which fails the document with the reason when it does not.

    Raises:
        BadDocument: with the status code to answer.
    """
    content_type = detect(data, label)
    check_declared(declared, content_type, label)
    return content_type
