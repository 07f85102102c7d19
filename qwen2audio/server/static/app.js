// Chat page for the qwen2audio server: no framework, no build step, no network beyond this server.
// The whole conversation (audio included, as input_audio base64 parts) is sent on every turn; the
// server's encoded-audio cache makes re-sent clips cheap.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], pending: [], busy: false, controller: null, recorder: null };

// ---- server info --------------------------------------------------------------------------------
async function loadModel() {
  try {
    const res = await fetch("/health");
    const info = await res.json();
    state.model = info.model;
    $("model").textContent = `${info.model} · context ${info.max_model_len} tokens`;
  } catch (err) {
    $("model").textContent = "server unreachable";
  }
}

// ---- attachments --------------------------------------------------------------------------------
function formatOf(name, mime) {
  const ext = (name.split(".").pop() || "").toLowerCase();
  if (ext && ext !== name.toLowerCase()) return ext;
  return (mime.split("/")[1] || "wav").split(";")[0];
}

function readBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function attach(blob, name) {
  const data = await readBase64(blob);
  state.pending.push({ name, url: URL.createObjectURL(blob),
                       part: { type: "input_audio", input_audio: { data, format: formatOf(name, blob.type || "") } } });
  renderAttachments();
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  state.pending.forEach((item, i) => {
    const li = document.createElement("li");
    li.textContent = item.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Remove";
    remove.onclick = () => { state.pending.splice(i, 1); renderAttachments(); };
    li.append(remove);
    list.append(li);
  });
}

// ---- microphone ---------------------------------------------------------------------------------
async function toggleRecording() {
  const button = $("record");
  if (state.recorder) { state.recorder.stop(); return; }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    setStatus(`Microphone unavailable: ${err.message}`);
    return;
  }
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    button.classList.remove("recording");
    button.textContent = "● Record";
    const type = recorder.mimeType || "audio/webm";
    const ext = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
    await attach(new Blob(chunks, { type }), `recording-${new Date().toLocaleTimeString()}.${ext}`);
  };
  recorder.start();
  state.recorder = recorder;
  button.classList.add("recording");
  button.textContent = "■ Stop recording";
}

// ---- history ------------------------------------------------------------------------------------
function addBubble(role, text, audioUrls = []) {
  $("empty")?.remove();
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "you" : "assistant";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  for (const url of audioUrls) {
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.src = url;
    div.append(audio);
  }
  $("history").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setStatus(text) { $("status").textContent = text; }

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

// ---- sending ------------------------------------------------------------------------------------
async function send(event) {
  event.preventDefault();
  if (state.busy) return;
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) { setStatus("Type a message or attach audio first."); return; }
  const content = state.pending.map((p) => p.part);
  if (text) content.push({ type: "text", text });
  const turn = { role: "user", content };
  addBubble("user", text, state.pending.map((p) => p.url));
  state.pending = [];
  renderAttachments();
  $("prompt").value = "";

  const bubble = addBubble("assistant", "");
  bubble.dataset.state = "streaming";
  const out = bubble.querySelector(".text");
  const body = {
    model: state.model, messages: [...state.messages, turn], stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  setBusy(true);
  setStatus("");
  state.controller = new AbortController();
  const started = performance.now();
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error(err.error?.message || `HTTP ${res.status}`);
    }
    const usage = await readStream(res, (piece) => { out.textContent += piece; bubble.scrollIntoView({ block: "end" }); });
    state.messages.push(turn, { role: "assistant", content: out.textContent });
    bubble.dataset.state = "done";
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(usage ? `${usage.completion_tokens} tokens in ${secs} s (prompt ${usage.prompt_tokens} tokens)` : "");
  } catch (err) {
    const aborted = err.name === "AbortError";
    bubble.dataset.state = aborted ? "done" : "error";
    if (!aborted) out.textContent += (out.textContent ? "\n" : "") + `Error: ${err.message}`;
    setStatus(aborted ? "Stopped." : "");
    if (aborted && out.textContent) state.messages.push(turn, { role: "assistant", content: out.textContent });
  } finally {
    setBusy(false);
    state.controller = null;
  }
}

// Server-sent events over fetch: `data: {json}` blocks separated by a blank line, `data: [DONE]` last.
async function readStream(res, onText) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return usage;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) usage = msg.usage;
        const piece = msg.choices?.[0]?.delta?.content;
        if (piece) onText(piece);
      }
    }
  }
  return usage;
}

// ---- wiring -------------------------------------------------------------------------------------
$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("file").addEventListener("change", async (e) => {
  for (const file of e.target.files) await attach(file, file.name);
  e.target.value = "";
});
$("record").addEventListener("click", toggleRecording);
if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") {
  $("record").disabled = true;
  $("record").title = "Recording needs a browser with MediaRecorder, on https or localhost";
}
$("stop").addEventListener("click", () => state.controller?.abort());
$("clear").addEventListener("click", () => {
  state.controller?.abort();
  state.messages = [];
  state.pending = [];
  renderAttachments();
  $("history").replaceChildren();
  setStatus("New conversation.");
});
loadModel();
