"use strict";
(function jobPage() {
  const { el } = Speft;
  const jobId = document.getElementById("job").dataset.jobId;
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const $ = (id) => document.getElementById(id);
  const charts = {};

  function chart(id, series, data) {
    const target = $(id);
    const width = Math.max(320, target.clientWidth || 640);
    if (!charts[id]) {
      charts[id] = new uPlot({
        width, height: 260, scales: { x: { time: false } },
        axes: [{ label: "step" }, {}],
        series: [{ label: "step" }, ...series.map((s) => ({ spanGaps: true, width: 2, points: { show: s.points }, ...s }))],
      }, data, target);
    } else {
      charts[id].setData(data);
    }
  }

  function drawCurves(metrics) {
    const steps = metrics.map((m) => m.step);
    const train = metrics.map((m) => m.train_loss ?? null);
    const valid = metrics.map((m) => m.eval_loss ?? null);
    const accuracy = metrics.map((m) => m.eval_accuracy ?? null);
    chart("loss-chart", [
      { label: "train loss", stroke: "#1f5fa8" },
      { label: "valid loss", stroke: "#b3261e", points: true },
    ], [steps, train, valid]);
    const trainPoints = train.filter((v) => v !== null).length;
    const validPoints = valid.filter((v) => v !== null).length;
    const last = [...train].reverse().find((v) => v !== null);
    $("loss-summary").textContent = trainPoints
      ? `${trainPoints} training steps, last train loss ${Speft.number(last)}; ${validPoints} validation point(s).`
      : "No steps reported yet.";
    $("loss-chart").dataset.points = String(trainPoints);
    if (accuracy.some((v) => v !== null)) {
      $("accuracy-block").hidden = false;
      chart("accuracy-chart", [{ label: "valid accuracy", stroke: "#2e7d32", points: true }],
            [steps, accuracy]);
    }
  }

  function drawJob(job) {
    const status = $("job-status");
    status.textContent = job.status;
    status.className = `status status-${job.status}`;
    const { step = 0, total_steps: total } = job.progress || {};
    $("job-progress").max = total || 1;
    $("job-progress").value = total ? step : 0;
    $("job-steps").textContent = total ? `${step} / ${total} steps` : `${step} steps`;
    $("job-phase").textContent = Speft.phase(job) || "—";
    $("job-eta").textContent = Speft.TERMINAL.has(job.status) ? `finished ${Speft.time(job.finished_at)}`
                                                              : Speft.time(job.estimated_finish);
    $("job-adapter").textContent = job.adapter_id || "—";
    if (job.error) $("job-error").textContent = `${job.error.code}: ${job.error.message}`;
    $("cancel-job").hidden = Speft.TERMINAL.has(job.status);
    $("download-delta").hidden = !job.adapter_id;
    $("download-delta").dataset.adapterId = job.adapter_id || "";
    const spec = { model: job.model, task: job.task, device: job.device, method: job.method,
                   hyperparameters: job.hyperparameters, training_file: job.training_file,
                   validation_file: job.validation_file, trainable_params: job.trainable_params,
                   result_step: job.result_step, result_files: job.result_files };
    $("job-spec").textContent = JSON.stringify(spec, null, 2);
  }

  function drawEvents(events) {
    Speft.fill(document.querySelector("#events-table tbody"), events.map((e) => el("tr", {},
      el("td", {}, Speft.time(e.created_at)), el("td", {}, e.level), el("td", {}, e.message))),
      "No events yet.", 3);
  }

  function drawCheckpoints(checkpoints) {
    Speft.fill(document.querySelector("#checkpoints-table tbody"), checkpoints.map((c) => el("tr", {},
      el("td", { class: "mono" }, c.id), el("td", {}, c.step_number),
      el("td", {}, Speft.number(c.metrics.train_loss)), el("td", {}, Speft.number(c.metrics.valid_loss)),
      el("td", {}, Speft.number(c.metrics.valid_accuracy ?? c.metrics.valid_mean_token_accuracy)))),
      "No checkpoints.", 5);
  }

  let finalDone = false;
  Speft.poll(async () => {
    const [job, metrics, events, checkpoints] = await Promise.all([
      Speft.api(base), Speft.api(`${base}/metrics`), Speft.api(`${base}/events`),
      Speft.api(`${base}/checkpoints`).catch(() => ({ data: [] })),
    ]);
    drawJob(job);
    drawCurves(metrics.data);
    drawEvents(events.data);
    drawCheckpoints(checkpoints.data);
    if (!Speft.TERMINAL.has(job.status)) return true;
    if (finalDone) return false;
    finalDone = true;  // one more refresh after the end: the last metrics land with it
    return true;
  }, 2000, (err) => { $("job-error").textContent = err.message; });

  $("cancel-job").addEventListener("click", async () => {
    try { drawJob(await Speft.api(`${base}/cancel`, { method: "POST" })); }
    catch (err) { $("job-error").textContent = err.message; }
  });
  $("download-delta").addEventListener("click", async (event) => {
    const adapterId = event.currentTarget.dataset.adapterId;
    try { await Speft.download(`/v1/adapters/${encodeURIComponent(adapterId)}/content`, `${adapterId}.safetensors`); }
    catch (err) { $("job-error").textContent = err.message; }
  });
})();
