// The engram-local chat page: streaming chat (POST /v1/chat/completions, stream: true), the user's
// facts (GET/POST/DELETE /v1/memories), a user switcher. Plain JS, no build step, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
const store = window.localStorage;
let history = [];          // this conversation's messages
let busy = false;

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
function user() { return $("user").value.trim(); }
function status(text) { $("status").textContent = text || ""; }

async function api(method, path, body) {
  const r = await fetch(path, {method, headers: headers(body !== undefined),
                               body: body === undefined ? undefined : JSON.stringify(body)});
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((doc.error && doc.error.message) || ("HTTP " + r.status));
  return doc;
}

function bubble(role, text) {
  const d = document.createElement("div");
  d.className = "msg " + role;
  d.textContent = text;
  $("log").appendChild(d);
  $("log").scrollTop = $("log").scrollHeight;
  return d;
}

// ------------------------------------------------------------------ chat
async function send(text) {
  if (busy || !text.trim()) return;
  busy = true; $("go").disabled = true;
  history.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  const body = {model: "default", messages: history, stream: true, max_tokens: 256};
  if (user()) body.user = user();
  if (user() && $("auto").checked) body.remember = true;
  let reply = "";
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(true), body: JSON.stringify(body)});
    if (!r.ok) {
      const doc = await r.json().catch(() => ({}));
      throw new Error((doc.error && doc.error.message) || ("HTTP " + r.status));
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i).replace(/^\r?\n\r?\n/, "");
        for (const line of event.split(/\r?\n/)) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const doc = JSON.parse(data);
          if (doc.error) throw new Error(doc.error.message);
          if (doc.memory_job) watchJob(doc.memory_job.id, "remembering " + doc.memory_job.statements.join("; "));
          const c = doc.choices && doc.choices[0];
          if (c && c.delta && c.delta.content) {
            reply += c.delta.content;
            out.textContent = reply;
            $("log").scrollTop = $("log").scrollHeight;
          }
        }
      }
    }
    history.push({role: "assistant", content: reply});
  } catch (e) {
    out.className = "msg error";
    out.textContent = "Error: " + e.message;
    history.pop();
  } finally {
    busy = false; $("go").disabled = false;
    out.dataset.done = "1";
  }
}

// ------------------------------------------------------------------ memory
async function loadFacts() {
  const ul = $("facts");
  ul.textContent = "";
  if (!user()) { ul.innerHTML = "<li><em>choose a user to see their memory</em></li>"; return; }
  try {
    const doc = await api("GET", "/v1/memories?user=" + encodeURIComponent(user()));
    if (!doc.facts.length) ul.innerHTML = "<li><em>nothing remembered yet</em></li>";
    for (const f of doc.facts) {
      const li = document.createElement("li");
      li.dataset.id = f.id;
      const span = document.createElement("span");
      span.className = "fact";
      span.textContent = f.prompt + " " + f.answer;
      span.title = f.id + ", " + f.rows + " rows, " + f.time;
      const b = document.createElement("button");
      b.textContent = "forget";
      b.className = "forget";
      b.onclick = () => forget(f.id);
      li.append(span, b);
      ul.appendChild(li);
    }
  } catch (e) { ul.innerHTML = ""; status(e.message); }
}

const watching = new Set();
async function watchJob(id, what) {
  watching.add(id);
  $("jobs").textContent = what + "...";
  for (;;) {
    await new Promise((r) => setTimeout(r, 700));
    let job;
    try { job = await api("GET", "/v1/memories/jobs/" + encodeURIComponent(id)); } catch (e) { status(e.message); break; }
    if (job.status === "done" || job.status === "failed") {
      $("jobs").textContent = job.status === "done" ? what + ": done" : what + ": failed: " + job.error;
      break;
    }
  }
  watching.delete(id);
  loadFacts();
}

async function remember(statement) {
  if (!user()) { status("choose a user first"); return; }
  try {
    const job = await api("POST", "/v1/memories", {user: user(), statement});
    watchJob(job.id, "remembering \"" + statement + "\"");
  } catch (e) { status(e.message); }
}

async function forget(id) {
  try {
    const job = await api("DELETE", "/v1/memories/" + encodeURIComponent(user()) + "/" + encodeURIComponent(id));
    watchJob(job.id, "forgetting " + id);
  } catch (e) { status(e.message); }
}

// ------------------------------------------------------------------ wiring
function knownUsers() { return JSON.parse(store.getItem("engram.users") || "[]"); }
function switchUser() {
  const u = user();
  store.setItem("engram.user", u);
  if (u && !knownUsers().includes(u)) store.setItem("engram.users", JSON.stringify([u, ...knownUsers()].slice(0, 20)));
  $("users").textContent = "";
  for (const x of knownUsers()) { const o = document.createElement("option"); o.value = x; $("users").appendChild(o); }
  history = []; $("log").textContent = "";
  status(u ? "chatting as " + u : "no user: no memory");
  loadFacts();
}

$("user").value = store.getItem("engram.user") || "";
$("key").value = store.getItem("engram.key") || "";
$("user").addEventListener("change", switchUser);
$("key").addEventListener("change", () => { store.setItem("engram.key", $("key").value); loadFacts(); });
$("clear").addEventListener("click", () => { history = []; $("log").textContent = ""; });
$("send").addEventListener("submit", (e) => { e.preventDefault(); const t = $("msg").value; $("msg").value = ""; send(t); });
$("msg").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("send").requestSubmit(); }
});
$("add").addEventListener("submit", (e) => {
  e.preventDefault();
  const s = $("statement").value.trim();
  if (s) { $("statement").value = ""; remember(s); }
});
switchUser();
