// Shared by every dashboard page: the API key, API calls, errors, small DOM and format helpers.
"use strict";

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
  }
}

const Speft = {
  KEY: "speft.apiKey",
  TERMINAL: new Set(["succeeded", "failed", "cancelled"]),

  key() { return sessionStorage.getItem(Speft.KEY) || ""; },
  setKey(key) { key ? sessionStorage.setItem(Speft.KEY, key) : sessionStorage.removeItem(Speft.KEY); },

  // fetch an API path with the bearer token; JSON in (opts.json) and out (unless opts.raw)
  async api(path, opts = {}) {
    const headers = new Headers(opts.headers || {});
    const key = opts.key !== undefined ? opts.key : Speft.key();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const init = { method: opts.method || (opts.json || opts.form ? "POST" : "GET"), headers };
    if (opts.json !== undefined) {
      headers.set("Content-Type", "application/json");
      init.body = JSON.stringify(opts.json);
    } else if (opts.form) {
      init.body = opts.form;
    }
    const response = await fetch(path, init);
    if (response.status === 401 && !opts.noRedirect) {
      Speft.setKey("");
      location.href = `/ui/signin?next=${encodeURIComponent(location.pathname)}`;
      throw new ApiError(401, { message: "sign in first" });
    }
    if (!response.ok) {
      let body = {};
      try { body = await response.json(); } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, body.error || { message: response.statusText });
    }
    return opts.raw ? response : response.json();
  },

  // an element with attributes and children (strings become text: never parsed as HTML)
  el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  },

  fill(tbody, rows, emptyText, columns) {
    tbody.replaceChildren();
    if (!rows.length) {
      tbody.append(Speft.el("tr", {}, Speft.el("td", { colspan: columns }, emptyText)));
      return;
    }
    for (const row of rows) tbody.append(row);
  },

  time(unix) { return unix ? new Date(unix * 1000).toLocaleString() : "—"; },
  number(value, digits = 4) { return value === null || value === undefined ? "—" : Number(value).toPrecision(digits); },
  bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
  statusBadge(status) { return Speft.el("span", { class: `status status-${status}` }, status); },
  // what a running job is doing (its phase, with the phase's own progress and end), or that its
  // worker has gone silent; "" once no worker runs it
  phase(job) {
    const p = job.progress || {};
    if (p.stale) return `no word from its worker since ${Speft.time(p.heartbeat_at)}`;
    if (!p.phase) return "";
    const done = p.phase_total ? ` ${p.phase_step}/${p.phase_total}` : "";
    const ends = p.phase_estimated_finish ? `, ends ${Speft.time(p.phase_estimated_finish)}` : "";
    return `${p.phase.replaceAll("_", " ")}${done}${ends}`;
  },

  // save a Response body as a file (downloads need the bearer token, so no plain link)
  async download(path, filename) {
    const response = await Speft.api(path, { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const link = Speft.el("a", { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  },

  // re-run `fn` every `ms` until it returns false; errors are shown, polling goes on
  poll(fn, ms, onError) {
    let timer = null;
    const tick = async () => {
      let again = true;
      try { again = (await fn()) !== false; } catch (err) { if (onError) onError(err); }
      if (again) timer = setTimeout(tick, ms);
    };
    tick();
    return () => clearTimeout(timer);
  },
};

// header: who is signed in, and sign-out
(function header() {
  const who = document.getElementById("who");
  const signout = document.getElementById("signout");
  if (Speft.key()) {
    who.textContent = "Signed in with an API key";
    signout.hidden = false;
    signout.addEventListener("click", () => { Speft.setKey(""); location.href = "/ui/signin"; });
  }
})();
