// Sign-in at the hospital's OIDC provider (Keycloak or any other): the authorization code flow
// with PKCE (RFC 7636) for a public client, as ingest names it (GET /v1/workbench/config).
// Tokens stay in this tab (sessionStorage); an expired access token is renewed with the refresh
// token when the API answers 401.

const SESSION_KEY = "ctloop.oidc"; // {token_endpoint, client_id, refresh_token}
const PENDING_KEY = "ctloop.oidc.pending"; // the request in flight: state, verifier, ...

function base64url(bytes) {
  let text = "";
  for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString(bytes) {
  return base64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

async function discover(issuer) {
  const url = `${issuer.replace(/\/$/, "")}/.well-known/openid-configuration`;
  let response;
  try {
    response = await fetch(url, { cache: "no-store" });
  } catch (err) {
    throw new Error(`the sign-in service ${issuer} cannot be reached (${err.message})`);
  }
  if (!response.ok) throw new Error(`the sign-in service ${issuer} answered HTTP ${response.status}`);
  return response.json();
}

async function tokenRequest(endpoint, params) {
  const response = await fetch(endpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams(params),
    cache: "no-store",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok || !body.access_token) {
    throw new Error(`sign-in failed: ${body.error_description || body.error || `HTTP ${response.status}`}`);
  }
  return body;
}

// The provider this page signs in with, or null (then only pasted tokens).
export async function config() {
  const response = await fetch("/v1/workbench/config", { cache: "no-store" });
  if (!response.ok) return null;
  return (await response.json()).oidc;
}

// Leave for the provider's login page; it sends the browser back to /ui/ with a code.
export async function begin(provider) {
  const meta = await discover(provider.issuer);
  const verifier = randomString(48);
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  const state = randomString(16);
  const redirect = `${location.origin}/ui/`;
  sessionStorage.setItem(
    PENDING_KEY,
    JSON.stringify({
      state,
      verifier,
      redirect,
      client_id: provider.client_id,
      token_endpoint: meta.token_endpoint,
    }),
  );
  const query = new URLSearchParams({
    response_type: "code",
    client_id: provider.client_id,
    redirect_uri: redirect,
    scope: provider.scope,
    state,
    code_challenge: base64url(digest),
    code_challenge_method: "S256",
  });
  location.assign(`${meta.authorization_endpoint}?${query}`);
}

// Back from the provider (?code=...&state=...): the access token, or null when this page load
// is not a sign-in answer. The code is used once and taken out of the address bar and history.
export async function complete() {
  const query = new URLSearchParams(location.search);
  if (!query.has("code") && !query.has("error")) return null;
  history.replaceState(null, "", location.pathname);
  const pending = JSON.parse(sessionStorage.getItem(PENDING_KEY) || "null");
  sessionStorage.removeItem(PENDING_KEY);
  if (query.has("error")) {
    throw new Error(`sign-in refused: ${query.get("error_description") || query.get("error")}`);
  }
  if (!pending || query.get("state") !== pending.state) {
    throw new Error("that sign-in answer was not requested by this tab: sign in again");
  }
  const tokens = await tokenRequest(pending.token_endpoint, {
    grant_type: "authorization_code",
    code: query.get("code"),
    redirect_uri: pending.redirect,
    client_id: pending.client_id,
    code_verifier: pending.verifier,
  });
  remember(pending.token_endpoint, pending.client_id, tokens);
  return tokens.access_token;
}

function remember(tokenEndpoint, clientId, tokens) {
  sessionStorage.setItem(
    SESSION_KEY,
    JSON.stringify({
      token_endpoint: tokenEndpoint,
      client_id: clientId,
      refresh_token: tokens.refresh_token || null,
    }),
  );
}

// A new access token from the refresh token (null: not signed in over OIDC, or it expired).
export async function refresh() {
  const session = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
  if (!session || !session.refresh_token) return null;
  try {
    const tokens = await tokenRequest(session.token_endpoint, {
      grant_type: "refresh_token",
      refresh_token: session.refresh_token,
      client_id: session.client_id,
    });
    remember(session.token_endpoint, session.client_id, tokens);
    return tokens.access_token;
  } catch (_) {
    sessionStorage.removeItem(SESSION_KEY);
    return null;
  }
}

export function forget() {
  sessionStorage.removeItem(SESSION_KEY);
  sessionStorage.removeItem(PENDING_KEY);
}
