"""Routes of the dashboard: one HTML shell per page, and the static scripts and styles."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from speft_core.salience import METRICS as SALIENCE_METRICS

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)

# The salience metrics a job form offers, the paper's winner (and the default) first.
METRICS = ("gradient", *sorted(set(SALIENCE_METRICS) - {"gradient"}))
PAGES = {"jobs": "Jobs", "adapters": "Adapters", "playground": "Playground"}


def _page(request: Request, template: str, title: str, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {
        "title": title, "pages": PAGES, "current": template.removesuffix(".html"), **context})


@router.get("", response_class=RedirectResponse)
def dashboard_root() -> RedirectResponse:
    """/ui opens the jobs list."""
    return RedirectResponse("/ui/jobs", status_code=307)


@router.get("/signin", response_class=HTMLResponse)
def signin_page(request: Request) -> HTMLResponse:
    """Sign in with an API key (kept in this browser tab's session storage)."""
    return _page(request, "signin.html", "Sign in")


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    """The jobs list with live status, and the form that creates a job."""
    return _page(request, "jobs.html", "Jobs", metrics=METRICS)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    """One job: curves, events, checkpoints, spec, cancel, download."""
    return _page(request, "job.html", f"Job {job_id}", job_id=job_id, current_nav="jobs")


@router.get("/adapters", response_class=HTMLResponse)
def adapters_page(request: Request) -> HTMLResponse:
    """The trained adapters, with delete."""
    return _page(request, "adapters.html", "Adapters")


@router.get("/playground", response_class=HTMLResponse)
def playground_page(request: Request) -> HTMLResponse:
    """Try adapters: classification, completion or chat; two side by side; streamed text."""
    return _page(request, "playground.html", "Playground")


def install_ui(app: FastAPI) -> None:
    """Mount the dashboard's pages and static files on `app`."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
