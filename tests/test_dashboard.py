"""The dashboard in a real headless browser (Debian's chromium through Selenium), against the real
services: the gateway serving the page and forwarding to the OMS, risk, exeq and pnl on real
nats-server and redis-server. A person's path: prices tick, an order is placed and filled, the
position shows, a resting order is cancelled from the blotter.

TRADINGSTACK_SCREENSHOT=path saves what the browser shows at the end (the README's picture).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tradingstack.api import ServiceName
from tradingstack_services.marketdata import gateway

from conftest import LiveServer, wait_for
from test_trading_e2e import Platform, platform  # noqa: F401

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("TRADINGSTACK_REQUIRE_ENVTEST"):  # CI: hack/test-deps.sh installs them
            pytest.fail("chromium and chromium-driver are required (apt-get install chromium chromium-driver)")
        pytest.skip("chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def text(driver: Any, selector: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.CSS_SELECTOR, selector).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def number(shown: str) -> float | None:
    try:
        return float(shown.replace(",", ""))
    except ValueError:
        return None


def test_a_person_watches_prices_places_an_order_sees_it_filled_and_cancels_a_resting_one(
    platform: Platform,
    browser: Any,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with contextlib.ExitStack() as stack:
        servers = platform.serve_all(stack)
        oms = servers[ServiceName.OMS]
        settings = platform.settings(ServiceName.GATEWAY).model_copy(
            update={"TICK_RATE": 4.0, "TRADING_API_URL": f"http://127.0.0.1:{oms.port}"}
        )
        page = stack.enter_context(LiveServer(gateway.create(settings)))
        browser.get(f"http://127.0.0.1:{page.port}/")
        assert browser.current_url.endswith("/dashboard/")

        # Prices tick: BTCUSDT near the seeds' 45,000, and moving.
        first = wait_for(lambda: number(text(browser, '#tickers tr[data-symbol="BTCUSDT"] .last')), 15, "a price")
        assert 40_000 < first < 50_000
        wait_for(lambda: number(text(browser, '#tickers tr[data-symbol="BTCUSDT"] .last')) not in (None, first), 15,
                 "the price to move")  # fmt: skip
        wait_for(lambda: text(browser, "#connection") == "live", 15, "the live stream")

        # An order through the ticket: filled, and the position shows it.
        ticket = browser.find_element(By.ID, "ticket")
        Select(ticket.find_element(By.NAME, "symbol")).select_by_value("BTCUSDT")
        Select(ticket.find_element(By.NAME, "side")).select_by_value("buy")
        quantity = ticket.find_element(By.NAME, "quantity")
        quantity.clear()
        quantity.send_keys("0.25")
        ticket.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(lambda: text(browser, "#blotter tbody tr:first-child .status") == "filled", 20, "the order filled")
        wait_for(lambda: number(text(browser, '#positions tr[data-key="/BTCUSDT"] .qty')) == 0.25, 20, "a position")
        assert "P&L" in text(browser, "#pnl-total")

        # A limit order far below the market rests; its Cancel button cancels it.
        Select(ticket.find_element(By.NAME, "order_type")).select_by_value("limit")
        limit = ticket.find_element(By.NAME, "limit_price")
        limit.send_keys("1000")
        ticket.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(lambda: text(browser, "#blotter tbody tr:first-child .status") == "routed", 20, "a resting order")
        browser.find_element(By.CSS_SELECTOR, "#blotter tbody tr:first-child button.cancel").click()
        wait_for(lambda: text(browser, "#blotter tbody tr:first-child .status") == "cancelled", 20, "cancelled")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#blotter tbody tr")) == 2

        # What the page showed is what the services hold.
        orders = oms.get("/orders")[1]["orders"]
        assert [o["status"] for o in orders] == ["cancelled", "filled"]
        positions = servers[ServiceName.PNL].get("/positions")[1]
        assert [(p["symbol"], p["quantity"]) for p in positions] == [("BTCUSDT", 0.25)]
        if target := os.environ.get("TRADINGSTACK_SCREENSHOT"):
            browser.save_screenshot(str(Path(target)))
        # Leave the page before the servers stop: its live stream would hold their shutdown open.
        browser.get("about:blank")


def test_the_gateway_forwards_only_the_trading_api(platform: Platform) -> None:
    settings = platform.settings(ServiceName.GATEWAY).model_copy(update={"TICK_RATE": 0.0})
    with LiveServer(gateway.create(settings.model_copy(update={"TRADING_API_URL": None}))) as alone:
        status, body = alone.get("/api/trading/orders")
        assert status == 503
        assert "TRADING_API_URL" in body["detail"]
    with contextlib.ExitStack() as stack:
        oms = platform.serve_all(stack, [ServiceName.RISK, ServiceName.OMS])[ServiceName.OMS]
        update = {"TRADING_API_URL": f"http://127.0.0.1:{oms.port}"}
        page = stack.enter_context(LiveServer(gateway.create(settings.model_copy(update=update))))
        assert page.get("/api/trading/orders")[0] == 200
        for path in ("/api/trading/metrics", "/api/trading/../metrics", "/api/trading/readyz", "/api/trading/%2e%2e/x"):
            assert page.get(path)[0] == 404, path
        assert page.get("/dashboard/app.js")[0] == 200
    with LiveServer(gateway.create(settings.model_copy(update=update))) as orphan:
        status, body = orphan.get("/api/trading/orders")
        assert status == 502  # the OMS is gone now
        assert orphan.last_headers.get("retry-after") == "1"
