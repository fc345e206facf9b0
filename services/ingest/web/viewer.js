// One view (axial, coronal or sagittal) on a canvas: the CT plane through a window/level
// lookup table, the labels as a coloured overlay, the brush and eraser, scrolling with
// prefetch. Everything it draws is first composed at one screen pixel per voxel on an
// offscreen canvas, then scaled to the view with the voxels' true aspect.

import { brushOffsets, PlaneMap } from "./volume.js";

const PREFETCH = 6; // planes fetched ahead in the direction of scrolling (and 2 behind)

export class View {
  constructor(name, element, app) {
    this.name = name;
    this.app = app;
    this.element = element;
    this.canvas = element.querySelector("canvas");
    this.caption = element.querySelector(".caption");
    this.ctx = this.canvas.getContext("2d");
    this.base = document.createElement("canvas");
    this.zoom = 1;
    this.panX = 0;
    this.panY = 0;
    this.index = 0;
    this.direction = 1;
    this.pointer = null; // last pointer position, in voxels of this view
    this.drag = null;
    this.bind();
  }

  setVolume(view) {
    this.view = view;
    this.index = Math.floor(view.size / 2);
    this.zoom = 1;
    this.panX = 0;
    this.panY = 0;
    this.map = new PlaneMap(view, this.app.dims, this.index);
    this.base.width = this.map.nCols;
    this.base.height = this.map.nRows;
    this.baseCtx = this.base.getContext("2d");
    this.pixels = this.baseCtx.createImageData(this.map.nCols, this.map.nRows);
    this.render();
  }

  setIndex(index) {
    if (!this.view) return;
    const clamped = Math.max(0, Math.min(this.view.size - 1, index));
    if (clamped === this.index) return;
    this.direction = clamped > this.index ? 1 : -1;
    this.index = clamped;
    this.map = new PlaneMap(this.view, this.app.dims, this.index);
    this.app.viewsChanged(this);
    this.render();
  }

  prefetch() {
    const cache = this.app.cache;
    for (let k = 1; k <= PREFETCH; k++) {
      const i = this.index + k * this.direction;
      if (i >= 0 && i < this.view.size) cache.get(this.view.axis, i).catch(() => {});
    }
    for (let k = 1; k <= 2; k++) {
      const i = this.index - k * this.direction;
      if (i >= 0 && i < this.view.size) cache.get(this.view.axis, i).catch(() => {});
    }
  }

  // ------------------------------------------------------------------ drawing
  render() {
    if (!this.view) return;
    const plane = this.app.cache.peek(this.view.axis, this.index);
    if (!plane) {
      const wanted = this.index;
      this.app.cache
        .get(this.view.axis, wanted)
        .then(() => wanted === this.index && this.render())
        .catch((err) => this.app.status(`plane ${wanted}: ${err.message}`, true));
    }
    this.compose(plane);
    this.draw();
    this.prefetch();
  }

  compose(plane) {
    const { map, app } = this;
    const out = this.pixels.data;
    const lut = app.lut;
    const labels = app.labels ? app.labels.data : null;
    const colours = app.colours;
    const visible = app.visible;
    const alpha = app.overlayOn ? app.opacity : 0;
    const { start: p0, dr: pr, dc: pc } = map.plane;
    const { start: l0, dr: lr, dc: lc } = map.vol;
    let o = 0;
    for (let r = 0; r < map.nRows; r++) {
      let pi = p0 + r * pr;
      let li = l0 + r * lr;
      for (let c = 0; c < map.nCols; c++) {
        const g = plane ? lut[plane[pi] + 32768] : 24;
        let red = g;
        let green = g;
        let blue = g;
        const k = labels ? labels[li] : 0;
        if (k && alpha > 0 && visible[k]) {
          const col = colours[k];
          red = g + (col[0] - g) * alpha;
          green = g + (col[1] - g) * alpha;
          blue = g + (col[2] - g) * alpha;
        }
        out[o] = red;
        out[o + 1] = green;
        out[o + 2] = blue;
        out[o + 3] = 255;
        o += 4;
        pi += pc;
        li += lc;
      }
    }
    this.baseCtx.putImageData(this.pixels, 0, 0);
  }

  // Screen geometry: canvas pixels per voxel along rows and columns, and the image's origin.
  geometry() {
    const dpr = window.devicePixelRatio || 1;
    const w = this.canvas.clientWidth;
    const h = this.canvas.clientHeight;
    if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(h * dpr)) {
      this.canvas.width = Math.round(w * dpr);
      this.canvas.height = Math.round(h * dpr);
    }
    const mmW = this.map.nCols * this.view.col_mm;
    const mmH = this.map.nRows * this.view.row_mm;
    const scale = Math.min(this.canvas.width / mmW, this.canvas.height / mmH) * this.zoom;
    const sx = this.view.col_mm * scale;
    const sy = this.view.row_mm * scale;
    const ox = (this.canvas.width - mmW * scale) / 2 + this.panX * dpr;
    const oy = (this.canvas.height - mmH * scale) / 2 + this.panY * dpr;
    return { dpr, sx, sy, ox, oy };
  }

  draw() {
    const { ctx } = this;
    const g = this.geometry();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(this.base, g.ox, g.oy, this.map.nCols * g.sx, this.map.nRows * g.sy);
    this.drawCrosshair(g);
    this.drawBrush(g);
    const reviewed = this.app.isReviewed(this.view.axis, this.index) ? " · reviewed" : "";
    this.caption.textContent = `${this.name} ${this.index + 1}/${this.view.size}${reviewed}`;
  }

  drawCrosshair(g) {
    const { ctx } = this;
    ctx.strokeStyle = "rgba(255, 214, 0, 0.35)";
    ctx.lineWidth = 1;
    for (const other of this.app.views) {
      if (other === this || !other.view) continue;
      const at = (n, flip) => (flip ? n - 1 - other.index : other.index) + 0.5;
      ctx.beginPath();
      if (other.view.axis === this.view.rows) {
        const y = g.oy + at(this.map.nRows, this.view.flip_rows) * g.sy;
        ctx.moveTo(g.ox, y);
        ctx.lineTo(g.ox + this.map.nCols * g.sx, y);
      } else if (other.view.axis === this.view.cols) {
        const x = g.ox + at(this.map.nCols, this.view.flip_cols) * g.sx;
        ctx.moveTo(x, g.oy);
        ctx.lineTo(x, g.oy + this.map.nRows * g.sy);
      }
      ctx.stroke();
    }
  }

  drawBrush(g) {
    if (!this.pointer || !["brush", "eraser"].includes(this.app.tool)) return;
    const { ctx } = this;
    const rad = this.app.brushRadius + 0.5;
    const [r, c] = this.pointer;
    ctx.beginPath();
    ctx.ellipse(
      g.ox + (c + 0.5) * g.sx,
      g.oy + (r + 0.5) * g.sy,
      (rad * g.sx * Math.min(this.view.row_mm, this.view.col_mm)) / this.view.col_mm,
      (rad * g.sy * Math.min(this.view.row_mm, this.view.col_mm)) / this.view.row_mm,
      0,
      0,
      2 * Math.PI,
    );
    ctx.strokeStyle = this.app.tool === "eraser" ? "#fff" : this.app.organColour();
    ctx.lineWidth = 1.5;
    ctx.stroke();
  }

  // ------------------------------------------------------------------ pointer and wheel
  voxelAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    const g = this.geometry();
    const x = (event.clientX - rect.left) * g.dpr;
    const y = (event.clientY - rect.top) * g.dpr;
    return [Math.floor((y - g.oy) / g.sy), Math.floor((x - g.ox) / g.sx)];
  }

  // Where the centre of display voxel (row, col) is on the page (used by tests and help).
  clientPoint(row, col) {
    const rect = this.canvas.getBoundingClientRect();
    const g = this.geometry();
    return {
      x: rect.left + (g.ox + (col + 0.5) * g.sx) / g.dpr,
      y: rect.top + (g.oy + (row + 0.5) * g.sy) / g.dpr,
    };
  }

  bind() {
    const c = this.canvas;
    c.addEventListener("contextmenu", (e) => e.preventDefault());
    c.addEventListener("pointerdown", (e) => this.down(e));
    c.addEventListener("pointermove", (e) => this.move(e));
    c.addEventListener("pointerup", (e) => this.up(e));
    c.addEventListener("pointercancel", (e) => this.up(e));
    c.addEventListener("pointerleave", () => {
      this.pointer = null;
      if (this.view) this.draw();
    });
    c.addEventListener("pointerenter", () => this.app.setActive(this));
    c.addEventListener(
      "wheel",
      (e) => {
        if (!this.view) return;
        e.preventDefault();
        const step = Math.sign(e.deltaY);
        if (e.ctrlKey || e.metaKey) {
          this.zoom = Math.max(0.5, Math.min(16, this.zoom * (step > 0 ? 1 / 1.15 : 1.15)));
          this.draw();
        } else {
          this.setIndex(this.index + step);
        }
      },
      { passive: false },
    );
  }

  down(e) {
    if (!this.view) return;
    this.app.activity();
    this.canvas.setPointerCapture(e.pointerId);
    const [r, c] = this.voxelAt(e);
    if (e.button === 2) {
      this.drag = { kind: "window", x: e.clientX, y: e.clientY, start: { ...this.app.window } };
    } else if (e.button === 1 || (e.button === 0 && this.app.tool === "pan")) {
      this.drag = { kind: "pan", x: e.clientX, y: e.clientY, px: this.panX, py: this.panY };
    } else if (e.button === 0 && e.shiftKey) {
      this.app.navigateTo(this, r, c);
    } else if (e.button === 0 && ["brush", "eraser"].includes(this.app.tool)) {
      if (!this.app.canEdit()) return;
      const offsets = brushOffsets(this.app.brushRadius, this.view.row_mm, this.view.col_mm);
      const organ = this.app.organ;
      this.app.labels.beginStroke(organ, this.view.axis, this.index);
      this.app.labels.stamp(this.map, r, c, offsets, organ, this.app.tool === "eraser");
      this.drag = { kind: "paint", r, c, offsets, organ };
      this.render();
    }
  }

  move(e) {
    if (!this.view) return;
    const [r, c] = this.voxelAt(e);
    this.pointer = [r, c];
    const d = this.drag;
    if (d && d.kind === "paint") {
      const erase = this.app.tool === "eraser";
      this.app.labels.line(this.map, d.r, d.c, r, c, d.offsets, d.organ, erase);
      d.r = r;
      d.c = c;
      this.app.activity();
      this.compose(this.app.cache.peek(this.view.axis, this.index));
    } else if (d && d.kind === "window") {
      const w = Math.max(1, d.start.width + (e.clientX - d.x) * 4);
      const l = d.start.level - (e.clientY - d.y) * 2;
      this.app.setWindow({ width: w, level: l, name: "custom" });
      return;
    } else if (d && d.kind === "pan") {
      this.panX = d.px + (e.clientX - d.x);
      this.panY = d.py + (e.clientY - d.y);
    }
    this.draw();
  }

  up(e) {
    const d = this.drag;
    this.drag = null;
    if (this.canvas.hasPointerCapture(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
    if (d && d.kind === "paint") {
      if (this.app.labels.endStroke()) this.app.edited(d.organ);
      this.app.renderAll();
    }
  }
}
