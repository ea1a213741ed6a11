"use strict";
(function adaptersPage() {
  const { el } = Speft;
  const tbody = document.querySelector("#adapters-table tbody");
  const status = document.getElementById("adapters-status");

  function evalText(values) {
    const entries = Object.entries(values || {});
    return entries.length ? entries.map(([k, v]) => `${k} ${Speft.number(v)}`).join(", ") : "—";
  }

  async function remove(adapter) {
    if (!confirm(`Delete adapter ${adapter.id}? Its delta file is deleted too.`)) return;
    try {
      await Speft.api(`/v1/adapters/${encodeURIComponent(adapter.id)}`, { method: "DELETE" });
      status.textContent = `Deleted ${adapter.id}.`;
      await load();
    } catch (err) { status.textContent = `Could not delete ${adapter.id}: ${err.message}`; }
  }

  async function load() {
    const page = await Speft.api("/v1/adapters");
    Speft.fill(tbody, page.data.map((a) => el("tr", { "data-adapter-id": a.id },
      el("td", { class: "mono" }, a.id), el("td", {}, a.base_model), el("td", {}, Speft.bytes(a.bytes)),
      el("td", {}, a.density), el("td", {}, a.metric), el("td", {}, evalText(a.eval)),
      el("td", {}, Speft.time(a.created_at)),
      el("td", {}, el("button", { type: "button", class: "danger", onclick: () => remove(a),
                                  "aria-label": `Delete ${a.id}` }, "Delete")))),
      "No adapters yet: a job that succeeds makes one.", 8);
    status.textContent = `${page.data.length} adapter(s)`;
  }
  load().catch((err) => { status.textContent = `Could not load adapters: ${err.message}`; });
})();
