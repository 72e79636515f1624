"""The web page in a real browser: headless Chromium (Debian's `chromium`) driven over the DevTools protocol
(tests/web.py), against tools/serve.py --fake-weights. Loads the page, chooses a photo in the file input,
presses a preset, checks the plan, runs, waits for the result and checks the before/after view shows it
(images loaded at the result's size, the divider following the mouse), the downloads and the history; then
the same page in a phone-sized window (390x844): one column, nothing wider than the screen.
Skips where /usr/bin/chromium is absent, except under CI (.ci/run installs it), where that fails. About 20 s:
    python -m pytest tests/test_serve_browser.py -q
MINIDIFF_SCREENSHOTS=docs also saves the screenshots the README shows (docs/serve.png, docs/serve-phone.png),
on the small family (--model small) instead of random weights.
"""
import json
import os
import urllib.request

import pytest

from web import CHROMIUM, ROOT, Browser, Server

SHOTS = os.environ.get("MINIDIFF_SCREENSHOTS")
PHOTO = str(ROOT / "examples" / "coffee-rain.jpg")


def element(b, selector, expression):
    """Evaluate `expression` with `e` bound to document.querySelector(selector)."""
    return b.js(f"(e => {expression})(document.querySelector({json.dumps(selector)}))")


@pytest.fixture(scope="module")
def page():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium for this test")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    # the README's screenshots show the small family's real restorations; the tests run on random weights
    flags = ("--model", "small") if SHOTS else ("--fake-weights", "--max-side", "192")
    with Server(*flags) as url, Browser() as b:
        b.viewport(1280, 900)
        b.goto(url + "/")
        yield url, b


def shown(b, selector):
    """Whether the element takes room on the page (its `hidden` attribute not overridden by a display rule)."""
    return element(b, selector, "getComputedStyle(e).display !== 'none' && e.getBoundingClientRect().height > 0")


def test_empty_state_shows_no_photo_and_no_downloads(page):
    """Before any photo: the drop hint, no broken-image icon ("your photo"), no download links, no plan.
    (The CSS display rules of `.drop img` and `#downloads` used to override their `hidden` attribute.)"""
    url, b = page
    b.wait("document.querySelectorAll('#presets button').length === 8")
    for selector in ("#photo", "#downloads", "#plan", "#compare", "#progress", "#cancel", "#error"):
        assert element(b, selector, "e.hidden") and not shown(b, selector), selector
    assert shown(b, "#drop-hint") and shown(b, "#result-empty") and element(b, "#run", "e.disabled")


def test_upload_preset_run_before_after(page):
    url, b = page
    assert b.wait("document.querySelectorAll('#presets button').length") == 8
    if not SHOTS:
        assert "FAKE WEIGHTS" in element(b, "#warning", "!e.hidden && e.textContent")
    b.set_files("#file", [PHOTO])  # as a user choosing the file
    b.wait("document.querySelector('#photo-info').textContent.includes('480×320')")
    assert b.wait("document.querySelector('#photo').naturalWidth") == 480  # the server's decoded preview
    assert element(b, "#presets button:nth-child(4)", "e.textContent") == "Deraining"
    b.click("#presets button:nth-child(4)")
    assert element(b, "#prompt", "e.value") == "remove rain"
    b.wait("!document.querySelector('#plan').hidden && !document.querySelector('#run').disabled")
    assert element(b, "#scores", "e.rows.length") == 9  # 8 plugins + null
    if SHOTS:  # the README's picture: seed 42, tools/sample.py's default, so that it shows what the CLI gives
        b.js("(c => { c.checked = false; c.dispatchEvent(new Event('change')); })"
             "(document.querySelector('#seed-random')); document.querySelector('#seed').value = 42")
    b.click("#run")
    b.wait("(e => e.complete && e.naturalWidth > 0)(document.querySelector('#after'))", timeout=90)
    assert element(b, "#compare", "!e.hidden")
    b.wait("(e => e.complete && e.naturalWidth > 0)(document.querySelector('#before'))")
    after, before = (element(b, s, "[e.getAttribute('src'), e.naturalWidth, e.naturalHeight]")
                     for s in ("#after", "#before"))
    job_id = after[0].split("/")[3]
    with urllib.request.urlopen(f"{url}/api/jobs/{job_id}", timeout=10) as r:
        job = json.load(r)
    assert job["state"] == "done" and after[0] == job["files"]["result.png"]
    assert after[1:] == before[1:] == job["record"]["processed_size"] == [192, 128]
    assert before[0] == job["files"]["input.png"]
    assert element(b, "#before", "e.style.clipPath").replace("px", "") == "inset(0 50% 0 0)"
    b.click("#compare", fx=0.25)  # the divider follows the pointer: before on the left quarter
    assert element(b, "#divider", "e.style.left") == "25%"
    assert element(b, "#dl-png", "e.getAttribute('href')") == job["files"]["result.png"]
    assert element(b, "#dl-json", "e.getAttribute('href')") == job["files"]["record.json"]
    # the side-by-side image (input | result), as tools/sample.py's <stem>-compare.png
    assert element(b, "#dl-compare", "e.getAttribute('href')") == job["files"]["compare.png"]
    assert element(b, "#dl-compare", "e.download") == job["record"]["outputs"]["compare"] == "coffee-rain-compare.png"
    assert shown(b, "#downloads") and shown(b, "#dl-compare")
    assert str(job["seed"]) in element(b, "#result-info", "e.textContent")
    b.wait("document.querySelectorAll('#history .card').length === 1")
    if SHOTS:
        b.click("#compare", fx=0.5)
        b.js("document.querySelector('#advanced').open = true")
        b.screenshot(os.path.join(SHOTS, "serve.png"), colors=256)
        b.js("document.querySelector('#advanced').open = false")


def test_phone_window(page):
    url, b = page
    b.viewport(390, 844, mobile=True, scale=2)
    b.wait("innerWidth === 390")
    assert b.js("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
    controls, output = (element(b, s, "e.getBoundingClientRect().toJSON()") for s in ("#controls", "#output"))
    assert output["top"] >= controls["bottom"] and controls["width"] > 350  # one column, result below
    assert element(b, "#run", "e.getBoundingClientRect().width") > 300  # a thumb-sized Run button
    assert b.js("document.querySelector('#after').getBoundingClientRect().width") <= 390
    if SHOTS:
        b.viewport(390, 844, mobile=True, scale=1)
        b.js("scrollTo(0, 0)")
        b.screenshot(os.path.join(SHOTS, "serve-phone.png"), colors=256)


def test_tasks_by_hand_and_a_bad_file(page, tmp_path):
    url, b = page
    b.viewport(1280, 900)
    before = element(b, "#photo", "e.getAttribute('src')")
    b.set_files("#file", [PHOTO])  # the same file again: uploaded again, a new id
    b.wait(f"(s => s !== {json.dumps(before)} && s.endsWith('preview.png'))"
           "(document.querySelector('#photo').getAttribute('src'))")
    b.js("document.querySelector('#pick').open = true")
    for task in ("dehaze", "derain"):  # run in the order clicked, not the official one
        b.click(f"#tasks button[data-task={task}]")
    assert element(b, "#prompt", "e.value") == ""
    b.wait("document.querySelector('#plan-text').textContent === 'dehaze then derain'")
    (tmp_path / "notes.png").write_text("not an image")
    b.set_files("#file", [tmp_path / "notes.png"])
    error = b.wait("!document.querySelector('#error').hidden && document.querySelector('#error').textContent")
    assert "notes.png: not an image" in error and "Traceback" not in error
    assert element(b, "#run", "e.disabled")


def test_time_left_cancel_then_a_rejected_upload_clears_the_page(page, tmp_path):
    """A long job shows the time left, is cancelled ("Cancelled."), then a file that is not an image is
    refused: the old photo, its plan and the cancelled job's line go; only the error stays."""
    url, b = page
    b.viewport(1280, 900)
    b.set_files("#file", [PHOTO])
    b.wait("(s => s && s.endsWith('preview.png'))(document.querySelector('#photo').getAttribute('src'))")
    b.js("(e => { e.value = e.max; e.dispatchEvent(new Event('input')); })(document.querySelector('#steps'))")
    b.js("document.querySelector('#pick').open = true")
    if not element(b, "#tasks button[data-task=derain]", "e.classList.contains('on')"):
        b.click("#tasks button[data-task=derain]")
    b.wait("!document.querySelector('#plan').hidden && !document.querySelector('#run').disabled")
    b.click("#run")
    line = b.wait("(t => / s left$/.test(t) && t)(document.querySelector('#progress-text').textContent)",
                  timeout=60)
    assert "step " in line and " of " in line
    b.click("#cancel")
    b.wait("document.querySelector('#progress-text').textContent === 'Cancelled.'", timeout=60)
    assert shown(b, "#progress") and shown(b, "#plan")
    (tmp_path / "notes.png").write_text("not an image")
    b.set_files("#file", [tmp_path / "notes.png"])
    error = b.wait("!document.querySelector('#error').hidden && document.querySelector('#error').textContent")
    assert "notes.png: not an image" in error
    for selector in ("#plan", "#progress", "#photo"):
        assert not shown(b, selector), selector
    assert element(b, "#progress-text", "e.textContent") == "" and element(b, "#run", "e.disabled")
    assert shown(b, "#drop-hint")
