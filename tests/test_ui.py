"""`raypurify ui`: a real MLflow server on a real sweep-shaped store, read by a real browser.

The store is built through raypurify.tracking exactly as a sweep leaves it (a parent run
tagged kind=sweep, one child per trial with `mlflow.parentRunId`, `trial_id`, the params
kld1/kld2/lambda and the metrics), once per module: every new SQLite store runs MLflow's
schema migrations, which cost seconds. The browser test opens the printed comparison
link in headless Chromium (selenium + chromedriver) and waits for every trial's values to
render: the compare page fetches the runs with JavaScript after load, so the DOM of the
first paint does not have them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import new_store

from raypurify.errors import ConfigError
from raypurify.sweeps import ui
from raypurify.tracking import start_run

# kld1, kld2, lambda, objective per trial: values that cannot be mistaken for one another
# or for anything else on the page. MLflow shows metrics rounded to 3 decimals.
TRIALS = [
    ("0.731", "3.117", "0.0123", 0.614),
    ("1.264", "4.402", "0.0456", 0.659),
    ("2.58", "5.93", "0.0789", 0.701),
]
EXPERIMENT = "sweep-ui-test"


@pytest.fixture(scope="module")
def sweep_dir(mlflow_template, tmp_path_factory) -> Path:
    """A sweep's output directory: sweep.json pointing at a real store with 3 trials and,
    below the same parent, the run of the poison step the sweep prepared."""
    root = tmp_path_factory.mktemp("sweep")
    uri = new_store(mlflow_template, root)
    parent = start_run(EXPERIMENT, "sweep-demo", uri=uri, tags={"kind": "sweep"})
    parent.log_params({"space": "demo", "samples": len(TRIALS)})
    for i, (kld1, kld2, lam, objective) in enumerate(TRIALS):
        params = {"kld1": kld1, "kld2": kld2, "lambda": lam, "width": 16, "epochs": 3}
        trial = parent.child(f"trial-{i}", params, trial_id=f"t{i:05d}")
        for epoch in range(3):
            # The objective is a different number from every other metric on the page.
            trial.log_metrics({"val_accuracy": objective - 0.05 * (3 - epoch)}, step=epoch)
        trial.log_metrics({"objective": objective, "test_accuracy": objective - 0.02})
        trial.log_metrics({"label_free": 1.0 - objective})
        trial.log_dict({"trial": i, "kld1": kld1}, "summary.json")
        trial.finish()
    parent.child("poison/em-class", {"attack": "em"}).finish()  # a prepared step's run
    parent.finish()
    client = parent.client
    (root / "sweep.json").write_text(
        json.dumps(
            {
                "tracking_uri": uri,
                "experiment_id": client.get_run(parent.run_id).info.experiment_id,
                "experiment_name": EXPERIMENT,
                "parent_run_id": parent.run_id,
            }
        )
    )
    return root


# --- units ----------------------------------------------------------------------------------


def test_comparison_url_is_mlflows_compare_route():
    url = ui.comparison_url("http://127.0.0.1:5000/", "7", ["ab12", "cd34"])
    assert url == (
        "http://127.0.0.1:5000/#/compare-runs"
        "?runs=%5B%22ab12%22%2C%22cd34%22%5D&experiments=%5B%227%22%5D"
    )
    assert ui.base_url("0.0.0.0", 5001) == "http://127.0.0.1:5001"
    assert ui.experiment_url("http://h:1", "3") == "http://h:1/#/experiments/3"


def test_sweep_runs_are_the_trials_oldest_first(sweep_dir):
    sweep = ui.load_sweep(sweep_dir)
    runs = ui.sweep_runs(sweep["tracking_uri"], sweep["experiment_id"], sweep["parent_run_id"])
    assert [r.data.tags["trial_id"] for r in runs] == ["t00000", "t00001", "t00002"]
    assert [r.data.params["kld1"] for r in runs] == [t[0] for t in TRIALS]
    assert sweep["parent_run_id"] not in {r.info.run_id for r in runs}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no sweep.json"),
        ("{not json", "not readable JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"tracking_uri": "sqlite:///x.db"}', "`experiment_id` is missing"),
    ],
)
def test_bad_sweep_dirs_are_one_line_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "sweep.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        ui.load_sweep(tmp_path)
    with pytest.raises(ConfigError, match="no such directory"):
        ui.load_sweep(tmp_path / "absent")


def test_ports_and_stores(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}: already in use"):
            ui.choose_port("127.0.0.1", port)
    chosen, note = ui.choose_port("127.0.0.1", None)
    assert (chosen == ui.DEFAULT_PORT) == (note is None)
    with pytest.raises(ConfigError, match="no MLflow store at"):
        ui.check_store(f"sqlite:///{tmp_path / 'absent.db'}")
    cmd = ui.server_command(f"sqlite:///{tmp_path / 'm.db'}", "127.0.0.1", 5123)
    assert cmd[cmd.index("--artifacts-destination") + 1] == (tmp_path / "mlartifacts").as_uri()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_a_taken_default_port_falls_back_to_a_free_one_and_says_so(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(ui, "DEFAULT_PORT", port)
        chosen, note = ui.choose_port("127.0.0.1", None)
    assert chosen != port and note == (
        f"port {port} is in use on 127.0.0.1; serving on {chosen} instead"
    )


def test_a_tracking_server_is_pointed_to_not_served_again(capsys):
    """Runs logged to an `mlflow server` are browsed on that server: no second one starts."""
    assert _cli_main(["--backend-store-uri", "http://127.0.0.1:9/"]) == 0
    assert capsys.readouterr().out == (
        "the tracking server at http://127.0.0.1:9/ serves the MLflow UI itself\n"
    )


def test_cli_bad_input_exits_2_with_one_line(sweep_dir, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sweep.json").write_text("{")
    store = f"sqlite:///{sweep_dir / 'mlflow.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv, message in [
            (["--sweep", str(tmp_path / "absent")], "no such directory"),
            (["--sweep", str(tmp_path)], "no sweep.json"),
            (["--sweep", str(tmp_path / "bad")], "not readable JSON"),
            (["--backend-store-uri", f"sqlite:///{tmp_path / 'no.db'}"], "no MLflow store"),
            (["--backend-store-uri", store, "--port", str(port)], "already in use"),
        ]:
            assert _cli_main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1, err
            assert message in err, err


def _cli_main(argv: list[str]) -> int:
    """`raypurify ui ...` in process."""
    from raypurify import cli

    return cli.main(["ui", *argv])


# --- the browser ----------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _ui_command() -> list[str]:
    return [sys.executable, "-m", "raypurify", "ui"]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_line(lines: list[str], prefix: str, proc, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if line.startswith(prefix):
                return line
        if proc.poll() is not None and not any(x.startswith(prefix) for x in lines):
            break
        time.sleep(0.2)
    pytest.fail(f"no {prefix!r} line from raypurify ui; output:\n" + "".join(lines))


@pytest.mark.slow
def test_browser_shows_every_trial_on_the_comparison_page(sweep_dir, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium binary (apt-get install -y chromium chromium-driver)")
    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromium is installed but chromedriver is not (chromium-driver)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port = ui.free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [*_ui_command(), "--port", str(port), "--sweep", str(sweep_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()
    browser = None
    shot = Path(os.environ.get("RAYPURIFY_UI_SCREENSHOT") or tmp_path / "mlflow-compare.png")
    try:
        _wait_for_line(lines, "starting the MLflow UI", proc, 60)
        line = _wait_for_line(lines, "compare its 3 trials: ", proc, 240)
        url = line.split(": ", 1)[1].strip()
        assert url.startswith(f"http://127.0.0.1:{port}/#/compare-runs?runs=")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.read().strip() == b"OK"
        check_artifacts_are_served(port, sweep_dir)

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            options.add_argument(arg)
        options.add_argument("--window-size=1500,1900")
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        browser.set_page_load_timeout(120)
        browser.get(url)
        wanted = {v for kld1, kld2, lam, obj in TRIALS for v in (kld1, kld2, lam, f"{obj:g}")}
        deadline = time.monotonic() + 180
        missing = wanted
        while time.monotonic() < deadline:
            text = browser.find_element("tag name", "body").text
            missing = {v for v in wanted if v not in text}
            if not missing and "kld1" in text and "objective" in text:
                break
            time.sleep(1)
        tidy_for_screenshot(browser)
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        assert not missing, f"not on the page: {sorted(missing)}; screenshot {shot}"
        assert shot.stat().st_size > 10_000
    finally:
        if browser is not None:
            browser.quit()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=10)
        leftover = _kill_group_if_alive(lines)
    assert proc.returncode == 0, "".join(lines)
    assert "stopping the MLflow UI" in "".join(lines)
    assert not leftover, "the mlflow server's process group outlived raypurify ui"
    assert not _port_open(port), f"port {port} still open after raypurify ui stopped"


def tidy_for_screenshot(browser, timeout: float = 30) -> None:
    """Best effort, for the picture only: close MLflow's assistant panel and let the
    parallel-coordinates plot finish drawing (it renders after the tables)."""
    from selenium.common.exceptions import WebDriverException

    try:
        for button in browser.find_elements(
            "css selector", "button[data-component-id='mlflow.assistant.chat_panel.close']"
        ):
            button.click()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if browser.find_elements("css selector", ".js-plotly-plot svg.main-svg"):
                break
            time.sleep(0.5)
        time.sleep(2)  # the plot's and the layout's transitions
    except WebDriverException:
        pass


def check_artifacts_are_served(port: int, sweep_dir: Path) -> None:
    """The trials' artifacts (file:// under mlartifacts/ beside the DB) reach the UI."""
    sweep = ui.load_sweep(sweep_dir)
    run = ui.sweep_runs(sweep["tracking_uri"], sweep["experiment_id"], sweep["parent_run_id"])[1]
    base = f"http://127.0.0.1:{port}"
    q = f"run_id={run.info.run_id}"
    with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/artifacts/list?{q}") as r:
        listed = [f["path"] for f in json.load(r).get("files", [])]
    assert listed == ["summary.json"]
    with urllib.request.urlopen(f"{base}/get-artifact?path=summary.json&run_uuid=" + q[7:]) as r:
        assert json.load(r) == {"trial": 1, "kld1": TRIALS[1][0]}
    assert (sweep_dir / "mlartifacts").is_dir()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group_if_alive(lines: list[str]) -> bool:
    """Safety net: if the ui ended without stopping its server, stop that server's group
    (the pid the ui reported starting, in a group of its own), nothing broader. True when
    there was one to stop."""
    for line in lines:
        if line.startswith("starting the MLflow UI") and "server pid " in line:
            pgid = int(line.split("server pid ")[1].split(",")[0])
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
                return True
    return False
