// The playground: POST /v1/infill with stream=true and show the text as its pieces arrive,
// generated pieces highlighted. Server-sent events are read from the fetch body (EventSource
// cannot POST). No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;

function strategy() {
  return document.querySelector("input[name=strategy]:checked").value;
}

function showParams() {
  const s = strategy();
  document.querySelectorAll(".sample").forEach((el) => el.classList.toggle("hidden", s !== "sample"));
  document.querySelectorAll(".beam").forEach((el) => el.classList.toggle("hidden", s !== "beam"));
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function request() {
  const body = {
    text: $("text").value,
    max_tokens: number("max_tokens"),
    min_tokens: number("min_tokens"),
    no_repeat_ngram_size: number("no_repeat_ngram_size"),
    stream: true,
  };
  const s = strategy();
  if (s === "sample") {
    Object.assign(body, { temperature: number("temperature"), top_p: number("top_p"), top_k: number("top_k") });
    if (number("seed") !== null) body.seed = number("seed");
  } else {
    body.temperature = 0;
    if (s === "beam") Object.assign(body, { num_beams: number("num_beams"), length_penalty: number("length_penalty") });
  }
  if ($("stop").value) body.stop = $("stop").value;
  return body;
}

function append(text, generated) {
  const output = $("output");
  const last = output.lastChild;
  if (last && last.nodeType === Node.ELEMENT_NODE && last.classList.contains("fill") === generated) {
    last.textContent += text;
    return;
  }
  const span = document.createElement("span");
  if (generated) span.className = "fill";
  span.textContent = text;
  output.appendChild(span);
}

function finish(result) {
  const list = $("blanks");
  list.replaceChildren();
  for (const blank of result.blanks) {
    const item = document.createElement("li");
    item.textContent = `${blank.mask || "continuation"} → ${JSON.stringify(blank.text)}`;
    list.appendChild(item);
  }
  $("status").textContent = `done: ${result.usage.completion_tokens} tokens, ${result.finish_reason}`;
  $("output").dataset.done = "true";
}

function fail(message) {
  $("status").textContent = message;
  $("status").className = "error";
}

async function run(event) {
  event.preventDefault();
  controller?.abort();
  controller = new AbortController();
  $("output").replaceChildren();
  $("output").dataset.done = "false";
  $("blanks").replaceChildren();
  $("status").className = "muted";
  $("status").textContent = "generating…";
  $("run").disabled = true;
  $("stop-run").disabled = false;
  try {
    const response = await fetch("/v1/infill", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request()),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      fail(`error ${response.status}: ${body.error?.message ?? response.statusText}`);
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data || data === "[DONE]") continue;
        const message = JSON.parse(data);
        if (message.error) fail(`error: ${message.error.message}`);
        else if (message.object === "infill.chunk") append(message.text, message.generated);
        else if (message.object === "infill") finish(message);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") $("status").textContent = "stopped";
    else fail(`error: ${err.message}`);
  } finally {
    $("run").disabled = false;
    $("stop-run").disabled = true;
  }
}

document.querySelectorAll("input[name=strategy]").forEach((el) => el.addEventListener("change", showParams));
document.querySelectorAll("[data-insert]").forEach((button) =>
  button.addEventListener("click", () => {
    const area = $("text");
    const at = area.selectionStart ?? area.value.length;
    area.value = area.value.slice(0, at) + button.dataset.insert + area.value.slice(area.selectionEnd ?? at);
    area.focus();
  }),
);
$("form").addEventListener("submit", run);
$("stop-run").addEventListener("click", () => controller?.abort());
showParams();
fetch("/v1/models").then((r) => r.json()).then((r) => { $("model").textContent = `model: ${r.data[0].id}`; }).catch(() => {});
