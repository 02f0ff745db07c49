"""The Prefect UI as a person browses it, in a real headless Chromium (tests/helpers/browser.py),
on the README's team stack (tests/fixtures/servers.py): a deployment run's graph must be
the chain of stages, its Logs tab must carry Keras' epoch lines, its summary must render,
and every deployment must have a name of its own.
"""

from __future__ import annotations

import re

import pytest

from flows.stage import STAGE_NAMES
from tests.helpers.browser import browser
from tests.helpers.operate import deployment_run_args, flow_run_id
from tests.helpers.project import TINY

pytestmark = pytest.mark.slow

EPOCHS = 2


def test_the_prefect_ui_draws_the_chain_of_stages_and_the_summary(stack, request):
    name = "browser-ui"
    overrides = TINY | {"mlflow.experiment": name, "register.model_name": name}
    result = stack.prefect(
        *deployment_run_args(
            "training-pipeline/train", {"overrides": overrides | {"train.epochs": EPOCHS}}
        )
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    flow_run = flow_run_id(result.stdout)
    ui = stack.prefect_api.removesuffix("/api")
    graphs: list[dict] = []

    with browser(request.node.name) as (session, problems):
        page = session.new_page()
        page.on(
            "response",
            lambda response: (
                response.url.endswith(f"/flow_runs/{flow_run}/graph-v2")
                and response.ok
                and graphs.append(response.json())
            ),
        )
        # Prefect's login page takes the whole user:password line.
        page.goto(f"{ui}/login")
        page.locator("input[type=password]").fill(stack.credential)
        page.keyboard.press("Enter")
        page.wait_for_url(lambda url: "/login" not in url)
        # Prefect 3.8's login page calls the API before it has the credential and leaves
        # the 401 uncaught (a minified error object); what counts starts after the login.
        problems.found[:] = [
            p for p in problems.found if not p.startswith(f"page error at {ui}/login")
        ]

        page.goto(f"{ui}/runs/flow-run/{flow_run}")
        page.locator("canvas").first.wait_for()  # the graph is drawn on a canvas
        page.wait_for_timeout(2000)  # for the graph's data, which the canvas draws
        assert graphs, "the UI fetched no graph for the flow run"
        nodes = {node["id"]: node for _, node in graphs[-1]["nodes"]}
        names = {node_id: node["label"] for node_id, node in nodes.items()}
        assert sorted(names.values()) == sorted(STAGE_NAMES), names
        for node in nodes.values():
            # The API lists an edge once per row joined; the UI draws one line per pair.
            parents = sorted({names[parent["id"]] for parent in node["parents"]})
            index = STAGE_NAMES.index(node["label"])
            assert parents == list(STAGE_NAMES[index - 1 : index]), (node["label"], parents)

        # Keras' per-epoch lines in the flow run's Logs tab.
        epoch_line = page.get_by_text(f"Epoch {EPOCHS}/{EPOCHS}").first  # the default tab
        epoch_line.scroll_into_view_if_needed()
        epoch_line.wait_for()

        # The summary artifact renders as a table with a header.
        page.goto(f"{ui}/artifacts/key/pipeline-summary")  # its history, newest first
        page.get_by_role("link", name=re.compile(r"^[0-9a-f]{8}$")).first.click()
        page.get_by_text("Training pipeline summary").first.wait_for()
        header = page.locator("table thead").first.inner_text()
        assert "Run" in header and "Value" in header, header
        assert "Test accuracy" in page.inner_text("body")

        # Every deployment has a name of its own.
        page.goto(f"{ui}/deployments")
        page.get_by_text("reproduce", exact=True).first.wait_for()
        listed = page.inner_text("body")
        for deployment in ("train", "reproduce", "predict", "nightly", "sweep"):
            assert deployment in listed, listed
        assert "local" not in listed.split(), listed
    assert not problems.found, problems.found
