"""Recognise an upload's type by its content, within bounds: what the API checks at upload.

The type comes from the bytes, never from the file name: PDF by its ``%PDF-`` header, DOCX as a
ZIP holding ``word/document.xml``, HTML by sniffing its first tag (the WHATWG rules), anything
else that decodes as UTF-8 (or UTF-16/32 with a byte-order mark) is text, Markdown when it
looks like Markdown. A declared ``Content-Type`` that contradicts the content is refused as
mislabelled (415), as is any other binary format; an empty or undecodable text, or a damaged
ZIP, is refused with 422. Every refusal says what to do.

This is the first of two stages (see docs/security.md, "Uploads"). :func:`inspect_upload` runs
in the API on untrusted bytes, so it only *sniffs*: magic bytes, a bounded look at the first
bytes, a ZIP's central directory (``ingestion.zipdir``, never inflating a part), and text
decoded piece by piece without keeping it. Its time is linear in the size and its memory does
not grow with it. Nothing here parses a document: the second stage, ``ingestion.extract``, does
that in the worker's sandbox, and this module imports no parser, so none loads in the API.

Every regular expression here may see user text: each runs in linear time (no nested or
overlapping quantifiers, nothing that crosses lines, possessive quantifiers where a failing match
would otherwise backtrack); tests/ingestion/test_untrusted_files.py feeds each 1 MB adversarial
inputs.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator

import filetype

from atrium.ingestion.exceptions import BadDocument
from atrium.ingestion.zipdir import damaged_zip, zip_walk

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

# WHATWG MIME sniffing: the tags that mark a resource as HTML when they come first.
_HTML_TAG = re.compile(
    rb"^\s*<(?:!doctype\s+html|html|head|script|iframe|h1|div|font|table|a|style|title|b|body"
    rb"|br|p|!--)(?:[\s>/]|$)",
    re.IGNORECASE,
)
# Markdown sniffing. None of these crosses a line (``[ \t]``, not ``\s``), a bracket scan
# stops at the next opening bracket too (so scans from different starts never overlap), and
# quantifiers that would only backtrack into a failure are possessive: linear time on any input.
_MD_HEADING = re.compile(r"^#{1,6}[ \t]++\S", re.MULTILINE)
_MD_FENCE = re.compile(r"^(?:```|~~~)", re.MULTILINE)
_MD_BLOCK = re.compile(
    r"^[ \t]{0,3}+(?:[-*+][ \t]++\S|\d{1,3}+[.)][ \t]++\S|>[ \t]?\S|\|[^\n]*\|[ \t]*+$)",
    re.MULTILINE,
)
_MD_INLINE = re.compile(r"\[[^\[\]\n]++\]\([^()\s]++\)|\*\*[^*\n]++\*\*|`[^`\n]++`")

#: Text is checked in pieces of this many bytes at upload (memory stays flat whatever the size).
_TEXT_STEP = 1024 * 1024
#: Characters of text looked at to tell Markdown from plain text.
_MARKDOWN_SAMPLE = 20000
#: The first bytes a fallback title (a JSON text's first line) is taken from.
_FALLBACK_TITLE_BYTES = 4096


def describe(content_type: str) -> str:
    """A person's name for a supported content type."""
    return _HUMAN.get(content_type, content_type)


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


def decode_text(data: bytes, label: str) -> str:
    """The whole text of a text file (worker side, ``ingestion.extract``).

    Decoded exactly as the upload check decodes it, so the two never disagree on a text.
    """
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

    Bounded (see :func:`zip_walk`); no part is inflated.
    """
    # Each wanted name is ASCII, which cp437 and UTF-8 (the two name encodings) spell alike.
    return {name.decode("ascii") for name in zip_walk(data, label, _SIGNATURE_PARTS)}


def _zip_kind(data: bytes, label: str) -> str:
    try:
        names = _zip_names(data, label)
    except BadDocument:
        raise
    except Exception:  # anything else a crafted directory trips is damage, never a 500
        raise damaged_zip(label) from None
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


def fallback_title(data: bytes) -> str | None:
    """The first non-blank line of a text's first bytes (120 characters at most).

    The title of a JSON text sent without one, until its own title (a first heading) is
    known; the worker recognises it the same way (see ``ingestion.pipeline``).
    """
    head = data[:_FALLBACK_TITLE_BYTES].decode("utf-8", "ignore")
    line = next((line.strip() for line in head.splitlines() if line.strip()), "")
    return line[:120] or None
