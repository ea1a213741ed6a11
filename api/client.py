"""A small typed HTTP client for the speft REST API (DESIGN.md §3), used by the `speft` CLI.

Every non-2xx answer becomes an `ApiClientError` carrying the API's `{"error": {...}}` fields;
an unreachable server becomes an `ApiConnectionError` naming the base URL.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "SPEFT_BASE_URL"
API_KEY_ENV = "SPEFT_API_KEY"
DEFAULT_TIMEOUT_S = 60.0


class ApiClientError(Exception):
    """An error answer from the API (or no answer at all), with the API's code, message and param."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.param = param


class ApiConnectionError(ApiClientError):
    """The server at the base URL could not be reached."""


def _error_from_response(response: httpx.Response) -> ApiClientError:
    """The `{"error": {...}}` body of a failed response as an ApiClientError."""
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict) or not error.get("message"):
        text = response.text.strip()[:200] or response.reason_phrase
        return ApiClientError(f"HTTP {response.status_code}: {text}",
                              status_code=response.status_code)
    return ApiClientError(str(error["message"]), status_code=response.status_code,
                          code=error.get("code"), param=error.get("param"))


class SpeftClient:
    """Calls the speft REST API at `base_url` with an optional bearer API key."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        api_key = api_key or os.environ.get(API_KEY_ENV) or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _unreachable(self, err: httpx.TransportError) -> ApiConnectionError:
        """The error for a server that did not answer, naming the base URL."""
        return ApiConnectionError(
            f"cannot reach the speft API at {self.base_url} ({err}); is `speft serve` running "
            f"there? (set --base-url or {BASE_URL_ENV})"
        )

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; raise ApiClientError on a non-2xx answer or no answer."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise self._unreachable(err) from err
        if response.is_error:
            raise _error_from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """Send one request and return its JSON object."""
        return self._send(method, path, **kwargs).json()

    # -- files -----------------------------------------------------------------------------
    def upload_file(self, path: Path, *, purpose: str = "fine-tune") -> dict[str, Any]:
        """POST /v1/files: upload a JSONL dataset; the File object."""
        with path.open("rb") as handle:
            return self._json("POST", "/v1/files", data={"purpose": purpose},
                              files={"file": (path.name, handle, "application/jsonl")})

    # -- jobs ------------------------------------------------------------------------------
    def create_job(self, body: dict[str, Any], *,
                   idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/fine_tuning/jobs: the created (or, for a repeated key, existing) Job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/fine_tuning/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/fine_tuning/jobs/{id}."""
        return self._json("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def list_jobs(self, *, limit: int | None = None, status: str | None = None,
                  after: str | None = None) -> dict[str, Any]:
        """GET /v1/fine_tuning/jobs: one page `{data, has_more}`, newest first."""
        params = {k: v for k, v in {"limit": limit, "status": status, "after": after}.items()
                  if v is not None}
        return self._json("GET", "/v1/fine_tuning/jobs", params=params)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """POST /v1/fine_tuning/jobs/{id}/cancel: the Job (cancel_requested or cancelled)."""
        return self._json("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def pause_job(self, job_id: str) -> dict[str, Any]:
        """POST /v1/fine_tuning/jobs/{id}/pause: the Job (pause_requested or paused)."""
        return self._json("POST", f"/v1/fine_tuning/jobs/{job_id}/pause")

    def resume_job(self, job_id: str) -> dict[str, Any]:
        """POST /v1/fine_tuning/jobs/{id}/resume: the Job (queued again)."""
        return self._json("POST", f"/v1/fine_tuning/jobs/{job_id}/resume")

    def job_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """GET /v1/fine_tuning/jobs/{id}/checkpoints: the checkpoints, newest first."""
        return self._json("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")["data"]

    def create_webhook(self, url: str, events: list[str] | None = None) -> dict[str, Any]:
        """POST /v1/webhooks: the endpoint with its secret (shown once)."""
        return self._json("POST", "/v1/webhooks", json={"url": url, "events": events})

    def list_webhooks(self) -> list[dict[str, Any]]:
        """GET /v1/webhooks: the endpoints, newest first."""
        return self._json("GET", "/v1/webhooks")["data"]

    def delete_webhook(self, endpoint_id: str) -> dict[str, Any]:
        """DELETE /v1/webhooks/{id}."""
        return self._json("DELETE", f"/v1/webhooks/{endpoint_id}")

    def webhook_deliveries(self, endpoint_id: str) -> list[dict[str, Any]]:
        """GET /v1/webhooks/{id}/deliveries: the latest deliveries with their attempts."""
        return self._json("GET", f"/v1/webhooks/{endpoint_id}/deliveries")["data"]

    def job_metrics(self, job_id: str) -> list[dict[str, Any]]:
        """GET /v1/fine_tuning/jobs/{id}/metrics: the metric rows by step."""
        answer: Any = self._send("GET", f"/v1/fine_tuning/jobs/{job_id}/metrics").json()
        return answer.get("data", []) if isinstance(answer, dict) else list(answer)

    # -- adapters --------------------------------------------------------------------------
    def get_adapter(self, adapter_id: str) -> dict[str, Any]:
        """GET /v1/adapters/{id}."""
        return self._json("GET", f"/v1/adapters/{adapter_id}")

    def download_adapter(self, adapter_id: str, out: Path) -> int:
        """GET /v1/adapters/{id}/content into `out` (written atomically); the bytes written."""
        partial = out.with_name(out.name + ".part")
        written = 0
        try:
            with self._http.stream("GET", f"/v1/adapters/{adapter_id}/content") as response:
                if response.is_error:
                    response.read()
                    raise _error_from_response(response)
                with partial.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
                        written += len(chunk)
        except httpx.TransportError as err:
            partial.unlink(missing_ok=True)
            raise self._unreachable(err) from err
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(out)
        return written

    # -- health ----------------------------------------------------------------------------
    def healthz(self) -> dict[str, Any]:
        """GET /healthz."""
        return self._json("GET", "/healthz")
