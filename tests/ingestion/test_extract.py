"""Type detection by content and text extraction, on files made by the real libraries."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest

from atrium.ingestion import detect, extract
from atrium.ingestion.exceptions import BadDocument
from tests.support.files import (
    PNG,
    PROSE,
    encrypt_pdf,
    make_docx,
    make_image_only_pdf,
    make_pdf,
    make_zip,
)


def test_pdf_is_detected_and_extracted_with_its_title() -> None:
    data = make_pdf([["First page line one", "First page line two"], ["Second page text"]])
    assert detect.detect(data) == detect.PDF
    result = extract.extract(data, detect.PDF)
    assert "First page line one" in result.text and "Second page text" in result.text
    assert result.pages == 2
    assert result.title == "Quarterly report"
    # The upload only sniffs the type; the title comes from the worker's extraction.
    assert detect.inspect_upload(data, "application/pdf") == detect.PDF


def test_docx_is_detected_and_keeps_structure_as_markdown() -> None:
    data = make_docx()
    assert detect.detect(data) == detect.DOCX
    result = extract.extract(data, detect.DOCX)
    assert result.markdown
    assert result.title == "Travel policy"
    assert "## Travel policy" in result.text
    assert "- Book trains before flights" in result.text
    assert "| Economy | Always |" in result.text


def test_html_is_sniffed_and_converted() -> None:
    page = (
        b"<!DOCTYPE html><html><head><title>Handbook</title><style>p{}</style></head><body>"
        b"<h1>Welcome</h1><p>Hello <b>there</b>.</p><script>alert(1)</script>"
        b"<ul><li>one</li><li>two</li></ul></body></html>"
    )
    assert detect.detect(page) == detect.HTML
    result = extract.extract(page, detect.HTML)
    assert result.title == "Handbook"
    assert "# Welcome" in result.text and "Hello there." in result.text
    assert "- one" in result.text
    assert "alert" not in result.text and "p{}" not in result.text


def test_html_in_another_charset_is_accepted() -> None:
    page = '<html><head><meta charset="iso-8859-1"></head><body><p>Café</p></body></html>'
    data = page.encode("latin-1")
    assert detect.detect(data) == detect.HTML
    assert "Café" in extract.extract(data, detect.HTML).text


def test_markdown_and_plain_text() -> None:
    markdown = b"# Guide\n\nSome *text*.\n\n- a\n- b\n"
    assert detect.detect(markdown) == detect.MARKDOWN
    result = extract.extract(markdown, detect.MARKDOWN)
    assert result.markdown and result.title == "Guide"
    assert detect.detect(PROSE.encode()) == detect.TEXT
    assert not extract.extract(PROSE.encode(), detect.TEXT).markdown


def test_type_comes_from_content_not_from_the_declared_name() -> None:
    # A PDF declared as octet-stream (no information) is a PDF.
    assert detect.inspect_upload(make_pdf([["x y z"]]), "application/octet-stream") == detect.PDF
    assert detect.inspect_upload(b"plain words", None) == detect.TEXT


def test_text_with_byte_order_marks() -> None:
    assert extract.extract("\ufeffhello".encode(), detect.TEXT).text == "hello"
    utf16 = "\ufeffhello wörld".encode("utf-16-le")
    assert detect.detect(b"\xff\xfe" + utf16[2:]) == detect.TEXT


@pytest.mark.parametrize(
    ("data", "declared", "status", "words"),
    [
        (b"", None, 422, "empty"),
        (b"  \n\t ", None, 422, "only whitespace"),
        ("Café crème".encode("latin-1"), None, 422, "not valid UTF-8"),
        (PNG, None, 415, "image/png"),
        (PNG, "image/png", 415, "image/png"),
        (b"\x00\x01\x02binary\xff\xfe\x00", None, 415, "binary data"),
        (make_zip({"a.txt": b"x"}), None, 415, "ZIP archive"),
        (make_zip({"xl/workbook.xml": b"<x/>"}), None, 415, "Excel"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 64, None, 415, "legacy Microsoft Office"),
        (b"PK\x03\x04 broken", None, 422, "damaged"),
        (b"just text", "application/pdf", 415, "sent as application/pdf"),
        (make_pdf([["text"]]), "text/plain", 415, "its content is a PDF"),
        (make_docx(), "application/pdf", 415, "Word (DOCX)"),
    ],
)
def test_bad_documents_are_refused_with_a_reason(
    data: bytes, declared: str | None, status: int, words: str
) -> None:
    with pytest.raises(BadDocument) as info:
        detect.inspect_upload(data, declared, "File 'x'")
    assert info.value.status_code == status
    assert words in info.value.message
    assert info.value.message.startswith("File 'x'")


# Found only by parsing, which the API no longer does: the upload is accepted (its type is
# right) and the worker's extraction fails the document with the reason.
@pytest.mark.parametrize(
    ("data", "content_type", "words"),
    [
        (b"%PDF-1.4 this is no pdf", detect.PDF, "could not be read as a PDF"),
        (make_image_only_pdf(), detect.PDF, "without extractable text"),
        (encrypt_pdf(make_pdf([["secret text"]]), "pw"), detect.PDF, "encrypted"),
        (b"<html><body></body></html>", detect.HTML, "without any text"),
    ],
)
def test_unreadable_documents_fail_extraction_with_a_reason(
    data: bytes, content_type: str, words: str
) -> None:
    assert detect.inspect_upload(data, None) == content_type
    with pytest.raises(BadDocument) as info:
        extract.extract(data, content_type, "File 'x'")
    assert words in info.value.message
    assert info.value.message.startswith("File 'x'")


def test_pdf_with_only_an_owner_password_is_readable() -> None:
    data = encrypt_pdf(make_pdf([["open to read"]]), user_password="")
    assert detect.inspect_upload(data, None) == detect.PDF
    assert "open to read" in extract.extract(data, detect.PDF).text


def test_extracted_text_never_holds_nul() -> None:
    result = extract.extract(b"<p>a\x00b</p>", detect.HTML)
    assert "\x00" not in result.text


def _zip64_end(data: bytes) -> bytes:
    """The same ZIP with ZIP64 end records (as a writer of a >65,535-entry file adds) and the
    classic end record's count and size set to "see ZIP64"."""
    at = data.rindex(b"PK\x05\x06")
    entries, size, offset = struct.unpack_from("<10xHII", data, at)
    record = struct.pack(
        "<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset
    )
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, at, 1)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:at] + record + locator + end


def test_the_directory_walk_finds_what_zipfile_finds() -> None:
    """The upload check walks a ZIP's directory by hand (bounded); it locates the directory as
    zipfile does, so the variants zipfile reads are told apart the same way."""
    docx = make_docx()
    commented = io.BytesIO()
    with zipfile.ZipFile(commented, "w") as archive:
        archive.writestr("word/document.xml", b"<w/>")
        archive.comment = b"an archive comment " * 100
    variants = {
        "plain": docx,
        "comment": commented.getvalue(),
        # A self-extracting stub before the ZIP shifts every offset.
        "prefixed": b"PK\x03\x04stub" + b"\x00" * 1000 + docx,
        "zip64": _zip64_end(docx),
    }
    for name, data in variants.items():
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert "word/document.xml" in archive.namelist(), name
        assert detect.inspect_upload(data, None) == detect.DOCX, name
    assert extract.extract(variants["zip64"], detect.DOCX).title == "Travel policy"
    odt = make_zip({"mimetype": b"application/vnd.oasis.opendocument.text", "content.xml": b"<x/>"})
    with pytest.raises(BadDocument) as info:
        detect.inspect_upload(_zip64_end(odt), None)
    assert info.value.status_code == 415 and "OpenDocument" in info.value.message
