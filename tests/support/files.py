"""Files made by the real libraries (reportlab, pypdf, python-docx, zipfile) for the extraction
and ingestion tests."""

from __future__ import annotations

import io
import zipfile

PROSE = (
    "The lighthouse keeper logged every passing ship in a leather-bound journal. "
    "Rainfall in the northern valleys was twice the seasonal average. "
)


def make_pdf(pages: list[list[str]], title: str | None = "Quarterly report") -> bytes:
    """A real PDF (reportlab) with the given lines of text on each page."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    if title:
        pdf.setTitle(title)
    for lines in pages:
        y = 800
        for line in lines:
            pdf.drawString(50, y, line)
            y -= 16
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def make_image_only_pdf() -> bytes:
    """A PDF whose only page holds a drawing and no text (like a scan)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    pdf.rect(100, 100, 300, 400, fill=1)
    pdf.circle(300, 600, 80, fill=0)
    pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def encrypt_pdf(data: bytes, user_password: str, owner_password: str = "owner-secret") -> bytes:
    """The same PDF encrypted by pypdf."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(io.BytesIO(data)).pages:
        writer.add_page(page)
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx(title: str = "Travel policy", paragraphs: int = 3) -> bytes:
    """A real DOCX (python-docx) with a heading, paragraphs, a list and a table."""
    import docx

    document = docx.Document()
    document.core_properties.title = title
    document.add_heading(title, level=1)
    for i in range(paragraphs):
        document.add_paragraph(f"Paragraph {i}: {PROSE}")
    document.add_paragraph("Book trains before flights", style="List Bullet")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Class"
    table.cell(0, 1).text = "Allowed"
    table.cell(1, 0).text = "Economy"
    table.cell(1, 1).text = "Always"
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def make_zip(names: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in names.items():
            archive.writestr(name, data)
    return buffer.getvalue()


PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)
