"""One page API over the two browsers the workbench is tested in.

Chromium (Debian's package) is driven by Playwright over CDP. Firefox ESR (Debian's package)
is driven by Selenium through geckodriver (built from crates.io by ``make browser``): Playwright's
own Firefox is a patched build it downloads, and its BiDi channel needs commands newer than the
ESR has. Both adapters expose what the workbench test does, in the same words, so the test runs
unchanged in each browser.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from ctloop.settings import REPO_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FIREFOX = shutil.which("firefox-esr") or "/usr/bin/firefox-esr"
GECKODRIVER = REPO_ROOT / ".ctloop" / "tools" / "bin" / "geckodriver"
WAIT_S = 60.0


class Page(Protocol):
    name: str

    def goto(self, url: str) -> None: ...
    def fill(self, selector: str, text: str) -> None: ...
    def click(self, selector: str) -> None: ...
    def wait_for(self, selector: str) -> None: ...
    def text(self, selector: str) -> str: ...
    def value(self, selector: str) -> str: ...
    def attribute(self, selector: str, name: str) -> str | None: ...
    def evaluate(self, expression: str) -> Any: ...
    def press(self, key: str) -> None: ...
    def drag(self, points: list[dict[str, float]]) -> None: ...
    def click_at(self, point: dict[str, float]) -> None: ...
    def screenshot(self, path: Path, full_page: bool = False) -> None: ...
    def errors(self) -> list[str]: ...


def missing(browser: str) -> str | None:
    """Why ``browser`` cannot run here (None: it can)."""
    needs = {"chromium": [Path(CHROMIUM)], "firefox": [Path(FIREFOX), GECKODRIVER]}[browser]
    absent = [str(p) for p in needs if not p.exists()]
    return f"not installed: {', '.join(absent)} (run `make setup`)" if absent else None


@contextlib.contextmanager
def open_page(browser: str, width: int = 1500, height: int = 900) -> Iterator[Page]:
    if browser == "chromium":
        with _chromium(width, height) as page:
            yield page
    else:
        with _firefox(width, height) as page:
            yield page


# ---------------------------------------------------------------- Chromium (Playwright)
@contextlib.contextmanager
def _chromium(width: int, height: int) -> Iterator[Page]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield _PlaywrightPage(browser.new_page(viewport={"width": width, "height": height}))
        finally:
            browser.close()


class _PlaywrightPage:
    name = "chromium"

    def __init__(self, page: Any) -> None:
        self.page = page
        self._errors: list[str] = []
        page.on("pageerror", lambda e: self._errors.append(str(e)))

    def goto(self, url: str) -> None:
        self.page.goto(url)

    def fill(self, selector: str, text: str) -> None:
        self.page.fill(selector, text)

    def click(self, selector: str) -> None:
        self.page.click(selector)

    def wait_for(self, selector: str) -> None:
        # (no wait_for_function: it evaluates strings, which the page's CSP forbids)
        self.page.wait_for_selector(selector, timeout=WAIT_S * 1000)

    def text(self, selector: str) -> str:
        return str(self.page.inner_text(selector))

    def value(self, selector: str) -> str:
        return str(self.page.input_value(selector))

    def attribute(self, selector: str, name: str) -> str | None:
        return self.page.get_attribute(selector, name)  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    def press(self, key: str) -> None:
        self.page.keyboard.press(key)

    def drag(self, points: list[dict[str, float]]) -> None:
        mouse = self.page.mouse
        mouse.move(points[0]["x"], points[0]["y"])
        mouse.down()
        for p in points[1:]:
            mouse.move(p["x"], p["y"], steps=6)
        mouse.up()

    def click_at(self, point: dict[str, float]) -> None:
        self.page.mouse.click(point["x"], point["y"])

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        self.page.screenshot(path=str(path), full_page=full_page)

    def errors(self) -> list[str]:
        return list(self._errors)


# ---------------------------------------------------------------- Firefox (Selenium)
@contextlib.contextmanager
def _firefox(width: int, height: int) -> Iterator[Page]:
    from selenium import webdriver
    from selenium.webdriver.firefox.service import Service

    options = webdriver.FirefoxOptions()
    options.binary_location = FIREFOX
    options.add_argument("-headless")
    options.add_argument(f"--width={width}")
    options.add_argument(f"--height={height}")
    options.enable_bidi = True  # for the page's uncaught errors
    driver = webdriver.Firefox(options=options, service=Service(executable_path=str(GECKODRIVER)))
    try:
        yield _SeleniumPage(driver)
    finally:
        driver.quit()


_KEYS = {"Control": "CONTROL", "Shift": "SHIFT", "Alt": "ALT", "Escape": "ESCAPE"}


class _SeleniumPage:
    name = "firefox"

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self._errors: list[str] = []
        driver.script.add_javascript_error_handler(lambda e: self._errors.append(e.text))

    def _find(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def goto(self, url: str) -> None:
        self.driver.get(url)

    def fill(self, selector: str, text: str) -> None:
        element = self._find(selector)
        element.clear()
        element.send_keys(text)

    def click(self, selector: str) -> None:
        self.wait_for(selector)
        self._find(selector).click()

    def wait_for(self, selector: str) -> None:
        from selenium.webdriver.common.by import By

        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            found = self.driver.find_elements(By.CSS_SELECTOR, selector)
            if found and found[0].is_displayed():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{selector!r} did not show in {WAIT_S:.0f} s")

    def text(self, selector: str) -> str:
        return str(self._find(selector).text)

    def value(self, selector: str) -> str:
        return str(self._find(selector).get_property("value"))

    def attribute(self, selector: str, name: str) -> str | None:
        return self._find(selector).get_dom_attribute(name)  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        return self.driver.execute_script(f"return ({expression});")

    def press(self, key: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        *modifiers, last = key.split("+")
        chain = ActionChains(self.driver)
        held = [getattr(Keys, _KEYS[m]) for m in modifiers]
        for m in held:
            chain.key_down(m)
        chain.send_keys(getattr(Keys, _KEYS[last]) if last in _KEYS else last)
        for m in reversed(held):
            chain.key_up(m)
        chain.perform()

    def _pointer(self) -> Any:
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        return ActionBuilder(self.driver)

    def drag(self, points: list[dict[str, float]]) -> None:
        actions = self._pointer()
        pointer = actions.pointer_action
        pointer.move_to_location(round(points[0]["x"]), round(points[0]["y"]))
        pointer.pointer_down()
        for a, b in itertools.pairwise(points):
            for step in range(1, 7):  # as Playwright's steps=6: intermediate moves
                f = step / 6
                x = a["x"] + (b["x"] - a["x"]) * f
                y = a["y"] + (b["y"] - a["y"]) * f
                pointer.move_to_location(round(x), round(y))
        pointer.pointer_up()
        actions.perform()

    def click_at(self, point: dict[str, float]) -> None:
        actions = self._pointer()
        actions.pointer_action.move_to_location(round(point["x"]), round(point["y"]))
        actions.pointer_action.click()
        actions.perform()

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        if full_page:
            self.driver.get_full_page_screenshot_as_file(str(path))
        else:
            self.driver.save_screenshot(str(path))

    def errors(self) -> list[str]:
        return list(self._errors)
