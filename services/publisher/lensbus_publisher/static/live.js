// The live view: the device stream drawn on a canvas with the results' boxes drawn over it
// here in the browser, so watching costs the server no decode, draw or encode (the
// server-drawn project stream is /cameras/<id>/project.mjpeg, for other clients).
//
// The frames come from /cameras/<id>/device.mjpeg read with fetch (each part's X-Seq header
// names its frame) and the results from the page's /results feed; a frame is drawn with the
// result of the same seq. A frame waits at most HOLD_MS for its result (results come ~0.1 s
// after their frame); one still without it then is drawn with the newest older result, as
// the project stream does.
"use strict";

window.LensbusLive = (function () {
  const HOLD_MS = 500;
  const KEEP_RESULTS = 120;
  const ENC = new TextEncoder();
  const DEC = new TextDecoder();
  // The project stream's palette (render.py, BGR there), as CSS colours.
  const PALETTE = ["#ffff00", "#00ffff", "#00ff00", "#ff00ff", "#ff8000", "#0080ff",
    "#00ff80", "#ff0000", "#8000ff", "#ff0080", "#80ff00", "#ffffff"];

  function indexOf(buf, pat, from) {
    outer: for (let i = from; i <= buf.length - pat.length; i++) {
      for (let j = 0; j < pat.length; j++) if (buf[i + j] !== pat[j]) continue outer;
      return i;
    }
    return -1;
  }

  // One multipart part at the start of buf: {seq, jpeg, end} or null until it is all there.
  function takePart(buf) {
    const headEnd = indexOf(buf, ENC.encode("\r\n\r\n"), 0);
    if (headEnd < 0) return null;
    const headers = {};
    for (const line of DEC.decode(buf.subarray(0, headEnd)).split("\r\n")) {
      const at = line.indexOf(":");
      if (at > 0) headers[line.slice(0, at).trim().toLowerCase()] = line.slice(at + 1).trim();
    }
    const length = parseInt(headers["content-length"], 10);
    const start = headEnd + 4;
    if (!(length >= 0) || buf.length < start + length + 2) return null;
    return { seq: parseInt(headers["x-seq"], 10), jpeg: buf.slice(start, start + length), end: start + length + 2 };
  }

  function labelOf(d) {
    const name = d.track_id ? `#${d.track_id} ${d.track_label || d.label}` : d.label;
    const attrs = (d.attributes || []).map((a) => ` | ${a.label} ${a.score.toFixed(2)}`).join("");
    return `${name} ${d.score.toFixed(2)}${attrs}`;
  }

  class Live {
    constructor(canvas) {
      this.canvas = canvas;
      this.ctx = canvas.getContext("2d");
      this.results = new Map(); // seq -> result, the newest KEEP_RESULTS
      this.waiting = null; // {seq, bitmap, since}: the newest frame not drawn yet
      this.abort = null;
      this.stats = { frames: 0, drawn: 0, joined: 0, lastSeq: -1, lastResultSeq: -1 };
      this.timer = setInterval(() => this.flush(), 50);
    }

    open(url) {
      this.close();
      this.results.clear();
      this.stats = { frames: 0, drawn: 0, joined: 0, lastSeq: -1, lastResultSeq: -1 };
      const abort = (this.abort = new AbortController());
      this.read(url, abort.signal).catch(() => {
        if (!abort.signal.aborted) setTimeout(() => this.abort === abort && this.open(url), 1000);
      });
    }

    close() {
      if (this.abort) this.abort.abort();
      this.abort = null;
      this.waiting = null;
    }

    result(r) {
      this.results.set(r.seq, r);
      while (this.results.size > KEEP_RESULTS) this.results.delete(this.results.keys().next().value);
      this.flush();
    }

    async read(url, signal) {
      const resp = await fetch(url, { signal, cache: "no-store" });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const reader = resp.body.getReader();
      let buf = new Uint8Array(0);
      for (;;) {
        const { value, done } = await reader.read();
        if (done) throw new Error("stream ended");
        const joined = new Uint8Array(buf.length + value.length);
        joined.set(buf);
        joined.set(value, buf.length);
        buf = joined;
        for (let part = takePart(buf); part; part = takePart(buf)) {
          buf = buf.subarray(part.end);
          this.frame(part.seq, part.jpeg);
        }
      }
    }

    async frame(seq, jpeg) {
      const bitmap = await createImageBitmap(new Blob([jpeg], { type: "image/jpeg" }));
      this.stats.frames++;
      if (this.waiting && this.waiting.seq > seq) return; // an older one decoded late
      if (this.waiting) this.draw(this.waiting); // the next frame came: no more waiting
      this.waiting = { seq, bitmap, since: performance.now() };
      this.flush();
    }

    // Draw the waiting frame once its result is here or it has waited HOLD_MS.
    flush() {
      const w = this.waiting;
      if (w && (this.results.has(w.seq) || performance.now() - w.since >= HOLD_MS)) this.draw(w);
    }

    resultFor(seq) {
      if (this.results.has(seq)) return this.results.get(seq);
      let best = null;
      for (const r of this.results.values()) if (r.seq < seq && (!best || r.seq > best.seq)) best = r;
      return best;
    }

    draw(w) {
      if (this.waiting === w) this.waiting = null;
      const { canvas, ctx } = this;
      if (canvas.width !== w.bitmap.width || canvas.height !== w.bitmap.height) {
        canvas.width = w.bitmap.width;
        canvas.height = w.bitmap.height;
      }
      ctx.drawImage(w.bitmap, 0, 0);
      w.bitmap.close();
      const r = this.resultFor(w.seq);
      this.stats.drawn++;
      this.stats.lastSeq = w.seq;
      canvas.dataset.seq = w.seq;
      canvas.dataset.resultSeq = r ? r.seq : "";
      if (!r) return;
      if (r.seq === w.seq) this.stats.joined++;
      this.stats.lastResultSeq = r.seq;
      this.boxes(r);
    }

    boxes(r) {
      const { canvas, ctx } = this;
      const sx = canvas.width / r.width, sy = canvas.height / r.height;
      const lw = Math.max(3, Math.round(Math.min(canvas.width, canvas.height) / 270));
      const font = Math.max(12, Math.round(canvas.height / 40));
      ctx.font = `${font}px sans-serif`;
      ctx.textBaseline = "bottom";
      const items = r.detections.length ? r.detections : r.segments.map((s) => ({ ...s, score: s.area }));
      for (const d of items) {
        const color = PALETTE[d.class_id % PALETTE.length];
        const x = d.box.left * sx, y = d.box.top * sy;
        const w = (d.box.right - d.box.left) * sx, h = (d.box.bottom - d.box.top) * sy;
        ctx.lineWidth = lw;
        ctx.strokeStyle = color;
        ctx.strokeRect(x + lw / 2, y + lw / 2, Math.max(0, w - lw), Math.max(0, h - lw));
        const text = labelOf(d);
        const tw = ctx.measureText(text).width + 8;
        const ty = y > font + 6 ? y : y + font + 6;
        ctx.fillStyle = color;
        ctx.fillRect(x, ty - font - 6, tw, font + 6);
        ctx.fillStyle = "#000";
        ctx.fillText(text, x + 4, ty - 3);
      }
      if (!r.detections.length && r.classes.length) {
        const c = r.classes[0];
        const text = `${c.label} ${c.score.toFixed(2)}`;
        ctx.fillStyle = "rgba(0,0,0,0.6)";
        ctx.fillRect(0, 0, ctx.measureText(text).width + 16, font + 12);
        ctx.fillStyle = "#fff";
        ctx.fillText(text, 8, font + 6);
      }
    }
  }

  return { Live, takePart };
})();
