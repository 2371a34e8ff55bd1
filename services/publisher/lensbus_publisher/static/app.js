// The page's script: a file, so the CSP needs no 'unsafe-inline' (see web.py).
"use strict";
(function () {
  // A token given once as ?token= stays for this tab (and is sent with every request).
  const params = new URLSearchParams(location.search);
  let token = params.get("token") || sessionStorage.getItem("lensbus-token") || "";
  if (params.get("token")) sessionStorage.setItem("lensbus-token", token);
  const withToken = (path) =>
    token ? path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : path;
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const $ = (id) => document.getElementById(id);
  const MAX_ROWS = 50;

  let cameras = [];
  let selected = params.get("camera") || null;
  let source = null;
  const live = new window.LensbusLive.Live($("live"));
  window.lensbusLive = live; // for a look from the console (and the browser tests)

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function modelText(m) {
    return m ? `${m.name}:${m.version}${m.framework ? " · " + m.framework : ""}${m.device ? " · " + m.device : ""}` : "no model yet";
  }

  async function getJSON(path) {
    const r = await fetch(withToken(path), { headers, cache: "no-store" });
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  function renderCameras() {
    const ul = $("cameras");
    ul.replaceChildren();
    for (const c of cameras) {
      const li = el("li");
      li.dataset.camera = c.id;
      if (c.id === selected) li.classList.add("selected");
      li.append(el("div", "cam-id", c.id));
      const fps = c.fps ? c.fps.toFixed(1) + " fps" : "no frames";
      const size = c.frame ? ` · ${c.frame.width}×${c.frame.height}` : "";
      li.append(el("div", "cam-meta", fps + size));
      li.append(el("div", "cam-meta", modelText(c.model)));
      if (c.state) {
        const st = el("div", "cam-meta cam-state " + c.state.state, c.state.state);
        if (c.state.reason) st.textContent += ": " + c.state.reason;
        li.append(st);
      }
      li.addEventListener("click", () => select(c.id));
      ul.append(li);
    }
  }

  function select(id) {
    if (id === selected && !$("camera").hidden) return;
    selected = id;
    const url = new URL(location.href);
    url.searchParams.set("camera", id);
    url.searchParams.delete("token");
    history.replaceState(null, "", url);
    $("empty").hidden = true;
    $("camera").hidden = false;
    $("camera-id").textContent = id;
    $("results").replaceChildren();
    // The live view reads the device stream and draws the results itself; the server draws
    // the project stream only for whoever shows it. Changing src closes the old stream.
    live.open(withToken(`/cameras/${encodeURIComponent(id)}/device.mjpeg`));
    showProject(localStorage.getItem("lensbus.project") === "1");
    renderCameras();
    updateInfo();
  }

  function showProject(on) {
    const img = $("project");
    img.hidden = !on;
    $("project-toggle").textContent = on ? "Hide the project stream"
      : "Show the project stream (drawn by the server: projects' overlays)";
    if (on && selected) img.src = withToken(`/cameras/${encodeURIComponent(selected)}/project.mjpeg`);
    if (!on) img.removeAttribute("src");
  }

  function updateInfo() {
    const c = cameras.find((x) => x.id === selected);
    if (!c) return;
    $("model").textContent = modelText(c.model);
    $("device-info").textContent = c.frame
      ? `#${c.frame.seq} · ${c.fps.toFixed(1)} fps · ${(c.frame.bytes / 1024).toFixed(0)} KiB`
      : "";
    $("project-info").textContent = c.result
      ? `result #${c.result.seq} · ${(c.result.latency_s * 1000).toFixed(0)} ms`
      : "no results yet";
  }

  async function pollCameras() {
    try {
      cameras = (await getJSON("/api/cameras")).cameras;
      $("conn").textContent = "connected";
      // Open a camera that has frames (one still retrying has nothing to show yet).
      if (!selected && cameras.length) selected = (cameras.find((c) => c.frame) || cameras[0]).id;
      if (selected && cameras.some((c) => c.id === selected) && $("camera").hidden) {
        select(selected);
      }
      renderCameras();
      updateInfo();
    } catch (e) {
      $("conn").textContent = "offline (" + e.message + ")";
    }
  }

  async function pollEvents() {
    try {
      const { events } = await getJSON("/api/events");
      const ul = $("events");
      ul.replaceChildren();
      for (const ev of events.slice(0, 20)) {
        const li = el("li", "event-row");
        li.dataset.clip = ev.clip.id;
        if (ev.snapshot_url) {
          const img = el("img");
          img.src = withToken(ev.snapshot_url);
          img.alt = "snapshot";
          li.append(img);
        }
        li.append(el("span", "time", new Date(ev.event_ns / 1e6).toLocaleTimeString()));
        li.append(el("span", "", `${ev.camera} · ${eventText(ev)}`));
        if (ev.clip.state === "kept") {
          const play = el("a", "play", "play");
          play.href = "#";
          play.addEventListener("click", (e) => {
            e.preventDefault();
            const p = $("clip-player");
            p.hidden = false;
            p.src = withToken(ev.clip.play);
          });
          const dl = el("a", "clip-link", "download clip");
          dl.href = withToken(ev.clip.url);
          li.append(play, dl);
        } else {
          li.append(el("span", "dim", "clip " + ev.clip.state));
        }
        ul.append(li);
      }
    } catch (e) { /* shown by the camera poll */ }
  }

  async function pollStatus() {
    try {
      const { services } = await getJSON("/api/status");
      const box = $("services");
      box.replaceChildren();
      for (const s of services) {
        const state = s.stale ? "stale" : s.state;
        const b = el("span", "badge " + state, `${s.service} ${state}`);
        b.title = `${s.instance} · v${s.version}${s.reason ? " · " + s.reason : ""}` +
          (s.model ? " · " + s.model.name + ":" + s.model.version : "");
        box.append(b);
      }
    } catch (e) { /* shown by the camera poll */ }
  }

  function addRow(li) {
    const ul = $("results");
    ul.prepend(li);
    while (ul.children.length > MAX_ROWS) ul.lastChild.remove();
  }

  function onResult(r) {
    if (r.camera !== selected) return;
    live.result(r);
    const li = el("li", "result");
    li.dataset.seq = r.seq;
    li.append(el("span", "time dim", new Date(r.capture_ns / 1e6).toLocaleTimeString()));
    li.append(el("span", "seq dim", "#" + r.seq));
    const labels = el("span", "labels");
    const items = r.detections.length ? r.detections
      : r.classes.length ? r.classes.slice(0, 3)
      : r.segments.map((s) => ({ label: s.label, score: s.area }));
    if (!items.length) labels.append(el("span", "dim", "nothing"));
    for (const d of items) {
      // A tracked object: "#12 car"; a cascade's answers follow it ("taxi 0.91").
      const name = d.track_id ? `#${d.track_id} ${d.track_label || d.label}` : d.label;
      const attrs = (d.attributes || []).map((a) => ` · ${a.label} ${a.score.toFixed(2)}`).join("");
      const span = el("span", "label", name + attrs + " ");
      span.append(el("span", "score", d.score.toFixed(2)));
      labels.append(span);
    }
    li.append(labels);
    li.append(el("span", "model dim", r.model.name + ":" + r.model.version));
    li.append(el("span", "latency", (r.latency_s * 1000).toFixed(0) + " ms"));
    addRow(li);
  }

  function eventText(ev) {
    if (!ev.trigger || ev.trigger === "rule") return `${ev.rule}: ${ev.label} ${ev.score.toFixed(2)}`;
    if (ev.trigger === "project") return `project ${ev.project}: ${ev.label} ${ev.score.toFixed(2)}`;
    const who = ev.track_id ? `${ev.label} #${ev.track_id}` : ev.label;
    const how = ev.direction ? ` ${ev.direction}` : ev.dwell_s ? ` ${ev.dwell_s.toFixed(0)} s` : "";
    return `${ev.zone} ${ev.trigger}${how}: ${who}`;
  }

  // The selected camera's zones and lines with their figures (occupancy, in/out counts).
  async function pollZones() {
    if (!selected) return;
    try {
      const z = await getJSON(`/api/cameras/${encodeURIComponent(selected)}/zones`);
      const box = $("zones");
      box.replaceChildren();
      for (const zone of z.zones) box.append(el("span", "badge zone", `${zone.name}: ${zone.occupancy} inside`));
      for (const ln of z.lines) box.append(el("span", "badge line", `${ln.name}: in ${ln.in} · out ${ln.out}`));
    } catch (e) { /* no such camera yet */ }
  }

  function onEvent(ev) {
    if (ev.camera !== selected) return;
    const li = el("li", "event");
    li.append(el("span", "time", new Date(ev.event_ns / 1e6).toLocaleTimeString()));
    li.append(el("span", "seq", "#" + ev.seq));
    li.append(el("span", "labels", "⚑ " + eventText(ev)));
    li.append(el("span", "model dim", ev.snapshot || ""));
    li.append(el("span", "latency", "event"));
    addRow(li);
  }

  function openResults() {
    if (source) source.close();
    source = new EventSource(withToken("/results"));
    source.addEventListener("result", (m) => onResult(JSON.parse(m.data)));
    source.addEventListener("event", (m) => onEvent(JSON.parse(m.data)));
    source.addEventListener("counts", (m) => { if (JSON.parse(m.data).camera === selected) pollZones(); });
    source.onerror = () => { $("conn").textContent = "reconnecting…"; };
    source.onopen = () => { $("conn").textContent = "connected"; };
  }

  $("project-toggle").addEventListener("click", () => {
    const on = $("project").hidden;
    localStorage.setItem("lensbus.project", on ? "1" : "0");
    showProject(on);
  });
  openResults();
  pollCameras();
  pollStatus();
  setInterval(pollCameras, 2000);
  setInterval(pollStatus, 2000);
  setInterval(pollZones, 1000);
  pollEvents();
  setInterval(pollEvents, 2000);
})();
