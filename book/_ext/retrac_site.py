"""Small fixes to the rendered site, loaded through ``sphinx.local_extensions`` in ``_config.yml``.

* Jupyter Book 1 registers sphinx-thebe's configuration script twice, so every page logs
  "Identifier 'THEBE_JS_URL' has already been declared" in the browser console. The browser test
  (``tests/test_site.py``) fails on console errors, so duplicate scripts are dropped here (the two
  copies differ only in a filename of ``None`` against ``""``).
* The "Open in Colab" badge of every chapter is shown from ``_static/colab-badge.svg`` instead of
  Colab's server, so the site has no broken image offline; the badge's link is unchanged.
* ``book/_static/retrac.css`` adjusts a few styles (dense tables, the logo's height, a code font
  that fits 88-character lines, wrapped outputs).
* myst-nb shows every glued text in bold, which suits a number but turns a glued sentence (a
  ``prose.pick`` of the chapters) into a bold paragraph; glued texts with a space and more than
  ``SENTENCE`` characters get the class ``pasted-sentence`` and the weight of the text around.
* The chapters' solution cells carry otter-grader's ``# BEGIN SOLUTION`` / ``# END SOLUTION``
  lines (``tools/make_assignments.py`` needs them); the chapter pages show the solution without them.
* MathJax is served from the site itself when the ``django-static-mathjax`` package (a plain copy
  of MathJax 3, pinned in requirements.txt) is installed: the formulas then render in a local build
  read offline and in the browser test, which has no internet. Without the package the theme's
  default, a CDN, is used.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

MATHJAX_BUNDLE = "tex-mml-chtml.js"
MATHJAX_PARTS = [MATHJAX_BUNDLE, "output/chtml/fonts/woff-v2", "input/tex/extensions", "ui",
                 "a11y", "sre"]


def _mathjax_es5() -> Path | None:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        return None
    es5 = Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax" / "es5"
    return es5 if (es5 / MATHJAX_BUNDLE).exists() else None


def _use_local_mathjax(app, config):
    if _mathjax_es5() is not None and "://" in (config.mathjax_path or "://"):
        config.mathjax_path = f"mathjax/{MATHJAX_BUNDLE}"


def _copy_mathjax(app, exception):
    es5 = _mathjax_es5()
    if exception is not None or es5 is None or app.builder.format != "html":
        return
    if app.config.mathjax_path != f"mathjax/{MATHJAX_BUNDLE}":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    for part in MATHJAX_PARTS:
        source = es5 / part
        if source.is_dir():
            shutil.copytree(source, target / part, dirs_exist_ok=True)
        elif source.exists():
            (target / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / part)


COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def _local_colab_badge(app, pagename, templatename, context, doctree):
    body = context.get("body")
    if body and COLAB_BADGE in body:
        context["body"] = body.replace(
            f'src="{COLAB_BADGE}"', f'src="{context["pathto"]("_static/colab-badge.svg", 1)}"')


SENTENCE = 30
PASTED = re.compile(r'<span class="pasted-text">([^<]*)</span>')


def _sentence(match: re.Match) -> str:
    text = match.group(1)
    if " " in text and len(text) > SENTENCE:
        return f'<span class="pasted-text pasted-sentence">{text}</span>'
    return match.group(0)


def _glued_sentences_in_text_weight(app, pagename, templatename, context, doctree):
    body = context.get("body")
    if body and "pasted-text" in body:
        context["body"] = PASTED.sub(_sentence, body)


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        attributes = getattr(script, "attributes", {}) or {}
        key = (str(getattr(script, "filename", script) or ""), tuple(sorted(
            (k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def _add_static(app, config):
    config.html_static_path.append(str(Path(__file__).resolve().parents[1] / "_static"))


OTTER_MARKERS = {"# BEGIN SOLUTION", "# END SOLUTION"}


def _drop_otter_markers(app, doctree) -> None:
    """Remove otter's solution-marker lines from the code blocks of a chapter (the instructors'
    page shows them on purpose)."""
    from docutils import nodes

    if not app.env.docname.startswith("notebooks/"):
        return
    for block in doctree.findall(nodes.literal_block):
        text = block.astext()
        lines = text.split("\n")
        kept = [line for line in lines if line.strip() not in OTTER_MARKERS]
        if len(kept) != len(lines):
            new = "\n".join(kept)
            block.rawsource = new
            block.children = [nodes.Text(new)]


def setup(app):
    app.connect("doctree-read", _drop_otter_markers)
    app.connect("config-inited", _add_static)
    app.connect("config-inited", _use_local_mathjax)
    app.add_css_file("retrac.css")
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    app.connect("html-page-context", _local_colab_badge)
    app.connect("html-page-context", _glued_sentences_in_text_weight)
    app.connect("build-finished", _copy_mathjax)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
