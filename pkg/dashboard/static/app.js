// meshd dashboard: renders the view the server sends over server-sent
// events. Every value from etcd is set with textContent or setAttribute:
// nothing is ever parsed as markup.
"use strict";

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function td(child) {
  const c = el("td");
  if (child instanceof Node) c.appendChild(child); else if (child !== undefined) c.textContent = String(child);
  return c;
}

function ago(iso, now) {
  const t = Date.parse(iso);
  if (isNaN(t)) return "";
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h ago";
}

function clock(iso) {
  const d = new Date(iso);
  return isNaN(d) ? "" : d.toLocaleTimeString();
}

function replaceBody(table, rows) {
  const tb = table.tBodies[0];
  tb.replaceChildren(...rows);
}

let view = null;

function renderNodes(v, now) {
  const rows = v.nodes.map(n => {
    const tr = el("tr");
    tr.setAttribute("data-node", n.name);
    tr.appendChild(td(n.name));
    const state = el("span", "badge " + (n.up ? "up" : "down"), n.up ? "up" : "down");
    state.setAttribute("data-state", n.up ? "up" : "down");
    const st = td(state);
    if (n.lagging) st.appendChild(el("span", "badge lag", "lagging"));
    tr.appendChild(st);
    tr.appendChild(td(n.lease || "—"));
    tr.appendChild(td(n.applied || n.seen ? n.applied + " / " + n.seen + " (cluster " + v.revision + ")" : "—"));
    const comps = el("td");
    for (const c of n.components || []) {
      comps.appendChild(el("span", "comp" + (c.error ? " err" : ""), c.error ? c.name + ": " + c.error : c.name + ": ok"));
    }
    tr.appendChild(comps);
    tr.appendChild(td(n.version || "—"));
    tr.appendChild(td(n.updatedAt ? ago(n.updatedAt, now) : "—"));
    return tr;
  });
  replaceBody(document.getElementById("nodes"), rows);
}

function renderPeers(v) {
  const table = document.getElementById("peers");
  const head = el("tr");
  head.appendChild(el("th"));
  for (const n of v.peers.nodes) head.appendChild(el("th", null, n));
  table.tHead.replaceChildren(head);
  const rows = v.peers.nodes.map((row, i) => {
    const tr = el("tr");
    tr.setAttribute("data-peer-row", row);
    tr.appendChild(el("th", "row", row));
    v.peers.cells[i].forEach((cell, j) => {
      const label = cell === "self" ? "—" : cell === "unknown" ? "?" : cell;
      const span = el("span", "cell " + cell, label);
      span.setAttribute("data-peer", v.peers.nodes[j]);
      span.setAttribute("data-cell", cell);
      span.title = row + " → " + v.peers.nodes[j] + ": " + cell;
      tr.appendChild(td(span));
    });
    return tr;
  });
  replaceBody(table, rows);
  const note = document.getElementById("peers-note");
  note.hidden = v.peers.total === v.peers.nodes.length;
  note.textContent = "Showing the " + v.peers.nodes.length + " of " + v.peers.total +
    " nodes that have a handshake not known to be up; every other pair is up.";
}

function renderGroups(v) {
  const box = document.getElementById("groups");
  const parts = [];
  if (v.groups.length === 0) parts.push(el("p", "muted", "No apps registered."));
  for (const g of v.groups) {
    const sec = el("div");
    sec.setAttribute("data-group", g.group);
    sec.appendChild(el("h3", null, g.group));
    sec.appendChild(el("p", "muted", "Consumed by: " + (g.consumers.length ? g.consumers.join(", ") : "no live node")));
    const table = el("table");
    const hr = el("tr");
    for (const h of ["App", "Port", "Instances"]) hr.appendChild(el("th", null, h));
    table.appendChild(el("thead")).appendChild(hr);
    const tb = table.appendChild(el("tbody"));
    for (const a of g.apps) {
      const tr = el("tr");
      tr.setAttribute("data-app", g.group + "/" + a.name);
      tr.appendChild(td(a.name));
      tr.appendChild(td(a.port ? "127.0.0.1:" + a.port : "—"));
      const ins = el("td");
      if (a.instances.length === 0) ins.textContent = "none";
      for (const i of a.instances) {
        const s = el("span", "instance" + (i.down ? " down" : ""), i.node + " " + i.addr + (i.down ? " (down)" : ""));
        s.setAttribute("data-instance", i.node);
        s.setAttribute("data-state", i.down ? "down" : "up");
        ins.appendChild(s);
      }
      tr.appendChild(ins);
      tb.appendChild(tr);
    }
    sec.appendChild(table);
    parts.push(sec);
  }
  box.replaceChildren(...parts);
}

function renderProblems(v, now) {
  const rows = v.problems.map(p => {
    const tr = el("tr");
    tr.setAttribute("data-kind", p.kind);
    tr.appendChild(td(clock(p.since) + " (" + ago(p.since, now) + ")"));
    tr.appendChild(td(p.kind));
    tr.appendChild(td(p.subject));
    tr.appendChild(td(p.detail || ""));
    return tr;
  });
  replaceBody(document.getElementById("problems"), rows);
  document.getElementById("no-problems").hidden = rows.length > 0;
}

function render() {
  if (!view) return;
  const now = Date.now();
  const up = view.nodes.filter(n => n.up).length;
  document.getElementById("summary").textContent =
    up + " of " + view.nodes.length + " nodes up · revision " + view.revision + " · " +
    view.problems.length + " problems · watching since " + clock(view.since);
  renderProblems(view, now);
  renderNodes(view, now);
  renderPeers(view);
  renderGroups(view);
}

function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource("/events");
  es.addEventListener("open", () => { conn.textContent = "live"; conn.className = "conn up"; });
  es.addEventListener("error", () => { conn.textContent = "reconnecting…"; conn.className = "conn down"; });
  es.addEventListener("view", ev => {
    view = JSON.parse(ev.data);
    document.body.setAttribute("data-revision", String(view.revision));
    render();
  });
}

connect();
setInterval(render, 5000); // keep the "ago" columns current
