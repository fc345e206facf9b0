// The workbench page: sign in, the task list, a task open in three views with the correction
// tools, per-organ status, reviewed slices, the timer, and the submission of a revision.

import * as api from "./api.js";
import * as oidc from "./oidc.js";
import { View } from "./viewer.js";
import { gzipBlob, LabelVolume, niftiBytes, PlaneCache } from "./volume.js";

const WINDOWS = {
  abdomen: { width: 400, level: 40 },
  liver: { width: 160, level: 60 },
  bone: { width: 1800, level: 400 },
};
const PRESET_CYCLE = ["abdomen", "liver", "bone"];
const IDLE_S = 120; // the timer stops counting after this long without input
const RENEW_MS = 5 * 60 * 1000;
const STATUSES = ["accepted", "corrected", "skipped"];

const $ = (sel) => document.querySelector(sel);

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

class Workbench {
  constructor() {
    this.views = ["axial", "coronal", "sagittal"].map(
      (name) => new View(name, $(`#view-${name}`), this),
    );
    this.active = this.views[0];
    this.tool = "brush";
    this.brushRadius = 3;
    this.opacity = 0.45;
    this.overlayOn = true;
    this.window = { ...WINDOWS.abdomen, name: "abdomen" };
    this.lut = new Uint8Array(65536);
    this.colours = [];
    this.visible = [];
    this.labels = null;
    this.task = null;
    this.seconds = 0;
    this.lastInput = 0;
    this.makeLut();
    this.bind();
    setInterval(() => this.tick(), 1000);
    window.addEventListener("resize", () => this.renderAll());
  }

  // ------------------------------------------------------------------ screens
  show(screen) {
    for (const id of ["signin", "tasks", "workbench"]) $(`#${id}`).hidden = id !== screen;
    $("#sign-out").hidden = screen === "signin";
    this.screen = screen;
  }

  status(message, error = false) {
    const el = $("#status");
    el.textContent = message;
    el.className = error ? "error" : "";
  }

  async start() {
    try {
      const signedIn = await oidc.complete(); // back from the OIDC provider's login page?
      if (signedIn) api.signIn(signedIn);
    } catch (err) {
      $("#signin-error").textContent = err.message;
    }
    if (!api.token()) return this.offerSignIn();
    try {
      await this.loadTasks();
    } catch (err) {
      api.signOut();
      $("#signin-error").textContent = err.message;
      await this.offerSignIn();
    }
  }

  async offerSignIn() {
    this.show("signin");
    try {
      this.provider = await oidc.config();
    } catch (_) {
      this.provider = null;
    }
    if (this.provider) {
      const host = new URL(this.provider.issuer).host;
      $("#sso").textContent = `Sign in with ${host}`;
      $("#sso-box").hidden = false;
    }
  }

  async loadTasks() {
    const t = await api.getJson("/v1/workbench/tasks");
    $("#who").textContent = `${t.name || t.user} (${t.role})`;
    $("#sites").textContent = t.sites.length ? `sites: ${t.sites.join(", ")}` : "all sites";
    const fill = (table, rows, mine) => {
      const body = $(`${table} tbody`);
      body.replaceChildren();
      for (const x of rows) {
        const tr = document.createElement("tr");
        cell(tr, x.volume_id);
        cell(tr, x.site_id);
        cell(tr, x.model ? `${x.model} v${x.version}` : "none yet");
        if (mine) {
          cell(tr, new Date(x.expires_at).toLocaleTimeString());
          const open = document.createElement("button");
          open.textContent = "Open";
          open.type = "button";
          open.addEventListener("click", () => this.open(x.volume_id));
          cell(tr, "").appendChild(open);
        } else {
          cell(tr, x.uncertainty == null ? "-" : x.uncertainty.toFixed(3));
          cell(tr, x.leased ? "leased" : "waiting");
        }
        body.appendChild(tr);
      }
      if (!rows.length) cell(body.insertRow(), mine ? "none: take the next task" : "queue empty");
    };
    fill("#mine", t.mine, true);
    fill("#waiting", t.waiting, false);
    this.show("tasks");
  }

  async nextTask() {
    try {
      const task = await api.postJson("/v1/tasks/next");
      await this.open(task.volume_id);
    } catch (err) {
      this.status(err.code === "queue_empty" ? "No task is waiting in your sites." : err.message);
    }
  }

  // ------------------------------------------------------------------ a task
  async open(volumeId) {
    this.status(`opening ${volumeId}…`);
    const id = encodeURIComponent(volumeId);
    const meta = await api.getJson(`/v1/volumes/${id}/viewer`);
    let labels;
    let fromModel = "";
    try {
      const got = await api.getArray(`/v1/volumes/${id}/labels`, Uint8Array);
      labels = got.data;
      fromModel = got.headers.get("X-From-Model") || "";
    } catch (err) {
      if (err.code !== "no_prediction") throw err;
      labels = new Uint8Array(meta.shape[0] * meta.shape[1] * meta.shape[2]);
    }
    this.meta = meta;
    this.dims = meta.shape;
    this.fromModel = fromModel;
    this.labels = new LabelVolume(labels, this.dims);
    this.cache = new PlaneCache(volumeId);
    this.task = { volumeId, opened: Date.now() };
    this.statuses = {};
    this.reviewed = new Uint8Array(this.dims[meta.reviewed_axis]);
    this.lastMark = null;
    this.seconds = 0;
    this.activity();
    this.colours = [[0, 0, 0]];
    this.visible = [false];
    for (const o of meta.organs) {
      this.colours[o.id] = hexToRgb(o.colour);
      this.visible[o.id] = true;
    }
    this.organ = meta.organs[0].id;
    $("#volume-name").textContent = volumeId;
    $("#label-source").textContent =
      meta.labels.kind === "prediction"
        ? ` · pre-annotation ${meta.labels.model} v${meta.labels.version}`
        : " · no pre-annotation";
    $("#partial-review").checked = false;
    this.buildOrgans();
    this.show("workbench");
    for (const v of this.views) v.setVolume(meta.views[v.name]);
    this.updateReviewed();
    clearInterval(this.renewTimer);
    this.renewTimer = setInterval(() => this.renew(), RENEW_MS);
    this.status(`${volumeId}: ${meta.shape.join("×")} voxels`);
  }

  async renew() {
    if (!this.task) return;
    try {
      await api.postJson(`/v1/tasks/${encodeURIComponent(this.task.volumeId)}/renew`);
    } catch (err) {
      this.status(`lease: ${err.message}`, true);
    }
  }

  closeTask() {
    clearInterval(this.renewTimer);
    this.task = null;
    this.labels = null;
    this.loadTasks().catch((err) => this.status(err.message, true));
  }

  canEdit() {
    return this.task !== null && this.labels !== null;
  }

  buildOrgans() {
    const body = $("#organs tbody");
    body.replaceChildren();
    this.meta.organs.forEach((o, n) => {
      const tr = document.createElement("tr");
      tr.dataset.organ = o.name;
      const pick = cell(tr, "");
      const swatch = document.createElement("button");
      swatch.type = "button";
      swatch.className = "organ";
      swatch.title = `select (${n + 1})`;
      swatch.textContent = `${n + 1} ${o.name}`;
      swatch.style.setProperty("--organ", o.colour);
      swatch.addEventListener("click", () => this.selectOrgan(o.id));
      pick.appendChild(swatch);
      const vis = document.createElement("input");
      vis.type = "checkbox";
      vis.checked = true;
      vis.title = "visible (V)";
      vis.addEventListener("change", () => {
        this.visible[o.id] = vis.checked;
        this.renderAll();
      });
      cell(tr, "").appendChild(vis);
      const statusCell = cell(tr, "");
      for (const s of STATUSES) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "status";
        b.dataset.status = s;
        b.textContent = s === "accepted" ? "accept" : s === "corrected" ? "corrected" : "skip";
        b.addEventListener("click", () => this.setStatus(o.name, s));
        statusCell.appendChild(b);
      }
      body.appendChild(tr);
    });
    this.selectOrgan(this.organ);
    this.updateStatuses();
  }

  organName(id) {
    return this.meta.organs.find((o) => o.id === id).name;
  }

  organColour() {
    return this.meta ? this.meta.organs.find((o) => o.id === this.organ).colour : "#fff";
  }

  selectOrgan(id) {
    this.organ = id;
    for (const tr of document.querySelectorAll("#organs tr")) {
      tr.classList.toggle("selected", tr.dataset.organ === this.organName(id));
    }
  }

  setStatus(organ, status) {
    this.statuses[organ] = status;
    this.activity();
    this.updateStatuses();
  }

  updateStatuses() {
    for (const tr of document.querySelectorAll("#organs tr")) {
      for (const b of tr.querySelectorAll("button.status")) {
        b.classList.toggle("on", this.statuses[tr.dataset.organ] === b.dataset.status);
      }
    }
    const unset = this.meta.organs.filter((o) => !this.statuses[o.name]).length;
    $("#submit").textContent = unset ? `Submit (${unset} unset = corrected)` : "Submit";
  }

  // A hand edit makes the organ "corrected".
  edited(organ) {
    this.statuses[this.organName(organ)] = "corrected";
    this.updateStatuses();
  }

  // ------------------------------------------------------------------ views
  setActive(view) {
    this.active = view;
  }

  viewsChanged() {
    for (const v of this.views) v.draw();
  }

  renderAll() {
    if (!this.labels) return;
    for (const v of this.views) v.render();
  }

  navigateTo(view, r, c) {
    if (!view.map.inside(r, c)) return;
    const vox = [0, 0, 0];
    vox[view.view.axis] = view.index;
    vox[view.view.rows] = view.view.flip_rows ? view.map.nRows - 1 - r : r;
    vox[view.view.cols] = view.view.flip_cols ? view.map.nCols - 1 - c : c;
    for (const v of this.views) if (v !== view) v.setIndex(vox[v.view.axis]);
  }

  makeLut() {
    const { width, level } = this.window;
    const lo = level - width / 2;
    for (let i = 0; i < 65536; i++) {
      const g = ((i - 32768 - lo) / width) * 255;
      this.lut[i] = g < 0 ? 0 : g > 255 ? 255 : g;
    }
  }

  setWindow(w) {
    this.window = w;
    $("#window-preset").value = w.name;
    this.makeLut();
    this.renderAll();
  }

  preset(name) {
    if (name === "auto" && this.meta) {
      const [lo, hi] = this.meta.intensity;
      return this.setWindow({ width: Math.max(1, hi - lo), level: (lo + hi) / 2, name });
    }
    if (WINDOWS[name]) this.setWindow({ ...WINDOWS[name], name });
  }

  // ------------------------------------------------------------------ reviewed slices
  isReviewed(axis, index) {
    return (
      this.meta &&
      $("#partial-review").checked &&
      axis === this.meta.reviewed_axis &&
      this.reviewed[index] === 1
    );
  }

  reviewView() {
    return this.views.find((v) => v.view.axis === this.meta.reviewed_axis) || this.views[0];
  }

  markReviewed(range) {
    if (!this.canEdit()) return;
    $("#partial-review").checked = true;
    const i = this.reviewView().index;
    if (range && this.lastMark !== null) {
      const [a, b] = [Math.min(i, this.lastMark), Math.max(i, this.lastMark)];
      this.reviewed.fill(1, a, b + 1);
    } else {
      this.reviewed[i] = this.reviewed[i] ? 0 : 1;
    }
    this.lastMark = i;
    this.updateReviewed();
  }

  reviewedRanges() {
    if (!$("#partial-review").checked) return null;
    const out = [];
    let start = null;
    for (let i = 0; i <= this.reviewed.length; i++) {
      const on = i < this.reviewed.length && this.reviewed[i] === 1;
      if (on && start === null) start = i;
      if (!on && start !== null) {
        out.push([start, i - 1]);
        start = null;
      }
    }
    return out;
  }

  updateReviewed() {
    const ranges = this.reviewedRanges();
    $("#reviewed-summary").textContent =
      ranges === null
        ? "every slice counts as reviewed"
        : ranges.length
          ? `reviewed: ${ranges.map(([a, b]) => (a === b ? `${a}` : `${a}–${b}`)).join(", ")}`
          : "no slice marked reviewed yet";
    for (const v of this.views) v.draw();
  }

  // ------------------------------------------------------------------ timer
  activity() {
    this.lastInput = Date.now();
  }

  tick() {
    if (!this.task || document.visibilityState !== "visible") return;
    if (Date.now() - this.lastInput > IDLE_S * 1000) return;
    this.seconds += 1;
    const m = Math.floor(this.seconds / 60);
    $("#timer").textContent = `${m}:${String(this.seconds % 60).padStart(2, "0")}`;
  }

  minutes() {
    // At least a second: opening a task and submitting it is never free.
    return Math.max(1, this.seconds) / 60;
  }

  // ------------------------------------------------------------------ submit
  async submit() {
    if (!this.canEdit()) return;
    const button = $("#submit");
    button.disabled = true;
    this.status("submitting…");
    try {
      const raw = niftiBytes(this.labels.data, this.dims, this.meta.affine, this.meta.spacing);
      const { blob, name } = await gzipBlob(raw);
      const form = new FormData();
      form.append("mask", blob, name);
      form.append("minutes", this.minutes().toFixed(4));
      form.append("organs", JSON.stringify(this.statuses));
      const ranges = this.reviewedRanges();
      if (ranges !== null) form.append("reviewed_slices", JSON.stringify(ranges));
      if (this.fromModel) form.append("from_model", this.fromModel);
      const id = encodeURIComponent(this.task.volumeId);
      const rev = await api.postForm(`/v1/volumes/${id}/annotations`, form);
      this.status(`submitted revision ${rev.revision} of ${rev.volume_id}`);
      document.body.dataset.submitted = `${rev.volume_id}:${rev.revision}`;
      this.closeTask();
    } catch (err) {
      this.status(`not submitted: ${err.message}`, true);
    } finally {
      button.disabled = false;
    }
  }

  async giveBack() {
    if (!this.task) return;
    try {
      await api.del(`/v1/tasks/${encodeURIComponent(this.task.volumeId)}`);
      this.status(`gave ${this.task.volumeId} back to the queue`);
    } catch (err) {
      this.status(err.message, true);
    } finally {
      this.closeTask();
    }
  }

  // ------------------------------------------------------------------ wiring
  setTool(tool) {
    this.tool = tool;
    for (const b of document.querySelectorAll("[data-tool]")) {
      b.classList.toggle("on", b.dataset.tool === tool);
    }
    for (const v of this.views) if (v.view) v.draw();
  }

  setBrush(radius) {
    this.brushRadius = Math.max(0, Math.min(25, radius));
    $("#brush-size").value = this.brushRadius;
    $("#brush-size-value").textContent = this.brushRadius;
  }

  bind() {
    $("#signin-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      oidc.forget(); // a pasted token is not renewed
      api.signIn($("#token").value);
      $("#token").value = "";
      $("#signin-error").textContent = "";
      await this.start();
    });
    $("#sso").addEventListener("click", async () => {
      $("#signin-error").textContent = "";
      try {
        await oidc.begin(this.provider);
      } catch (err) {
        $("#signin-error").textContent = err.message;
      }
    });
    $("#sign-out").addEventListener("click", () => {
      api.signOut();
      this.task = null;
      this.offerSignIn();
    });
    $("#next-task").addEventListener("click", () => this.nextTask());
    $("#refresh-tasks").addEventListener("click", () => this.loadTasks());
    for (const b of document.querySelectorAll("[data-tool]")) {
      b.addEventListener("click", () => this.setTool(b.dataset.tool));
    }
    $("#brush-size").addEventListener("input", (e) => this.setBrush(Number(e.target.value)));
    $("#undo").addEventListener("click", () => this.undo());
    $("#redo").addEventListener("click", () => this.redo());
    $("#fill-between").addEventListener("click", () => this.fillBetween());
    $("#window-preset").addEventListener("change", (e) => this.preset(e.target.value));
    $("#opacity").addEventListener("input", (e) => {
      this.opacity = Number(e.target.value) / 100;
      this.renderAll();
    });
    $("#overlay-on").addEventListener("change", (e) => {
      this.overlayOn = e.target.checked;
      this.renderAll();
    });
    $("#accept-rest").addEventListener("click", () => this.acceptRest());
    $("#partial-review").addEventListener("change", () => this.updateReviewed());
    $("#mark-reviewed").addEventListener("click", () => this.markReviewed(false));
    $("#submit").addEventListener("click", () => this.submit());
    $("#give-back").addEventListener("click", () => this.giveBack());
    $("#close-task").addEventListener("click", () => this.closeTask());
    $("#help-button").addEventListener("click", () => this.toggleHelp());
    document.addEventListener("keydown", (e) => this.key(e));
    document.addEventListener("pointerdown", () => this.activity());
    this.setTool("brush");
  }

  undo() {
    if (this.labels && this.labels.undo()) this.renderAll();
  }

  redo() {
    if (this.labels && this.labels.redo()) this.renderAll();
  }

  fillBetween() {
    if (!this.canEdit()) return;
    const n = this.labels.fillBetween(this.active.view, this.organ);
    if (n) this.edited(this.organ);
    this.status(
      n
        ? `filled ${this.organName(this.organ)} on ${n} ${this.active.name} slices`
        : `draw ${this.organName(this.organ)} on two ${this.active.name} slices with a gap first`,
    );
    this.renderAll();
  }

  acceptRest() {
    for (const o of this.meta.organs) if (!this.statuses[o.name]) this.statuses[o.name] = "accepted";
    this.updateStatuses();
  }

  toggleHelp(force) {
    const help = $("#help");
    help.hidden = force === undefined ? !help.hidden : !force;
  }

  key(e) {
    const target = e.target;
    if (target instanceof HTMLInputElement && target.type !== "checkbox" && target.type !== "range")
      return;
    if (target instanceof HTMLSelectElement) return;
    this.activity();
    const k = e.key;
    if (k === "?") return this.toggleHelp();
    if (k === "Escape") return this.toggleHelp(false);
    if (this.screen === "tasks" && (k === "n" || k === "N")) return this.nextTask();
    if (this.screen !== "workbench") return;
    const ctrl = e.ctrlKey || e.metaKey;
    const view = this.active;
    const handled = () => e.preventDefault();
    if (ctrl && (k === "z" || k === "Z")) {
      handled();
      return e.shiftKey ? this.redo() : this.undo();
    }
    if (ctrl && (k === "y" || k === "Y")) return handled(), this.redo();
    if (ctrl && k === "Enter") return handled(), this.submit();
    if (ctrl || e.altKey) return;
    if (k === "ArrowUp" || k === "ArrowDown") {
      handled();
      return view.setIndex(view.index + (k === "ArrowUp" ? 1 : -1));
    }
    if (k === "PageUp" || k === "PageDown") {
      handled();
      return view.setIndex(view.index + (k === "PageUp" ? 10 : -10));
    }
    if (/^[1-9]$/.test(k)) {
      const organ = this.meta.organs[Number(k) - 1];
      if (organ) this.selectOrgan(organ.id);
      return;
    }
    const name = this.organName(this.organ);
    switch (k.toLowerCase()) {
      case "b":
        return this.setTool("brush");
      case "e":
        return this.setTool("eraser");
      case "p":
        return this.setTool("pan");
      case "[":
        return this.setBrush(this.brushRadius - 1);
      case "]":
        return this.setBrush(this.brushRadius + 1);
      case "i":
        return this.fillBetween();
      case "a":
        return e.shiftKey ? this.acceptRest() : this.setStatus(name, "accepted");
      case "c":
        return this.setStatus(name, "corrected");
      case "s":
        return this.setStatus(name, "skipped");
      case "v": {
        this.visible[this.organ] = !this.visible[this.organ];
        const box = document.querySelector(`#organs tr[data-organ="${name}"] input`);
        if (box) box.checked = this.visible[this.organ];
        return this.renderAll();
      }
      case "h":
        $("#overlay-on").checked = this.overlayOn = !this.overlayOn;
        return this.renderAll();
      case "w": {
        const at = PRESET_CYCLE.indexOf(this.window.name);
        return this.preset(PRESET_CYCLE[(at + 1) % PRESET_CYCLE.length]);
      }
      case "r":
        return this.markReviewed(e.shiftKey);
      default:
    }
  }
}

const app = new Workbench();
window.ctloopWorkbench = app; // for tests and the browser console
app.start();
