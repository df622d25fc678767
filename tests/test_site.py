"""The built book in a real browser: every page of _toc.yml loads in headless Chromium, shows its
figures, links to other pages that exist, and every chapter has a Colab launch link to its own
notebook. Screenshots of every page go to ``<site>/../screenshots/`` for people to look at.

The site is ``$RETRAC_SITE`` (required to exist when set: .ci/run sets it after the strict build)
or ``_build/html`` (skipped when missing, so ``pytest`` works before any build). Chromium and its
driver come from Debian (``apt-get install chromium chromium-driver``); Selenium drives them and
never downloads anything.
"""
from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SITE_ENV = "RETRAC_SITE"
REQUIRED = bool(os.environ.get(SITE_ENV))
SITE = Path(os.environ.get(SITE_ENV) or ROOT / "_build" / "html").resolve()
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars"]
WINDOW = (1280, 1000)
SCREENSHOT_MAX_HEIGHT = 16000


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{SITE_ENV}={os.environ[SITE_ENV]} is set but {reason}")
    pytest.skip(reason)


def _toc_pages() -> list[str]:
    """Document names in reading order (root first), as in _toc.yml."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                pages.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                walk(node.get(key))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return pages


def _expected_colab(docname: str) -> str:
    spec = importlib.util.spec_from_file_location("sync_notebooks", ROOT / "tools" / "sync_notebooks.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    return sync.colab_link(sync.settings(ROOT), f"{docname}.ipynb")


PAGES = _toc_pages()


@pytest.fixture(scope="module")
def site():
    if not (SITE / "index.html").exists():
        _unavailable(f"no built book at {SITE} (build it with `jupyter-book build . --all`, "
                     f"or point {SITE_ENV} at a built _build/html)")
    missing = [p for p in PAGES if not (SITE / f"{p}.html").exists()]
    assert not missing, f"pages of _toc.yml missing from the built site {SITE}: {missing}"
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def screenshots():
    folder = SITE.parent / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _find(names, env):
    if os.environ.get(env):
        return os.environ[env]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser(site):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -r requirements.txt)")
    chrome = _find(["chromium", "chromium-browser", "google-chrome"], "RETRAC_CHROME")
    driver_path = _find(["chromedriver"], "RETRAC_CHROMEDRIVER")
    if not chrome or not driver_path:
        _unavailable("Chromium or chromedriver not found (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="retrac-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.set_window_size(*WINDOW)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _screenshot(driver, folder: Path, name: str) -> None:
    """``name.png``: what a reader sees first; ``name-full.png``: the whole page (up to
    SCREENSHOT_MAX_HEIGHT pixels), taken with a window as tall as the page."""
    driver.save_screenshot(str(folder / f"{name}.png"))
    height = driver.execute_script(
        "return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)")
    driver.set_window_size(WINDOW[0], min(int(height) + 200, SCREENSHOT_MAX_HEIGHT))
    try:
        driver.save_screenshot(str(folder / f"{name}-full.png"))
    finally:
        driver.set_window_size(*WINDOW)


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


@functools.lru_cache(maxsize=None)
def _fetch_ids(url: str) -> frozenset:
    with urllib.request.urlopen(url, timeout=30) as response:
        parser = _Ids()
        parser.feed(response.read().decode("utf-8", "replace"))
    return frozenset(parser.ids)


def _local_errors(driver, site: str) -> list[str]:
    """Console errors about this site's own files (external ones, like a CDN, are offline here)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and site in e["message"]]


def _wait_for_math(driver, docname: str) -> None:
    """Formulas are typeset once MathJax has run (the site serves its own copy, see
    book/_ext/retrac_site.py; a CDN copy cannot load here and is not checked)."""
    if not (SITE / "_static" / "mathjax").exists():
        return
    driver.set_script_timeout(60)
    counts = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const count = () => [document.querySelectorAll('.math').length,
                             document.querySelectorAll('mjx-container').length];
        if (!document.querySelector('.math')) { done(count()); return; }
        const wait = () => (window.MathJax && MathJax.startup && MathJax.startup.promise)
            ? MathJax.startup.promise.then(() => done(count()), e => done([-1, String(e)]))
            : setTimeout(wait, 100);
        wait();""")
    assert counts[0] >= 0, f"{docname}: MathJax failed: {counts[1]}"
    assert counts[1] >= counts[0], f"{docname}: {counts[0]} formulas, only {counts[1]} typeset"


@pytest.mark.parametrize("docname", PAGES)
def test_page_loads_with_figures_links_and_launch_button(docname, site, browser, screenshots):
    from selenium.webdriver.common.by import By

    url = f"{site}/{docname}.html"
    browser.get(url)
    title = browser.find_element(By.CSS_SELECTOR, "article h1").text.strip()
    assert title, f"{docname}: no page title"
    index = PAGES.index(docname)
    _wait_for_math(browser, docname)
    _screenshot(browser, screenshots, f"{index:02d}_{Path(docname).name}")

    # Figures: every image of the page itself has loaded; a chapter shows at least one figure.
    images = browser.execute_script("""
        return Array.from(document.querySelectorAll('article img')).map(img => ({
            src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0,
            output: !!img.closest('.cell_output, .output')}));""")
    local = [im for im in images if im["src"].startswith(site) or im["src"].startswith("data:")]
    broken = [im["src"] for im in local if not im["ok"]]
    assert not broken, f"{docname}: images that did not load: {broken}"
    if docname.startswith("notebooks/"):
        figures = [im for im in local if im["output"]]
        assert figures, f"{docname}: a chapter should show at least one figure; found none"
    assert not _local_errors(browser, site), f"{docname}: console errors {_local_errors(browser, site)}"

    # Links to other pages of the book resolve, anchors included.
    hrefs = browser.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);")
    internal = sorted({h for h in hrefs if h.startswith(site)})
    for href in internal:
        target, _, fragment = href.partition("#")
        try:
            ids = _fetch_ids(target)
        except urllib.error.HTTPError as err:
            pytest.fail(f"{docname}: link to {href} is broken ({err.code})")
        if fragment and target.endswith(".html"):
            assert urllib.parse.unquote(fragment) in ids, f"{docname}: link {href}: no such anchor"

    # The navigation reaches the neighbouring pages in reading order.
    nxt = browser.find_elements(By.CSS_SELECTOR, "a.right-next")
    if index + 1 < len(PAGES):
        assert nxt, f"{docname}: no link to the next page"
        assert nxt[0].get_attribute("href").split("#")[0] == f"{site}/{PAGES[index + 1]}.html"
    sidebar = {a.get_attribute("href").split("#")[0]
               for a in browser.find_elements(By.CSS_SELECTOR, "nav.bd-links a.reference")}
    missing = [p for p in PAGES if f"{site}/{p}.html" not in sidebar and p != PAGES[0]]
    assert not missing, f"{docname}: the sidebar does not link {missing}"

    # Chapters: the theme's launch button and the badge open this very notebook in Colab.
    if docname.startswith("notebooks/"):
        expected = _expected_colab(docname)
        colab = [h for h in hrefs if h.startswith("https://colab.research.google.com/")]
        assert colab, f"{docname}: no Colab link"
        assert set(colab) == {expected}, f"{docname}: Colab links {set(colab)}, expected {expected}"
        badge = browser.find_elements(By.CSS_SELECTOR, f'article a[href="{expected}"] img')
        assert badge, f"{docname}: no Colab badge at the top of the chapter"
        launch = browser.find_elements(By.CSS_SELECTOR, f'.dropdown-launch-buttons a[href="{expected}"]')
        assert launch, f"{docname}: the launch button does not open {expected}"


def test_chapters_show_no_otter_markers(site):
    """Solutions are shown without otter-grader's marker lines; tests and configs not at all."""
    for page in PAGES:
        if page.startswith("notebooks/"):
            html = (SITE / f"{page}.html").read_text()
            for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN QUESTION", "BEGIN TESTS",
                           "BEGIN TEST CONFIG"):
                assert marker not in html, f"{page}: otter's {marker!r} shows on the page"


def test_next_link_click_goes_to_the_second_page(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{site}/{PAGES[0]}.html")
    link = browser.find_element(By.CSS_SELECTOR, "a.right-next")
    browser.execute_script("arguments[0].scrollIntoView();", link)
    link.click()
    WebDriverWait(browser, 30).until(expected_conditions.url_contains(f"{PAGES[1]}.html"))
    assert browser.find_element(By.CSS_SELECTOR, "article h1").text.strip()


CHAPTERS = [p for p in PAGES if p.startswith("notebooks/")]


def test_chapters_show_no_book_plumbing(site):
    """The "what this section states" cells (glue, claims, timing) are removed from the page."""
    for page in CHAPTERS:
        html = (SITE / f"{page}.html").read_text()
        for plumbing in ("#@title", "prose.glue", "claims.check", "perf_counter", "{glue:"):
            assert plumbing not in html, f"{page}: {plumbing!r} shows on the page"


@pytest.mark.parametrize("page", CHAPTERS)
def test_code_fits_the_column_and_glued_sentences_read_as_text(page, site, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{site}/{page}.html")
    wide = browser.execute_script(
        "return [...document.querySelectorAll('div.cell_input pre, div.cell_output pre')]"
        ".filter(p => p.scrollWidth > p.clientWidth + 1)"
        ".map(p => p.textContent.split('\\n').sort((a, b) => b.length - a.length)[0])")
    assert not wide, f"{page}: code or output scrolls sideways at {WINDOW[0]} px: {wide[:3]}"
    weights = browser.execute_script(
        "return [...document.querySelectorAll('span.pasted-text')].map(s => [s.textContent,"
        " getComputedStyle(s).fontWeight, getComputedStyle(s.parentElement).fontWeight])")
    assert weights, f"{page}: no glued values on the page"
    browser.find_element(By.CSS_SELECTOR, "article h1")
    for text, weight, around in weights:
        sentence = " " in text and len(text) > 30
        assert (weight == around) if sentence else int(weight) >= 600, (
            f"{page}: glued {text[:40]!r} has weight {weight} (its paragraph {around})")
