"""The web UI of ``chronoedit serve``: its files work offline, and it edits an image in a real headless Chromium.

The browser tests drive Debian's ``chromium`` through ``chromium-driver`` with Selenium against a real server (uvicorn
in a thread) on the demo model. Without the browser they are skipped, unless ``CHRONOEDIT_REQUIRE_BROWSER=1`` (CI),
where a missing browser is a failure. The screenshot lands in ``test-artifacts/web-ui.png``.
"""

from __future__ import annotations

import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from fastapi.testclient import TestClient
from serve_helpers import make_state, running_server, workers_end_here

from chronoedit.commands import serve as serve_cmd
from chronoedit.editing import MODEL_PATH_ENV
from chronoedit.serve.app import STATIC_DIR, ServerState, create_app
from chronoedit.serve.options import Limits

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRE_BROWSER = "CHRONOEDIT_REQUIRE_BROWSER"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,2000",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # offline: nothing but the test server resolves
]  # fmt: skip
EDIT_TIMEOUT_S = 120
TOKEN = "web-ui-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _workers_end_with_their_test():
    """The workers of the servers a test made have stopped, and their threads ended, before the next test starts."""
    with workers_end_here():
        yield


# ---------------------------------------------------------------- static files, offline


class _References(HTMLParser):
    """The URLs an HTML page loads or links to (src and href attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_static_files_are_served_and_work_offline(tmp_path):
    """``/`` and every file the page references come from this server; no file points at another host."""
    state = ServerState(store=None, worker=None, results_dir=tmp_path, limits=Limits())  # type: ignore[arg-type]
    client = TestClient(create_app(state))  # no lifespan: the static routes need no worker
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    parser = _References()
    parser.feed(page.text)
    local = [url for url in parser.urls if not url.startswith(("data:", "#"))]
    paths = {urlsplit(urljoin("http://testserver/", url)).path for url in local}
    assert {"/static/app.js", "/static/style.css"} <= paths
    for path in paths:
        assert client.get(path).status_code == 200, path
    assert "javascript" in client.get("/static/app.js").headers["content-type"]  # module scripts need a JS type
    for file in STATIC_DIR.iterdir():
        assert client.get(f"/static/{file.name}").status_code == 200, file.name
        remote = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", file.read_text(encoding="utf-8"))
        assert not remote, f"{file.name} refers to another host: {remote}"


def test_api_docs_are_served_offline(tmp_path):
    """Swagger UI loads its script and style from this server, not from a CDN; there is no ReDoc (it needs a CDN)."""
    state = ServerState(store=None, worker=None, results_dir=tmp_path, limits=Limits())  # type: ignore[arg-type]
    client = TestClient(create_app(state))
    assert client.get("/redoc").status_code == 404
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    parser = _References()
    parser.feed(page.text)
    assert len(parser.urls) >= 2 and not [url for url in parser.urls if not url.startswith("/")], parser.urls
    assert not re.findall(r"(?:src|href|url)\s*[=:(]\s*[\"']?https?://", page.text), "the page loads from another host"
    for url in parser.urls:
        asset = client.get(url)
        assert asset.status_code == 200 and asset.content, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"] and len(asset.content) > 1e5, url


# ---------------------------------------------------------------- a real server and a real browser


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A running ``chronoedit serve`` on the demo model (tiny settings) on a free port of 127.0.0.1, with a token: the
    UI must ask for it and send it with every request, images and video included."""
    with pytest.MonkeyPatch.context() as mp, workers_end_here():
        mp.setenv("CHRONOEDIT_HOME", str(tmp_path_factory.mktemp("chronoedit_home")))
        mp.delenv(MODEL_PATH_ENV, raising=False)
        mp.setenv(serve_cmd.TOKEN_ENV, TOKEN)
        state = make_state(tmp_path_factory.mktemp("serve_state"))
        with running_server(create_app(state)) as url:
            yield url + "/"


def _wait_for(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


def _missing_browser(reason: str) -> None:
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(f"{reason} ({REQUIRE_BROWSER}=1)")
    pytest.skip(reason)


@pytest.fixture
def driver(tmp_path):
    """Headless Debian chromium with a fresh profile (empty localStorage) and the browser console captured."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        _missing_browser(f"the web UI test needs Debian's chromium and chromium-driver: {', '.join(missing)} missing")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing_browser("the web UI test needs selenium (pip install 'chronoedit[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # never selenium-manager
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


def _until(driver, script: str, timeout_s: float = 30, message: str = ""):
    """Wait until the JavaScript expression ``script`` is truthy; its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(
        lambda d: d.execute_script(f"return {script}"), message or script
    )


def _severe(entries: list[dict], allow_network: bool = False) -> list[dict]:
    """Console errors; failed requests (the browser logs every 4xx) only when not ``allow_network``."""
    return [e for e in entries if e["level"] == "SEVERE" and not (allow_network and e.get("source") == "network")]


def _sign_in(driver, server_url: str) -> None:
    """Load the page: it finds the server wants a token and asks for it; once given, the page loads the config."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(server_url)
    _until(driver, "!document.getElementById('auth-box').hidden", message="the token field")
    assert "bearer token is required" in driver.find_element(By.ID, "auth-message").text
    driver.find_element(By.ID, "token-input").send_keys(TOKEN, Keys.ENTER)
    _until(driver, "document.getElementById('preset').options.length > 1", message="presets from /v1/config")
    assert not driver.find_element(By.ID, "enhance-row").is_displayed()  # this server has no prompt enhancer
    assert not driver.find_element(By.ID, "auth-box").is_displayed()
    unauthorized = driver.get_log("browser")  # the 401s that made the page ask
    assert unauthorized and all("401" in e["message"] for e in _severe(unauthorized)), unauthorized


def _image(path: Path) -> Path:
    Image.new("RGB", (48, 32), (200, 120, 40)).save(path)
    return path


def _loaded(element_id: str) -> str:
    """JS: the <img> is shown and decoded."""
    shown = "e.offsetParent !== null && e.complete && e.naturalWidth > 0"
    return f"(e => {shown})(document.getElementById('{element_id}'))"


def _fetched_size(driver, element_id: str) -> int:
    """The byte size of what a download link (a blob: URL) holds."""
    return driver.execute_async_script(
        "const done = arguments[1];"
        "fetch(arguments[0].href).then(r => r.blob()).then(b => done(b.size), e => done(-1));",
        driver.find_element("id", element_id),
    )


def test_edit_with_reasoning_in_the_browser(driver, server_url, tmp_path):
    """Give the token, upload, edit with temporal reasoning, see the result and the trajectory, compare, download, find
    it in the history after a reload (the token is remembered); no console errors."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _sign_in(driver, server_url)
    driver.find_element(By.ID, "image-input").send_keys(str(_image(tmp_path / "cup.png")))
    _until(driver, _loaded("input-preview"), message="the preview of the chosen image")
    driver.find_element(By.ID, "prompt").send_keys("put a red hat on the cup")
    assert not driver.find_element(By.ID, "reasoning-steps").is_enabled()
    driver.find_element(By.ID, "reasoning").click()
    assert driver.find_element(By.ID, "keep-trajectory").is_selected()  # on by default with reasoning
    driver.find_element(By.ID, "reasoning-steps").send_keys("1")
    driver.find_element(By.ID, "submit").click()

    _until(driver, _loaded("result-image"), EDIT_TIMEOUT_S, "the edited image")
    job_id = driver.find_element(By.ID, "job").get_attribute("data-id")
    assert driver.find_element(By.ID, "status-text").text.startswith("Done")
    assert driver.execute_script("return document.getElementById('result-image').naturalWidth") == 32  # the server's
    assert driver.execute_script("return document.getElementById('result-input').naturalWidth") == 48

    _until(driver, _loaded("trajectory-sheet"), message="the trajectory's frame sheet")
    video_ok = driver.execute_script(
        "const v = document.getElementById('trajectory-video'); return v.canPlayType(arguments[0]);",
        'video/mp4; codecs="avc1.42E01E"',
    )
    if video_ok:  # Debian's chromium plays the server's H.264 mp4
        _until(driver, "document.getElementById('trajectory-video').readyState >= 2", message="the trajectory video")
        assert driver.execute_script("return document.getElementById('trajectory-video').videoWidth") == 32
    else:
        assert driver.find_element(By.ID, "video-note").is_displayed()

    after = driver.find_element(By.ID, "compare-after")
    assert after.value_of_css_property("clip-path") == "inset(0px 0px 0px 50%)"
    slider = driver.find_element(By.ID, "compare-slider")
    slider.send_keys(Keys.HOME)  # the keyboard moves the divider: all edited
    assert after.value_of_css_property("clip-path") == "inset(0px 0px 0px 0%)"
    for _ in range(3):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert after.value_of_css_property("clip-path") == "inset(0px 0px 0px 3%)"

    files = {role: httpx.get(f"{server_url}v1/edits/{job_id}/{role}", headers=AUTH).content for role in
             ("result", "trajectory", "trajectory-sheet")}  # fmt: skip
    for link, role, suffix in (("download-result", "result", ".png"), ("download-trajectory", "trajectory", ".mp4"),
                               ("download-sheet", "trajectory-sheet", ".png")):  # fmt: skip
        assert driver.find_element(By.ID, link).get_attribute("download").endswith(suffix)
        assert _fetched_size(driver, link) == len(files[role]) > 0

    item = f"#history-list [data-testid='history-item'][data-id='{job_id}']"
    _until(driver, f"document.querySelector(\"{item}\")?.dataset.status === 'done'", message="the history entry")
    _until(driver, f"[...document.querySelectorAll(\"{item} img\")].filter(i => i.naturalWidth > 0).length === 2",
           message="the history thumbnails (input and result)")  # fmt: skip

    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(ARTIFACTS / "web-ui.png"))
    console = driver.get_log("browser")

    driver.find_element(By.ID, "edit-result").click()  # the edited image becomes the next edit's input
    _until(driver, "document.getElementById('input-preview').naturalWidth === 32", message="the result as input")
    assert driver.find_element(By.ID, "image-name").text.startswith(f"chronoedit-{job_id[:8]}-edited.png")
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == ""
    assert driver.find_element(By.ID, "reasoning").is_selected()  # the other settings are kept

    gone = "A" * 22  # a well-formed id this server never issued: the reload must drop it from the history
    driver.execute_script(
        "const list = JSON.parse(localStorage.getItem('chronoedit.history'));"
        "list.push({id: arguments[0], prompt: 'gone', created: Date.now(), status: 'done'});"
        "localStorage.setItem('chronoedit.history', JSON.stringify(list));",
        gone,
    )
    driver.refresh()  # the token and the history are in localStorage, and the page's #id reopens the job
    _until(driver, f'document.querySelector("{item}") !== null', message="the history entry after a reload")
    _until(driver, _loaded("result-image"), message="the job reopened after a reload")
    _until(driver, f"document.querySelector(\"[data-id='{gone}']\") === null", message="the unknown job dropped")
    assert driver.find_element(By.ID, "history-list").text.splitlines()[0] == "put a red hat on the cup"
    after_reload = [e for e in driver.get_log("browser") if gone not in e["message"]]  # its 404s are expected
    assert not _severe(console + after_reload)

    driver.find_element(By.ID, "history-clear").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#history-list li") == []
    assert driver.execute_script("return JSON.parse(localStorage.getItem('chronoedit.history'))") == []


def _api_error(server_url: str, image: Path, options: str) -> str:
    """What the API itself answers to this submission (a 4xx's ``detail``)."""
    files, data = {"image": image.read_bytes()}, {"options": options}
    response = httpx.post(f"{server_url}v1/edits", files=files, data=data, headers=AUTH)
    assert 400 <= response.status_code < 500
    return response.json()["detail"]


def test_server_errors_are_shown_verbatim(driver, server_url, tmp_path):
    """A missing prompt and a file that is not an image: the page shows the server's own message; nothing is queued."""
    from selenium.webdriver.common.by import By

    _sign_in(driver, server_url)
    image = _image(tmp_path / "cup.png")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    expected = {
        path: _api_error(server_url, path, options)
        for path, options in ((image, '{"output_format": "png"}'), (not_an_image, '{"prompt": "a hat"}'))
    }
    assert "prompt" in expected[image] and "cannot be read" in expected[not_an_image]

    driver.find_element(By.ID, "image-input").send_keys(str(image))
    driver.find_element(By.ID, "submit").click()  # no prompt
    _until(driver, "!document.getElementById('error').hidden", message="the error area")
    assert driver.find_element(By.ID, "error").text == expected[image]

    driver.find_element(By.ID, "image-input").send_keys(str(not_an_image))
    driver.find_element(By.ID, "prompt").send_keys("a hat")
    assert not driver.find_element(By.ID, "error").is_displayed()  # a new file clears the old error
    driver.find_element(By.ID, "submit").click()
    _until(driver, "!document.getElementById('error').hidden", message="the error area")
    assert driver.find_element(By.ID, "error").text == expected[not_an_image]
    assert driver.find_element(By.ID, "error").get_attribute("data-status") == "400"
    assert driver.find_elements(By.CSS_SELECTOR, "#history-list li") == []
    assert driver.find_element(By.ID, "job").get_attribute("hidden") is not None
    assert not _severe(driver.get_log("browser"), allow_network=True)


def test_api_docs_render_offline_in_the_browser(driver, server_url):
    """Swagger UI draws the routes of /openapi.json while no other host resolves (the browser is offline)."""
    text = "document.body.innerText.replace(/\\u200b/g, '')"  # Swagger UI breaks paths with zero-width spaces
    driver.get(server_url + "docs")
    _until(driver, f"{text}.includes('/v1/edits/{{job_id}}/input')", message="the routes in /docs")
    assert "ChronoEdit" in driver.execute_script(f"return {text}")
    assert not _severe(driver.get_log("browser")), driver.get_log("browser")


def test_the_servers_seed_is_shown_as_the_default(driver, tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONOEDIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)
    monkeypatch.delenv(serve_cmd.TOKEN_ENV, raising=False)
    with running_server(create_app(make_state(tmp_path / "state", "--seed", "42"))) as url:
        driver.get(url + "/")
        _until(driver, "document.getElementById('preset').options.length > 1", message="the config")
        assert driver.find_element("id", "seed").get_attribute("placeholder") == "42 (default)"
        assert driver.find_element("id", "seed-hint").text == "Blank: the server's seed 42."
