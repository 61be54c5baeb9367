"""Open notebooks in JupyterLab in a headless Chromium, as a learner would, and report what rendered.

nbval proves that every cell runs and prints what it printed; it cannot see a browser. This script
starts JupyterLab on a throw-away copy of the repository (so autosave never touches your
notebooks), opens each notebook, clears its outputs, runs all cells, and reports per notebook:
how long the run took, how many code cells ran, cells that raised, images (plots) that rendered,
live widget views, and "Error displaying widget" placeholders. With --ask it also types a question
into the chat widget of notebook 09, presses "send" and prints the streamed answer. Screenshots
go to --out.

It needs what the course itself does not: Chromium and its driver, and selenium (any Python):

    sudo apt-get install chromium chromium-driver        # Debian / Ubuntu
    python -m venv /tmp/selenv && /tmp/selenv/bin/pip install selenium
    /tmp/selenv/bin/python scripts/check_in_jupyterlab.py --jupyter .venv/bin/jupyter \
        --ask "What colour is the circle?" notebooks/*.ipynb

Exit status 1 if any notebook had an error, a cell that did not run, or a widget that did not render.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STATE = """const w = window.jupyterapp.shell.currentWidget;
const cells = [...w.content.model.cells].filter(c => c.type === 'code');
const failed = cells.filter(c => [...Array(c.outputs.length).keys()].some(i => c.outputs.get(i).type === 'error'));
return {kernel: w.sessionContext.session ? w.sessionContext.session.kernel.status : 'none',
        code_cells: cells.length, ran: cells.filter(c => c.executionCount).length, errors: failed.length};"""

RENDERED = """return {
  images: [...document.querySelectorAll('.jp-RenderedImage img')].filter(i => i.naturalWidth > 0).length,
  widget_views: document.querySelectorAll('.jupyter-widgets').length,
  widget_errors: [...document.querySelectorAll('.jp-OutputArea-output')]
      .filter(e => /Error displaying widget|widget model not found/i.test(e.textContent)).length};"""

# Render every cell (JupyterLab 4 otherwise draws only those in view) and skip the news prompt.
OVERRIDES = {"@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
             "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(jupyter: str, root: Path, home: Path, port: int) -> subprocess.Popen:
    """JupyterLab with its user settings and workspaces in `home` (yours are not read or changed)."""
    settings = home / "user-settings"
    for name, values in OVERRIDES.items():
        package, plugin = name.rsplit(":", 1)
        (settings / package).mkdir(parents=True, exist_ok=True)
        (settings / package / f"{plugin}.jupyterlab-settings").write_text(json.dumps(values))
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(home / "ws")}
    cmd = [jupyter, "lab", "--no-browser", "--allow-root", f"--port={port}", f"--ServerApp.root_dir={root}",
           "--ServerApp.token=", "--ServerApp.password=", "--LabApp.expose_app_in_browser=True"]
    lab = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=2)
            return lab
        except OSError:
            time.sleep(1)
    lab.kill()
    raise SystemExit(f"JupyterLab did not answer on port {port} within 2 minutes ({' '.join(cmd)})")


def browser(chromium: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    return webdriver.Chrome(options=opts, service=Service(driver))


def wait(predicate, timeout: float, every: float = 1.0):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


def run_notebook(d, port: int, path: str, timeout: float) -> dict:
    d.get(f"http://127.0.0.1:{port}/lab/tree/{path}?reset")
    if not wait(lambda: d.execute_script("return !!(window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                         " && window.jupyterapp.shell.currentWidget.sessionContext)"), 120):
        return {"notebook": path, "error": "the notebook did not open"}
    wait(lambda: d.execute_script(STATE)["kernel"] == "idle", 60)
    d.execute_script("return window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    time.sleep(1)
    start = time.time()
    d.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    time.sleep(2)
    state = wait(lambda: (lambda s: s if s["kernel"] == "idle" and s["ran"] == s["code_cells"] else None)(
        d.execute_script(STATE)), timeout, every=2) or d.execute_script(STATE)
    seconds = round(time.time() - start, 1)
    time.sleep(2)  # let the last images decode
    return {"notebook": path, "seconds": seconds, **state, **d.execute_script(RENDERED)}


def ask_chat_widget(d, question: str) -> str:
    from selenium.webdriver.common.by import By

    box = d.find_element(By.CSS_SELECTOR, '.widget-text input[placeholder="Ask about the image"]')
    d.execute_script("arguments[0].scrollIntoView();", box)
    box.send_keys(question)
    send = [b for b in d.find_elements(By.CSS_SELECTOR, "button.jupyter-button") if b.text.strip() == "send"][0]
    send.click()
    def text() -> str:
        return d.execute_script("return [...document.querySelectorAll('.jupyter-widgets.widget-output')]"
                                ".map(e => e.innerText).join('')").strip()

    wait(text, 60)  # the first streamed piece
    last, end = None, time.time() + 120
    while time.time() < end and text() != last:  # then until the stream stops growing
        last = text()
        time.sleep(3)
    return last or ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", help="notebook paths inside the repository")
    p.add_argument("--jupyter", default=str(ROOT / ".venv" / "bin" / "jupyter"), help="the course's jupyter")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--driver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    p.add_argument("--timeout", type=float, default=600, help="seconds one notebook may run")
    p.add_argument("--ask", default=None, help="a question to type into the chat widget (notebook 09)")
    p.add_argument("--out", default="runs/lab_check", help="screenshots and results.json go here")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lab_check_"))
    copy = work / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__"))
    port = free_port()
    lab = start_lab(args.jupyter, copy, work / "lab", port)
    d = browser(args.chromium, args.driver)
    results, ok = [], True
    try:
        for nb in args.notebooks:
            rel = str(Path(nb).resolve().relative_to(ROOT)) if Path(nb).exists() else nb
            r = run_notebook(d, port, rel, args.timeout)
            if args.ask and "ChatWidget" in (ROOT / rel).read_text(encoding="utf-8"):
                r["chat_answer"] = ask_chat_widget(d, args.ask)
            d.save_screenshot(str(out / (Path(rel).stem + ".png")))
            good = ("error" not in r and r["errors"] == 0 and r["ran"] == r["code_cells"]
                    and r["widget_errors"] == 0)
            ok &= good
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        d.quit()
        lab.terminate()
        lab.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"{sum(r.get('seconds', 0) for r in results):.0f} s for {len(results)} notebooks; "
          f"{'all ran, nothing failed to render' if ok else 'PROBLEMS above'}; screenshots in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
