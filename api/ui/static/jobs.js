"use strict";
(function jobs() {
  const { el } = Speft;
  const tbody = document.querySelector("#jobs-table tbody");
  const status = document.getElementById("jobs-status");
  const form = document.getElementById("job-form");
  const formError = document.getElementById("form-error");
  const createStatus = document.getElementById("create-status");
  // the API's `param` of an error -> the form field it is about
  const FIELDS = {
    "training_file": "training_file", "validation_file": "validation_file", "model": "model",
    "method.speft.metric": "metric", "method.speft.density": "density",
    "hyperparameters.n_epochs": "n_epochs", "hyperparameters.learning_rate": "learning_rate",
    "hyperparameters.batch_size": "batch_size",
  };

  function progress(job) {
    const { step, total_steps: total } = job.progress || {};
    const phase = Speft.phase(job);
    const steps = total ? [el("progress", { max: total, value: step, "aria-label": `${job.id} steps` }),
                           ` ${step}/${total}`] : [`${step || 0} steps`];
    return el("span", {}, ...steps, phase ? el("span", { class: "phase" }, phase) : null);
  }

  function row(job) {
    return el("tr", { "data-job-id": job.id },
      el("td", {}, el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
      el("td", {}, job.model), el("td", {}, Speft.statusBadge(job.status)),
      el("td", {}, progress(job)),
      el("td", {}, Speft.TERMINAL.has(job.status) ? "—" : Speft.time(job.estimated_finish)),
      el("td", {}, Speft.time(job.created_at)));
  }

  Speft.poll(async () => {
    const page = await Speft.api("/v1/fine_tuning/jobs?limit=50");
    Speft.fill(tbody, page.data.map(row), "No jobs yet: create one below.", 6);
    status.textContent = `${page.data.length} job(s), refreshed ${new Date().toLocaleTimeString()}`;
  }, 2000, (err) => { status.textContent = `Could not load jobs: ${err.message}`; });

  (async function models() {
    const select = document.getElementById("model");
    const page = await Speft.api("/v1/models");
    select.replaceChildren(...page.data.map((m) => el("option", { value: m.id }, `${m.id} (${m.task})`)));
  })().catch((err) => { formError.textContent = `Could not load models: ${err.message}`; });

  function clearErrors() {
    formError.textContent = "";
    for (const node of form.querySelectorAll(".field-error")) node.textContent = "";
    for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  }

  function showError(err, fallbackField) {
    const field = FIELDS[err.param] || (err.param === "file" ? fallbackField : null);
    const input = field && document.getElementById(field);
    if (!input) { formError.textContent = err.param ? `${err.param}: ${err.message}` : err.message; return; }
    document.getElementById(`${field}-error`).textContent = err.message;
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }

  async function upload(field) {
    const input = document.getElementById(field);
    if (!input.files.length) return null;
    const data = new FormData();
    data.append("purpose", "fine-tune");
    data.append("file", input.files[0]);
    try {
      return (await Speft.api("/v1/files", { form: data })).id;
    } catch (err) {
      showError(err, field);
      throw err;
    }
  }

  // "auto" stays a string; a number is sent as a number; anything else as typed (the API says why)
  function value(id) {
    const text = document.getElementById(id).value.trim();
    if (text === "auto") return text;
    return text !== "" && !Number.isNaN(Number(text)) ? Number(text) : text;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    if (!document.getElementById("training_file").files.length) {
      showError({ param: "training_file", message: "Choose a training file." });
      return;
    }
    const button = document.getElementById("create-job");
    button.disabled = true;
    try {
      createStatus.textContent = "Uploading…";
      const training = await upload("training_file");
      const validation = await upload("validation_file");
      createStatus.textContent = "Creating the job…";
      const body = {
        model: document.getElementById("model").value, training_file: training,
        method: { type: "speft", speft: { metric: document.getElementById("metric").value,
                                          density: value("density") } },
        hyperparameters: { n_epochs: value("n_epochs"), learning_rate: value("learning_rate"),
                           batch_size: value("batch_size") },
      };
      if (validation) body.validation_file = validation;
      const job = await Speft.api("/v1/fine_tuning/jobs", { json: body });
      location.href = `/ui/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      createStatus.textContent = "";
      if (err instanceof ApiError && !form.querySelector("[aria-invalid]")) showError(err);
    } finally {
      button.disabled = false;
    }
  });
})();
