"""The dashboard's pages as served: shells with no data, every asset local (no network), and
the vendored chart library pinned with its licence. The browser flow is tests/ui."""
from __future__ import annotations

import re

import pytest

PAGES = ["/ui/signin", "/ui/jobs", "/ui/jobs/ftjob-anything", "/ui/adapters", "/ui/playground"]


@pytest.fixture
def client(make_client):
    return make_client(api_keys="k-ui:tenant-ui")


def test_ui_root_opens_the_jobs_list(client):
    response = client.get("/ui", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/ui/jobs"


@pytest.mark.parametrize("path", PAGES)
def test_each_page_is_a_shell_whose_assets_are_all_served_here(client, path):
    """Pages need no key (the data comes from /v1 with the key, which is refused without it);
    every script and stylesheet is a local /ui/static file that is served."""
    assert client.get("/v1/models").status_code == 401
    page = client.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<html lang="en">' in html and "<main id=\"main\">" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "an asset off this site"
    assets = re.findall(r"""(?:src|href)="(/ui/static/[^"]+)\"""", html)
    assert "/ui/static/app.js" in assets
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert served.content


def test_the_job_page_carries_its_job_id_and_the_pinned_chart_library(client):
    html = client.get("/ui/jobs/ftjob-abc123").text
    assert 'data-job-id="ftjob-abc123"' in html
    assert '<dd id="job-phase" aria-live="polite">' in html  # what the running job is doing
    assert "/ui/static/vendor/uplot-1.6.32/uPlot.iife.min.js" in html
    licence = client.get("/ui/static/vendor/uplot-1.6.32/LICENSE")
    assert licence.status_code == 200 and "MIT License" in licence.text


def test_a_job_id_is_escaped_in_the_page(client):
    html = client.get('/ui/jobs/"><script>alert(1)</script>').text
    assert "<script>alert(1)</script>" not in html


def test_pages_are_not_in_the_openapi_schema(client):
    assert not [p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/ui")]


@pytest.mark.parametrize("path", PAGES)
def test_pages_send_a_content_security_policy_and_refuse_framing(client, path):
    headers = client.get(path).headers
    policy = dict(part.strip().split(" ", 1) for part in
                  headers["content-security-policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"


def test_every_response_is_nosniff_and_api_answers_carry_no_page_policy(client):
    for answer in (client.get("/v1/models"), client.get("/healthz"),
                   client.get("/ui/static/app.js")):
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in client.get("/healthz").headers


@pytest.mark.parametrize("path", PAGES)
def test_head_answers_a_page_as_get_does_without_a_body(client, path):
    head = client.head(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == client.get(path).headers["content-type"]


def test_the_site_icon_is_served(client):
    answer = client.get("/favicon.ico")
    assert answer.status_code == 200, answer.status_code
    assert answer.headers["content-type"].startswith("image/svg+xml")
    assert 'rel="icon" href="/ui/static/favicon.svg"' in client.get("/ui/jobs").text
