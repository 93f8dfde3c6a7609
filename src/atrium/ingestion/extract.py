"""Extract the text of a document whose type ``ingestion.detect`` recognised.

This is the second of two stages (see docs/security.md, "Uploads"; the first, the API's bounded
sniffing, is ``ingestion.detect``). :func:`extract` parses the whole document and runs only in
the worker, inside the sandbox (``ingestion.sandbox``: a child process with a memory and a time
limit). It still checks a DOCX's parts (count, declared and actual inflated sizes, compression
ratio) before handing it to python-docx, and caps a PDF's pages. An encrypted, image-only or
damaged PDF, a Word file or HTML page without text, or a ZIP bomb ends the document ``failed``
with the reason.

Extraction keeps structure where the chunker can use it: Markdown stays Markdown, and DOCX and
HTML headings, list items and tables become Markdown, so the Markdown splitter cuts at sections.

Every regular expression here may see user text: each runs in linear time (no nested or
overlapping quantifiers, nothing that crosses lines, possessive quantifiers where a failing match
would otherwise backtrack); tests/ingestion/test_untrusted_files.py feeds each 1 MB adversarial
inputs.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from typing import Any

from atrium.ingestion.detect import DOCX, HTML, MARKDOWN, PDF, decode_text
from atrium.ingestion.exceptions import BadDocument
from atrium.ingestion.zipdir import MAX_ZIP_ENTRIES, too_many_parts, zip_walk

_MAX_TITLE = 300

# An ATX heading: the text after the hashes, to the end of its line (closing hashes cut in code).
# Like the Markdown sniffing in ``ingestion.detect``, it crosses no line and its quantifiers are
# possessive where a failing match would otherwise backtrack: linear time on any input.
_MD_TITLE = re.compile(r"^ {0,3}+#{1,6}[ \t]++(\S[^\n]*+)", re.MULTILINE)
_HTML_FIRST_HEADING = re.compile(r"^# ([^\n]+)", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")
_DOCX_HEADING = re.compile(r"Heading (\d)")

#: A part larger than this once inflated must not be compressed more than ``MAX_ZIP_RATIO`` times.
ZIP_RATIO_FLOOR = 4 * 1024 * 1024
MAX_ZIP_RATIO = 100
_ZIP_READ = 1024 * 1024


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


def _pdf_reader(data: bytes, label: str) -> Any:
    # Each parser is imported on first use, not at the top: only a document of its type needs
    # it (read in the sandboxed child), so importing this module stays as cheap as it was.
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
    from docx.table import Table  # on first use, like pypdf in _pdf_reader

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
    zip_walk(data, label)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_ZIP_ENTRIES:
                raise too_many_parts(label, f"{len(infos):,}")
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
    import docx  # on first use, like pypdf in _pdf_reader

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
    from bs4 import BeautifulSoup  # on first use, like pypdf in _pdf_reader

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


def _extract_text(data: bytes, content_type: str, label: str) -> Extracted:
    text = _clean(decode_text(data, label))
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
