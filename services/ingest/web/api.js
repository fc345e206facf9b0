// The ctloop API from the page: the bearer token (kept for this tab only) and JSON / binary
// requests to the same origin. Standard fetch only, so Chromium and Firefox behave alike.

import * as oidc from "./oidc.js";

const TOKEN_KEY = "ctloop.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value.trim());
}

export function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  oidc.forget();
}

async function request(method, path, body) {
  const headers = { Authorization: `Bearer ${token()}` };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let response = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  if (response.status === 401) {
    // An OIDC access token lives minutes: renew it once and send the request again.
    const renewed = await oidc.refresh();
    if (renewed) {
      signIn(renewed);
      headers.Authorization = `Bearer ${renewed}`;
      response = await fetch(path, { method, headers, body: payload, cache: "no-store" });
    }
  }
  if (!response.ok) {
    let code = "error";
    let message = `${method} ${path}: HTTP ${response.status}`;
    try {
      const err = await response.json();
      code = err.code || code;
      message = err.message || message;
    } catch (_) {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, code, message);
  }
  return response;
}

export async function getJson(path) {
  return (await request("GET", path)).json();
}

export async function postJson(path, body) {
  const response = await request("POST", path, body === undefined ? {} : body);
  return response.status === 204 ? null : response.json();
}

export async function del(path) {
  await request("DELETE", path);
}

export async function postForm(path, form) {
  return (await request("POST", path, form)).json();
}

// A binary array answer: the body (gzip is undone by the browser), its X-Shape and headers.
export async function getArray(path, ArrayType) {
  const response = await request("GET", path);
  const buffer = await response.arrayBuffer();
  const shape = (response.headers.get("X-Shape") || "").split(",").map(Number);
  return { data: new ArrayType(buffer), shape, headers: response.headers };
}
