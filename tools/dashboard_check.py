"""Open a study in optuna-dashboard in headless Chromium and check what a person sees.

    python tools/dashboard_check.py STUDY_OR_DB [--shots DIR]

Starts ``meme-nas dashboard`` on a free loopback port, opens the study list, the
study page and the trial list in Debian's Chromium through its own chromedriver (no
browser or driver download), checks that the pages show the study's trial count, a
metric name and a decoded ratio string, and saves a screenshot of each page. Exit 0
when every check passed; prints one line per check.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parent.parent


def available() -> str:
    """'' when the check can run here, else why not."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} not found (Debian packages chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(study: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "nas.engine.dashboard", study, "--port", str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nas.engine.dashboard exited: {proc.stderr.read().strip()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("nas.engine.dashboard did not answer in 60 s")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1500,2000"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def page_text(driver, url: str, needles: list[str], timeout: float = 30) -> str:
    """Load url and wait (bounded) until every needle is in the rendered text."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        text = driver.find_element(By.TAG_NAME, "body").text
        if all(n in text for n in needles):
            break
        time.sleep(0.5)
    return text


def check(study: str, shots: Path, expect: dict) -> list[tuple[str, bool]]:
    """expect: study_name, n_trials, metric, ratio and status (of the first trial), study_id."""
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = serve(study, port)
    driver = browser()
    results = []
    try:
        base = f"http://127.0.0.1:{port}/dashboard"
        text = page_text(driver, base, [expect["study_name"]])
        driver.save_screenshot(str(shots / "1-study-list.png"))
        results.append((f"study list shows {expect['study_name']!r}", expect["study_name"] in text))
        sid = expect.get("study_id", 1)
        text = page_text(driver, f"{base}/studies/{sid}", [expect["metric"]])
        driver.save_screenshot(str(shots / "2-study.png"))
        results.append((f"study page names the metric {expect['metric']!r}", expect["metric"] in text))
        count = f"{expect['n_trials']} Trials"
        text = page_text(driver, f"{base}/studies/{sid}/trials", [expect["ratio"], count, expect["status"]])
        driver.save_screenshot(str(shots / "3-trials.png"))
        results.append((f"trial list shows {count!r}", count in text))
        results.append((f"first trial shows its decoded ratios {expect['ratio']!r}", expect["ratio"] in text))
        results.append((f"first trial shows its status {expect['status']!r}", expect["status"] in text))
    finally:
        driver.quit()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return results


def expectations(db: Path) -> dict:
    """What the page must show, read from the study itself."""
    import optuna

    url = f"sqlite:///{db.resolve()}"
    summary = optuna.study.get_all_study_summaries(url)[0]
    study = optuna.load_study(study_name=summary.study_name, storage=url)
    trials = study.get_trials(deepcopy=False)
    first = trials[0]  # the trial page opens on it
    return {"study_name": study.study_name, "n_trials": len(trials), "metric": study.metric_names[0],
            "ratio": first.user_attrs["expert_1"], "status": first.user_attrs["status"], "study_id": optuna.storages.RDBStorage(url).get_study_id_from_name(study.study_name)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("db", type=Path, help="an optuna.db (SQLite) holding one study")
    p.add_argument("--shots", type=Path, default=Path("results/dashboard-check"), help="screenshot folder")
    args = p.parse_args(argv)
    why = available()
    if why:
        print(f"cannot run the browser check: {why}")
        return 2
    results = check(str(args.db), args.shots, expectations(args.db))
    for what, ok in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    print(f"screenshots in {args.shots}/")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
