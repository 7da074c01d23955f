// The playground: lists the served prompts (GET /v1/models, GET /v1/prompts/{name}) and sends one text to several of
// them and to the base model (POST /v1/completions: classification whole, with its label_scores; generation streamed
// as server-sent events). Plain JS, no dependencies: it uses the public API as any client would.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { key: null, base: null, prompts: [], controller: null };
  const needsKey = document.body.dataset.auth === "required";

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // ---- small DOM helpers ----

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "data") Object.entries(value).forEach(([k, v]) => { node.dataset[k] = String(v); });
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    node.append(...children.flat().filter((c) => c !== null && c !== undefined));
    return node;
  }

  function notice(message) {
    const box = $("notice");
    box.textContent = message || "";
    box.hidden = !message;
  }

  const METHODS = { prompt: "prompt tuning", prefix: "prefix tuning" };

  function kib(bytes) {
    return bytes < 1024 ? `${bytes} B` : bytes < 1048576 ? `${(bytes / 1024).toFixed(1)} KiB`
      : `${(bytes / 1048576).toFixed(1)} MiB`;
  }

  // ---- the API ----

  async function call(path, body, signal) {
    const headers = {};
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    if (body) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method: body ? "POST" : "GET", headers, body: body ? JSON.stringify(body) : undefined, signal,
    });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const error = (await response.json()).error;
        if (error && error.message) message = error.message;
      } catch (_) { /* not JSON: keep the status line */ }
      throw new ApiError(response.status, message);
    }
    return response;
  }

  // A refused key anywhere: say so, and ask for the key again.
  function keyRefused(error) {
    state.key = null;
    notice(`The server refused the API key (401 Unauthorized): ${error.message} Check the key and enter it again.`);
    askKey();
  }

  function askKey() {
    $("prompts").hidden = true;
    $("try").hidden = true;
    $("key-form").hidden = false;
    $("server-line").textContent = "This server needs its API key.";
    const input = $("key");
    input.value = "";
    input.focus();
  }

  // ---- loading the prompts ----

  async function start() {
    if (needsKey && !state.key) {
      askKey();
      return;
    }
    let models;
    try {
      models = (await (await call("/v1/models")).json()).data;
    } catch (error) {
      if (error.status === 401) keyRefused(error);
      else notice(`Cannot list the models: ${error.message}`);
      return;
    }
    notice("");
    $("key-form").hidden = true;
    state.base = (models.find((m) => m.parent === null) || { id: "?" }).id;
    state.prompts = models.filter((m) => m.parent !== null).sort((a, b) => a.id.localeCompare(b.id));
    const count = state.prompts.length;
    $("server-line").textContent = `Base model ${state.base}, ${count} prompt${count === 1 ? "" : "s"}.`;
    showPrompts();
    showTargets();
    $("prompts").hidden = false;
    $("try").hidden = false;
    await Promise.all(state.prompts.map(loadDetails));
  }

  function showPrompts() {
    $("no-prompts").hidden = state.prompts.length > 0;
    $("prompt-cards").replaceChildren(...state.prompts.map((p) => {
      const facts = el("dl", { class: "facts" });
      const fact = (field, term, value) => facts.append(el("dt", {}, term), el("dd", { data: { field } }, value));
      fact("method", "Method", METHODS[p.method] || p.method || "?");
      fact("task", "Task", p.task || "?");
      fact("template", "Template", el("code", { class: "template" }, p.template || ""));
      if (p.labels) fact("labels", "Label words", p.labels.join(", "));
      fact("num_virtual_tokens", "Virtual tokens", String(p.num_virtual_tokens));
      fact("size", "Size on disk", "…");
      fact("training", "Training", "…");
      fact("base_model", "Base model", "…");
      return el("article", { class: "card", data: { model: p.id } },
        el("h3", {}, p.id), facts, el("div", { class: "extra" }));
    }));
  }

  async function loadDetails(prompt) {
    const card = document.querySelector(`#prompt-cards [data-model="${CSS.escape(prompt.id)}"]`);
    const set = (field, value) => card.querySelector(`[data-field="${field}"]`).replaceChildren(value);
    let details;
    try {
      details = await (await call(`/v1/prompts/${encodeURIComponent(prompt.id)}`)).json();
    } catch (error) {
      if (error.status === 401) return keyRefused(error);
      const message = el("p", { class: "error" }, `Details unavailable: ${error.message}`);
      card.querySelector(".extra").replaceChildren(message);
      return;
    }
    set("size", kib(details.bytes_on_disk));
    set("training", trainingSummary(details.training || {}));
    set("base_model", details.base_model || "?");
    card.dataset.loaded = "true";
    if (details.nearest_tokens) card.querySelector(".extra").replaceChildren(nearestTable(details));
    else if (details.method === "prefix") {
      card.querySelector(".extra").replaceChildren(el("p", { class: "muted" },
        "Prefix tuning learns key/values for every layer, not input embeddings: no nearest vocabulary tokens."));
    }
  }

  function trainingSummary(t) {
    if (!Object.keys(t).length) return "not recorded";
    const steps = t.last_step ?? t.steps;
    const parts = [];
    if (steps !== undefined) parts.push(`${steps} steps${t.stopped_early ? " (stopped early)" : ""}`);
    if (t.valid && typeof t.valid === "object") {
      const scores = Object.entries(t.valid).filter(([k, v]) => k !== "n" && typeof v === "number")
        .map(([k, v]) => `${k} ${v.toFixed(3)}`);
      const at = t.best_step !== null && t.best_step !== undefined ? ` at step ${t.best_step}` : "";
      const n = t.valid.n !== undefined ? ` (${t.valid.n} examples)` : "";
      parts.push(`best validation${at}: ${scores.join(", ")}${n}`);
    } else {
      parts.push("no validation");
    }
    return parts.join("; ");
  }

  function nearestTable(details) {
    const k = details.nearest_tokens[0].length;
    const head = el("tr", {}, el("th", { scope: "col" }, "token"), el("th", { scope: "col" }, "norm"),
      Array.from({ length: k }, (_, j) => el("th", { scope: "col" }, `nearest ${j + 1} (cosine)`)));
    const rows = details.nearest_tokens.map((tokens, i) => el("tr", { data: { position: i } },
      el("th", { scope: "row" }, `p${i}`),
      el("td", { class: "num" }, details.norms[i].toFixed(2)),
      tokens.map((token, j) => el("td", { data: { token, cosine: details.nearest_cosines[i][j] } },
        el("code", {}, JSON.stringify(token)), " ", el("span", { class: "muted" },
          details.nearest_cosines[i][j].toFixed(2))))));
    return el("details", { class: "nearest" },
      el("summary", {}, `Nearest vocabulary tokens of the ${details.nearest_tokens.length} virtual tokens`),
      el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, head), el("tbody", {}, rows))));
  }

  function showTargets() {
    const names = [...state.prompts.map((p) => p.id), state.base];
    $("target-list").replaceChildren(...names.map((name, i) => {
      const id = `target-${i}`;
      const isBase = name === state.base;
      return el("div", { class: "target" },
        el("input", { type: "checkbox", id, value: name, checked: isBase || i < 4 }),
        el("label", { for: id }, isBase ? `${name} (base model)` : name));
    }));
  }

  // ---- answering ----

  async function ask(event) {
    event.preventDefault();
    const text = $("text").value;
    const targets = [...$("target-list").querySelectorAll("input:checked")].map((c) => c.value);
    if (!text.trim()) {
      notice("Write a text first.");
      $("text").focus();
      return;
    }
    if (!targets.length) {
      notice("Select at least one prompt or the base model.");
      return;
    }
    notice("");
    if (state.controller) state.controller.abort();
    const controller = state.controller = new AbortController();
    const options = { max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value) };
    const columns = targets.map((name) => answerColumn(name));
    $("answers").replaceChildren(...columns.map((c) => c.node));
    await Promise.all(columns.map((c) => answer(c, text, options, controller.signal)));
  }

  function answerColumn(name) {
    const prompt = state.prompts.find((p) => p.id === name);
    const kind = prompt ? `${prompt.task}, ${METHODS[prompt.method] || prompt.method}` : "base model, no prompt";
    const body = el("div", { class: "body" });
    const status = el("p", { class: "status muted" }, "waiting…");
    const node = el("section", { class: "card answer", data: { model: name, state: "running" }, "aria-busy": "true" },
      el("h3", {}, name), el("p", { class: "muted kind" }, kind), body, status);
    return { name, prompt, node, body, status };
  }

  async function answer(column, text, options, signal) {
    const started = performance.now();
    const classify = column.prompt && column.prompt.task === "classification";
    try {
      const request = { model: column.name, prompt: text, ...options, stream: !classify };
      const response = await call("/v1/completions", request, signal);
      const finish = classify ? await showLabels(column, await response.json()) : await streamText(column, response);
      column.node.dataset.finishReason = finish || "";
      column.status.textContent = `${finish ? `finish: ${finish}, ` : ""}${Math.round(performance.now() - started)} ms`;
      column.node.dataset.state = "done";
    } catch (error) {
      if (error.name === "AbortError") return;
      if (error.status === 401) return keyRefused(error);
      column.body.replaceChildren(el("p", { class: "error" }, error.message));
      column.status.textContent = error.status ? `error ${error.status}` : "error";
      column.node.dataset.state = "error";
    } finally {
      column.node.removeAttribute("aria-busy");
    }
  }

  // A classification prompt's answer: its best label word, and each label word's probability (from label_scores,
  // the log-probabilities the API returns) as bars.
  function showLabels(column, reply) {
    const choice = reply.choices[0];
    const scores = choice.label_scores || {};
    column.node.dataset.label = choice.text;
    const bars = Object.entries(scores).map(([word, logprob]) => {
      const p = Math.exp(logprob);
      const fill = el("span", { class: "fill" });
      fill.style.width = `${(100 * p).toFixed(2)}%`;
      return el("li", { class: word === choice.text ? "chosen" : null, data: { labelWord: word, logprob },
        title: `log-probability ${logprob.toFixed(4)}` },
      el("span", { class: "word" }, word), el("span", { class: "bar", "aria-hidden": "true" }, fill),
      el("span", { class: "num" }, `${(100 * p).toFixed(1)}%`));
    });
    column.body.replaceChildren(
      el("p", { class: "label" }, "Label: ", el("strong", { class: "label-word" }, choice.text)),
      el("ul", { class: "bars", "aria-label": "probability of each label word" }, bars));
    return choice.finish_reason;
  }

  // A generation answer, streamed: the text grows as the server-sent events come.
  async function streamText(column, response) {
    const out = el("p", { class: "text" });
    column.body.replaceChildren(out);
    column.status.textContent = "generating…";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = null;
    let events = 0;
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(500, chunk.error.message);
          for (const choice of chunk.choices) {
            out.textContent += choice.text;
            if (choice.finish_reason) finish = choice.finish_reason;
          }
          column.node.dataset.events = String(++events);
        }
      }
      if (done) break;
    }
    if (!finish) throw new ApiError(0, "the stream ended before the answer did");
    return finish;
  }

  // ---- wiring ----

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    state.key = key;
    notice("");
    $("server-line").textContent = "Checking the key…";
    start();
  });
  $("ask-form").addEventListener("submit", ask);
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  start();
})();
