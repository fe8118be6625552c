// sdinfer serve's page: a form that POSTs /v1/jobs, follows the job's server-sent events
// (/v1/jobs/ID/events) for progress, shows the images, and lists the store (/v1/images).
"use strict";
const $ = (id) => document.getElementById(id);
let oldest = null;

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

function figure(item) {
  const fig = document.createElement("figure");
  fig.className = "image";
  fig.dataset.id = item.id;
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = item.prompt;
  const cap = document.createElement("figcaption");
  const r = item.report || item;
  cap.textContent = `${item.prompt} · ${r.sampler} ${r.steps} steps` +
    (r.steps_skipped ? ` (+${r.steps_skipped} cached)` : "") +
    ` · cfg ${r.guidance_scale} · seed ${r.seed} · ${r.size}` +
    (r.accelerate ? ` · ${r.accelerate}` : "") + (r.cache_hit ? ` · cache hit ${Number(r.similarity).toFixed(3)}` : "");
  fig.append(img, cap);
  return fig;
}

async function loadConfig() {
  const res = await fetch("/v1/config");
  if (res.status === 401) {   // the server has an API key: ask for it, keep it as a same-site cookie
    $("keyform").hidden = false;
    throw new Error("enter the server's API key");
  }
  $("keyform").hidden = true;
  const c = await res.json();
  $("model").textContent = `model ${c.model}`;
  $("steps").value = c.defaults.steps === "auto" ? "" : c.defaults.steps;
  $("sampler").value = c.defaults.sampler;
  $("guidance").value = c.defaults.guidance_scale;
  $("accelerate").value = c.defaults.accelerate || "";
  for (const s of c.samplers) { const o = document.createElement("option"); o.value = s; $("samplers").append(o); }
  for (const s of c.sizes) {
    const o = document.createElement("option"); o.value = o.textContent = s; o.selected = s === c.size; $("size").append(o);
  }
  $("approx").disabled = !c.approx_cache;
  if (!c.approx_cache) $("approx").parentElement.title = "this server has no approximate cache";
}

async function loadGallery(more) {
  const url = "/v1/images?limit=24" + (more && oldest ? `&before=${oldest}` : "");
  const body = await (await fetch(url)).json();
  if (!more) $("gallery").replaceChildren();
  for (const item of body.data) $("gallery").append(figure(item));
  oldest = body.next_before;
  $("more").hidden = !oldest;
}

function request() {
  const body = { prompt: $("prompt").value, size: $("size").value, approx_cache: $("approx").checked };
  if ($("steps").value) body.steps = Number($("steps").value);
  if ($("sampler").value) body.sampler = $("sampler").value;
  if ($("guidance").value) body.guidance_scale = Number($("guidance").value);
  if ($("seed").value) body.seed = Number($("seed").value);
  body.accelerate = $("accelerate").value.trim() || "none";
  return body;
}

async function generate(event) {
  event.preventDefault();
  $("go").disabled = true;
  $("result").replaceChildren();
  const bar = $("bar");
  bar.hidden = false; bar.value = 0;
  try {
    const res = await fetch("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                          body: JSON.stringify(request()) });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
    say("queued");
    await new Promise((resolve, reject) => {
      const events = new EventSource(body.events);
      events.addEventListener("running", (e) => say(`running (batch of ${JSON.parse(e.data).batch_size})`));
      events.addEventListener("step", (e) => {
        const s = JSON.parse(e.data);
        if (s.steps) { bar.max = s.steps; bar.value = s.step; say(`step ${s.step} / ${s.steps}`); }
        else say(`step ${s.step}`);
      });
      events.addEventListener("done", (e) => {
        events.close();
        const d = JSON.parse(e.data);
        for (const item of d.images) $("result").append(figure(item));
        say(`done: ${d.images.length} image${d.images.length > 1 ? "s" : ""}`);
        resolve();
      });
      events.addEventListener("error", (e) => {
        events.close();
        reject(new Error(e.data ? JSON.parse(e.data).message : "the connection to the server was lost"));
      });
    });
    await loadGallery(false);
  } catch (err) {
    say(err.message, true);
  } finally {
    bar.hidden = true;
    $("go").disabled = false;
  }
}

function useKey(event) {
  event.preventDefault();
  document.cookie = `sdinfer_key=${encodeURIComponent($("key").value.trim())}; path=/; SameSite=Strict`;
  start();
}

function start() {
  say("");
  loadConfig().then(() => loadGallery(false))
    .catch((err) => say($("keyform").hidden ? `cannot reach the server: ${err.message}` : err.message, true));
}

$("keyform").addEventListener("submit", useKey);
$("form").addEventListener("submit", generate);
$("more").addEventListener("click", () => loadGallery(true));
start();
