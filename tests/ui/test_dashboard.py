"""The dashboard in a real browser: headless Debian chromium driven by Playwright, against a real
`speft serve` and `speft worker` (embedded stack, two API keys for two tenants).

One flow, as a user would go: sign in (a wrong key is refused), create a job from the form with
a small chat file (a bad value first: the API's own error shows next to its field), watch it
reach `succeeded` on its page with the loss curve drawn, find it among the adapters, run the
playground with the new adapter and compare it with a second one (streamed text, checked
against the API's own non-streamed answer), delete an adapter, and see that the other tenant's
key shows none of it. Every page passes axe-core (vendored) with no serious or critical
violation; screenshots go to tests/artifacts/ and are checked to be non-blank.
"""
from __future__ import annotations

import io
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_service_flow import Stack, _embedded_env, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
AXE = Path(__file__).parents[1] / "fixtures" / "vendor" / "axe-core-4.14.1" / "axe.min.js"
ARTIFACTS = Path(__file__).parents[1] / "artifacts"
CHAT_SET = Path(__file__).parents[1] / "data" / "alpaca_chat40" / "train.jsonl"
KEY_A, KEY_B = "key-a-" + uuid.uuid4().hex[:8], "key-b-" + uuid.uuid4().hex[:8]
JOB_TIMEOUT_MS = 240_000
# Chromium flags for this machine's closed network (no background connections, no sandbox as root)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
HYPERPARAMETERS = {"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-2, "max_length": 128}


@pytest.fixture
def stack(tmp_path: Path, stories_dir: Path) -> Iterator[Stack]:
    env = _embedded_env(tmp_path, f"ui-{uuid.uuid4().hex[:8]}")
    env["SPEFT_API_KEYS"] = f"{KEY_A}:tenant-a,{KEY_B}:tenant-b"
    env["SPEFT_MODELS_DIR"] = str(stories_dir.parent)
    with running_stack(env, KEY_A, tmp_path) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _api(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"},
                        timeout=60)


def _accessible(page: Any, name: str) -> None:
    """axe-core finds no serious or critical violation on the page as it stands (loaded through
    the DevTools protocol, which the page's CSP leaves alone: a script tag would be refused)."""
    page.evaluate(AXE.read_text(encoding="utf-8"))
    violations = page.evaluate("""async () => (await axe.run(document, {
        resultTypes: ["violations"]})).violations.map(v => ({
            id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.map(n => n.target.join(" ")).slice(0, 3)}))""")
    bad = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert not bad, f"{name}: {bad}"


def _screenshot(page: Any, name: str) -> Path:
    """A full-page screenshot under tests/artifacts/, checked to show more than one colour."""
    from PIL import Image

    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    image = Image.open(io.BytesIO(path.read_bytes())).convert("L")
    low, high = image.getextrema()
    assert high - low > 100, f"{name}: the screenshot is blank ({low}..{high})"
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, f"{name}: near blank"
    return path


def _second_adapter(stack: Stack) -> str:
    """A job created over the API (the comparison adapter), waited for."""
    with _api(stack, KEY_A) as client:
        upload = client.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("chat.jsonl", CHAT_SET.read_bytes())})
        assert upload.status_code == 200, upload.text
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "stories-260k", "training_file": upload.json()["id"],
            "hyperparameters": {**HYPERPARAMETERS, "n_epochs": 1},
            "method": {"type": "speft", "speft": {"metric": "random", "density": 0.05}}})
        assert job.status_code in (200, 201), job.text
        return job.json()["id"]


def _adapter_of(stack: Stack, job_id: str) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    with _api(stack, KEY_A) as client:
        while time.monotonic() < deadline:
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                assert job["status"] == "succeeded", f"{job}\n{stack.output()}"
                return job["adapter_id"]
            time.sleep(0.5)
    pytest.fail(f"{job_id} did not finish:\n{stack.output()}")


def test_the_dashboard_flow_in_a_real_browser(stack: Stack, browser: Any, tmp_path: Path):
    other_job = _second_adapter(stack)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    refused = []  # what the dashboard's Content-Security-Policy blocked: nothing, it loads no
    page.on("console", lambda message: refused.append(message.text)  # inline or foreign code
            if "Content Security Policy" in message.text else None)

    # sign in: the jobs page sends an unsigned visitor to sign-in; a wrong key is refused
    page.goto(f"{stack.url}/ui")
    page.wait_for_url("**/ui/signin**")
    _accessible(page, "sign-in")
    page.fill("#api-key", "not-a-key")
    page.click("button[type=submit]")
    page.wait_for_selector("#api-key-error:has-text('refused')")
    page.fill("#api-key", KEY_A)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/jobs")
    page.wait_for_selector(f"tr[data-job-id='{other_job}']")
    page.wait_for_selector("#model option[value='stories-260k']", state="attached")

    # the form: a bad epoch count comes back as the API's error, next to its field
    small = tmp_path / "small-chat.jsonl"
    small.write_bytes(CHAT_SET.read_bytes())
    page.set_input_files("#training_file", str(small))
    page.set_input_files("#validation_file", str(small))
    page.select_option("#model", "stories-260k")
    page.fill("#density", "0.05")
    page.fill("#n_epochs", "0")
    page.fill("#learning_rate", str(HYPERPARAMETERS["learning_rate"]))
    page.fill("#batch_size", str(HYPERPARAMETERS["batch_size"]))
    page.click("#create-job")
    error = page.wait_for_selector("#n_epochs-error:not(:empty)")
    assert "n_epochs must be an integer in [1, 100]; got 0" in error.inner_text()
    assert page.get_attribute("#n_epochs", "aria-invalid") == "true"
    _accessible(page, "jobs with a form error")
    page.fill("#n_epochs", str(HYPERPARAMETERS["n_epochs"]))
    page.click("#create-job")
    page.wait_for_url("**/ui/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]

    # the job page: live status until succeeded, the curve drawn, events and the spec
    page.wait_for_selector("#job-status:has-text('succeeded')", timeout=JOB_TIMEOUT_MS)
    page.wait_for_function("Number(document.querySelector('#loss-chart').dataset.points) >= 10")
    assert page.locator("#loss-chart canvas").count() == 1
    assert "validation point" in page.inner_text("#loss-summary")
    assert page.locator("#events-table tbody tr").count() >= 3
    assert '"stories-260k"' in page.inner_text("#job-spec")
    assert page.is_visible("#download-delta") and not page.is_visible("#cancel-job")
    with page.expect_download() as download:
        page.click("#download-delta")
    saved = tmp_path / "delta.safetensors"
    download.value.save_as(saved)
    adapter = page.inner_text("#job-adapter").strip()
    with _api(stack, KEY_A) as client:
        record = client.get(f"/v1/adapters/{adapter}").json()
    assert saved.stat().st_size == record["bytes"]
    _accessible(page, "job page")
    _screenshot(page, "dashboard-job")

    # the adapters list holds both
    other = _adapter_of(stack, other_job)
    page.goto(f"{stack.url}/ui/adapters")
    page.wait_for_selector(f"tr[data-adapter-id='{adapter}']")
    page.wait_for_selector(f"tr[data-adapter-id='{other}']")
    _accessible(page, "adapters")

    # the playground: the new adapter against the other one, streamed chat answers
    page.goto(f"{stack.url}/ui/playground?adapter={adapter}")
    page.wait_for_selector(f"#adapter-b option[value='{other}']", state="attached")
    assert page.input_value("#adapter-a") == adapter
    page.select_option("#adapter-b", other)
    page.fill("#play-input", "What are the three primary colors?")
    page.fill("#max-tokens", "12")
    page.click("#play-run")
    page.wait_for_selector("#out-a[data-done='true'] .generated")
    page.wait_for_selector("#out-b[data-done='true'] .generated")
    streamed = {side: page.inner_text(f"#out-{side} .generated") for side in ("a", "b")}
    pieces = page.evaluate("document.querySelector('#out-a .generated').childNodes.length")
    assert pieces > 1, "the answer arrived in one piece, not streamed"
    with _api(stack, KEY_A) as client:
        for side, adapter_id in (("a", adapter), ("b", other)):
            answer = client.post("/v1/chat/completions", json={
                "model": "stories-260k", "adapter": adapter_id, "max_tokens": 12,
                "temperature": 0, "messages": [{"role": "user",
                                                "content": "What are the three primary colors?"}]})
            assert answer.status_code == 200, answer.text
            assert streamed[side] == answer.json()["choices"][0]["message"]["content"]
    assert page.inner_text("#out-a-which") == adapter
    assert page.inner_text("#out-b-which") == other
    _accessible(page, "playground")
    _screenshot(page, "dashboard-playground")

    # completion mode with a composition of both, alone: the API's own answer for it
    page.select_option("#play-mode", "completion")
    page.select_option("#adapter-b", "")
    page.fill("#compose-a", f"{adapter}:0.5, {other}:0.5")
    page.fill("#play-input", "Once upon a time")
    page.click("#play-run")
    page.wait_for_selector("#out-a[data-done='true'] .generated")
    assert page.is_hidden("#pane-b")
    composition = [{"id": adapter, "weight": 0.5}, {"id": other, "weight": 0.5}]
    with _api(stack, KEY_A) as client:
        answer = client.post("/v1/completions", json={
            "model": "stories-260k", "adapter": composition, "prompt": "Once upon a time",
            "max_tokens": 12, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert page.inner_text("#out-a .generated") == answer.json()["choices"][0]["text"]
    assert page.inner_text("#out-a-which") == f"{adapter} × 0.5 + {other} × 0.5"

    # cancel from a job's page: a long job, stopped by its Cancel button
    with _api(stack, KEY_A) as client:
        upload = client.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("chat.jsonl", CHAT_SET.read_bytes())})
        long_job = client.post("/v1/fine_tuning/jobs", json={
            "model": "stories-260k", "training_file": upload.json()["id"],
            "hyperparameters": {**HYPERPARAMETERS, "n_epochs": 100}}).json()["id"]
    # while it runs, its phase shows in the list and on its page
    page.goto(f"{stack.url}/ui/jobs")
    page.wait_for_selector(f"tr[data-job-id='{long_job}'] .phase:has-text('training')",
                           timeout=JOB_TIMEOUT_MS)
    page.goto(f"{stack.url}/ui/jobs/{long_job}")
    page.wait_for_selector("#job-phase:has-text('training')")
    page.wait_for_selector("#cancel-job", state="visible")
    page.click("#cancel-job")
    page.wait_for_selector("#job-status:has-text('cancelled')", timeout=JOB_TIMEOUT_MS)
    assert page.is_hidden("#cancel-job")

    # delete the comparison adapter from its page
    page.goto(f"{stack.url}/ui/adapters")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"tr[data-adapter-id='{other}'] button")
    page.wait_for_selector(f"tr[data-adapter-id='{other}']", state="detached")
    with _api(stack, KEY_A) as client:
        assert client.get(f"/v1/adapters/{other}").status_code == 404

    # the other tenant's key sees none of it
    second = browser.new_page()
    second.goto(f"{stack.url}/ui/signin")
    second.fill("#api-key", KEY_B)
    second.click("button[type=submit]")
    second.wait_for_url("**/ui/jobs")
    second.wait_for_selector("#jobs-table tbody td:has-text('No jobs yet')")
    second.goto(f"{stack.url}/ui/jobs/{job_id}")
    second.wait_for_selector(f"#job-error:has-text('no such job: {job_id}')")
    second.close()
    assert not refused, refused  # the dashboard runs under its CSP without a violation
