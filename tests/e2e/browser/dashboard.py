"""Browser check of the taskhost dashboard (GET / on the worker's --http listener).
Drives headless Chromium through Selenium: a finished task row, then a dead-letter replay."""

import argparse
import os

from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

# The page re-renders every second, so elements can go stale between lookups.
IGNORED = (NoSuchElementException, StaleElementReferenceException)


class Failure(Exception):
    """A step did not reach its expected state."""


def css_str(value):
    """Quote a value for use inside a CSS attribute selector."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def task_row(task_id):
    return f"tr[data-task-id={css_str(task_id)}]"


def letter_row(letter_id):
    return f"tr[data-letter-id={css_str(letter_id)}]"


def status_text(driver):
    try:
        return driver.find_element(By.ID, "status").text.strip()
    except WebDriverException:
        return ""


def wait_for(driver, timeout, what, condition, ignored=IGNORED):
    """Poll `condition(driver)` until it returns something truthy, or fail."""
    try:
        return WebDriverWait(
            driver, timeout, poll_frequency=0.25, ignored_exceptions=ignored
        ).until(condition)
    except TimeoutException:
        raise Failure(f"timed out after {timeout}s waiting for {what}") from None


def fail_fast_on_401(driver):
    if status_text(driver).startswith("401"):
        raise Failure("the dashboard was refused (401); is the token in --url right?")


def wait_task_success(driver, timeout, task_id):
    seen = {"state": None}

    def done(d):
        fail_fast_on_401(d)
        rows = d.find_elements(By.CSS_SELECTOR, task_row(task_id))
        if not rows:
            return False
        seen["state"] = rows[0].find_element(By.CSS_SELECTOR, ".state").text.strip()
        return seen["state"] == "SUCCESS"

    try:
        wait_for(driver, timeout, f"task {task_id} in state SUCCESS", done)
    except Failure as e:
        last = seen["state"]
        detail = f"last state shown: {last}" if last else "its row never appeared"
        raise Failure(f"{e} ({detail})") from None


def run(driver, args):
    # 1. the page loads and shows the finished task.
    driver.get(args.url)
    wait_task_success(driver, args.timeout, args.task_id)

    # 2. the dead letter is listed; replay it.
    def click_replay(d):
        fail_fast_on_401(d)
        d.find_element(By.CSS_SELECTOR, letter_row(args.letter_id) + " button.replay").click()
        return True

    wait_for(
        driver,
        args.timeout,
        f"dead letter {args.letter_id} with a clickable replay button",
        click_replay,
        IGNORED + (ElementClickInterceptedException, ElementNotInteractableException),
    )

    # 3. the replay is acknowledged, the letter leaves the list, the task runs.
    wait_for(
        driver,
        args.timeout,
        '#status to report "replayed"',
        lambda d: "replayed" in status_text(d),
    )
    wait_for(
        driver,
        args.timeout,
        f"dead letter {args.letter_id} to leave the table",
        lambda d: not d.find_elements(By.CSS_SELECTOR, letter_row(args.letter_id)),
    )
    wait_task_success(driver, args.timeout, args.replayed_task_id)


def make_driver(timeout):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(executable_path="/usr/bin/chromedriver"), options=options
    )
    driver.set_page_load_timeout(timeout)
    return driver


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="dashboard URL including ?token=")
    parser.add_argument("--task-id", required=True, help="a task that has already succeeded")
    parser.add_argument("--letter-id", required=True, help="a dead letter to replay")
    parser.add_argument("--replayed-task-id", required=True,
                        help="id of the task the replay publishes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per wait")
    args = parser.parse_args()

    driver = None
    try:
        driver = make_driver(args.timeout)
        run(driver, args)
        print("dashboard ok", flush=True)
        return 0
    except Exception as e:  # report every failure the same way
        kind = "" if isinstance(e, Failure) else f"{type(e).__name__}: "
        print(f"dashboard FAILED: {kind}{e}", flush=True)
        if driver is not None:
            print(f"#status: {status_text(driver)!r}", flush=True)
            shot = os.path.join(os.environ.get("TMPDIR", "/tmp"), "dashboard-fail.png")
            try:
                if driver.get_screenshot_as_file(shot):
                    print(f"screenshot: {shot}", flush=True)
            except WebDriverException:
                pass
        return 1
    finally:
        if driver is not None:
            try:
                driver.quit()
            except WebDriverException:
                pass


if __name__ == "__main__":
    raise SystemExit(main())
