// handprop serve: the drawing page. Plain JavaScript, no library, no network but the
// server's own API (docs/api.md): POST /api/predict with the canvas as a PNG while the
// user draws, at most one request in flight, the latest drawing always sent last.
"use strict";

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d");
const state = {
  models: [],
  model: null, // the chosen model's info from /api/models
  drawing: false,
  last: null,
  inked: false, // anything on the canvas
  busy: false,
  dirty: false,
  answers: 0, // answers drawn so far (the browser test waits on it)
  generation: 0, // bumped by Clear: an answer to an older drawing is dropped
};
document.body.dataset.answers = "0";

// -- errors: one line from the server (or the network), shown until the next answer

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  document.body.dataset.errors = String(Number(document.body.dataset.errors || 0) + 1);
}

function clearError() {
  $("error").hidden = true;
}

async function api(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error("the server cannot be reached (is handprop serve still running?)");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const line = body && body.error ? body.error : `HTTP ${response.status}`;
    throw new Error(line);
  }
  return body;
}

// -- models

async function loadModels() {
  const data = await api("/api/models");
  state.models = data.models;
  const select = $("model");
  select.innerHTML = "";
  for (const m of data.models) {
    const option = document.createElement("option");
    option.value = m.id;
    const acc = m.accuracy == null ? "" : ` — ${(100 * m.accuracy).toFixed(2)}%`;
    option.textContent = `${m.name}${m.dataset ? " (" + m.dataset + ")" : ""}${acc}`;
    select.appendChild(option);
  }
  select.value = data.default;
  select.disabled = data.models.length < 2;
  chooseModel(data.default);
}

function chooseModel(id) {
  state.model = state.models.find((m) => m.id === id);
  const m = state.model;
  const acc = m.accuracy == null ? "accuracy unknown" : `test accuracy ${(100 * m.accuracy).toFixed(2)}%`;
  const info = `${m.dataset || "dataset unknown"} · ${acc} · ${m.description}`;
  $("model-info").textContent = info;
  $("model-info").title = info; // one line, cut with an ellipsis: the whole on hover
  $("input").width = $("saliency").width = m.image_shape[1];
  $("input").height = $("saliency").height = m.image_shape[0];
  $("input-caption").textContent =
    `the ${m.image_shape[0]}x${m.image_shape[1]} input: ${m.preparation}; handprop predict does the same`;
  drawBars(null);
  if (state.inked) send();
}

$("model").addEventListener("change", (e) => chooseModel(e.target.value));

// -- the canvas: pointer events cover mouse, touch and pen

function clearPad() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
  state.inked = false;
}

function point(e) {
  const r = pad.getBoundingClientRect();
  return { x: ((e.clientX - r.left) * pad.width) / r.width, y: ((e.clientY - r.top) * pad.height) / r.height };
}

function dot(at) {
  // a press paints a round dot of the pen's width (a zero-length line paints nothing)
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc(at.x, at.y, Number($("pen").value) / 2, 0, 2 * Math.PI);
  ctx.fill();
  state.inked = true;
}

function stroke(from, to) {
  ctx.strokeStyle = "#fff";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.lineWidth = Number($("pen").value);
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
  state.inked = true;
}

pad.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  state.drawing = true;
  state.last = point(e);
  dot(state.last);
  send();
});
pad.addEventListener("pointermove", (e) => {
  if (!state.drawing) return;
  e.preventDefault();
  const p = point(e);
  stroke(state.last, p);
  state.last = p;
  send();
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => {
    if (state.drawing) send();
    state.drawing = false;
  });
}

$("clear").addEventListener("click", () => {
  state.generation += 1;
  clearPad();
  clearError();
  drawBars(null);
  drawInput(null);
  drawLayer(null);
});

// -- sending: the canvas as a PNG, or a file's own bytes

function send() {
  state.dirty = true;
  if (state.busy || !state.inked) return;
  state.busy = true;
  state.dirty = false;
  pad.toBlob((blob) => post(blob, "drawing"), "image/png");
}

async function post(blob, name, type) {
  const url = `/api/predict?model=${encodeURIComponent(state.model.id)}&name=${encodeURIComponent(name)}`;
  const generation = state.generation;
  try {
    const answer = await api(url, {
      method: "POST",
      headers: { "Content-Type": type || "image/png" },
      body: blob,
    });
    if (generation !== state.generation) return;
    clearError();
    render(answer);
  } catch (err) {
    if (generation === state.generation) showError(err.message);
  } finally {
    state.busy = false;
    if (state.dirty && state.inked) send();
  }
}

function upload(file) {
  if (!file) return;
  if (state.busy) {
    setTimeout(() => upload(file), 50);
    return;
  }
  state.busy = true;
  // the file itself goes to the server; the canvas shows it when the browser can read it
  clearPad();
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    const s = Math.min(pad.width / img.width, pad.height / img.height);
    const w = img.width * s, h = img.height * s;
    ctx.drawImage(img, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    state.inked = true;
    URL.revokeObjectURL(url);
  };
  img.onerror = () => URL.revokeObjectURL(url);
  img.src = url;
  post(file, file.name, "application/octet-stream");
}

$("file").addEventListener("change", (e) => {
  upload(e.target.files[0]);
  e.target.value = "";
});
const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => {
  e.preventDefault();
  zone.classList.add("dragging");
});
zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("dragging");
  upload(e.dataTransfer.files[0]);
});

// -- drawing the answer

function render(a) {
  drawBars(a);
  drawInput(a);
  drawLayer(a);
  state.answers += 1;
  document.body.dataset.answers = String(state.answers);
}

function drawBars(a) {
  const bars = $("bars");
  bars.innerHTML = "";
  const classes = a ? a.classes : state.model ? state.model.classes : [];
  classes.forEach((name, j) => {
    const p = a ? a.probabilities[j] : 0;
    const row = document.createElement("div");
    row.className = "bar-row" + (a && j === a.prediction ? " top" : "");
    row.dataset.p = String(p);
    row.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span><span class="value"></span>';
    row.querySelector(".name").textContent = name;
    row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    row.querySelector(".value").textContent = a ? `${(100 * p).toFixed(1)}%` : "";
    bars.appendChild(row);
  });
  $("answer").textContent = a ? a.label : "—";
}

function paint(canvas, h, w, rgbAt) {
  canvas.width = w;
  canvas.height = h;
  const c = canvas.getContext("2d");
  const img = c.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const [r, g, b] = rgbAt(y, x);
      const o = 4 * (y * w + x);
      img.data[o] = r;
      img.data[o + 1] = g;
      img.data[o + 2] = b;
      img.data[o + 3] = 255;
    }
  }
  c.putImageData(img, 0, 0);
}

function drawInput(a) {
  const [h, w] = state.model ? state.model.image_shape : [28, 28];
  if (!a) {
    paint($("input"), h, w, () => [0, 0, 0]);
    paint($("saliency"), h, w, () => [0, 0, 0]);
    return;
  }
  const X = a.input, S = a.saliency;
  paint($("input"), X.length, X[0].length, (y, x) => {
    const v = Math.round(255 * X[y][x]);
    return [v, v, v];
  });
  // the input dimmed, the gradient over it: red raises the top score, blue lowers it
  paint($("saliency"), X.length, X[0].length, (y, x) => {
    const base = 150 * X[y][x];
    const g = Math.max(-1, Math.min(1, S[y][x]));
    const t = Math.min(1, 1.4 * Math.abs(g));
    const col = g >= 0 ? [230, 48, 31] : [43, 108, 214];
    return col.map((c) => Math.round(base * (1 - t) + c * t));
  });
}

function drawLayer(a) {
  const box = $("layer");
  box.innerHTML = "";
  const f = a && a.first_layer;
  if (!f) {
    $("layer-hint").textContent = a ? "" : "Draw to see the first layer at work.";
    return;
  }
  const [h, w] = state.model.image_shape;
  if (f.kind === "dense") {
    $("layer-title").textContent = `First layer: the ${f.units.length} most active of ${f.n_units} hidden units`;
    $("layer-hint").textContent =
      `Each unit's weights on the input pixels (red positive, blue negative) and its ${f.activation} output.`;
    for (const u of f.units) {
      const cell = document.createElement("div");
      cell.className = "cell unit";
      const canvas = document.createElement("canvas");
      if (u.weights) {
        paint(canvas, h, w, (y, x) => {
          const v = u.weights[y * w + x] / 127;
          return v >= 0
            ? [255, Math.round(255 * (1 - v)), Math.round(255 * (1 - v))]
            : [Math.round(255 * (1 + v)), Math.round(255 * (1 + v)), 255];
        });
      }
      cell.appendChild(canvas);
      const label = document.createElement("div");
      label.textContent = `#${u.unit}: ${u.value.toFixed(2)}`;
      cell.appendChild(label);
      box.appendChild(cell);
    }
  } else if (f.kind === "conv") {
    $("layer-title").textContent = `First layer: ${f.maps.length} of ${f.n_maps} feature maps`;
    $("layer-hint").textContent =
      `Each convolution filter's output after ${f.activation}, on one shared scale (brighter: stronger).`;
    const [mh, mw] = f.shape;
    f.maps.forEach((m, k) => {
      const cell = document.createElement("div");
      cell.className = "cell map";
      const canvas = document.createElement("canvas");
      paint(canvas, mh, mw, (y, x) => {
        const v = m[y * mw + x];
        return v >= 0 ? [v, v, v] : [0, 0, Math.round(-v * 0.8)];
      });
      cell.appendChild(canvas);
      const label = document.createElement("div");
      label.textContent = `map ${k}`;
      cell.appendChild(label);
      box.appendChild(cell);
    });
  }
}

// -- start

clearPad();
drawInput(null);
loadModels().then(
  () => {
    document.body.dataset.ready = "1";
  },
  (err) => showError(err.message),
);
