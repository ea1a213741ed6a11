"use strict";
(function playground() {
  const { el } = Speft;
  const $ = (id) => document.getElementById(id);
  const MODES = { classification: ["classification"], causal_lm: ["chat", "completion"] };
  const INPUT_LABELS = { classification: "Texts, one per line", completion: "Prompt", chat: "Your message" };
  let models = [];
  let adapters = [];

  function adapterOptions(select, model, blank) {
    const own = adapters.filter((a) => a.base_model === model);
    select.replaceChildren(el("option", { value: "" }, blank),
                           ...own.map((a) => el("option", { value: a.id }, `${a.id} (${a.metric}, ${a.density})`)));
  }

  function modelChanged() {
    const model = models.find((m) => m.id === $("play-model").value);
    if (!model) return;
    $("play-mode").replaceChildren(...MODES[model.task].map((m) => el("option", { value: m }, m)));
    adapterOptions($("adapter-a"), model.id, "base model (no adapter)");
    adapterOptions($("adapter-b"), model.id, "— nothing: one output —");
    const wanted = new URLSearchParams(location.search).get("adapter");
    if (wanted && adapters.some((a) => a.id === wanted && a.base_model === model.id)) $("adapter-a").value = wanted;
    modeChanged();
  }

  function modeChanged() {
    const mode = $("play-mode").value;
    $("play-input-label").textContent = INPUT_LABELS[mode];
    $("tokens-field").hidden = mode === "classification";
  }

  // "id:weight, id:weight" -> a composition; else the select's adapter (or null: the base)
  function choice(select, composeText) {
    const text = (composeText || "").trim();
    if (!text) return select.value || null;
    return text.split(",").map((part) => {
      const [id, weight] = part.split(":").map((s) => s.trim());
      return { id, weight: weight === undefined ? 1 : Number(weight) };
    });
  }

  function describe(adapter) {
    if (adapter === null) return "base model";
    if (typeof adapter === "string") return adapter;
    return adapter.map((a) => `${a.id} × ${a.weight}`).join(" + ");
  }

  async function classify(model, adapter, out) {
    const input = $("play-input").value.split("\n").map((s) => s.trim()).filter(Boolean);
    const answer = await Speft.api("/v1/classifications", { json: { model, adapter, input } });
    out.replaceChildren(el("ol", {}, answer.data.map((r) => el("li", {},
      el("strong", {}, r.label), ` — ${input[r.index]} `,
      el("span", { class: "hint" }, `(${Object.entries(r.probs).map(([k, v]) => `${k} ${v.toFixed(3)}`).join(", ")})`)))));
  }

  // stream a completion or chat answer into `out` as server-sent events arrive
  async function generate(mode, model, adapter, out) {
    const text = $("play-input").value;
    const body = { model, adapter, max_tokens: Number($("max-tokens").value) || 32, temperature: 0, stream: true };
    const path = mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
    if (mode === "chat") body.messages = [{ role: "user", content: text }];
    else body.prompt = text;
    const response = await Speft.api(path, { json: body, raw: true });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const answer = el("p", { class: "generated" });
    out.replaceChildren(answer);
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (event === "[DONE]") { out.dataset.done = "true"; return; }
        const chunk = JSON.parse(event);
        if (chunk.error) throw new ApiError(500, chunk.error);
        const piece = mode === "chat" ? chunk.choices[0].delta.content : chunk.choices[0].text;
        if (piece) answer.append(piece);
      }
    }
    out.dataset.done = "true";
  }

  async function runOne(side, adapter) {
    const out = $(`out-${side}`);
    out.dataset.done = "false";
    out.replaceChildren(el("p", { class: "hint" }, "Running…"));
    $(`out-${side}-which`).textContent = describe(adapter);
    const model = $("play-model").value;
    const mode = $("play-mode").value;
    try {
      if (mode === "classification") await classify(model, adapter, out);
      else await generate(mode, model, adapter, out);
      out.dataset.done = "true";
    } catch (err) {
      out.replaceChildren(el("p", { class: "field-error" }, err.param ? `${err.param}: ${err.message}` : err.message));
      out.dataset.done = "true";
    }
  }

  $("play-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("play-error").textContent = "";
    const first = choice($("adapter-a"), $("compose-a").value);
    const second = $("adapter-b").value || null;
    $("pane-b").hidden = second === null;
    const runs = [runOne("a", first)];
    if (second !== null) runs.push(runOne("b", second));
    Promise.all(runs);
  });
  $("play-model").addEventListener("change", modelChanged);
  $("play-mode").addEventListener("change", modeChanged);

  (async function load() {
    const [modelPage, adapterPage] = await Promise.all([Speft.api("/v1/models"), Speft.api("/v1/adapters")]);
    models = modelPage.data;
    adapters = adapterPage.data;
    $("play-model").replaceChildren(...models.map((m) => el("option", { value: m.id }, `${m.id} (${m.task})`)));
    const wanted = adapters.find((a) => a.id === new URLSearchParams(location.search).get("adapter"));
    if (wanted) $("play-model").value = wanted.base_model;
    else if (adapters.length) $("play-model").value = adapters[0].base_model;
    modelChanged();
  })().catch((err) => { $("play-error").textContent = `Could not load models and adapters: ${err.message}`; });
})();
