"""Routes of the dashboard: one HTML shell per page, and the static scripts and styles."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from speft_core.salience import METRICS as SALIENCE_METRICS

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")

# The salience metrics a job form offers, the paper's winner (and the default) first.
METRICS = ("gradient", *sorted(set(SALIENCE_METRICS) - {"gradient"}))
PAGES = {"jobs": "Jobs", "adapters": "Adapters", "playground": "Playground"}
UI_PREFIX = "/ui"
FAVICON = "/ui/static/favicon.svg"
# The dashboard loads only its own scripts, styles and API (no inline code, no other origin) and
# may not be framed (clickjacking); every response of the service is served as its stated type.
UI_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}
EVERY_RESPONSE_HEADERS = {"x-content-type-options": "nosniff"}
PAGE_METHODS = ["GET", "HEAD"]  # a HEAD answers as the GET would, without the body
router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)


def _page(request: Request, template: str, title: str, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {
        "title": title, "pages": PAGES, "current": template.removesuffix(".html"), **context})


@router.api_route("", methods=PAGE_METHODS, response_class=RedirectResponse)
def dashboard_root() -> RedirectResponse:
    """/ui opens the jobs list."""
    return RedirectResponse("/ui/jobs", status_code=307)


@router.api_route("/signin", methods=PAGE_METHODS, response_class=HTMLResponse)
def signin_page(request: Request) -> HTMLResponse:
    """Sign in with an API key (kept in this browser tab's session storage)."""
    return _page(request, "signin.html", "Sign in")


@router.api_route("/jobs", methods=PAGE_METHODS, response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    """The jobs list with live status, and the form that creates a job."""
    return _page(request, "jobs.html", "Jobs", metrics=METRICS)


@router.api_route("/jobs/{job_id}", methods=PAGE_METHODS, response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    """One job: curves, events, checkpoints, spec, cancel, download."""
    return _page(request, "job.html", f"Job {job_id}", job_id=job_id, current_nav="jobs")


@router.api_route("/adapters", methods=PAGE_METHODS, response_class=HTMLResponse)
def adapters_page(request: Request) -> HTMLResponse:
    """The trained adapters, with delete."""
    return _page(request, "adapters.html", "Adapters")


@router.api_route("/playground", methods=PAGE_METHODS, response_class=HTMLResponse)
def playground_page(request: Request) -> HTMLResponse:
    """Try adapters: classification, completion or chat; two side by side; streamed text."""
    return _page(request, "playground.html", "Playground")


class SecurityHeadersMiddleware:
    """Pure ASGI middleware: nosniff on every response; the dashboard's policy (CSP, no framing)
    on the dashboard's own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        extra = {**EVERY_RESPONSE_HEADERS, **(
            UI_HEADERS if path == UI_PREFIX or path.startswith(UI_PREFIX + "/") else {})}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(extra)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def favicon() -> RedirectResponse:
    """Browsers ask the site root for its icon: the dashboard's."""
    return RedirectResponse(FAVICON, status_code=308)


def install_ui(app: FastAPI) -> None:
    """Mount the dashboard's pages, static files and icon on `app`, with its response headers."""
    app.include_router(router)
    app.add_api_route("/favicon.ico", favicon, methods=PAGE_METHODS, include_in_schema=False)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.add_middleware(SecurityHeadersMiddleware)
