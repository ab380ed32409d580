"""The chat page at ``/`` in headless Chromium (the Debian package, driven by selenium through the
system's chromedriver): two turns with a system prompt, each streamed reply equal to the greedy reply
the API gives for the same conversation."""
from __future__ import annotations

import shutil

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("the chat page test needs chromium and chromedriver (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def test_chat_page_streams_the_greedy_reply_of_the_conversation(server, client, browser, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: len(Select(d.find_element("id", "model")).options) == 2)
    assert [o.get_attribute("value") for o in Select(browser.find_element("id", "model")).options] == \
        ["tiny-chat", "tuned"]
    _set(browser, "system", "Be brief.")
    _set(browser, "temperature", "0")
    _set(browser, "max_tokens", "12")
    messages = [{"role": "system", "content": "Be brief."}]
    for turn, text in enumerate(["Hello world", "你好 again"]):
        _set(browser, "input", text)
        browser.find_element("id", "send").click()
        wait.until(lambda d: d.execute_script(
            "const r = document.querySelectorAll('.msg.assistant, .msg.error');"
            f"return r.length === {turn + 1} && r[{turn}].dataset.done === '1';"))
        shown = browser.execute_script(f"return document.querySelectorAll('.msg')[{2 * turn + 1}].textContent")
        messages.append({"role": "user", "content": text})
        expected = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12,
                                                  temperature=0).choices[0].message.content
        assert shown == expected, f"turn {turn}"
        messages.append({"role": "assistant", "content": expected})
    screenshot = tmp_path / "chat_page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 1000
