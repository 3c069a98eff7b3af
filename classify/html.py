"""report.html: a run's (or an evaluation's) report.md as one self-contained page, with what only a page
can show: the error gallery (thumbnails and heatmaps) and the embedding map (the image id on hover).

Self-contained means it opens from an e-mail attachment with no network: every plot and thumbnail is
inlined as a `data:` URI, the map is an inline SVG whose points carry `<title>`s (the browser shows them
on hover without any script), the style sheet is in the page, and nothing refers to another file or
host. A browser test (tests/test_report_html.py) checks that it loads with no request, no broken image
and no console error.

The markdown is rendered by markdown-it-py (CommonMark with tables), a maintained parser that is
already installed with rich, rather than a converter of our own: report.md stays the one source of the
sections, so the page cannot drift from it.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

from classify.runs import write_text

__all__ = ["HTML_REPORT", "HtmlSection", "data_uri", "image_uri", "page", "render_markdown", "write_html_report"]

HTML_REPORT = "report.html"
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1.5em; color: #1b1f24; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f3f5f7; padding: .05em .3em; border-radius: 3px; font-size: .9em; }
blockquote { border-left: 4px solid #d1242f; margin: 1em 0; padding: .2em 1em; background: #fff5f5; }
img { max-width: 100%; height: auto; }
p img { max-width: 49%; vertical-align: top; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 1em; }
.case { border: 1px solid #d0d7de; border-radius: 6px; padding: .6em; }
.case img { width: 48%; max-width: 48%; }
.case p { margin: .3em 0; font-size: .9em; }
.map svg { width: 100%; max-width: 760px; height: auto; border: 1px solid #d0d7de; }
.note { color: #57606a; font-size: .92em; }
"""


@dataclass
class HtmlSection:
    """A section only the page has: its title (an `h2`) and its HTML."""

    title: str
    html: str


def render_markdown(text: str) -> str:
    """report.md's markdown as HTML (CommonMark and tables; raw HTML in the markdown is escaped)."""
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_uri(image, *, size: int | None = None, fmt: str = "JPEG") -> str:
    """A PIL image as a data: URI, shrunk to fit `size` pixels when given (thumbnails stay small)."""
    image = image.convert("RGB")
    if size:
        image = image.copy()
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=85)
    return data_uri(buffer.getvalue(), "image/jpeg" if fmt == "JPEG" else "image/png")


def _inline_images(body: str, folder: Path) -> str:
    """Every `<img src="relative file">` of the rendered markdown with the file inlined; an image that is
    missing becomes its alt text, so the page never shows a broken image."""

    def inline(match: re.Match) -> str:
        tag, src = match.group(0), html.unescape(match.group(1))
        if src.startswith("data:"):
            return tag
        path = (folder / src).resolve()
        mime = MIME.get(path.suffix.lower())
        if mime is None or not path.is_file() or folder.resolve() not in path.parents:
            alt = re.search(r'alt="([^"]*)"', tag)
            return f'<em class="note">[{alt.group(1) if alt else src}: not found]</em>'
        return tag.replace(match.group(1), data_uri(path.read_bytes(), mime))

    return re.sub(r'<img src="([^"]+)"[^>]*>', inline, body)


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_html_report(folder: Path, sections: list[HtmlSection] | tuple[HtmlSection, ...] = ()) -> Path:
    """report.html beside the folder's report.md: its sections, then `sections`, plots inlined."""
    folder = Path(folder)
    text = (folder / "report.md").read_text()
    body = _inline_images(render_markdown(text), folder)
    extra = "".join(f"\n<h2>{html.escape(s.title)}</h2>\n{s.html}\n" for s in sections)
    # the page's own sections go before the list of files that closes the report
    closing = body.rfind("<p>Files: ")
    body = body[:closing] + extra + body[closing:] if closing >= 0 else body + extra
    heading = re.search(r"<h1>(.*?)</h1>", body)
    title = html.unescape(re.sub(r"<[^>]+>", "", heading.group(1))) if heading else "report"
    path = folder / HTML_REPORT
    write_text(path, page(title, body))
    return path
