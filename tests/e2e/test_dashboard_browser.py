"""The dashboard in a real browser: headless Debian Chromium against a running daemon
(simulator backend). It must show every VM, a host chart that moves, the pool tree and the
decisions; the screenshot is kept in tests/artifacts/dashboard.png."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_run import RunningDaemon, write_host_file

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(binary) is None:
            pytest.skip(f"needs {binary} (Debian chromium and chromium-driver: scripts/setup.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,1500",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate: object, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.mark.timeout(300)
def test_dashboard_shows_every_vm_and_a_moving_chart(tmp_path: Path, browser: object) -> None:
    from selenium.webdriver.common.by import By

    driver = browser  # a selenium WebDriver
    state = tmp_path / "state"
    host = write_host_file(tmp_path, capacity="2GiB")  # overcommitted: the scheduler acts
    with RunningDaemon(state, host) as d:
        d.wait_ready()
        driver.get(f"{d.url}/#token={d.token}")  # type: ignore[attr-defined]

        def vm_rows() -> list[str]:
            rows = driver.find_elements(By.CSS_SELECTOR, "#vm-table tbody tr")  # type: ignore[attr-defined]
            return [r.get_attribute("data-vm") for r in rows]

        wait_for(lambda: sorted(vm_rows()) == ["batch", "web1", "web2"], what="the VM rows")
        chart = driver.find_element(By.ID, "host-chart")  # type: ignore[attr-defined]
        wait_for(lambda: int(chart.get_attribute("data-points") or 0) >= 4, what="chart points")
        first_x = float(chart.get_attribute("data-last-x"))
        first_png = driver.execute_script("return arguments[0].toDataURL()", chart)  # type: ignore[attr-defined]
        wait_for(
            lambda: float(chart.get_attribute("data-last-x")) > first_x + 2, what="a newer point"
        )
        assert driver.execute_script("return arguments[0].toDataURL()", chart) != first_png  # type: ignore[attr-defined]
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None  # type: ignore[attr-defined]
        assert "history" not in driver.current_url and "token" not in driver.current_url  # type: ignore[attr-defined]
        pools = driver.find_element(By.ID, "pool-tree").text  # type: ignore[attr-defined]
        assert "prod" in pools and "web1" in pools and "expandable" in pools
        state_badge = driver.find_element(By.ID, "host-state").text  # type: ignore[attr-defined]
        assert state_badge in ("high", "soft", "hard", "low")
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#decision-table tbody tr")) > 0,  # type: ignore[attr-defined]
                 what="a decision")  # fmt: skip
        events = driver.find_element(By.ID, "event-table").text  # type: ignore[attr-defined]
        assert "daemon.started" in events
        time.sleep(3)  # a few more points, so the screenshot shows a history
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))  # type: ignore[attr-defined]
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
        assert d.stop() == 0
