"""A document as every report is built: sections of blocks (text, a table, a figure), rendered to
Markdown (`render_markdown`, also what a Prefect artifact shows) and to one self-contained HTML
page (`render_html`). The content is built once and rendered twice, so the two never disagree.

The one module of the report that other stages may import (tests/unit/test_layering.py).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from typing import Literal

from tasks import layout


@dataclass(frozen=True)
class Text:
    text: str
    style: Literal["plain", "warning", "strong"] = "plain"


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    """A PNG figure; Markdown links it as `<figure>.png` beside the document, HTML inlines it."""

    figure: layout.NightlyFigure
    png: bytes | None
    alt: str
    missing: str  # shown instead when there is no image


Block = Text | Table | Image


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    blocks: list[Block]


@dataclass(frozen=True)
class Document:
    title: str
    warnings: list[str]
    sections: list[Section]

    def images(self) -> list[tuple[layout.NightlyFigure, bytes]]:
        """(figure, PNG) of each figure that has an image: the files the Markdown links."""
        return [
            (b.figure, b.png)
            for s in self.sections
            for b in s.blocks
            if isinstance(b, Image) and b.png is not None
        ]


# -- Markdown ------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(document: Document, images: bool = True) -> str:
    """Markdown; `images` links each figure by its file name (they sit beside the document),
    otherwise (a Prefect artifact) a figure is named, not shown."""
    lines = [f"# {document.title}", ""]
    lines += [line for w in document.warnings for line in (f"> **WARNING: {w}**", "")]
    for section in document.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [f"**{block.text}**" if block.style == "strong" else block.text, ""]
            elif isinstance(block, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                lines.append("")
            elif block.png is None:
                lines += [f"_{block.missing}_", ""]
            elif images:
                lines += [f"![{block.alt}]({block.figure}.png)", ""]
            else:
                lines += [f"_{block.alt}: in the HTML report_", ""]
    return "\n".join(lines)


# -- HTML ----------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }
th { background: #f2f2f2; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: 0.5rem 1rem; }
.missing { color: #777; font-style: italic; }
img { max-width: 100%; image-rendering: pixelated; }
"""

# Marks the page once loaded: how many of its images decoded (a headless-browser test reads it).
_SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok + "/" + images.length;
});
"""


def render_html(document: Document) -> str:
    """One self-contained page: inline CSS, images as data: URIs, nothing fetched."""
    e = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(document.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(document.title)}</h1>",
    ]
    out += [f'<p class="warning"><strong>WARNING: {e(w)}</strong></p>' for w in document.warnings]
    for section in document.sections:
        out.append(f'<section id="{section.id}"><h2>{e(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Text):
                text = e(block.text)
                out.append(
                    f"<p><strong>{text}</strong></p>"
                    if block.style == "strong"
                    else f"<p>{text}</p>"
                )
            elif isinstance(block, Table):
                out.append(
                    "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in block.header) + "</tr>"
                )
                out += [
                    "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                    for row in block.rows
                ]
                out.append("</table>")
            elif block.png is None:
                out.append(f'<p class="missing">{e(block.missing)}</p>')
            else:
                data = base64.b64encode(block.png).decode("ascii")
                out.append(
                    f'<img id="{block.figure}" alt="{e(block.alt)}" src="data:image/png;base64,{data}">'
                )
        out.append("</section>")
    out += [f"<script>{_SCRIPT}</script>", "</body></html>", ""]
    return "\n".join(out)


# -- a rendered report whose images were pruned (retention) -------------------------------------
_MD_IMAGE = re.compile(r"^!\[(?P<alt>[^\]\n]*)\]\((?P<figure>[a-z]+)\.png\)$", re.M)
_HTML_IMAGE = re.compile(
    r'<img id="(?P<figure>[a-z]+)" alt="(?P<alt>[^"]*)" src="data:image/png;base64,[A-Za-z0-9+/=]*">'
)


def markdown_without_images(markdown: str, note: str) -> str:
    """A rendered Markdown document with each figure link replaced by what `render_markdown`
    writes for a missing image, `<alt>: <note>`: the page as it was, its images gone."""
    return _MD_IMAGE.sub(lambda m: f"_{m['alt']}: {note}_", markdown)


def html_without_images(page: str, note: str) -> str:
    """A rendered HTML page with each inlined figure replaced by what `render_html` writes for a
    missing image, `<alt>: <note>`."""
    return _HTML_IMAGE.sub(
        lambda m: f'<p class="missing">{m["alt"]}{html.escape(": " + note)}</p>', page
    )
