"""The MLflow UI as a person browses it, in a real headless Chromium (tests/helpers/browser.py).

`make ui` over a project store holding two tiny flow runs and their registered versions:
the links the pipeline prints must open MLflow's "Model training" layout (a new browser
otherwise starts in GenAI), the runs table must tell the runs apart, the curves and the
confusion matrix must be drawn, the registry must show the champion and what it is.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.tracking import views
from tests.helpers.browser import browser, plot_traces
from tests.helpers.operate import free_port
from tests.helpers.project import TINY, pipeline_env, read_mlflow, run_module

pytestmark = pytest.mark.slow

EPOCHS = 2
RATES = ("0.001", "0.003")  # two runs that differ by one param
UI_READY_S = 120
# True once the model version page's "Aliases" field (up to "Stage") shows "@ champion".
CHAMPION_SHOWN = r"""() => /@\s*champion/.test(
    (document.body.innerText.split("Aliases")[1] || "").split("Stage")[0]
)"""


@pytest.fixture(scope="module")
def ui_project(tmp_path_factory):
    """A project copy with two tiny flow runs and a registered version in its store,
    served by `make ui` as the README says; yields (root, UI address, credential)."""
    from benchmarks.common import copy_repo, set_params

    root = copy_repo(tmp_path_factory.mktemp("ui") / "repo")
    set_params(root, TINY | {"train.epochs": EPOCHS})
    # The first run stops after evaluate (test metrics, no version); the second registers,
    # which refreshes the experiment's view with the param that differs between them.
    stages = [["--stages", "data", "preprocess", "train", "evaluate"], []]
    for rate, subset in zip(RATES, stages, strict=True):
        done = run_module("flows.pipeline", f"train.learning_rate={rate}", *subset, cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
    port = free_port()
    # VENV: this suite's virtualenv, so make uses it instead of building one in the copy.
    command = ["make", "ui", f"VENV={sys.prefix}", f"MLFLOW_PORT={port}"]
    ui = subprocess.Popen(
        command,
        cwd=root,
        env=pipeline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    banner = []
    try:
        for line in ui.stdout:
            banner.append(line)
            if line.strip().startswith("MLflow UI login"):
                break
        else:
            raise AssertionError("make ui ended:\n" + "".join(banner))
        text = "".join(banner)
        base = f"http://127.0.0.1:{port}"
        # The link the banner prints opens the Model training layout.
        assert f"{base}/#/experiments?{views.MODEL_TRAINING}" in text, text
        credential_file = next(
            Path(line.split()[1]) for line in banner if line.strip().startswith("credential")
        )
        user, password = credential_file.read_text().strip().split(":", 1)
        yield root, base, {"username": user, "password": password}
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)


def test_the_mlflow_ui_shows_the_runs_their_curves_and_the_champion(ui_project, request):
    root, base, credential = ui_project
    store = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client, runs = read_mlflow(store, "synthetic")  # mlflow.experiment: auto -> the dataset
    assert len(runs) == 2
    newest = runs[0]
    experiment = newest.info.experiment_id
    name = "synthetic-seed_cnn"
    champion = client.get_model_version_by_alias(name, "champion")

    with browser(request.node.name, http_credentials=credential) as (session, problems):
        page = session.new_page()
        # The experiment link the pipeline prints: its runs table, Model training layout,
        # with the "Pipeline runs" view (test accuracy and the param that differs).
        page.goto(views.experiment_url(base, experiment))
        page.get_by_role("button", name=views.VIEW_NAME).wait_for()
        assert "workflowType=machine_learning" in page.url
        assert page.get_by_role("link", name="Model registry").is_visible(), "ML sidebar"
        # MLflow opens its assistant panel on a first visit; closed, as a person would.
        page.get_by_role("button", name="Close", exact=True).first.click()
        table = page.locator(".ag-root")
        for run in runs:
            table.get_by_text(run.info.run_name).wait_for()
            assert run.info.run_name.startswith("seed_cnn-synthetic-")
        header = table.locator(".ag-header")
        for column in ("test/accuracy", "train.learning_rate"):  # the view's, beside MLflow's
            header.get_by_text(column, exact=True).wait_for()
        header = header.inner_text()
        assert "test/accuracy" in header and "train.learning_rate" in header, header
        body = table.inner_text()
        for run in runs:
            assert str(run.data.metrics["test/accuracy"]) in body, body
            assert run.data.params["train.learning_rate"] in body, body
        assert "python -m flows.pipeline" in body, "the Source column"

        # The run page's charts: Keras' per-epoch curves, one point per epoch.
        run_page = views.run_url(base, experiment, newest.info.run_id)
        page.goto(run_page.replace("?", "/model-metrics?"))
        cards = page.get_by_test_id("experiment-view-compare-runs-card")
        cards.first.wait_for()
        # Seven charts: the test section's three (test/loss shows as "loss" there), then
        # the four curves; no per-class or export bars.
        assert cards.count() == 7, cards.all_inner_texts()
        for metric in ("loss", "val_loss"):
            curves = []
            for card in cards.filter(has=page.get_by_text(metric, exact=True)).all():
                card.scroll_into_view_if_needed()
                curves += [t for t in plot_traces(card) if t["type"] != "bar"]
            # Plotly draws the run's line (and its points) from one series: this run's.
            assert curves and all(curve == curves[0] for curve in curves), (metric, curves)
            trace = curves[0]
            history = client.get_metric_history(newest.info.run_id, metric)
            assert trace["x"] == list(range(EPOCHS)), (metric, trace)
            assert trace["y"] == pytest.approx([m.value for m in history]), (metric, trace)

        # The confusion matrix, as an image the browser decoded.
        page.goto(run_page.replace("?", "/artifacts/evaluate/confusion_matrix.png?"))
        page.get_by_text("Test confusion matrix").or_(page.locator("img")).first.wait_for()
        # The PNG (600 x 600: 6 inches at 100 dpi) decoded by the browser, not a broken image.
        decoded = "() => Array.from(document.images).some(i => i.complete && i.naturalWidth >= 600)"
        page.wait_for_function(decoded)

        # The registry: the champion alias on the right version, and its descriptions.
        page.goto(views.model_version_url(base, name, str(champion.version)))
        page.get_by_text("Test accuracy").first.wait_for()
        # The aliases come in a request of their own, after the version's description.
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        with contextlib.suppress(PlaywrightTimeout):  # the assertion below says what it saw
            page.wait_for_function(CHAMPION_SHOWN, timeout=30_000)
        shown = page.inner_text("body")
        aliases = shown.split("Aliases", 1)[1].split("Stage", 1)[0]
        assert re.search(r"@\s*champion", aliases), aliases
        accuracy = float(champion.tags["test_accuracy"])
        assert f"{accuracy:.4f}" in shown, shown
        # The registered models list names the champion's version first.
        page.goto(f"{base}/#/models?{views.MODEL_TRAINING}")
        listed = page.get_by_role("row").filter(has_text=name).first.inner_text()
        assert re.search(rf"@\s*champion\s*:\s*Version {champion.version}", listed), listed
        page.goto(f"{base}/#/models/{name}?{views.MODEL_TRAINING}")
        page.get_by_text("Input: raw pixels").first.wait_for()
        row = page.get_by_role("row").filter(has_text=f"Version {champion.version}").first
        assert re.search(r"@\s*champion", row.inner_text()), row.inner_text()[-500:]
    assert not problems.found, problems.found
