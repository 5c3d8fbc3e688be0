"""The page at /, in headless Chromium driven by Playwright: from typing a prompt to seeing images,
then reusing a seed, downloading, variations and inpainting with the brush, on generated images and
on the user's own uploads.

Chromium is Debian's (`make test` installs the `chromium` package when it is missing); set
UNCLIP_CHROMIUM to use another binary. Without one this test fails: it never skips.
"""

import io
import os
import shutil

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image
from test_server import live_server, tiny_model

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def chromium() -> str:
    path = os.environ.get("UNCLIP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium was not found: the page test needs Debian's chromium (`apt-get install chromium`, "
                    "which `make test` runs when it is missing) or UNCLIP_CHROMIUM=/path/to/chrome")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import unclip

    # float32: a shown seed must redraw its image to 1/255 (docs/pipeline.md, "Seeds")
    with live_server(unclip.load(tiny_model(tmp_path_factory), precision="float32")) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(accept_downloads=True)
        page.errors = []
        page.on("pageerror", lambda err: page.errors.append(str(err)))
        page.goto(server + "/")
        yield page
        browser.close()


def _image(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(httpx.get(url).content)).convert("RGB"), dtype=np.int16)


def _wait_for_cards(page, count: int) -> None:
    page.wait_for_function(
        f"""() => {{ const imgs = [...document.querySelectorAll('#gallery .card img')];
                   return imgs.length >= {count} && imgs.every(i => i.complete && i.naturalWidth > 0); }}""",
        timeout=60_000)


def _generate_cards(page, n: int, size: str) -> None:
    """Generate n images of `size` ("16x16") at 2 steps on a fresh page and wait for their cards."""
    page.fill("#n", str(n))
    page.fill("#steps", "2")
    page.select_option("#size", size)
    page.click("#generate")
    _wait_for_cards(page, n)


def _inpaint(page, card, prompt: str, stroke: tuple[int, int, int, int]) -> None:
    """Open the editor on `card`, paint one stroke from (x0, y0) to (x1, y1) in the canvas, and fill it
    with `prompt`."""
    card.locator(".inpaint").click()
    page.wait_for_selector("#editor:not([hidden])")
    _stroke(page, stroke)
    page.fill("#edit-prompt", prompt)
    page.click("#fill")


def _stroke(page, stroke: tuple[int, int, int, int]) -> None:
    """One stroke of the mouse across the mask, from (x0, y0) to (x1, y1) in the canvas."""
    box = _settled_box(page, "#edit-paint")
    page.mouse.move(box["x"] + stroke[0], box["y"] + stroke[1])
    page.mouse.down()
    page.mouse.move(box["x"] + stroke[2], box["y"] + stroke[3], steps=10)
    page.mouse.up()


def _settled_box(page, selector: str) -> dict:
    """The element's box once it has stopped moving: the editor scrolls into view smoothly, and a box read
    mid-scroll puts the brush stroke somewhere else on the canvas."""
    page.evaluate("""selector => new Promise(resolve => {
        const element = document.querySelector(selector);
        let last = null, still = 0;
        const tick = () => {
            const top = element.getBoundingClientRect().top;
            still = top === last ? still + 1 : 0;
            last = top;
            if (still >= 10) resolve(); else requestAnimationFrame(tick);
        };
        requestAnimationFrame(tick);
    })""", selector)
    return page.locator(selector).bounding_box()


def test_typing_a_prompt_shows_progress_then_images_with_their_seeds(page):
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_contain_text("unclip-tiny")
    page.locator("#prompt").fill("x" * 1001)
    expect(page.locator("#count")).to_have_text("1001")
    expect(page.locator(".counter")).to_have_class("counter over")
    expect(page.locator("#generate")).to_be_disabled()
    page.locator("#prompt").fill("😀" * 600)  # 600 characters for the server, 1200 UTF-16 units for JavaScript
    expect(page.locator("#count")).to_have_text("600")
    expect(page.locator("#generate")).to_be_enabled()
    page.locator("#prompt").fill("")
    page.locator("#prompt").press_sequentially("a red circle")
    expect(page.locator("#count")).to_have_text("12")
    expect(page.locator("#generate")).to_be_enabled()

    page.evaluate("""() => { window.seen = []; const text = document.getElementById('progress-text');
        new MutationObserver(() => window.seen.push(text.textContent))
            .observe(text, {childList: true, characterData: true, subtree: true}); }""")
    page.fill("#n", "6")
    page.fill("#steps", "100")
    page.select_option("#size", "64x64")
    page.click("#generate")
    _wait_for_cards(page, 6)
    seen = page.evaluate("window.seen")
    assert any(": step " in text for text in seen), seen  # live progress: "decoder: step 12 of 100 · seed …"
    labels = page.locator("#gallery .card .seed").all_inner_texts()
    seeds = [int(label.split()[1]) for label in labels]
    assert seeds == list(range(seeds[0], seeds[0] + 6)) and all("64x64" in label for label in labels)
    assert page.locator("#gallery .card .label").first.inner_text() == "a red circle"
    assert page.locator("#error").is_hidden() and page.locator("#notice").is_hidden() and not page.errors


def test_a_shown_seed_redraws_its_image_and_downloads(page, tmp_path):
    second = page.locator("#gallery .card").nth(1)
    seed = int(second.locator(".seed").inner_text().split()[1])
    source = second.locator("img").get_attribute("src")
    page.fill("#steps", "7")  # the form moved on since: Reuse seed puts back what drew the image
    page.select_option("#size", "16x16")
    page.fill("#prompt", "a blue square")
    second.locator(".reuse").click()
    assert page.input_value("#seed") == str(seed) and page.input_value("#n") == "1"
    assert (page.input_value("#steps"), page.input_value("#size"), page.input_value("#prompt")) == \
        ("100", "64x64", "a red circle")
    page.click("#generate")
    _wait_for_cards(page, 7)
    newest = page.locator("#gallery .card").first
    assert newest.locator(".seed").inner_text().startswith(f"seed {seed} ")
    assert np.abs(_image(newest.locator("img").get_attribute("src")) - _image(source)).max() <= 1
    with page.expect_download() as download:
        newest.locator(".download").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == f"unclip-{seed}.png" and Image.open(saved).size == (64, 64)


def test_variations_and_brush_inpainting_from_the_gallery(page):
    page.fill("#seed", "")
    page.fill("#n", "2")
    page.fill("#steps", "3")
    page.locator("#gallery .card").first.locator(".vary").click()
    _wait_for_cards(page, 9)
    assert page.locator("#gallery .card .label").first.inner_text().startswith("variation of seed")
    assert page.locator("#gallery .card").first.locator(".reuse").is_hidden()  # not redrawn from a prompt

    source = page.locator("#gallery .card img").first.get_attribute("src")
    _inpaint(page, page.locator("#gallery .card").first, "a green star", (40, 40, 260, 200))
    _wait_for_cards(page, 11)
    assert page.locator("#gallery .card .label").first.inner_text() == "inpainted: a green star"
    before, after = _image(source), _image(page.locator("#gallery .card img").first.get_attribute("src"))
    assert np.array_equal(after[48:, :16], before[48:, :16])  # far from the stroke: kept
    assert not np.array_equal(after[:48], before[:48])        # under the stroke: repainted
    assert page.locator("#error").is_hidden() and not page.errors


def test_a_prompt_with_a_word_the_model_never_saw_is_drawn_with_a_note(page):
    from playwright.sync_api import expect

    page.locator("#prompt").fill("a red dog")
    page.fill("#seed", "")
    page.fill("#n", "1")
    page.fill("#steps", "2")
    page.click("#generate")
    _wait_for_cards(page, 12)
    expect(page.locator("#notice")).to_contain_text("never saw 'dog'")
    assert page.locator("#error").is_hidden() and not page.errors
    page.locator("#prompt").fill("วงกลมสีแดง")  # the next answer without warnings clears the note
    expect(page.locator("#prompt")).to_have_attribute("lang", "th")  # Thai is marked as Thai
    page.click("#generate")
    _wait_for_cards(page, 13)
    expect(page.locator("#notice")).to_be_hidden()
    assert page.locator("#gallery .card .label").first.get_attribute("lang") == "th"
    assert page.locator("#gallery .card .label").nth(1).get_attribute("lang") == "en"


def test_an_image_the_server_forgot_says_so_when_varied_or_edited(page):
    """Images live in the server's memory for a while; after that (or a restart) Variations threw an
    uncaught error and Inpaint did nothing, with no word on the page."""
    from playwright.sync_api import expect

    page.route("**/images/*.png", lambda route: route.fulfill(status=404))
    try:
        card = page.locator("#gallery .card").nth(2)
        card.locator(".vary").click()
        expect(page.locator("#error")).to_contain_text("no longer on the server")
        page.evaluate("showError('')")
        card.locator(".inpaint").click()
        expect(page.locator("#error")).to_contain_text("no longer on the server")
    finally:
        page.unroute("**/images/*.png")
    assert not page.errors, page.errors


def _fresh_page(page, server, **viewport):
    """A new tab of the same browser on a fresh page: an empty gallery, a first visit."""
    fresh = page.context.browser.new_page(**({"viewport": viewport} if viewport else {}))
    fresh.errors = []
    fresh.on("pageerror", lambda err: fresh.errors.append(str(err)))
    fresh.goto(server + "/")
    fresh.wait_for_function("document.getElementById('model').textContent.includes('unclip-tiny')")
    return fresh


def test_a_first_visit_draws_the_example_in_the_empty_box_from_the_keyboard(page, server):
    """The empty box shows the example prompt, but Generate was off until one typed: a newcomer saw a
    prompt and a dead button. Enter in the box added a line instead of generating."""
    from playwright.sync_api import expect

    fresh = _fresh_page(page, server)
    try:
        example = fresh.get_attribute("#prompt", "placeholder")
        assert example and fresh.input_value("#prompt") == ""
        expect(fresh.locator("#generate")).to_be_enabled()
        fresh.fill("#n", "1")
        fresh.fill("#steps", "2")
        fresh.select_option("#size", "16x16")
        fresh.locator("#prompt").press("Enter")
        _wait_for_cards(fresh, 1)
        assert fresh.input_value("#prompt") == example  # what was drawn is what the box says
        assert fresh.locator("#gallery .card .label").first.inner_text() == example
        # a screen reader hears that the images came, not every sampling step before
        expect(fresh.locator("#announce")).to_have_text("1 image added to the gallery")
        assert fresh.evaluate("""() => document.getElementById('progress-text')
            .closest('[aria-live], [role=status], [role=alert], [role=log]') === null""")

        fresh.locator("#prompt").fill("a blue square")
        fresh.locator("#prompt").press("Shift+Enter")  # still breaks the line, sends nothing
        assert fresh.input_value("#prompt") == "a blue square\n"
        # the Enter that confirms a Thai or other input method's composition (keyCode 229 in Safari)
        fresh.locator("#prompt").dispatch_event("keydown", {"key": "Enter", "keyCode": 229})
        fresh.wait_for_timeout(300)
        assert fresh.locator("#gallery .card").count() == 1
        fresh.locator("#prompt").fill("")
        fresh.locator("#prompt").press_sequentially("a blue square")
        fresh.locator("#prompt").press("Enter")
        _wait_for_cards(fresh, 2)
        assert fresh.locator("#gallery .card .label").first.inner_text() == "a blue square"
        assert not fresh.errors, fresh.errors
    finally:
        fresh.close()


def _busy(route, seconds: int = 1):
    route.fulfill(status=429, headers={"Retry-After": str(seconds)}, content_type="application/json",
                  body='{"error": {"message": "The server is busy.", "type": "requests", "param": null, '
                       '"code": "rate_limit_exceeded"}}')


def test_a_busy_server_is_waited_out_and_an_answer_that_is_no_json_is_named(page):
    """A 429 ended the request with an error (the server's message, which says when to retry, then the
    page's own "(retry in N s)"); a server stopped mid-request answers a plain-text 500, which the page
    reported as 'Unexpected token 'I', "Internal S"... is not valid JSON'."""
    from playwright.sync_api import expect

    calls = []

    def first_busy(route):
        calls.append(route.request.url)
        _busy(route) if len(calls) == 1 else route.continue_()

    page.evaluate("showError(''); showNotice('')")
    cards = page.locator("#gallery .card").count()
    page.fill("#prompt", "a red circle")
    page.fill("#seed", "")
    page.fill("#n", "1")
    page.fill("#steps", "2")
    page.route("**/v1/images/generations", first_busy)
    try:
        page.click("#generate")
        expect(page.locator("#progress-text")).to_contain_text("the server is busy: trying again in 1 s")
        _wait_for_cards(page, cards + 1)
        assert len(calls) == 2 and page.locator("#error").is_hidden()
    finally:
        page.unroute("**/v1/images/generations")

    page.route("**/v1/images/generations", lambda route: route.fulfill(
        status=500, content_type="text/plain", body="Internal Server Error"))
    try:
        page.click("#generate")
        expect(page.locator("#error")).to_have_text(
            "the server answered 500 Internal Server Error (is it still running?)")
    finally:
        page.unroute("**/v1/images/generations")
    assert not page.errors, page.errors


def test_progress_and_cancel_stay_in_sight_for_a_card_far_down_on_a_phone(page, server):
    """Variations or Inpaint on a card down the gallery started a request whose progress, Cancel and
    errors were at the top of the page, out of sight: on a phone nothing seemed to happen."""
    from playwright.sync_api import expect

    fresh = _fresh_page(page, server, width=390, height=844)
    try:
        _generate_cards(fresh, 3, "16x16")
        last = fresh.locator("#gallery .card").last
        last.scroll_into_view_if_needed()
        fresh.route("**/v1/images/variations", lambda route: _busy(route, 5))
        last.locator(".vary").click()
        expect(fresh.locator("#progress-text")).to_contain_text("the server is busy")
        for selector in ("#progress-text", "#cancel"):
            box = fresh.locator(selector).bounding_box()
            assert 0 <= box["y"] and box["y"] + box["height"] <= 844, (selector, box)
        fresh.click("#cancel")  # ends the wait at once
        expect(fresh.locator("#error")).to_have_text("cancelled")
        box = fresh.locator("#error").bounding_box()
        assert 0 <= box["y"] < 844, box
        assert fresh.locator("#gallery .card").count() == 3 and not fresh.errors, fresh.errors
    finally:
        fresh.close()


def _record_forms(page) -> None:
    """Keep every form the page sends from now on (Playwright sees no body in a request that carries
    blobs), for `_sent_form`."""
    page.evaluate("""() => {
        window.sentForms = [];
        const send = window.fetch;
        window.fetch = (url, options) => {
            if (options && options.body instanceof FormData) window.sentForms.push([url, options.body]);
            return send(url, options);
        }; }""")


def _sent_form(page, path: str) -> dict[str, bytes]:
    """The fields of the last form the page sent to `path`, by name (after `_record_forms`)."""
    import base64

    page.wait_for_function("path => window.sentForms.some(([url]) => url === path)", arg=path)
    fields = page.evaluate("""async path => {
        const [, form] = window.sentForms.filter(([url]) => url === path).pop();
        const fields = {};
        for (const [name, value] of form.entries()) {
            const bytes = new Uint8Array(await new Blob([value]).arrayBuffer());
            fields[name] = btoa(String.fromCharCode(...bytes));
        }
        return fields; }""", path)
    return {name: base64.b64decode(value) for name, value in fields.items()}


def test_the_mask_is_painted_from_the_keyboard_alone(page, server):
    """The mask could only be painted with a mouse or a finger: the canvas took no focus and no keys."""
    from playwright.sync_api import expect

    fresh = _fresh_page(page, server)
    try:
        _generate_cards(fresh, 1, "64x64")
        fresh.locator("#gallery .card .inpaint").first.focus()
        fresh.keyboard.press("Enter")
        fresh.wait_for_function("document.activeElement && document.activeElement.id === 'edit-paint'")
        paint = fresh.locator("#edit-paint")
        expect(paint).to_have_attribute("aria-label", "Mask: paint the region to repaint")
        expect(fresh.locator("#" + paint.get_attribute("aria-describedby"))).to_have_text(
            "Keys: arrows move the brush (Shift: farther); Space or Enter paints and E erases as it moves (press "
            "again to stop); Delete clears.")

        keys = fresh.keyboard
        keys.press("Space")                      # the brush starts at the centre of the 320² view: (160, 160)
        expect(fresh.locator("#brush-state")).to_have_text("painting: the arrows paint as they move, Space stops")
        for _ in range(2):
            keys.press("Shift+ArrowUp")          # paints up to (160, 96)
        keys.press("Delete")                     # ... and all of it is cleared again
        expect(fresh.locator("#brush-state")).to_have_text("mask cleared; brush lifted")
        for _ in range(2):
            keys.press("Shift+ArrowDown")        # back to (160, 160), painting nothing
        keys.press("Enter")
        for _ in range(10):
            keys.press("ArrowRight")             # a line from (160, 160) to (240, 160)
        keys.press("Space")                      # lifted
        keys.press("Shift+ArrowLeft")            # (208, 160)
        keys.press("e")                          # erases a dab of the line there
        expect(fresh.locator("#brush-state")).to_have_text("erasing: the arrows erase as they move, E stops")
        keys.press("e")
        for _ in range(2):
            keys.press("Shift+ArrowDown")        # (208, 224), painting nothing
        cursor = fresh.locator("#brush-cursor")  # the brush is seen where it is, at its size
        expect(cursor).to_be_visible()
        centre = fresh.evaluate("""() => {  // both boxes at once: the editor may still be scrolling into view
            const brush = document.getElementById('brush-cursor').getBoundingClientRect();
            const canvas = document.getElementById('edit-paint').getBoundingClientRect();
            return [brush.x + brush.width / 2 - canvas.x, brush.y + brush.height / 2 - canvas.y, brush.width]; }""")
        assert [round(v) for v in centre] == [208, 224, 32 + 4]  # the brush's 32 pixels inside a 2-pixel border

        _record_forms(fresh)
        keys.press("Tab")                        # on to the prompt, and Enter fills
        assert fresh.evaluate("document.activeElement.id") == "edit-prompt"
        keys.press("ControlOrMeta+a")
        keys.type("a blue square")
        keys.press("Enter")
        fields = _sent_form(fresh, "/v1/images/edits")
        assert fields["prompt"] == b"a blue square"
        alpha = np.asarray(Image.open(io.BytesIO(fields["mask"])).convert("RGBA"))[..., 3]
        assert alpha.shape == (64, 64)  # the view's 320 pixels are the mask's 64: a brush of 32 is 6.4 wide
        assert alpha[32, 33] == 0 and alpha[32, 49] == 0   # the painted line, at y 160 / 5
        assert alpha[32, 41] == 255                        # the dab erased from it, x 208 / 5
        assert alpha[:26].min() == 255 and alpha[36:].min() == 255  # the cleared stroke, the moves between
        _wait_for_cards(fresh, 2)
        assert fresh.locator("#gallery .card .label").first.inner_text() == "inpainted: a blue square"
        assert fresh.locator("#error").is_hidden() and not fresh.errors, fresh.errors
    finally:
        fresh.close()


def test_fill_shows_and_sends_its_own_images_size_steps_and_seed(page, server):
    """Fill took the number of images, seed and steps from the form above, which the inpainting panel
    did not show: what it would make was a guess."""
    from playwright.sync_api import expect

    fresh = _fresh_page(page, server)
    try:
        fresh.fill("#seed", "5")
        _generate_cards(fresh, 3, "64x64")
        fresh.locator("#gallery .card").first.locator(".inpaint").click()
        fresh.wait_for_selector("#editor:not([hidden])")
        settings = fresh.locator("#edit-settings")  # they start as the form's, the size as the image's
        expect(settings.locator("legend")).to_have_text("Fill makes")
        assert [fresh.input_value(f"#edit-{name}") for name in ("n", "size", "steps", "guidance", "seed")] == \
            ["3", "64x64", "2", "", "5"]
        settings.get_by_label("Images").fill("1")  # the panel's own, not the form's
        settings.get_by_label("Seed").fill("11")
        settings.get_by_label("Size").select_option("16x16")
        fresh.fill("#n", "4")                           # the form moves on: Fill keeps what it shows
        fresh.fill("#seed", "99")
        fresh.fill("#steps", "7")
        _stroke(fresh, (40, 40, 260, 200))
        fresh.fill("#edit-prompt", "a green star")
        _record_forms(fresh)
        fresh.click("#fill")
        fields = _sent_form(fresh, "/v1/images/edits")
        assert {name: fields[name] for name in ("n", "size", "steps", "seed")} == \
            {"n": b"1", "size": b"16x16", "steps": b"2", "seed": b"11"}
        assert "guidance_scale" not in fields  # blank: the model's
        _wait_for_cards(fresh, 4)
        assert fresh.locator("#gallery .card .seed").first.inner_text() == "seed 11 · 16x16"
        assert fresh.locator("#error").is_hidden() and not fresh.errors, fresh.errors
    finally:
        fresh.close()


# --- the user's own picture ---------------------------------------------------------------------------------

def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _card_bytes(card) -> bytes:
    """The bytes behind a card's image (an upload's blob: URL), as the page would send them."""
    import base64

    return base64.b64decode(card.locator("img").evaluate("""async img => {
        const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let text = '';
        for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
        return btoa(text); }"""))


def _small_requests(page) -> None:
    page.fill("#n", "2")
    page.fill("#steps", "2")
    page.select_option("#size", "16x16")


def test_an_uploaded_png_becomes_a_card_whose_variations_come_from_it(page, server):
    """Variations and Inpaint only worked on images the page had generated: no way to bring one's own."""
    from playwright.sync_api import expect

    from test_server import scene

    fresh = _fresh_page(page, server)
    try:
        original = _encoded(scene(64, seed=3), "PNG")
        fresh.focus("#generate")
        fresh.keyboard.press("Tab")  # the upload control is next in the tab order, and shows its focus
        assert fresh.evaluate("document.activeElement.id") == "upload"
        assert fresh.evaluate("getComputedStyle(document.querySelector('.upload-button')).outlineStyle") == "solid"
        fresh.get_by_label("Upload an image").set_input_files(
            files=[{"name": "scene.png", "mimeType": "image/png", "buffer": original}])
        _wait_for_cards(fresh, 1)
        card = fresh.locator("#gallery .card").first
        expect(card.locator(".label")).to_have_text("scene.png")
        expect(card.locator(".seed")).to_have_text("uploaded · 64×64")
        expect(card.locator("img")).to_have_attribute("alt", "your upload scene.png")
        expect(card.locator(".reuse")).to_be_hidden()
        expect(fresh.locator("#announce")).to_have_text("1 uploaded image added to the gallery")
        assert _card_bytes(card) == original  # a square PNG within the limits is sent as it is
        assert fresh.locator("#notice").is_hidden() and fresh.locator("#error").is_hidden()

        _small_requests(fresh)
        card.locator(".vary").click()
        _wait_for_cards(fresh, 3)
        assert fresh.locator("#gallery .card .label").all_inner_texts()[:2] == ["variation of scene.png"] * 2
        assert all(seed.startswith("seed ") and seed.endswith("· 16x16")
                   for seed in fresh.locator("#gallery .card .seed").all_inner_texts()[:2])
        assert fresh.locator("#error").is_hidden() and not fresh.errors, fresh.errors
    finally:
        fresh.close()


def test_a_dropped_non_square_jpeg_is_cropped_to_its_centre_and_varied_and_inpainted(page, server):
    import base64

    from playwright.sync_api import expect

    photo = np.zeros((64, 96, 3), dtype=np.uint8)
    photo[:, :16] = (0, 0, 255)     # left band: blue, outside the centre square
    photo[:, 16:80] = (0, 200, 0)   # the centre 64×64: green
    photo[:, 80:] = (255, 0, 0)     # right band: red
    jpeg = _encoded(Image.fromarray(photo), "JPEG", quality=95)
    fresh = _fresh_page(page, server)
    try:
        fresh.evaluate("""([name, b64]) => {
            const file = new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: 'image/jpeg'});
            const data = new DataTransfer();
            data.items.add(file);
            const send = (kind) => document.getElementById('gallery').dispatchEvent(
                new DragEvent(kind, {dataTransfer: data, bubbles: true, cancelable: true}));
            send('dragenter'); send('dragover');
            window.zoneShown = !document.getElementById('drop-zone').hidden;
            send('drop'); }""", ["holiday photo.jpg", base64.b64encode(jpeg).decode()])
        assert fresh.evaluate("window.zoneShown")
        _wait_for_cards(fresh, 1)
        expect(fresh.locator("#drop-zone")).to_be_hidden()
        card = fresh.locator("#gallery .card").first
        expect(card.locator(".seed")).to_have_text("uploaded · 64×64, cropped from 96×64")
        expect(fresh.locator("#notice")).to_contain_text(
            '"holiday photo.jpg" (96×64) was cropped to the 64×64 square at its centre, and saved as a PNG')
        expect(card.locator(".download")).to_have_attribute("download", "holiday photo.png")
        cropped = Image.open(io.BytesIO(_card_bytes(card)))
        assert cropped.format == "PNG" and cropped.size == (64, 64)
        pixels = np.asarray(cropped.convert("RGB"), dtype=np.int16)
        assert (pixels[:, 2:-2, 1] > 150).all() and (pixels[:, 2:-2, [0, 2]] < 80).all()  # the green centre only

        _small_requests(fresh)
        card.locator(".vary").click()
        _wait_for_cards(fresh, 3)
        assert fresh.locator("#gallery .card .label").first.inner_text() == "variation of holiday photo.jpg"

        _inpaint(fresh, fresh.locator("#gallery .card").last, "a red circle", (60, 60, 200, 200))  # the upload
        _wait_for_cards(fresh, 5)
        assert fresh.locator("#gallery .card .label").first.inner_text() == "inpainted: a red circle"
        assert fresh.locator("#error").is_hidden() and not fresh.errors, fresh.errors
    finally:
        fresh.close()


def _png_with_rows_missing(image: Image.Image) -> bytes:
    """A PNG of `image` whose every chunk is whole and checksummed but whose pixel stream holds only its
    first half of rows: what a broken encoder, or a cut-off file given a new end, looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + row.tobytes() for row in np.asarray(image.convert("RGB"))[:image.height // 2])
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, 2, 0, 0, 0)  # 8-bit RGB, not interlaced
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_a_corrupt_upload_is_refused_clearly_and_a_huge_one_is_shrunk(page, server):
    from playwright.sync_api import expect

    from test_server import scene

    fresh = _fresh_page(page, server)
    try:
        upload = fresh.get_by_label("Upload an image")
        garbage = b"\x89PNG\r\n\x1a\n" + bytes(300)  # not an image at all: the browser cannot decode it
        upload.set_input_files(files=[{"name": "broken.png", "mimeType": "image/png", "buffer": garbage}])
        expect(fresh.locator("#error")).to_have_text(
            '"broken.png" could not be read as an image: the file is damaged, or in a format this browser cannot '
            "open (PNG, JPEG, WebP and GIF work)")
        assert fresh.locator("#gallery .card").count() == 0

        # a cut-off download: the browser draws its first rows without a word; the page refuses it before
        # anything is sent (it made a card, and only the server said, once the card was varied)
        _record_forms(fresh)
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
        whole = _encoded(noise, "PNG")
        upload.set_input_files(files=[{"name": "cut.png", "mimeType": "image/png", "buffer": whole[:len(whole) // 2]}])
        expect(fresh.locator("#error")).to_have_text(
            '"cut.png" is a damaged PNG: the file is cut off before its end (only its first rows could be drawn), '
            "as a download or copy that stopped early is. Download or save the image again and upload the whole file.")
        assert fresh.locator("#gallery .card").count() == 0
        # whole chunks whose pixel stream stops half way (the server refuses it too: pixels_complete)
        upload.set_input_files(files=[{"name": "half.png", "mimeType": "image/png",
                                       "buffer": _png_with_rows_missing(noise)}])
        expect(fresh.locator("#error")).to_have_text(
            '"half.png" is a damaged PNG: its pixel data ends before the last row. Download or save the image again '
            "and upload the whole file.")
        assert fresh.locator("#gallery .card").count() == 0 and fresh.evaluate("window.sentForms.length") == 0

        # a PNG whole to the browser that the server still refuses (over 1 MB of text in a zTXt chunk, which
        # Pillow will not inflate): the card says so, with the server's word and the file's name
        from PIL import PngImagePlugin

        notes = PngImagePlugin.PngInfo()
        notes.add_text("notes", "x" * 2 * 2**20, zip=True)
        upload.set_input_files(files=[{"name": "notes.png", "mimeType": "image/png",
                                       "buffer": _encoded(noise, "PNG", pnginfo=notes)}])
        _wait_for_cards(fresh, 1)
        expect(fresh.locator("#error")).to_be_hidden()
        _small_requests(fresh)
        fresh.locator("#gallery .card").first.locator(".vary").click()
        expect(fresh.locator("#error")).to_contain_text(
            """the server refused your upload "notes.png": Invalid input image - 'image' could not be decoded as a """
            "PNG: it carries a compressed text chunk (metadata such as a comment) that inflates to over 1 MB")
        expect(fresh.locator("#gallery .card .seed").first).to_have_text("uploaded · 64×64 · refused by the server")
        assert fresh.locator("#gallery .card").count() == 1

        # a square PNG over the server's 4 MB is shrunk (and kept square) before it is sent
        noise = np.random.default_rng(1).integers(0, 255, (1200, 1200, 3), np.uint8)
        huge = _encoded(Image.fromarray(noise), "PNG", compress_level=1)
        assert len(huge) > 4 * 2**20
        upload.set_input_files(files=[{"name": "huge.png", "mimeType": "image/png", "buffer": huge}])
        _wait_for_cards(fresh, 2)
        card = fresh.locator("#gallery .card").first
        expect(card.locator(".seed")).to_have_text("uploaded · 1024×1024, shrunk from 1200×1200")
        expect(fresh.locator("#notice")).to_contain_text('"huge.png" (1200×1200) was shrunk to 1024×1024')
        expect(fresh.locator("#error")).to_be_hidden()
        sent = _card_bytes(card)
        assert len(sent) < 4 * 2**20 and Image.open(io.BytesIO(sent)).size == (1024, 1024)
        card.locator(".vary").click()
        _wait_for_cards(fresh, 4)
        assert fresh.locator("#error").is_hidden() and not fresh.errors, fresh.errors

        # what the server takes, the page takes too: whole pixels without the closing IEND chunk, and pixel
        # data whose chunk checksum is wrong (Pillow reads IDAT without it); the page refused both as damaged
        small = _encoded(Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), np.uint8)), "PNG")
        assert small.endswith(b"IEND\xaeB`\x82") and small.count(b"IDAT") == 1
        crc_at = small.index(b"IEND") - 8  # the IDAT chunk's checksum: the 4 bytes before IEND's length
        bad_crc = small[:crc_at] + bytes(b ^ 0xFF for b in small[crc_at:crc_at + 4]) + small[crc_at + 4:]
        for i, (name, data) in enumerate((("no-iend.png", small[:-12]), ("idat-crc.png", bad_crc))):
            from unclip.serve.uploads import read_png

            assert read_png(data, param="image").size == (32, 32)  # the server's judgement
            upload.set_input_files(files=[{"name": name, "mimeType": "image/png", "buffer": data}])
            _wait_for_cards(fresh, 5 + i)
            expect(fresh.locator("#error")).to_be_hidden()
            assert fresh.locator("#gallery .card").count() == 5 + i  # a card of its own, kept byte for byte
            assert _card_bytes(fresh.locator("#gallery .card").first) == data
    finally:
        fresh.close()


def test_a_cut_off_jpeg_is_refused_on_the_page_and_whole_ones_pass(page, server):
    """A JPEG cut off part way (a download that stopped early) was drawn down to where its data stopped and
    grey below, saved as a PNG and sent as if it were whole."""
    from playwright.sync_api import expect

    y, x = np.mgrid[0:48, 0:64]
    photo = Image.fromarray((np.stack([x * 4, y * 5, (x + y) * 2], axis=-1)
                             + np.random.default_rng(2).integers(0, 40, (48, 64, 3))).astype(np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "unclip"  # Make
    thumbnail = _encoded(photo.resize((16, 12)), "JPEG")  # its own end marker lies inside the APP1 segment
    baseline = _encoded(photo, "JPEG", quality=90)
    whole = {"baseline.jpg": baseline,
             "progressive.jpg": _encoded(photo, "JPEG", quality=90, progressive=True),
             "exif.jpg": _encoded(photo, "JPEG", quality=90, exif=exif.tobytes() + thumbnail),
             "restarts.jpg": _encoded(photo, "JPEG", quality=90, restart_marker_blocks=1),
             "trailer.jpg": baseline + b"\0\0SEFH" + bytes(64) + b"\xff\xd8 a camera's own data"}
    cut = {"cut.jpg": baseline[:len(baseline) * 3 // 5],
           "cut progressive.jpg": whole["progressive.jpg"][:len(whole["progressive.jpg"]) * 3 // 5],
           "cut exif.jpg": whole["exif.jpg"][:len(whole["exif.jpg"]) * 3 // 5],
           "no end marker.jpg": baseline[:-2]}
    assert all(len(data) > len(exif.tobytes() + thumbnail) + 100 for data in cut.values())  # past the thumbnail
    fresh = _fresh_page(page, server)
    try:
        upload = fresh.get_by_label("Upload an image")
        _record_forms(fresh)
        upload.set_input_files(files=[{"name": name, "mimeType": "image/jpeg", "buffer": data}
                                      for name, data in cut.items()])
        expect(fresh.locator("#error")).to_have_text(" ".join(
            f'"{name}" is a damaged JPEG: the file is cut off before its end (what is missing would be drawn grey, '
            "or blurred), as a download or copy that stopped early is. Download or save the image again and upload "
            "the whole file." for name in cut))
        assert fresh.locator("#gallery .card").count() == 0 and fresh.evaluate("window.sentForms.length") == 0

        upload.set_input_files(files=[{"name": name, "mimeType": "image/jpeg", "buffer": data}
                                      for name, data in whole.items()])
        _wait_for_cards(fresh, len(whole))
        expect(fresh.locator("#error")).to_be_hidden()
        assert fresh.locator("#gallery .card .label").all_inner_texts() == list(reversed(whole))
        assert fresh.locator("#gallery .card .seed").all_inner_texts() == [
            "uploaded · 48×48, cropped from 64×48"] * len(whole)
        assert not fresh.errors, fresh.errors
    finally:
        fresh.close()
