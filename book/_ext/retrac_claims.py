"""The page "What this book measured": every claim the chapters checked, from this build.

Chapters state results through ``retrac_lib.book.claims.check``, which writes one JSON file per
chapter to ``$RETRAC_CLAIMS_DIR``. This extension

* sets ``RETRAC_CLAIMS_DIR`` (unless it is set already) to ``claims/`` beside the HTML output
  folder, before any notebook runs, so the kernels myst-nb starts inherit it;
* deletes the records of every chapter about to be read (executed) again, so a claim a chapter no
  longer makes does not linger;
* replaces the ``{measured-claims}`` directive with a table of all records. It does so when the
  doctree is resolved, after every notebook of the build has been executed, whatever the reading
  order; the page holding it (``retrac_claims_page``) is re-read on every build.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

CHAPTER_DOC = re.compile(r"^notebooks/0*([0-9]+)([a-z]?)_")


def _claims_module():
    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:   # the library of this checkout, as the notebooks import it
        sys.path.insert(0, str(root))
    from retrac_lib.book import claims
    return claims


class measured_claims(nodes.General, nodes.Element):
    """Placeholder for the table, filled in when the doctree is resolved."""


class MeasuredClaims(SphinxDirective):
    def run(self):
        return [measured_claims()]


def chapter_of(docname: str) -> str | None:
    """"notebooks/04b_recipes" -> "ch4b"; None for a page that is not a chapter."""
    match = CHAPTER_DOC.match(docname)
    return f"ch{int(match.group(1))}{match.group(2)}" if match else None


def _set_folder(app):
    claims = _claims_module()
    if not os.environ.get(claims.CLAIMS_ENV):
        os.environ[claims.CLAIMS_ENV] = str(Path(app.outdir).parent / "claims")


def _forget_rereads(app, env, docnames):
    folder = _claims_module().claims_dir()
    for doc in docnames:
        chapter = chapter_of(doc)
        if folder is not None and chapter and (folder / f"{chapter}.json").exists():
            (folder / f"{chapter}.json").unlink()


def _always_reread(app, env, added, changed, removed):
    page = app.config.retrac_claims_page
    return [page] if page in env.found_docs else []


def _text(text):
    return nodes.paragraph("", "", nodes.Text(text))


def _table(app, docname, records):
    chapters = {chapter_of(d): d for d in app.env.found_docs if chapter_of(d)}
    table = nodes.table(classes=["claims-table"])
    group = nodes.tgroup(cols=5)
    table += group
    for width in (10, 50, 25, 8, 7):
        group += nodes.colspec(colwidth=width)
    head, body = nodes.thead(), nodes.tbody()
    group += head
    group += body
    row = nodes.row()
    for title in ("chapter", "claim", "measured", "held", "sizes"):
        row += nodes.entry("", _text(title))
    head += row
    for r in records:
        row = nodes.row(ids=[r["name"]])
        cell = nodes.paragraph()
        target = chapters.get(r["chapter"])
        number, letter = re.match(r"ch([0-9]+)([a-z]?)", r["chapter"]).groups()
        label = f"chapter {number}"
        if letter and target in app.env.titles:   # a section: its title
            label = f"{label}: {app.env.titles[target].astext()}"
        if target:
            uri = app.builder.get_relative_uri(docname, target)
            cell += nodes.reference("", label, refuri=uri)
        else:
            cell += nodes.Text(label)
        row += nodes.entry("", cell)
        row += nodes.entry("", _text(r["statement"]), nodes.paragraph("", "", nodes.literal("", r["name"])))
        row += nodes.entry("", _text(r["measured"]))
        row += nodes.entry("", _text("yes" if r["holds"] else "NO"))
        row += nodes.entry("", _text(r["mode"]))
        body += row
    return table


def _fill(app, doctree, docname):
    placeholders = list(doctree.findall(measured_claims))
    if not placeholders:
        return
    claims = _claims_module()
    folder = claims.claims_dir()
    records = claims.read_records(folder) if folder is not None and folder.exists() else []
    held = sum(r["holds"] for r in records)
    modes = sorted({r["mode"] for r in records})
    summary = (f"{len(records)} claims in this build, {held} held, {len(records) - held} did not; "
               f"sizes: {' and '.join(modes) or 'none'}."
               if records else "No claims were recorded in this build.")
    for node in placeholders:
        node.replace_self([_text(summary)] + ([_table(app, docname, records)] if records else []))


def setup(app):
    app.add_config_value("retrac_claims_page", "book/measured", "env")
    app.add_node(measured_claims)
    app.add_directive("measured-claims", MeasuredClaims)
    app.connect("builder-inited", _set_folder)
    app.connect("env-before-read-docs", _forget_rereads)
    app.connect("env-get-outdated", _always_reread)
    app.connect("doctree-resolved", _fill)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
