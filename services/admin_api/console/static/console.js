// The operator console: one page, hash routes (#/profiles, #/devices, ...), calling the admin API's own /api
// routes with the session cookie and, on every change, the session's CSRF token (X-CSRF-Token).
// No framework, no build step; every value shown goes through textContent (never innerHTML).
"use strict";

const STRATEGIES = {
  ALLOW_CREATE_NEW_DEVICES: "Allow to create new devices",
  CHECK_PRE_PROVISIONED_DEVICES: "Check for pre-provisioned devices",
  X509_CERTIFICATE_CHAIN: "X.509 certificates chain",
  DISABLED: "Disabled",
};
const CREDENTIALS_TYPES = ["ACCESS_TOKEN", "MQTT_BASIC", "X509_CERTIFICATE"];
const OUTCOMES = ["SUCCESS", "NOT_FOUND", "FAILURE", "TIMED_OUT"];
const PAGE_SIZE = 20;

let session = null; // {username, role, csrfToken}
let leavePage = null; // what the current page closes when another is shown (the live stream)

// --- helpers -------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function kids(children) {
  return children.flat().filter((c) => c !== null && c !== undefined && c !== false);
}
const replace = (el, ...children) => el.replaceChildren(...kids(children));
const add = (el, ...children) => el.append(...kids(children));

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body, contentType) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = session ? session.csrfToken : "";
  let payload;
  if (body !== undefined) {
    if (contentType) { headers["Content-Type"] = contentType; payload = body; }
    else { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  } catch (e) {
    throw new ApiError(0, "The admin API cannot be reached");
  }
  if (response.status === 401) {
    window.location.assign("/console/login");
    throw new ApiError(401, "Not logged in");
  }
  if (response.status === 204) return null;
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new ApiError(response.status, (data && data.message) || `HTTP ${response.status}`);
  return data;
}

function flash(message, kind) {
  const el = document.getElementById("flash");
  el.textContent = message;
  el.className = kind || "ok";
  el.hidden = !message;
  if (message) el.dataset.keep = "1";
}

function shown(promise) {
  return promise.catch((e) => { flash(e.message, "error"); throw e; });
}

const canOperate = () => session.role === "operator" || session.role === "admin";
const isAdmin = () => session.role === "admin";
const time = (ms) => (ms ? new Date(ms).toLocaleString() : "");
const main = () => document.getElementById("main");
const qs = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined)).toString();

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) { // no clipboard API (a non-secure page): select-and-copy
    const area = h("textarea", {}, text);
    document.body.append(area); area.select(); document.execCommand("copy"); area.remove();
  }
  if (button) { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1500); }
}

function secretLine(label, value, id) {
  const button = h("button", { type: "button", "data-copy": id, onclick: () => copy(value, button) }, "Copy");
  return h("div", { class: "secret" }, h("strong", {}, label), h("code", { id }, value), button);
}

function select(id, options, value) {
  return h("select", { id }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
}

async function allProfiles() {
  const page = await api("GET", "/api/device-profiles?pageSize=1000");
  return page.data;
}

function pager(page, hasNext, total, go) {
  return h("div", { class: "pager" },
    h("button", { type: "button", disabled: page === 0, onclick: () => go(page - 1) }, "Previous"),
    h("span", { id: "page-info" }, `page ${page + 1} · ${total} in all`),
    h("button", { type: "button", disabled: !hasNext, onclick: () => go(page + 1) }, "Next"));
}

// --- device profiles --------------------------------------------------------------------------------

async function profilesPage() {
  const root = main();
  replace(root, h("h1", {}, "Device profiles"));
  if (isAdmin()) add(root, h("div", { class: "toolbar" }, h("a", { href: "#/profiles/new" }, h("button", { type: "button", class: "primary", id: "add-profile" }, "+ Add profile"))));
  const profiles = await shown(allProfiles());
  add(root, h("table", { id: "profiles" },
    h("thead", {}, h("tr", {}, ["Name", "Provision strategy", "Provision key", "Created", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, profiles.map((p) => h("tr", { "data-name": p.name },
      h("td", {}, p.name), h("td", {}, STRATEGIES[p.provisionStrategy] || p.provisionStrategy),
      h("td", { class: "mono" }, p.provisionDeviceKey || ""), h("td", {}, time(p.createdTime)),
      h("td", {}, isAdmin() ? [
        h("a", { href: `#/profiles/${p.id}/edit` }, h("button", { type: "button", class: "edit" }, "Edit")), " ",
        h("button", { type: "button", class: "danger delete", onclick: () => deleteProfile(p) }, "Delete"),
      ] : h("a", { href: `#/devices?profile=${p.id}` }, "devices")))))));
  if (!profiles.length) add(root, h("p", { class: "hint" }, "No device profiles yet."));
}

async function deleteProfile(profile) {
  if (!window.confirm(`Delete the device profile ${profile.name}?`)) return;
  try {
    await api("DELETE", `/api/device-profiles/${profile.id}`);
    flash(`Deleted ${profile.name}`);
    profilesPage();
  } catch (e) { flash(e.message, "error"); }
}

function strategyFields(p) {
  const chain = h("div", { id: "chain-fields" },
    h("label", {}, "CA certificate (PEM) of the chain devices present",
      h("textarea", { id: "certificatePem", placeholder: "-----BEGIN CERTIFICATE-----" }, p.certificatePem || "")),
    h("label", {}, "CN regular expression (its first group is the device name)",
      h("input", { id: "certificateRegExPattern", value: p.certificateRegExPattern || "(.*)" })),
    h("label", {}, h("input", { type: "checkbox", id: "allowCreate", checked: p.allowCreateNewDevicesByX509Certificate !== false }),
      " Create new devices from their certificate"));
  const signing = h("details", { id: "signing-fields" }, h("summary", {}, "CSR signing CA (optional: devices send a CSR and get a certificate)"),
    h("label", {}, "Signing CA certificate (PEM)", h("textarea", { id: "signingCertificatePem" }, p.signingCertificatePem || "")),
    h("label", {}, "Signing CA private key (PEM; never shown again)", h("textarea", { id: "signingKeyPem" })),
    p.hasSigningKey ? h("p", { class: "hint" }, "A key is stored; leave it empty to keep it.") : null);
  return { chain, signing };
}

function profileBody(existing) {
  const strategy = document.getElementById("strategy").value;
  const body = { name: document.getElementById("name").value.trim(), provisionStrategy: strategy,
    allowWeakTokens: document.getElementById("allowWeakTokens").checked };
  // Settings this form does not show are sent back as they are (a PUT replaces the whole profile).
  for (const key of ["reprovisionPolicy", "issuedCertificateValidityDays"]) {
    if (existing && existing[key] !== undefined && existing[key] !== null) body[key] = existing[key];
  }
  if (existing && existing.provisionDeviceKey && strategy !== "X509_CERTIFICATE_CHAIN") {
    body.provisionDeviceKey = existing.provisionDeviceKey;
    if (existing.provisionDeviceSecret) body.provisionDeviceSecret = existing.provisionDeviceSecret;
  }
  if (strategy === "X509_CERTIFICATE_CHAIN") {
    body.certificatePem = document.getElementById("certificatePem").value;
    body.certificateRegExPattern = document.getElementById("certificateRegExPattern").value;
    body.allowCreateNewDevicesByX509Certificate = document.getElementById("allowCreate").checked;
  }
  const signingPem = document.getElementById("signingCertificatePem").value.trim();
  const signingKey = document.getElementById("signingKeyPem").value.trim();
  if (signingPem) body.signingCertificatePem = signingPem;
  if (signingKey) body.signingKeyPem = signingKey;
  return body;
}

// The wizard, in the spirit of ThingsBoard's "Add device profile": 1 name and strategy, 2 the strategy's
// settings, 3 the provision key and secret to copy into the firmware.
function profileWizard() {
  const root = main();
  const steps = h("div", { class: "steps" }, h("span", { id: "step-1", class: "current" }, "1 · Name and strategy"),
    h("span", { id: "step-2" }, "2 · Strategy settings"), h("span", { id: "step-3" }, "3 · Key and secret"));
  const { chain, signing } = strategyFields({});
  const one = h("div", { class: "card", id: "wizard-1" },
    h("label", {}, "Name", h("input", { id: "name", maxlength: 255, required: true })),
    h("label", {}, "Provision strategy", select("strategy", Object.entries(STRATEGIES), "ALLOW_CREATE_NEW_DEVICES")),
    h("label", {}, h("input", { type: "checkbox", id: "allowWeakTokens" }), " Allow devices to choose short access tokens"),
    h("button", { type: "button", class: "primary", id: "wizard-next", onclick: () => {
      if (!document.getElementById("name").value.trim()) { flash("A name is required", "error"); return; }
      flash("");
      chain.hidden = document.getElementById("strategy").value !== "X509_CERTIFICATE_CHAIN";
      one.hidden = true; two.hidden = false;
      document.getElementById("step-1").className = ""; document.getElementById("step-2").className = "current";
    } }, "Next"));
  const two = h("div", { class: "card", id: "wizard-2", hidden: true }, chain, signing,
    h("p", { class: "hint" }, "Allow new / pre-provisioned profiles get a generated provision key and secret."),
    h("button", { type: "button", onclick: () => { two.hidden = true; one.hidden = false; } }, "Back"), " ",
    h("button", { type: "button", class: "primary", id: "wizard-create", onclick: async () => {
      try {
        const created = await api("POST", "/api/device-profiles", profileBody(null));
        flash(`Created ${created.name}`);
        two.hidden = true;
        document.getElementById("step-2").className = ""; document.getElementById("step-3").className = "current";
        add(root, h("div", { class: "card", id: "wizard-3" },
          h("h2", {}, created.name),
          created.provisionDeviceKey ? secretLine("Provision key", created.provisionDeviceKey, "provision-key") : null,
          created.provisionDeviceSecret ? secretLine("Provision secret", created.provisionDeviceSecret, "provision-secret") : null,
          created.provisionStrategy === "X509_CERTIFICATE_CHAIN" ? h("p", { class: "hint" }, "Devices provision by presenting a certificate chained to the CA (no secret).") : null,
          created.provisionStrategy === "DISABLED" ? h("p", { class: "hint" }, "Provisioning is disabled for this profile.") : null,
          h("a", { href: "#/profiles" }, h("button", { type: "button", id: "wizard-done" }, "Done"))));
      } catch (e) { flash(e.message, "error"); }
    } }, "Create"));
  replace(root, h("h1", {}, "Add device profile"), steps, one, two);
}

async function profileEdit(id) {
  const root = main();
  const p = await shown(api("GET", `/api/device-profiles/${id}`));
  const { chain, signing } = strategyFields(p);
  const strategy = select("strategy", Object.entries(STRATEGIES), p.provisionStrategy);
  strategy.addEventListener("change", () => { chain.hidden = strategy.value !== "X509_CERTIFICATE_CHAIN"; });
  chain.hidden = p.provisionStrategy !== "X509_CERTIFICATE_CHAIN";
  const save = async (regenerate) => {
    const body = profileBody(p);
    if (regenerate) delete body.provisionDeviceSecret; // the API generates a new secret when none is given
    try {
      const saved = await api("PUT", `/api/device-profiles/${id}`, body);
      await profileEdit(id);
      flash(regenerate ? "New provision secret generated: devices need it from now on" : `Saved ${saved.name}`);
    } catch (e) { flash(e.message, "error"); }
  };
  replace(root, h("h1", {}, `Edit ${p.name}`), h("div", { class: "card" },
    h("label", {}, "Name", h("input", { id: "name", value: p.name })),
    h("label", {}, "Provision strategy", strategy),
    h("label", {}, h("input", { type: "checkbox", id: "allowWeakTokens", checked: p.allowWeakTokens }), " Allow devices to choose short access tokens"),
    chain, signing,
    p.provisionDeviceKey ? secretLine("Provision key", p.provisionDeviceKey, "provision-key") : null,
    p.provisionDeviceSecret ? secretLine("Provision secret", p.provisionDeviceSecret, "provision-secret") : null,
    h("button", { type: "button", class: "primary", id: "save-profile", onclick: () => save(false) }, "Save"), " ",
    p.provisionDeviceSecret ? h("button", { type: "button", id: "regenerate-secret", onclick: () => {
      if (window.confirm("Generate a new provision secret? Devices with the old one can no longer provision.")) save(true);
    } }, "Regenerate secret") : null, " ",
    h("a", { href: "#/profiles" }, "Back to the list")));
}

// --- devices ---------------------------------------------------------------------------------------------

async function devicesPage(params) {
  const root = main();
  const profiles = await shown(allProfiles());
  const names = Object.fromEntries(profiles.map((p) => [p.id, p.name]));
  const search = h("input", { id: "search", placeholder: "Name contains", value: params.get("q") || "" });
  const profile = select("filter-profile", [["", "All profiles"], ...profiles.map((p) => [p.id, p.name])], params.get("profile") || "");
  const state = select("filter-state", [["", "Any state"], ["provisioned", "provisioned"], ["pending", "not provisioned yet"]], params.get("state") || "");
  const ctype = select("filter-credentials", [["", "Any credentials"], ...CREDENTIALS_TYPES.map((t) => [t, t])], params.get("ctype") || "");
  const page = Number(params.get("page") || 0);
  const go = (p) => { window.location.hash = `#/devices?${qs({ q: search.value, profile: profile.value, state: state.value, ctype: ctype.value, page: p || "" })}`; };
  for (const el of [profile, state, ctype]) el.addEventListener("change", () => go(0));
  search.addEventListener("keydown", (e) => { if (e.key === "Enter") go(0); });
  replace(root, h("h1", {}, "Devices"), h("div", { class: "toolbar" }, search, profile, state, ctype,
    h("button", { type: "button", id: "apply-filters", onclick: () => go(0) }, "Search")));
  const result = await shown(api("GET", `/api/devices?${qs({ textSearch: search.value, deviceProfileId: profile.value,
    provisionState: state.value, credentialsType: ctype.value, page, pageSize: PAGE_SIZE })}`));
  add(root, h("table", { id: "devices" },
    h("thead", {}, h("tr", {}, ["Name", "Profile", "Provision state", "Credentials", "Created"].map((t) => h("th", {}, t)))),
    h("tbody", {}, result.data.map((d) => h("tr", { "data-name": d.name },
      h("td", {}, h("a", { href: `#/devices/${d.id}` }, d.name)), h("td", {}, names[d.deviceProfileId] || d.deviceProfileId),
      h("td", {}, h("span", { class: `badge state ${d.provisionState || "pending"}` }, d.provisionState || "not provisioned")),
      h("td", {}, d.credentialsType || "none (revoked)"), h("td", {}, time(d.createdTime)))))),
  pager(page, result.hasNext, result.totalElements, go));
}

async function deviceDetail(id) {
  const root = main();
  const d = await shown(api("GET", `/api/devices/${id}`));
  const profile = await api("GET", `/api/device-profiles/${d.deviceProfileId}`).catch(() => null);
  const [events] = await Promise.all([api("GET", `/api/provision-events?${qs({ deviceName: d.name, pageSize: 10 })}`).catch(() => ({ data: [] }))]);
  const last = events.data.find((e) => e.outcome === "SUCCESS");
  const oneTime = h("div", { id: "one-time" });
  const show = (result, title) => {
    const c = result.credentials || {};
    const value = typeof c.credentialsValue === "string" ? c.credentialsValue : JSON.stringify(c.credentialsValue);
    replace(oneTime, h("div", { class: "card" }, h("h2", {}, title),
      h("p", { class: "hint" }, "Shown once: copy them now."), h("div", {}, `Type: ${c.credentialsType || ""}`),
      value ? secretLine("Credentials", value, "new-credentials") : null));
  };
  const actions = canOperate() ? h("div", { class: "toolbar" },
    h("button", { type: "button", id: "rotate", onclick: async () => {
      if (!window.confirm("Give the device new credentials? The current ones stop working.")) return;
      try { show(await api("POST", `/api/devices/${id}/credentials/rotate`), "New credentials"); flash("Credentials rotated"); } catch (e) { flash(e.message, "error"); }
    } }, "Rotate credentials"),
    h("button", { type: "button", id: "revoke", onclick: async () => {
      if (!window.confirm("Revoke the device's credentials? It can no longer connect.")) return;
      try { await api("POST", `/api/devices/${id}/credentials/revoke`); flash("Credentials revoked"); await deviceDetail(id); } catch (e) { flash(e.message, "error"); }
    } }, "Revoke credentials"),
    h("button", { type: "button", class: "danger", id: "delete-device", onclick: async () => {
      if (!window.confirm(`Delete the device ${d.name}?`)) return;
      try { await api("DELETE", `/api/devices/${id}`); flash(`Deleted ${d.name}`); window.location.hash = "#/devices"; } catch (e) { flash(e.message, "error"); }
    } }, "Delete")) : null;
  const row = (k, v) => h("tr", {}, h("th", {}, k), h("td", {}, v));
  replace(root, h("h1", {}, d.name), h("table", { id: "device-detail" },
    row("Id", d.id), row("Label", d.label || ""), row("Profile", profile ? profile.name : d.deviceProfileId),
    row("Device key", d.deviceKey || ""),
    row("Provision state", d.provisionState || "not provisioned"), row("Provisioned", last ? time(last.time) : ""),
    row("Transport used", last ? `${last.transport}${last.dialect ? ` (${last.dialect})` : ""}` : ""),
    row("Credentials type", d.credentialsType || "none (revoked)"), row("Gateway", d.gateway ? "yes" : "no"),
    row("Created", time(d.createdTime))), actions, oneTime, h("p", {}, h("a", { href: "#/devices" }, "Back to the list")));
}

// --- bulk import ------------------------------------------------------------------------------------------

// The CSV's first line, read in the browser as the import API reads it (routers/imports.py): UTF-8 with its
// BOM dropped; the delimiter guessed from that line among , ; TAB | the way Python's csv.Sniffer does (the
// page then sends it, so the server splits exactly as shown); fields quoted with " ("" inside is one ").
const DELIMITERS = [[",", ", (comma)"], [";", "; (semicolon)"], ["\t", "TAB"], ["|", "| (pipe)"]];

function firstLine(text) {
  const end = text.indexOf("\n");
  return end < 0 ? text : text.slice(0, end + 1);
}

function sniffDelimiter(line) {
  // 1. csv.Sniffer._guess_quote_and_delimiter: a quoted field with the same character before and after it.
  // Python's re.MULTILINE ^ and $ only know \n as a line end (JavaScript's also \r): spelt out.
  const notWord = String.raw`[^\p{L}\p{N}_\n"']`, lineStart = String.raw`(?:(?<![\s\S])|\n)`;
  const lineEnd = String.raw`(?:(?=\n)|(?![\s\S])|\n)`;
  const patterns = [
    String.raw`(?<delim>${notWord})(?<space> ?)(?<quote>["']).*?\k<quote>\k<delim>`,
    String.raw`${lineStart}(?<quote>["']).*?\k<quote>(?<delim>${notWord})(?<space> ?)`,
    String.raw`(?<delim>${notWord})(?<space> ?)(?<quote>["']).*?\k<quote>${lineEnd}`,
  ];
  for (const pattern of patterns) {
    const found = [...line.matchAll(new RegExp(pattern, "gsu"))];
    if (!found.length) continue;
    const counts = new Map();
    for (const m of found) {
      const d = m.groups.delim;
      if (DELIMITERS.some(([c]) => c === d)) counts.set(d, (counts.get(d) || 0) + 1);
    }
    let best = "";
    for (const [d, n] of counts) if (!best || n > counts.get(best)) best = d;
    if (best) return best;
    break;
  }
  // 2. csv.Sniffer._guess_delimiter on one line: every candidate present is as consistent as any other, so
  // one present is it, and among several its preference order decides.
  const present = DELIMITERS.map(([c]) => c).filter((c) => line.includes(c));
  if (present.length === 1) return present[0];
  for (const c of [",", "\t", ";"]) if (present.includes(c)) return c;
  return ","; // nothing found: the server's fallback
}

function parseRecord(text, delimiter) {
  // The first record: fields split at the delimiter, "quoted" ones may hold the delimiter, "" and newlines.
  const fields = [];
  let field = "", quoted = false, i = 0, wasQuoted = false;
  for (; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"' && field === "" && !wasQuoted) { quoted = true; wasQuoted = true; }
    else if (c === delimiter) { fields.push(field); field = ""; wasQuoted = false; }
    else if (c === "\n" || c === "\r") break;
    else field += c;
  }
  fields.push(field);
  return fields;
}

async function readHeader(file) {
  const head = await file.slice(0, 65536).text();
  const text = head.charCodeAt(0) === 0xfeff ? head.slice(1) : head;
  const delimiter = sniffDelimiter(firstLine(text));
  return { delimiter, text };
}

const normalName = (name) => name.trim().toLowerCase().replace(/[ _-]/g, "");

let importFields = null; // {fields, ignored, aliases}: GET /console/import-fields, once

async function importPage() {
  const root = main();
  const profiles = await shown(allProfiles());
  if (!importFields) {
    const r = await fetch("/console/import-fields", { credentials: "same-origin" });
    if (r.status === 401) { window.location.assign("/console/login"); return; }
    importFields = await r.json();
  }
  const file = h("input", { type: "file", id: "import-file", accept: ".csv,text/csv,.ndjson,.jsonl" });
  const header = h("input", { type: "checkbox", id: "import-header", checked: true });
  const delimiter = select("import-delimiter", DELIMITERS, ",");
  const mapper = h("div", { id: "import-mapper" });
  const progress = h("progress", { id: "import-progress", max: 1, value: 0 });
  const status = h("p", { id: "import-status" });
  const report = h("div", { id: "import-report" });
  let head = null; // {delimiter, text} of the chosen CSV file; null for JSON lines or no file
  const isNdjson = (f) => /\.(nd)?jsonl?$|\.ndjson$/i.test(f.name);
  const targets = [["", "(ignore)"], ...importFields.fields.map((f) => [f, f])];

  const showMapper = () => {
    if (!head) { replace(mapper); return; }
    const cells = parseRecord(head.text, delimiter.value);
    const rows = cells.map((cell, i) => {
      const label = header.checked ? cell : `column ${i + 1}`;
      let target = "", note = "";
      if (header.checked) {
        const known = importFields.aliases[normalName(cell)];
        if (known === undefined) note = "not a known field: ignored unless you choose one";
        else if (importFields.ignored.includes(known)) note = "accepted, not stored";
        else target = known;
      } else if (i === 0) target = "name";
      const choice = select(`import-map-${i + 1}`, targets, target);
      const hint = h("td", { class: "hint" }, note);
      choice.addEventListener("change", () => { hint.textContent = choice.value ? "" : note; });
      return h("tr", { "data-column": i + 1 }, h("td", {}, i + 1), h("td", { class: "mono" }, label), h("td", {}, choice), hint);
    });
    replace(mapper, h("h2", {}, "Columns"),
      h("p", { class: "hint" }, header.checked ? "Each column's header and the field it fills (pre-selected from the header)." : "No header line: choose each column's field."),
      h("table", { id: "import-columns" }, h("thead", {}, h("tr", {}, ["#", header.checked ? "Header" : "Column", "Field", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows)));
  };

  file.addEventListener("change", async () => {
    head = null;
    const f = file.files[0];
    if (f && !isNdjson(f)) {
      try { head = await readHeader(f); } catch (e) { flash("The file cannot be read", "error"); }
      if (head) delimiter.value = head.delimiter;
    }
    delimiter.parentElement.hidden = !head; header.parentElement.hidden = !head;
    showMapper();
  });
  header.addEventListener("change", showMapper);
  delimiter.addEventListener("change", showMapper);

  const chosenColumns = () => {
    const chosen = [...mapper.querySelectorAll("select")].map((s) => s.value);
    const taken = chosen.filter((c) => c);
    const twice = taken.find((c, i) => taken.indexOf(c) !== i);
    if (twice) throw new Error(`More than one column is mapped to ${twice}`);
    if (!taken.includes("name")) throw new Error("Map one column to name");
    return chosen.join(",");
  };

  const run = async () => {
    if (!file.files.length) { flash("Choose a file", "error"); return; }
    const f = file.files[0];
    const ndjson = isNdjson(f);
    const params = { deviceProfileId: document.getElementById("import-profile").value, onExisting: document.getElementById("import-existing").value };
    if (!ndjson) {
      if (!head) { flash("The file cannot be read", "error"); return; }
      try { params.columns = chosenColumns(); } catch (e) { flash(e.message, "error"); return; }
      params.delimiter = delimiter.value;
      if (!header.checked) params.header = "false";
    }
    replace(report, ); flash("");
    let job;
    try { job = await api("POST", `/api/devices/import?${qs(params)}`, f, ndjson ? "application/x-ndjson" : "text/csv"); } catch (e) { flash(e.message, "error"); return; }
    for (;;) {
      let s;
      try { s = await api("GET", `/api/devices/import/${job.id}`); } catch (e) { flash(e.message, "error"); return; }
      progress.max = s.total || 1; progress.value = s.processed;
      status.textContent = `${s.status}: ${s.processed} of ${s.total ?? "?"} rows`;
      if (s.status !== "running") { showReport(report, s); return; }
      await new Promise((r) => setTimeout(r, 400));
    }
  };
  const delimiterLabel = h("label", { hidden: true }, "Delimiter (detected from the first line)", delimiter);
  const headerLabel = h("label", { hidden: true }, header, " The first line is a header");
  replace(root, h("h1", {}, "Bulk import"), h("div", { class: "card" },
    h("label", {}, "Device profile", select("import-profile", profiles.map((p) => [p.id, p.name]), "")),
    h("label", {}, "File (CSV, or JSON lines: .ndjson / .jsonl)", file),
    h("label", {}, "Devices that already exist", select("import-existing", [["skip", "skip them"], ["update", "update them"]], "skip")),
    delimiterLabel, headerLabel, mapper,
    h("p", { class: "hint" }, `Fields: ${importFields.fields.join(", ")} (name is required).`),
    h("button", { type: "button", class: "primary", id: "import-start", onclick: run }, "Import")),
  h("div", { class: "card" }, progress, status, report));
}

function showReport(root, s) {
  replace(root, 
    h("p", { id: "import-counts" }, `created ${s.created} · updated ${s.updated} · skipped ${s.skipped} · rejected ${s.rejected}`),
    s.message ? h("p", { class: "error" }, s.message) : null,
    s.errors.length ? h("table", { id: "import-errors" }, h("thead", {}, h("tr", {}, h("th", {}, "Line"), h("th", {}, "Field"), h("th", {}, "Reason"))),
      h("tbody", {}, s.errors.map((e) => h("tr", {}, h("td", {}, e.line), h("td", {}, e.field || ""), h("td", {}, e.reason))))) : null,
    s.errorsTruncated ? h("p", { class: "hint" }, "More rows were rejected than listed.") : null);
}

// --- live activity ----------------------------------------------------------------------------------------

async function activityPage(params) {
  const root = main();
  const profiles = await shown(allProfiles());
  const names = Object.fromEntries(profiles.map((p) => [p.id, p.name]));
  const outcome = select("filter-outcome", [["", "Any outcome"], ...OUTCOMES.map((o) => [o, o])], params.get("outcome") || "");
  const profile = select("filter-profile", [["", "All profiles"], ...profiles.map((p) => [p.id, p.name])], params.get("profile") || "");
  const go = () => { window.location.hash = `#/activity?${qs({ outcome: outcome.value, profile: profile.value })}`; };
  outcome.addEventListener("change", go); profile.addEventListener("change", go);
  const live = h("span", { id: "live-status", class: "badge" }, "connecting");
  const body = h("tbody", {});
  const seen = new Set(); // an event both live and among the stored ones fetched after the stream opened
  const add = (e, top) => {
    const key = `${e.requestId}|${e.time}|${e.outcome}|${e.deviceName}`;
    if (seen.has(key)) return;
    seen.add(key);
    const row = h("tr", { "data-device": e.deviceName || "" }, h("td", {}, time(e.time)),
      h("td", {}, h("span", { class: `badge ${e.outcome}` }, e.outcome)), h("td", {}, e.reason), h("td", {}, e.deviceName || ""),
      h("td", {}, names[e.deviceProfileId] || e.deviceProfileId || ""), h("td", {}, `${e.transport}${e.dialect ? ` (${e.dialect})` : ""}`),
      h("td", {}, e.sourceAddress), h("td", {}, `${Math.round(e.latencyMs)} ms`));
    if (top) body.prepend(row); else body.append(row);
    while (body.children.length > 200) body.lastChild.remove();
  };
  replace(root, h("h1", {}, "Live provisioning activity"), h("div", { class: "toolbar" }, outcome, profile, live),
    h("table", { id: "activity" }, h("thead", {}, h("tr", {}, ["Time", "Outcome", "Reason", "Device", "Profile", "Transport", "Source", "Latency"].map((t) => h("th", {}, t)))), body));
  const filters = { outcome: outcome.value, deviceProfileId: profile.value };
  const source = new EventSource(`/api/provision-events/stream?${qs(filters)}`);
  // The open stream is not a request, so the session idles out while the page watches: it asks, without
  // restarting the idle clock, how long the session has left, asks again then (at least once a minute:
  // a logout or a disabled account elsewhere), and says so when it has ended instead of going quiet.
  let timer = null, gone = false; // gone: another page is shown
  const expired = () => {
    if (gone) return;
    source.close(); clearTimeout(timer);
    live.textContent = "session expired"; live.className = "badge FAILURE";
    if (!document.getElementById("session-expired")) {
      root.prepend(h("p", { id: "session-expired", class: "card error", role: "alert" }, "Session expired — ", h("a", { href: "/console/login" }, "log in again")));
    }
  };
  const watch = async () => {
    let left = 15;
    try {
      const r = await fetch("/console/session/left", { credentials: "same-origin" });
      if (r.status === 401) { expired(); return; }
      if (r.ok) left = (await r.json()).secondsLeft;
    } catch (e) { /* the admin API is unreachable: ask again soon */ }
    if (!gone) timer = setTimeout(watch, (Math.min(Math.max(left, 0), 60) + 1) * 1000);
  };
  source.onopen = () => { live.textContent = "live"; live.className = "badge"; };
  source.onerror = async () => {
    live.textContent = "reconnecting";
    if (source.readyState === EventSource.CLOSED) { // refused: the session ended, or something else
      const check = await fetch("/console/session/left", { credentials: "same-origin" }).catch(() => null);
      if (check && check.status === 401) expired();
      else live.textContent = "stopped: reload the page";
    }
  };
  source.onmessage = (m) => { try { add(JSON.parse(m.data), true); } catch (e) { /* not an event */ } };
  leavePage = () => { gone = true; source.close(); clearTimeout(timer); };
  const recent = await api("GET", `/api/provision-events?${qs({ ...filters, pageSize: 50 })}`).catch(() => ({ data: [] }));
  for (const e of recent.data) add(e, false);
  if (source.readyState !== EventSource.CLOSED) watch();
}

// --- operators, tokens, audit -------------------------------------------------------------------------

async function operatorsPage() {
  const root = main();
  const operators = await shown(api("GET", "/api/operators"));
  const form = h("div", { class: "card", id: "new-operator" }, h("h2", {}, "New operator"),
    h("label", {}, "User name", h("input", { id: "op-username", maxlength: 64 })),
    h("label", {}, "Password (at least 12 characters)", h("input", { id: "op-password", type: "password", autocomplete: "new-password" })),
    h("label", {}, "Role", select("op-role", [["viewer", "viewer: reads everything but operators and the audit log"], ["operator", "operator: also devices and imports"], ["admin", "admin: everything"]], "viewer")),
    h("button", { type: "button", class: "primary", id: "op-create", onclick: async () => {
      try {
        await api("POST", "/api/operators", { username: document.getElementById("op-username").value,
          password: document.getElementById("op-password").value, role: document.getElementById("op-role").value });
        flash("Operator created"); operatorsPage();
      } catch (e) { flash(e.message, "error"); }
    } }, "Create"));
  const update = async (o, change, message) => {
    try { await api("PUT", `/api/operators/${o.id}`, change); flash(message); operatorsPage(); } catch (e) { flash(e.message, "error"); }
  };
  replace(root, h("h1", {}, "Operators"), h("table", { id: "operators" },
    h("thead", {}, h("tr", {}, ["User name", "Role", "State", "Created", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, operators.map((o) => {
      const role = select(`role-${o.username}`, [["viewer", "viewer"], ["operator", "operator"], ["admin", "admin"]], o.role);
      role.addEventListener("change", () => update(o, { role: role.value }, `${o.username} is now ${role.value}`));
      return h("tr", { "data-name": o.username }, h("td", {}, o.username), h("td", {}, role), h("td", {}, o.disabled ? "disabled" : "enabled"),
        h("td", {}, time(o.createdTime)), h("td", {},
          h("button", { type: "button", onclick: () => update(o, { disabled: !o.disabled }, `${o.username} ${o.disabled ? "enabled" : "disabled"}`) }, o.disabled ? "Enable" : "Disable"), " ",
          h("button", { type: "button", class: "danger", onclick: async () => {
            if (!window.confirm(`Delete the operator ${o.username}?`)) return;
            try { await api("DELETE", `/api/operators/${o.id}`); flash(`Deleted ${o.username}`); operatorsPage(); } catch (e) { flash(e.message, "error"); }
          } }, "Delete")));
    }))), form);
}

async function tokensPage() {
  const root = main();
  const tokens = await shown(api("GET", "/api/operators/me/tokens"));
  const once = h("div", { id: "token-once" });
  replace(root, h("h1", {}, "My API tokens"), h("p", { class: "hint" }, "For scripts and the provisioning command line (Authorization: Bearer TOKEN); they act with your role."),
    h("div", { class: "toolbar" }, h("input", { id: "token-name", placeholder: "Token name (what it is for)", maxlength: 100 }),
      h("button", { type: "button", class: "primary", id: "token-create", onclick: async () => {
        try {
          const t = await api("POST", "/api/operators/me/tokens", { name: document.getElementById("token-name").value });
          await tokensPage();
          replace(document.getElementById("token-once"), h("div", { class: "card" }, h("p", { class: "hint" }, "Shown once: copy it now."), secretLine(t.name, t.token, "new-token")));
        } catch (e) { flash(e.message, "error"); }
      } }, "Create token")), once,
    h("table", { id: "tokens" }, h("thead", {}, h("tr", {}, ["Name", "Created", "Last used", "Revoked", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, tokens.map((t) => h("tr", {}, h("td", {}, t.name), h("td", {}, time(t.createdTime)), h("td", {}, time(t.lastUsedTime)),
        h("td", {}, time(t.revokedTime)), h("td", {}, t.revokedTime ? "" : h("button", { type: "button", class: "danger", onclick: async () => {
          try { await api("DELETE", `/api/operators/me/tokens/${t.id}`); flash(`Revoked ${t.name}`); tokensPage(); } catch (e) { flash(e.message, "error"); }
        } }, "Revoke")))))));
}

async function auditPage(params) {
  const root = main();
  const page = Number(params.get("page") || 0);
  const actor = h("input", { id: "audit-actor", placeholder: "Actor", value: params.get("actor") || "" });
  const go = (p) => { window.location.hash = `#/audit?${qs({ actor: actor.value, page: p || "" })}`; };
  actor.addEventListener("keydown", (e) => { if (e.key === "Enter") go(0); });
  const result = await shown(api("GET", `/api/audit?${qs({ actor: actor.value, page, pageSize: PAGE_SIZE })}`));
  replace(root, h("h1", {}, "Audit log"), h("div", { class: "toolbar" }, actor, h("button", { type: "button", onclick: () => go(0) }, "Filter")),
    h("table", { id: "audit" }, h("thead", {}, h("tr", {}, ["Time", "Actor", "Call", "Status", "Object", "What changed"].map((t) => h("th", {}, t)))),
      h("tbody", {}, result.data.map((a) => h("tr", {}, h("td", {}, time(a.time)), h("td", {}, a.actor), h("td", { class: "mono" }, `${a.method} ${a.path}`),
        h("td", {}, a.status), h("td", { class: "mono" }, a.objectId || ""), h("td", { class: "mono" }, a.changes ? JSON.stringify(a.changes) : ""))))),
    pager(page, result.hasNext, result.totalElements, go));
}

// --- routing ----------------------------------------------------------------------------------------------

const ROUTES = [
  [/^profiles\/new$/, () => (isAdmin() ? profileWizard() : profilesPage()), "profiles"],
  [/^profiles\/([0-9a-f-]{36})\/edit$/, (m) => profileEdit(m[1]), "profiles"],
  [/^profiles$/, profilesPage, "profiles"],
  [/^devices\/([0-9a-f-]{36})$/, (m) => deviceDetail(m[1]), "devices"],
  [/^devices$/, (m, p) => devicesPage(p), "devices"],
  [/^import$/, importPage, "import"],
  [/^activity$/, (m, p) => activityPage(p), "activity"],
  [/^operators$/, operatorsPage, "operators"],
  [/^tokens$/, tokensPage, "tokens"],
  [/^audit$/, (m, p) => auditPage(p), "audit"],
];

function route() {
  if (leavePage) { leavePage(); leavePage = null; }
  const [path, query] = (window.location.hash.replace(/^#\/?/, "") || "profiles").split("?");
  const params = new URLSearchParams(query || "");
  for (const [pattern, show, nav] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === nav);
    Promise.resolve(show(match, params)).catch(() => { /* already shown by flash */ });
    return;
  }
  window.location.hash = "#/profiles";
}

async function start() {
  const response = await fetch("/console/session", { credentials: "same-origin" });
  if (!response.ok) { window.location.assign("/console/login"); return; }
  session = await response.json();
  document.getElementById("who").textContent = `${session.username} (${session.role})`;
  for (const a of document.querySelectorAll("#nav a[data-role]")) {
    const needed = a.dataset.role;
    a.hidden = !(needed === "operator" ? canOperate() : isAdmin());
  }
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/console/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": session.csrfToken } });
    window.location.assign("/console/login");
  });
  window.addEventListener("hashchange", () => { flashOnNavigate(); route(); });
  route();
}

function flashOnNavigate() {
  // A message stays for the page the action led to, and goes with the next navigation after that.
  const el = document.getElementById("flash");
  if (el.dataset.keep) { delete el.dataset.keep; return; }
  el.hidden = true;
}

start();
