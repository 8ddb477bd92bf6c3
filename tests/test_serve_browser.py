"""The playground in headless Chromium (Debian `chromium` + `chromium-driver`, driven by Selenium):
type text with blanks, choose a strategy, and watch the fillings stream in."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import torch

from openglm.config import model_preset
from openglm.generation import GenerationConfig, infill
from openglm.model import GLM
from openglm.serve import create_app, serve_in_thread
from openglm.tokenizer import GLMTokenizer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, GLM, GLMTokenizer]]:
    tokenizer = GLMTokenizer.default()
    torch.manual_seed(0)
    model = GLM(model_preset("micro", vocab_size=tokenizer.vocab_size)).eval()
    with serve_in_thread(create_app(model, tokenizer, model_name="micro")) as url:
        yield url, model, tokenizer


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def fill_in(browser: webdriver.Chrome, field: str, value: str) -> None:
    element = browser.find_element(By.ID, field)
    element.clear()
    element.send_keys(value)


def run(browser: webdriver.Chrome) -> None:
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "output").get_attribute("data-done") == "true")


def test_playground_streams_filled_blanks(served: tuple[str, GLM, GLMTokenizer], browser: webdriver.Chrome) -> None:
    url, model, tokenizer = served
    text = "Emma was [MASK] happy, and [MASK] rich."
    browser.get(url + "/")
    fill_in(browser, "text", text)
    fill_in(browser, "max_tokens", "6")
    fill_in(browser, "min_tokens", "3")
    run(browser)
    completed, fillings = infill(model, tokenizer, text, GenerationConfig(max_new_tokens=6, min_new_tokens=3, temperature=0))
    fills = [span.text for span in browser.find_elements(By.CSS_SELECTOR, "#output .fill")]
    assert fills == [f.strip() for f in fillings] and all(fills)  # .text trims the spaces at the edges
    assert browser.find_element(By.ID, "output").get_attribute("textContent") == completed
    assert len(browser.find_elements(By.CSS_SELECTOR, "#blanks li")) == 2
    assert browser.find_element(By.ID, "status").text.startswith("done: 12 tokens")  # 2 blanks x 6

    # Beam search: its options appear, and the filling is the beam search's.
    browser.find_element(By.CSS_SELECTOR, "input[name=strategy][value=beam]").click()
    assert browser.find_element(By.ID, "num_beams").is_displayed() and not browser.find_element(By.ID, "temperature").is_displayed()
    fill_in(browser, "num_beams", "3")
    run(browser)
    beam_text, _ = infill(model, tokenizer, text, GenerationConfig(max_new_tokens=6, min_new_tokens=3, num_beams=3))
    assert browser.find_element(By.ID, "output").get_attribute("textContent") == beam_text


def test_playground_shows_errors(served: tuple[str, GLM, GLMTokenizer], browser: webdriver.Chrome) -> None:
    url, _, _ = served
    browser.get(url + "/")
    fill_in(browser, "text", "word " * 200)
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 30).until(lambda b: "error 400" in b.find_element(By.ID, "status").text)
    assert "longer than the model's context" in browser.find_element(By.ID, "status").text
