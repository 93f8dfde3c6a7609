"""Recognise a document by its content and extract its text.

The type comes from the bytes, never from the file name: PDF by its ``%PDF-`` header, DOCX as a
ZIP holding ``word/document.xml``, HTML by sniffing its first tag (the WHATWG rules), anything
else that decodes as UTF-8 (or UTF-16/32 with a byte-order mark) is text, Markdown when it
looks like Markdown. A declared ``Content-Type`` that contradicts the content is refused as
mislabelled (415), as is any other binary format; an empty, undecodable, encrypted or image-only
document is refused with 422. Every refusal says what to do.

Extraction keeps structure where the chunker can use it: Markdown stays Markdown, and DOCX and
HTML headings, list items and tables become Markdown, so the Markdown splitter cuts at sections.
"""

from __future__ import annotations

import io
import re
import zipfile
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
_MD_HEADING = re.compile(r"^#{1,6}\s+\S", re.MULTILINE)
_MD_FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)
_MD_BLOCK = re.compile(r"^\s{0,3}(?:[-*+]\s+\S|\d{1,3}[.)]\s+\S|>\s?\S|\|.*\|\s*$)", re.MULTILINE)
_MD_INLINE = re.compile(r"\[[^\]\n]+\]\([^)\s]+\)|\*\*[^*\n]+\*\*|`[^`\n]+`")


@dataclass(frozen=True)
class Detected:
    """What an upload is, found from its content."""

    content_type: str
    title: str | None = None


@dataclass(frozen=True)
class Extracted:
    """A document's text, ready for the chunker."""

    text: str
    markdown: bool
    title: str | None = None
    pages: int | None = None


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


def _decode_text(data: bytes, label: str) -> str:
    """The text of a text file, or the reason it is not one."""
    boms = (
        (b"\xef\xbb\xbf", "utf-8"),
        (b"\xff\xfe\x00\x00", "utf-32-le"),
        (b"\x00\x00\xfe\xff", "utf-32-be"),
        (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"),
    )
    for bom, encoding in boms:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(encoding)
            except UnicodeDecodeError as exc:
                raise BadDocument(
                    f"{label} starts with a {encoding.upper()} byte-order mark but is not valid "
                    f"{encoding.upper()} (bad bytes at offset {exc.start + len(bom)}); "
                    "save it as UTF-8 and upload it again"
                ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        kind = filetype.guess(data)
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
            f"{label} is not valid UTF-8 text (undecodable bytes at offset {exc.start}); "
            "save it as UTF-8 and upload it again"
        ) from None
    if "\x00" in text:
        raise BadDocument(f"{label} is binary data of an unknown type; upload {SUPPORTED}", 415)
    return text


def _looks_like_markdown(text: str) -> bool:
    sample = text[:20000]
    if _MD_HEADING.search(sample) or _MD_FENCE.search(sample):
        return True
    return len(_MD_BLOCK.findall(sample)) + len(_MD_INLINE.findall(sample)) >= 3


def _is_html(data: bytes) -> bool:
    head = data[:_SNIFF_BYTES].removeprefix(b"\xef\xbb\xbf")
    if _HTML_TAG.match(head):
        return True
    return head.lstrip().lower().startswith(b"<?xml") and b"<html" in head.lower()


def _zip_kind(data: bytes, label: str) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, ValueError, OSError):
        raise BadDocument(
            f"{label} looks like a ZIP or Word file but is damaged; save it again and upload it"
        ) from None
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

    Args:
        data: the uploaded bytes.
        label: how messages name the upload (e.g. ``File 'a.pdf'``).

    Raises:
        BadDocument: 422 when empty or undecodable text, 415 when of an unsupported type.
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
    text = _decode_text(data, label)
    return MARKDOWN if _looks_like_markdown(text) else TEXT


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


def _extract_pdf(data: bytes, label: str) -> Extracted:
    reader = _pdf_reader(data, label)
    pages = [_pdf_page_text(page) for page in reader.pages]
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text.strip():
        raise _no_pdf_text(label)
    return Extracted(text=text, markdown=False, title=_pdf_title(reader), pages=len(pages))


def _check_pdf(data: bytes, label: str) -> str | None:
    """Upload-time check: readable, not locked, and some page has text (stops at the first)."""
    reader = _pdf_reader(data, label)
    for page in reader.pages:
        if _pdf_page_text(page).strip():
            return _pdf_title(reader)
    raise _no_pdf_text(label)


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
    match = re.match(r"Heading (\d)", style)
    if match:
        return "#" * min(6, int(match.group(1)) + 1) + " " + text
    if style.startswith("List"):
        return "- " + text
    return text


def _extract_docx(data: bytes, label: str) -> Extracted:
    import docx

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
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if not text:
        raise BadDocument(f"{label} is an HTML page without any text")
    if title is None:
        first = re.search(r"^# (.+)$", text, re.MULTILINE)
        title = _title(first.group(1)) if first else None
    return Extracted(text=text, markdown=True, title=title)


def _first_line_title(text: str, markdown: bool) -> str | None:
    if markdown:
        heading = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
        if heading:
            return _title(heading.group(1))
        return None
    return None


def _extract_text(data: bytes, content_type: str, label: str) -> Extracted:
    text = _clean(_decode_text(data, label))
    if not text.strip():
        raise BadDocument(f"{label} contains only whitespace")
    markdown = content_type == MARKDOWN
    return Extracted(text=text, markdown=markdown, title=_first_line_title(text, markdown))


def extract(data: bytes, content_type: str, label: str = "The document") -> Extracted:
    """The full text of a document whose type :func:`detect` found.

    Raises:
        BadDocument: when it holds no text or cannot be read.
    """
    if content_type == PDF:
        return _extract_pdf(data, label)
    if content_type == DOCX:
        return _extract_docx(data, label)
    if content_type == HTML:
        return _extract_html(data, label)
    return _extract_text(data, content_type, label)


def inspect_upload(data: bytes, declared: str | None, label: str = "The document") -> Detected:
    """Everything checked at upload time, so a bad document is refused with a 4xx at once.

    Detects the type, refuses a contradicting declared type, and makes sure text can be
    extracted (for a PDF, only up to the first page with text, to keep uploads fast).

    Raises:
        BadDocument: with the status code to answer.
    """
    content_type = detect(data, label)
    check_declared(declared, content_type, label)
    if content_type == PDF:
        return Detected(PDF, _check_pdf(data, label))
    return Detected(content_type, extract(data, content_type, label).title)
