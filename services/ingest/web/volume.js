// The data side of the viewer: how a view's screen pixels map onto voxels, the label volume
// being edited (strokes, undo / redo, fill between slices), the CT planes fetched so far, and
// the NIfTI-1 file a submission sends. Voxel order everywhere: first axis fastest (NIfTI's).

import { getArray } from "./api.js";

// Where display pixel (row, col) of plane `index` of `view` lies, as linear offsets into a
// volume of `dims` (label volume) and into the plane the server sends (its two axes in order).
export class PlaneMap {
  constructor(view, dims, index) {
    this.view = view;
    this.index = index;
    this.nRows = dims[view.rows];
    this.nCols = dims[view.cols];
    const volStride = [1, dims[0], dims[0] * dims[1]];
    const [p, q] = [0, 1, 2].filter((a) => a !== view.axis);
    const planeStride = { [p]: 1, [q]: dims[p] };
    const walk = (stride) => {
      let start = view.axis in stride ? index * stride[view.axis] : 0;
      let dr = stride[view.rows];
      let dc = stride[view.cols];
      if (view.flip_rows) {
        start += (this.nRows - 1) * dr;
        dr = -dr;
      }
      if (view.flip_cols) {
        start += (this.nCols - 1) * dc;
        dc = -dc;
      }
      return { start, dr, dc };
    };
    this.vol = walk(volStride);
    this.plane = walk(planeStride);
  }

  voxel(r, c) {
    return this.vol.start + r * this.vol.dr + c * this.vol.dc;
  }

  inside(r, c) {
    return r >= 0 && c >= 0 && r < this.nRows && c < this.nCols;
  }
}

// Offsets (dr, dc) of a brush of `radius` voxels, round on screen when voxels are not square.
export function brushOffsets(radius, rowMm, colMm) {
  const m = Math.min(rowMm, colMm);
  const ry = rowMm / m;
  const rx = colMm / m;
  const out = [];
  const R = Math.ceil(radius);
  for (let dr = -R; dr <= R; dr++) {
    for (let dc = -R; dc <= R; dc++) {
      if ((dr * ry) ** 2 + (dc * rx) ** 2 <= radius * radius) out.push([dr, dc]);
    }
  }
  return out;
}

export class LabelVolume {
  constructor(data, dims) {
    this.data = data;
    this.dims = dims;
    this.undoStack = [];
    this.redoStack = [];
    this.stroke = null;
    this.edited = new Set(); // organ ids changed by hand
    this.keySlices = new Map(); // `${organ}:${axis}` -> Set of planes drawn on
    this.onChange = () => {};
  }

  beginStroke(organ, axis, index) {
    this.stroke = { changes: new Map(), organ, axis, index };
  }

  set(idx, value) {
    const old = this.data[idx];
    if (old === value) return;
    if (!this.stroke.changes.has(idx)) this.stroke.changes.set(idx, old);
    this.data[idx] = value;
  }

  // Brush: the disc becomes `organ`. Eraser: the disc's voxels of `organ` become background.
  stamp(map, r, c, offsets, organ, erase) {
    for (const [dr, dc] of offsets) {
      const rr = r + dr;
      const cc = c + dc;
      if (!map.inside(rr, cc)) continue;
      const idx = map.voxel(rr, cc);
      if (erase) {
        if (this.data[idx] === organ) this.set(idx, 0);
      } else {
        this.set(idx, organ);
      }
    }
  }

  // Stamps along the segment from (r0, c0) to (r1, c1), so a fast stroke leaves no gaps.
  line(map, r0, c0, r1, c1, offsets, organ, erase) {
    const steps = Math.max(1, Math.ceil(Math.max(Math.abs(r1 - r0), Math.abs(c1 - c0))));
    for (let s = 0; s <= steps; s++) {
      const r = Math.round(r0 + ((r1 - r0) * s) / steps);
      const c = Math.round(c0 + ((c1 - c0) * s) / steps);
      this.stamp(map, r, c, offsets, organ, erase);
    }
  }

  endStroke() {
    const stroke = this.stroke;
    this.stroke = null;
    if (!stroke || stroke.changes.size === 0) return false;
    const n = stroke.changes.size;
    const entry = {
      idx: new Int32Array(n),
      old: new Uint8Array(n),
      neu: new Uint8Array(n),
      organ: stroke.organ,
    };
    let i = 0;
    for (const [idx, old] of stroke.changes) {
      entry.idx[i] = idx;
      entry.old[i] = old;
      entry.neu[i] = this.data[idx];
      i++;
    }
    this.undoStack.push(entry);
    this.redoStack = [];
    this.edited.add(stroke.organ);
    if (stroke.axis !== undefined) {
      const key = `${stroke.organ}:${stroke.axis}`;
      if (!this.keySlices.has(key)) this.keySlices.set(key, new Set());
      this.keySlices.get(key).add(stroke.index);
    }
    this.onChange();
    return true;
  }

  apply(entry, values) {
    for (let i = 0; i < entry.idx.length; i++) this.data[entry.idx[i]] = values[i];
    this.onChange();
  }

  undo() {
    const entry = this.undoStack.pop();
    if (!entry) return false;
    this.apply(entry, entry.old);
    this.redoStack.push(entry);
    return true;
  }

  redo() {
    const entry = this.redoStack.pop();
    if (!entry) return false;
    this.apply(entry, entry.neu);
    this.undoStack.push(entry);
    return true;
  }

  // Fill between slices: every plane between two planes the annotator drew `organ` on (along
  // the view's axis) gets the shape interpolated between them (signed distance maps blended
  // linearly: shape-based interpolation). Other organs are never overwritten. One undo step.
  fillBetween(view, organ) {
    const drawn = [...(this.keySlices.get(`${organ}:${view.axis}`) || [])].sort((a, b) => a - b);
    let filled = 0;
    this.beginStroke(organ);
    for (let k = 0; k + 1 < drawn.length; k++) {
      const [a, b] = [drawn[k], drawn[k + 1]];
      if (b - a < 2) continue;
      const ma = new PlaneMap(view, this.dims, a);
      const mb = new PlaneMap(view, this.dims, b);
      const da = signedDistance(this.planeMask(ma, organ), ma.nRows, ma.nCols);
      const db = signedDistance(this.planeMask(mb, organ), mb.nRows, mb.nCols);
      for (let s = a + 1; s < b; s++) {
        const w = (s - a) / (b - a);
        const m = new PlaneMap(view, this.dims, s);
        for (let r = 0; r < m.nRows; r++) {
          for (let c = 0; c < m.nCols; c++) {
            const i = r * m.nCols + c;
            const inside = (1 - w) * da[i] + w * db[i] <= 0;
            const idx = m.voxel(r, c);
            const v = this.data[idx];
            if (inside && v === 0) this.set(idx, organ);
            else if (!inside && v === organ) this.set(idx, 0);
          }
        }
        filled++;
      }
    }
    this.endStroke();
    return filled;
  }

  planeMask(map, organ) {
    const mask = new Uint8Array(map.nRows * map.nCols);
    for (let r = 0; r < map.nRows; r++) {
      for (let c = 0; c < map.nCols; c++) {
        mask[r * map.nCols + c] = this.data[map.voxel(r, c)] === organ ? 1 : 0;
      }
    }
    return mask;
  }
}

// Exact squared Euclidean distance transform in 1-D (Felzenszwalb & Huttenlocher's lower
// envelope of parabolas), applied along rows then columns.
function edt1d(f, n) {
  const d = new Float64Array(n);
  const v = new Int32Array(n);
  const z = new Float64Array(n + 1);
  let k = 0;
  v[0] = 0;
  z[0] = -Infinity;
  z[1] = Infinity;
  for (let q = 1; q < n; q++) {
    let s;
    for (;;) {
      const p = v[k];
      s = (f[q] + q * q - (f[p] + p * p)) / (2 * q - 2 * p);
      if (s <= z[k] && k > 0) k--;
      else break;
    }
    if (s <= z[k]) {
      v[0] = q;
      z[0] = -Infinity;
      z[1] = Infinity;
      k = 0;
      continue;
    }
    k++;
    v[k] = q;
    z[k] = s;
    z[k + 1] = Infinity;
  }
  k = 0;
  for (let q = 0; q < n; q++) {
    while (z[k + 1] < q) k++;
    d[q] = (q - v[k]) ** 2 + f[v[k]];
  }
  return d;
}

function distanceTo(mask, rows, cols, target) {
  const BIG = 1e12;
  const g = new Float64Array(rows * cols);
  for (let i = 0; i < g.length; i++) g[i] = mask[i] === target ? 0 : BIG;
  const row = new Float64Array(cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) row[c] = g[r * cols + c];
    const d = edt1d(row, cols);
    for (let c = 0; c < cols; c++) g[r * cols + c] = d[c];
  }
  const col = new Float64Array(rows);
  for (let c = 0; c < cols; c++) {
    for (let r = 0; r < rows; r++) col[r] = g[r * cols + c];
    const d = edt1d(col, rows);
    for (let r = 0; r < rows; r++) g[r * cols + c] = Math.sqrt(d[r]);
  }
  return g;
}

// Negative inside the shape, positive outside; an empty plane is far outside everywhere.
export function signedDistance(mask, rows, cols) {
  const toInside = distanceTo(mask, rows, cols, 1);
  const toOutside = distanceTo(mask, rows, cols, 0);
  const out = new Float64Array(mask.length);
  for (let i = 0; i < out.length; i++) {
    out[i] = mask[i] ? 0.5 - toOutside[i] : Math.min(toInside[i], 1e6) - 0.5;
  }
  return out;
}

// CT planes fetched so far, by axis and index, within a memory budget (least recent dropped),
// with the requests in flight shared so a plane is fetched once.
export class PlaneCache {
  constructor(volumeId, budgetBytes = 256 * 1024 * 1024) {
    this.volumeId = volumeId;
    this.budget = budgetBytes;
    this.bytes = 0;
    this.planes = new Map();
    this.pending = new Map();
  }

  peek(axis, index) {
    const key = `${axis}/${index}`;
    const hit = this.planes.get(key);
    if (hit) {
      this.planes.delete(key);
      this.planes.set(key, hit);
    }
    return hit;
  }

  get(axis, index) {
    const key = `${axis}/${index}`;
    const hit = this.peek(axis, index);
    if (hit) return Promise.resolve(hit);
    if (!this.pending.has(key)) {
      const url = `/v1/volumes/${encodeURIComponent(this.volumeId)}/slices/${axis}/${index}`;
      const p = getArray(url, Int16Array)
        .then(({ data }) => {
          this.planes.set(key, data);
          this.bytes += data.byteLength;
          for (const [k, v] of this.planes) {
            if (this.bytes <= this.budget) break;
            this.planes.delete(k);
            this.bytes -= v.byteLength;
          }
          return data;
        })
        .finally(() => this.pending.delete(key));
      this.pending.set(key, p);
    }
    return this.pending.get(key);
  }
}

// A NIfTI-1 single file (header + uint8 voxels, first axis fastest) on the volume's grid; the
// affine goes into the sform, which is what nibabel and every reader use when its code is set.
export function niftiBytes(labels, dims, affine, spacing) {
  const header = new ArrayBuffer(352);
  const h = new DataView(header);
  h.setInt32(0, 348, true); // sizeof_hdr
  const dim = [3, dims[0], dims[1], dims[2], 1, 1, 1, 1];
  dim.forEach((v, i) => h.setInt16(40 + 2 * i, v, true));
  h.setInt16(70, 2, true); // datatype: unsigned char
  h.setInt16(72, 8, true); // bitpix
  const pixdim = [1, spacing[0], spacing[1], spacing[2], 0, 0, 0, 0];
  pixdim.forEach((v, i) => h.setFloat32(76 + 4 * i, v, true));
  h.setFloat32(108, 352, true); // vox_offset
  h.setFloat32(112, 1, true); // scl_slope
  h.setUint8(123, 2); // xyzt_units: mm
  h.setInt16(252, 0, true); // qform_code
  h.setInt16(254, 2, true); // sform_code: aligned
  for (let row = 0; row < 3; row++) {
    for (let col = 0; col < 4; col++) h.setFloat32(280 + 16 * row + 4 * col, affine[row][col], true);
  }
  [0x6e, 0x2b, 0x31, 0].forEach((b, i) => h.setUint8(344 + i, b)); // "n+1\0"
  return new Blob([header, labels], { type: "application/octet-stream" });
}

export async function gzipBlob(blob) {
  if (typeof CompressionStream === "undefined") return { blob, name: "mask.nii" };
  const stream = blob.stream().pipeThrough(new CompressionStream("gzip"));
  return { blob: await new Response(stream).blob(), name: "mask.nii.gz" };
}
