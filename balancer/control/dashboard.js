// The balancer's dashboard. Plain JavaScript, no build step, no library.
//
// One stream (GET dashboard/stream, server-sent events read with fetch(), since
// EventSource cannot send an Authorization header) brings a "hello" with the recent
// history, then a "tick" a second. Every action is one of the admin API's own endpoints.
//
// Safety: every value from the server goes into the page with textContent (never
// innerHTML), so a backend named <img src=x onerror=...> is shown as text; the page's CSP
// allows scripts from this origin only. The token, when the admin API needs one, is asked
// for once, kept in sessionStorage (this tab only) and sent in the Authorization header,
// never in a URL or a cookie.
"use strict";

(() => {
  const TOKEN_KEY = "balancer-admin-token";
  const HISTORY = 180; // chart points kept (3 minutes at one a second)
  const MAX_EVENTS = 300; // event list items kept in the page
  const COLORS = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795",
    "#b7791f", "#4a5568", "#e53e3e", "#3182ce", "#718096", "#9f7aea"];

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let lastSeq = 0;
  let latest = null; // the newest snapshot
  let times = []; // wall-clock seconds of the chart's points
  let series = new Map(); // backend id -> requests/s, one per point
  const rows = new Map(); // backend id -> its row's cells
  const workerRows = new Map(); // worker key -> its row's cells
  const colors = new Map(); // backend id -> chart colour

  // -- small helpers -----------------------------------------------------------------

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setText(node, text) {
    const value = text === undefined || text === null ? "—" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    const h = Math.floor(s / 3600);
    return h < 48 ? `${h}h ${Math.floor((s % 3600) / 60)}m` : `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  const clock = (epoch) => new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
  const fixed = (value, digits) => (value === null || value === undefined ? "—" : value.toFixed(digits));
  const ms = (value) => (value === null || value === undefined ? "—" : value < 10 ? `${value.toFixed(2)} ms` : `${value.toFixed(0)} ms`);
  const percent = (value) => (value === null || value === undefined ? "—" : `${(value * 100).toFixed(value && value < 0.01 ? 2 : 1)}%`);

  function colorOf(id) {
    if (!colors.has(id)) colors.set(id, COLORS[colors.size % COLORS.length]);
    return colors.get(id);
  }

  function headers(extra) {
    const result = Object.assign({}, extra);
    if (token) result.Authorization = `Bearer ${token}`;
    return result;
  }

  function setLive(text, kind) {
    const live = $("live");
    setText(live, text);
    live.className = `live ${kind || ""}`;
  }

  function backendLabel(id) {
    const backend = latest && latest.backends.find((b) => b.id === id);
    return backend ? backend.url : id;
  }

  // -- the token -------------------------------------------------------------------------

  let tokenWait = null;

  function askToken(message) {
    if (tokenWait) return tokenWait;
    const dialog = $("token-dialog");
    setText($("token-text"), message);
    $("token-input").value = "";
    dialog.oncancel = (event) => event.preventDefault(); // Escape: the page needs it
    tokenWait = new Promise((resolve) => {
      $("token-form").onsubmit = (event) => {
        event.preventDefault();
        token = $("token-input").value.trim();
        sessionStorage.setItem(TOKEN_KEY, token);
        dialog.close();
        tokenWait = null;
        resolve();
      };
    });
    if (!dialog.open) dialog.showModal();
    return tokenWait;
  }

  // -- the stream ------------------------------------------------------------------------

  let lastMessageAt = 0;

  async function connect() {
    let delay = 500;
    for (;;) {
      let response;
      // A stream that goes quiet (a half-open connection) is abandoned: a tick comes
      // every second, so 5 s of silence means it is gone.
      const controller = new AbortController();
      lastMessageAt = Date.now();
      const watchdog = setInterval(() => {
        if (Date.now() - lastMessageAt > 5000) controller.abort();
      }, 1000);
      try {
        response = await fetch("dashboard/stream", {
          headers: headers({ Accept: "text/event-stream" }),
          cache: "no-store",
          signal: controller.signal,
        });
      } catch (error) {
        clearInterval(watchdog);
        setLive(`offline, retrying (${error.message})`, "bad");
        await sleep(delay);
        delay = Math.min(delay * 2, 5000);
        continue;
      }
      if (response.status === 401 || !response.ok || !response.body) clearInterval(watchdog);
      if (response.status === 401) {
        setLive("needs the admin token", "bad");
        await askToken(token ? "That token was refused; enter the admin token again."
          : "This admin API needs its bearer token (--admin-token).");
        continue;
      }
      if (!response.ok || !response.body) {
        setLive(`stream refused (${response.status}), retrying`, "bad");
        await sleep(delay);
        delay = Math.min(delay * 2, 5000);
        continue;
      }
      delay = 500;
      setLive("live", "ok");
      try {
        await read(response.body);
      } catch (error) {
        // The connection broke (or the watchdog cut it): reconnect below.
      } finally {
        clearInterval(watchdog);
      }
      setLive("reconnecting…", "bad");
      await sleep(delay);
    }
  }

  async function read(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) kind = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) {
          lastMessageAt = Date.now();
          receive(kind, JSON.parse(data.join("\n")));
        }
      }
    }
  }

  function receive(kind, message) {
    if (kind === "hello") {
      lastSeq = 0;
      $("events").replaceChildren();
      times = (message.history && message.history.times) || [];
      series = new Map(Object.entries((message.history && message.history.rps) || {}));
      if (message.backends) render(message);
      addEvents(message.events || [], false);
    } else if (kind === "tick") {
      times.push(message.time);
      if (times.length > HISTORY) times.shift();
      for (const [id, values] of series) {
        if (!(id in message.rps)) values.push(0);
      }
      for (const [id, value] of Object.entries(message.rps)) {
        if (!series.has(id)) series.set(id, new Array(Math.max(0, times.length - 1)).fill(0));
        series.get(id).push(value);
      }
      for (const [id, values] of series) {
        while (values.length > times.length) values.shift();
        if (!values.some((v) => v > 0) && !message.backends.some((b) => b.id === id)) series.delete(id);
      }
      render(message);
      addEvents(message.events || [], true);
    }
  }

  // -- rendering ------------------------------------------------------------------------

  function render(snap) {
    latest = snap;
    const info = snap.info || {};
    setText($("mode"), info.mode || "—");
    setText($("sticky"), info.sticky);
    setText($("listen"), info.listen);
    setText($("uptime"), duration(snap.uptime));
    const redis = snap.redis;
    const redisNode = $("redis");
    if (!redis) setText(redisNode, "not watched");
    else if (redis.reachable === null) setText(redisNode, "checking…");
    else if (redis.reachable) setText(redisNode, `reachable · ${redis.ops === null ? "…" : redis.ops.toFixed(0)} cmd/s`);
    else setText(redisNode, "UNREACHABLE");
    redisNode.className = redis && redis.reachable === false ? "state down" : "";
    redisNode.title = redis ? `${redis.url}${redis.error ? ` — ${redis.error}` : ""}` : "";
    const totals = snap.totals || {};
    setText($("total-rps"), fixed(totals.rps, 1));
    setText($("failovers"), totals.failovers);
    setText($("repins"), totals.repins);
    setText($("sessions"), totals.sessions === null ? "n/a" : totals.sessions);
    setText($("connections"), totals.connections);
    setText($("pool"), snap.pool);
    renderBackends(snap);
    renderWorkers(snap);
    drawChart();
  }

  function renderBackends(snap) {
    const tbody = $("backends").tBodies[0];
    const seen = new Set();
    const showWorker = Boolean(snap.info && snap.info.spawn);
    $("backends").classList.toggle("no-worker", !showWorker);
    snap.backends.forEach((backend, index) => {
      seen.add(backend.id);
      let row = rows.get(backend.id);
      if (!row) {
        row = newBackendRow(backend);
        rows.set(backend.id, row);
      }
      if (tbody.children[index] !== row.tr) tbody.insertBefore(row.tr, tbody.children[index] || null);
      const state = backend.state;
      row.tr.className = state;
      row.tr.dataset.state = state;
      setText(row.stateText, state.toUpperCase());
      row.state.className = `state ${state}`;
      const why = backend.reason || drainText(backend);
      setText(row.reason, why);
      row.reason.title = why;
      setText(row.sinceAgo, duration(snap.time - backend.since));
      setText(row.sinceAt, clock(backend.since));
      setText(row.inFlight, backend.in_flight);
      setText(row.rps, fixed(backend.rps, 1));
      setText(row.errors, percent(backend.error_rate));
      setText(row.p50, ms(backend.p50_ms));
      setText(row.p99, ms(backend.p99_ms));
      setText(row.sessions, sessionsText(backend));
      row.sessions.dataset.pinned = backend.pinned ?? "";
      row.sessions.dataset.active = backend.active ?? "";
      const worker = backend.worker;
      setText(row.worker, worker
        ? `#${worker.index} pid ${worker.pid ?? "—"} · ${worker.restarts} restarts · up ${duration(worker.uptime)}`
        : showWorker ? "—" : "");
      row.drain.disabled = state === "drained";
      setText(row.drain, state === "draining" ? "end drain" : "drain");
      row.enable.disabled = state !== "draining" && state !== "drained";
      row.view.disabled = backend.pinned === null || backend.pinned === undefined;
    });
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
  }

  // A DRAINING row: how its pinned clients are treated and for how long; a DRAINED one: why
  // its drain ended (idle, empty, deadline, now).
  function drainText(backend) {
    if (backend.state === "draining" && backend.drain_sessions) {
      return `${backend.drain_sessions === "keep" ? "keeping" : "moving"} sessions · ${duration(backend.drain_for)}`;
    }
    if (backend.state === "drained" && backend.drained_reason) return `ended: ${backend.drained_reason}`;
    return "";
  }

  // Pinned sessions (the pin table's, last 5 minutes); a DRAINING row adds those seen
  // within --drain-idle, the count its drain waits to fall to 0.
  function sessionsText(backend) {
    const pinned = backend.pinned ?? backend.sessions;
    if (pinned === null || pinned === undefined) return "n/a";
    if (backend.active === null || backend.active === undefined) return String(pinned);
    return `${pinned} · ${backend.active} active`;
  }

  function newBackendRow(backend) {
    const tr = el("tr");
    tr.dataset.backendId = backend.id;
    const url = el("td", "url");
    url.append(el("span", "name", backend.url), el("small", null, backend.id));
    url.title = backend.url;
    const state = el("td", "state");
    const stateText = el("span", "state-text");
    const reason = el("small", "reason");
    state.append(stateText, reason);
    const since = el("td", "since");
    const sinceAgo = el("span");
    const sinceAt = el("small");
    since.append(sinceAgo, sinceAt);
    const cells = {
      tr, state, stateText, reason, since, sinceAgo, sinceAt,
      inFlight: el("td", "num in-flight"),
      rps: el("td", "num rps"),
      errors: el("td", "num errors"),
      p50: el("td", "num p50"),
      p99: el("td", "num p99"),
      sessions: el("td", "num sessions"),
      worker: el("td", "worker-col worker"),
    };
    const actions = el("td", "actions");
    const id = backend.id;
    const name = () => backendLabel(id);
    const drainPath = `backends/${encodeURIComponent(id)}/drain`;
    cells.drain = button("drain", "drain", () => {
      const now = latest && latest.backends.find((b) => b.id === id);
      if (now && now.state === "draining") {
        act(`End the drain of ${name()} now? It becomes DRAINED: safe to remove; its pinned sessions move.`, `end the drain of ${name()}`, "POST", `${drainPath}?now=1`);
        return;
      }
      act(`Drain ${name()}? It gets no new clients; in-flight requests finish.`, `drain ${name()}`, "POST",
        (choice) => (choice === "now" ? `${drainPath}?now=1` : `${drainPath}?sessions=${choice}`), undefined, DRAIN_CHOICES);
    });
    cells.view = button("sessions", "view-sessions", () => showSessions(id));
    cells.enable = button("enable", "enable", () => act(`Enable ${name()} again?`, `enable ${name()}`, "POST", `backends/${encodeURIComponent(id)}/enable`));
    cells.remove = button("remove", "remove danger", () => act(`Remove ${name()} from the pool?`, `remove ${name()}`, "DELETE", `backends/${encodeURIComponent(id)}`));
    actions.append(cells.drain, cells.enable, cells.view, cells.remove);
    tr.append(url, state, cells.since, cells.inFlight, cells.rps, cells.errors, cells.p50,
      cells.p99, cells.sessions, cells.worker, actions);
    return cells;
  }

  function button(text, className, onClick) {
    const node = el("button", className, text);
    node.type = "button";
    node.addEventListener("click", onClick);
    return node;
  }

  function renderWorkers(snap) {
    const panel = $("workers-panel");
    const workers = snap.workers;
    panel.hidden = !workers;
    if (!workers) return;
    // With --spawn MIN:MAX the count moves by itself: show its range and the load it follows.
    const auto = workers.autoscale;
    setText($("desired"), auto
      ? `desired ${workers.desired} of ${auto.min}..${auto.max} (autoscaling: ${auto.load === null ? "–" : auto.load.toFixed(2)} in flight per worker, target ${auto.target})`
      : `desired ${workers.desired}`);
    const rollout = workers.rolling_restart;
    setText($("rollout"), rollout ? `rolling restart: ${rollout.phase}, ${rollout.replaced} replaced` : "");
    const tbody = $("workers").tBodies[0];
    const seen = new Set();
    workers.workers.forEach((worker, index) => {
      seen.add(worker.key);
      let row = workerRows.get(worker.key);
      if (!row) {
        row = { tr: el("tr") };
        row.tr.dataset.workerIndex = worker.index;
        for (const name of ["index", "state", "pid", "port", "restarts", "uptime", "exit"]) {
          row[name] = el("td", name === "index" || name === "state" ? name : `num ${name}`);
          row.tr.append(row[name]);
        }
        workerRows.set(worker.key, row);
      }
      if (tbody.children[index] !== row.tr) tbody.insertBefore(row.tr, tbody.children[index] || null);
      row.tr.dataset.state = worker.state;
      setText(row.index, worker.index);
      setText(row.state, worker.state.toUpperCase() + (worker.retiring ? " (retiring)" : ""));
      setText(row.pid, worker.pid);
      setText(row.port, worker.port);
      setText(row.restarts, worker.restarts);
      setText(row.uptime, duration(worker.uptime));
      setText(row.exit, worker.last_exit);
    });
    for (const [key, row] of workerRows) {
      if (!seen.has(key)) {
        row.tr.remove();
        workerRows.delete(key);
      }
    }
  }

  // -- the chart: one line per backend, requests/s over the last 3 minutes ---------------

  function drawChart() {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 560;
    const height = canvas.clientHeight || 240;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 44, right = 8, top = 8, bottom = 20;
    const plotW = width - left - right, plotH = height - top - bottom;
    let max = 1;
    for (const values of series.values()) for (const v of values) if (v > max) max = v;
    max = niceCeil(max);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7580";
    ctx.strokeStyle = "#e2e6ea";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + plotH - (plotH * i) / 4;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(left + plotW, y);
      ctx.stroke();
      ctx.fillText(formatAxis((max * i) / 4), 4, y + 4);
    }
    ctx.fillText(`−${HISTORY}s`, left, height - 4);
    ctx.fillText("now", left + plotW - 20, height - 4);
    const step = plotW / (HISTORY - 1);
    const legend = $("legend");
    const items = [];
    for (const [id, values] of series) {
      ctx.strokeStyle = colorOf(id);
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      const offset = HISTORY - values.length;
      values.forEach((v, i) => {
        const x = left + (offset + i) * step;
        const y = top + plotH - (plotH * v) / max;
        if (i === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      });
      ctx.stroke();
      const item = el("li", null, backendLabel(id));
      item.style.setProperty("--swatch", colorOf(id));
      items.push(item);
    }
    const signature = items.map((i) => i.textContent).join("\n");
    if (legend.dataset.signature !== signature) {
      legend.dataset.signature = signature;
      legend.replaceChildren(...items);
    }
  }

  function niceCeil(value) {
    const power = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 2, 4, 8, 10]) if (value <= m * power) return m * power;
    return 10 * power;
  }

  const formatAxis = (v) => (v >= 1000 ? `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)}k`
    : v.toFixed(v % 1 === 0 ? 0 : v < 1 ? 2 : 1));

  // -- events ------------------------------------------------------------------------------

  const DESCRIBE = {
    backend_state: (f) => `${f.url || f.backend}: ${String(f.old).toUpperCase()} → ${String(f.new).toUpperCase()}${f.reason ? ` (${f.reason})` : ""}`,
    backend_added: (f) => `${f.url} added`,
    backend_draining: (f) => `${backendLabel(f.backend)} draining, ${f.sessions === "keep" ? "keeping" : "moving"} its pinned sessions (${f.in_flight} in flight)`,
    backend_drained: (f) => `${backendLabel(f.backend)} drained after ${f.after}s (${f.reason}): ${f.pinned} session(s) still pinned`,
    backend_enabled: (f) => `${backendLabel(f.backend)} enabled`,
    backend_removed: (f) => `${f.backend} removed (${f.in_flight} in flight)`,
    backend_weight: (f) => `${backendLabel(f.backend)} weight ${f.was} -> ${f.weight}`,
    backend_discovered: (f) => `${f.url} found in the registry (instance ${f.instance})`,
    backend_undiscovered: (f) => `${f.url} left the registry (instance ${f.instance})`,
    session_moved: (f) => `session ${f.session} moves to ${backendLabel(f.backend)} on its next request`,
    session_forgotten: (f) => `session ${f.session} forgotten: placed anew on its next request`,
    failover: (f) => `${f.requests} request(s) failed over, ${f.repinned} client(s) re-pinned`,
    sessions_moved: (f) => `${f.sessions} session(s) moved from ${f.from} to ${Object.entries(f.to || {}).map(([url, n]) => `${url} (${n})`).join(", ")}`,
    worker_crashed: (f) => `worker #${f.index} (pid ${f.pid}) exited with ${f.code}; restart in ${f.restart_in}s (crash ${f.crashes} in a row)`,
    worker_restarted: (f) => `worker #${f.index} restarted: pid ${f.pid}, ${f.restarts} restart(s)`,
    worker_held: (f) => `worker #${f.index} held after ${f.crashes} early crashes: ${f.hint}`,
    rolling_restart_started: (f) => `rolling restart of ${f.workers} worker(s) started`,
    worker_replacing: (f) => `rolling restart: worker #${f.index} pid ${f.old_pid} is being replaced by pid ${f.new_pid}`,
    worker_ready: (f) => `worker #${f.index} (pid ${f.pid}) ready at ${f.url}`,
    worker_draining: (f) => `worker #${f.index} (pid ${f.pid}) draining`,
    worker_exited: (f) => `worker #${f.index} (pid ${f.pid}) exited (${f.code}, was ${f.was})`,
    worker_added: (f) => `worker #${f.index} added (pid ${f.pid})`,
    worker_removing: (f) => `worker #${f.index} (pid ${f.pid}) removed`,
    workers_scaled: (f) => `desired workers: ${f.desired} (${f.delta > 0 ? "+" : ""}${f.delta})`,
    autoscale_up: (f) => `autoscale: ${f.workers} → ${f.desired} workers (${f.reason})`,
    autoscale_down: (f) => `autoscale: ${f.workers} → ${f.desired} workers (${f.reason})`,
    autoscale_at_max: (f) => `autoscale: at the maximum, ${f.workers} workers (${f.reason})`,
    rolling_restart_done: (f) => `rolling restart done: ${f.replaced} replaced`,
  };

  function describe(event) {
    const known = DESCRIBE[event.name];
    if (known) {
      try {
        return known(event.fields || {});
      } catch (error) {
        // An unexpected shape: fall through to the generic form.
      }
    }
    return Object.entries(event.fields || {})
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  }

  function addEvents(events, fresh) {
    const list = $("events");
    const items = [];
    for (const event of events) {
      if (event.seq <= lastSeq) continue;
      lastSeq = event.seq;
      const item = el("li", `${String(event.level).toLowerCase()}${fresh ? " fresh" : ""}`);
      item.dataset.event = event.name;
      const time = el("time", null, clock(event.time));
      const text = el("span");
      text.append(el("span", "name", event.name), el("span", "fields", describe(event)));
      item.append(time, text);
      items.push(item);
    }
    if (!items.length) return;
    items.reverse(); // newest first
    list.prepend(...items);
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
    setText($("event-count"), `${lastSeq} so far`);
  }

  // -- actions ---------------------------------------------------------------------------

  // How a drain treats its pinned clients; the first is checked unless the balancer's
  // --drain-sessions (info.drain_sessions) says otherwise.
  const DRAIN_CHOICES = [
    ["keep", "keep its pinned sessions until they go idle (--drain-idle), then DRAINED"],
    ["move", "move its pinned sessions to other backends now"],
    ["now", "end at once: DRAINED, safe to remove"],
  ];

  // Resolves to false (cancelled), or true, or with `choices` the value picked.
  function confirmAction(question, choices) {
    const dialog = $("confirm");
    setText($("confirm-text"), question);
    const box = $("confirm-choices");
    box.replaceChildren();
    box.hidden = !choices;
    if (choices) {
      const preferred = (latest && latest.info && latest.info.drain_sessions) || choices[0][0];
      for (const [value, text] of choices) {
        const label = el("label");
        const input = el("input");
        input.type = "radio";
        input.name = "confirm-choice";
        input.value = value;
        input.checked = value === preferred;
        label.append(input, el("span", null, ` ${value}: ${text}`));
        box.append(label);
      }
    }
    const picked = () => {
      if (!choices) return true;
      const input = box.querySelector("input:checked");
      return input ? input.value : choices[0][0];
    };
    return new Promise((resolve) => {
      const done = (answer) => {
        $("confirm-form").onsubmit = null;
        $("confirm-cancel").onclick = null;
        dialog.onclose = null;
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      $("confirm-form").onsubmit = (event) => {
        event.preventDefault();
        done(picked());
      };
      $("confirm-cancel").onclick = () => done(false);
      dialog.onclose = () => done(false);
      dialog.showModal();
    });
  }

  let outcomeTimer = null;

  function showOutcome(ok, text) {
    const node = $("outcome");
    setText(node, text);
    node.className = ok ? "ok" : "bad";
    node.dataset.ok = ok ? "true" : "false";
    node.hidden = false;
    clearTimeout(outcomeTimer);
    outcomeTimer = setTimeout(() => { node.hidden = true; }, 8000);
  }

  // Confirm, call the admin API, show the outcome; resolves to whether it succeeded.
  // `path` may be a function of the choice picked among `choices`.
  async function act(question, label, method, path, body, choices) {
    const answer = await confirmAction(question, choices);
    if (!answer) return false;
    return call(label, method, typeof path === "function" ? path(answer) : path, body);
  }

  // Call the admin API (asking for the token again once on a 401), show the outcome.
  async function call(label, method, path, body) {
    for (let attempt = 0; attempt < 2; attempt++) {
      let response;
      try {
        response = await fetch(path, {
          method,
          headers: headers(body ? { "Content-Type": "application/json" } : {}),
          body: body ? JSON.stringify(body) : undefined,
          cache: "no-store",
        });
      } catch (error) {
        showOutcome(false, `${label}: failed (${error.message})`);
        return false;
      }
      if (response.status === 401 && attempt === 0) {
        await askToken("The admin API refused the token; enter it again.");
        continue;
      }
      let detail = "";
      try {
        const data = await response.json();
        detail = data.error || (data.state ? `now ${String(data.state).toUpperCase()}` : "");
        if (response.ok && method === "DELETE") detail = data.session ? "forgotten" : "removed";
        if (response.ok && data.session && method === "POST") detail = `moves to ${backendLabel(data.to)} on its next request`;
        if (data.desired !== undefined) detail = `desired ${data.desired}`;
        if (data.restart !== undefined) detail = String(data.restart);
      } catch (error) {
        // Not JSON: the status says enough.
      }
      showOutcome(response.ok, `${label}: ${response.status}${detail ? ` — ${detail}` : ""}`);
      return response.ok;
    }
    return false;
  }

  // -- one backend's sessions: forget or move one ----------------------------------------

  let sessionsOf = null; // the backend whose sessions the dialog shows

  async function showSessions(id) {
    sessionsOf = id;
    const dialog = $("sessions-dialog");
    setText($("sessions-title"), `Sessions pinned to ${backendLabel(id)}`);
    setText($("sessions-summary"), "loading…");
    $("sessions-list").tBodies[0].replaceChildren();
    if (!dialog.open) dialog.showModal();
    let data;
    try {
      const response = await fetch(`backends/${encodeURIComponent(id)}/sessions?limit=50`, {
        headers: headers(), cache: "no-store",
      });
      data = await response.json();
      if (!response.ok) throw new Error(data.error || String(response.status));
    } catch (error) {
      setText($("sessions-summary"), `could not list them: ${error.message}`);
      return;
    }
    if (sessionsOf !== id) return; // closed, or another backend's opened meanwhile
    setText($("sessions-summary"), `${data.pinned} seen in the last ${duration(data.window)}; the ${data.sessions.length} most recent:`);
    const targets = ((latest && latest.backends) || []).filter((b) => b.id !== id && b.state === "up");
    const rowsOut = data.sessions.map((session) => {
      const tr = el("tr");
      tr.dataset.session = session.session;
      const actions = el("td", "actions");
      const select = el("select", "move-target");
      for (const target of targets) {
        const option = el("option", null, target.url);
        option.value = target.id;
        select.append(option);
      }
      const move = button("move", "move-session", async () => {
        if (!select.value) return;
        await call(`move session ${session.session}`, "POST", `sessions/${session.session}/move`, { backend: select.value });
        showSessions(id);
      });
      move.disabled = !targets.length;
      const forget = button("forget", "forget-session", async () => {
        await call(`forget session ${session.session}`, "DELETE", `sessions/${session.session}`);
        showSessions(id);
      });
      actions.append(select, move, forget);
      tr.append(el("td", "handle", session.session), el("td", "num", `${duration(session.seen_ago)} ago${session.moving ? (session.to ? ` (moving to ${backendLabel(session.to)})` : " (forgotten)") : ""}`), actions);
      return tr;
    });
    $("sessions-list").tBodies[0].replaceChildren(...rowsOut);
  }

  $("sessions-close").addEventListener("click", () => {
    sessionsOf = null;
    $("sessions-dialog").close();
  });

  $("add-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const url = $("add-url").value.trim();
    if (!url) return;
    act(`Add the backend ${url}?`, `add ${url}`, "POST", "backends", { url }).then((ok) => {
      if (ok) $("add-url").value = "";
    });
  });
  $("scale-up").addEventListener("click", () => act("Start one more worker?", "scale +1", "POST", "workers/scale", { delta: 1 }));
  $("scale-down").addEventListener("click", () => act("Stop one worker (the newest drains first)?", "scale −1", "POST", "workers/scale", { delta: -1 }));
  $("restart").addEventListener("click", () => act("Restart every worker, one at a time?", "rolling restart", "POST", "workers/restart"));
  window.addEventListener("resize", drawChart);

  connect();
})();
