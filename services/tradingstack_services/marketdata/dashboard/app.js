// tradingstack dashboard: tickers from the gateway, everything else from the trading API (the OMS),
// which the gateway forwards under /api/trading/. Live through GET /stream (Server-Sent Events),
// read with fetch so an API key can go in the Authorization header (EventSource cannot send one).
"use strict";

const API = "/api/trading";
const state = { tickers: new Map(), orders: new Map(), positions: new Map(), lastEventId: null, stream: null };
const $ = (selector) => document.querySelector(selector);

function headers(extra = {}) {
  const key = sessionStorage.getItem("tradingstack-key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function fmt(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "";
  return Number(value).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function price(value) {  // a coin under 1 needs more places than one near 45,000
  return fmt(value, value && Math.abs(value) < 1 ? 6 : 2);
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

// Market

async function loadTickers() {
  try {
    const answer = await fetch("/tickers");
    if (!answer.ok) return;
    for (const ticker of await answer.json()) state.tickers.set(ticker.symbol, { ...state.tickers.get(ticker.symbol), ...ticker });
    renderTickers();
  } catch (error) { /* the gateway is restarting: the next poll tries again */ }
}

function renderTickers() {
  const body = $("#tickers tbody");
  const symbols = $("#ticket select[name=symbol]");
  for (const [symbol, t] of state.tickers) {
    let row = body.querySelector(`tr[data-symbol="${symbol}"]`);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.symbol = symbol;
      body.append(row);
      const option = document.createElement("option");
      option.value = option.textContent = symbol;
      symbols.append(option);
    }
    const change = t.change_24h ?? 0;
    row.replaceChildren(cell(symbol, "text"), cell(price(t.last_price), "last"), cell(price(t.bid), "bid"),
      cell(price(t.ask), "ask"), cell(`${change >= 0 ? "+" : ""}${fmt(change)}%`, change >= 0 ? "up" : "down"),
      cell(fmt(t.volume_24h, 4), "volume"));
  }
  renderPositions();
}

// Positions and P&L (unrealized at the last price shown)

function renderPositions() {
  const body = $("#positions tbody");
  const rows = [];
  let total = 0;
  for (const [key, p] of [...state.positions].sort()) {
    const last = state.tickers.get(p.symbol)?.last_price;
    const unrealized = last && p.quantity ? p.quantity * (last - p.avg_price) : 0;
    total += unrealized + (p.realized_pnl || 0);
    const row = document.createElement("tr");
    row.dataset.key = key;
    row.append(cell(p.account || "", "text"), cell(p.symbol, "text"), cell(fmt(p.quantity, 4), "qty"),
      cell(price(p.avg_price), "avg"), cell(price(last), "mark"), cell(fmt(unrealized), unrealized >= 0 ? "up" : "down"),
      cell(fmt(p.realized_pnl), "realized"));
    rows.push(row);
  }
  body.replaceChildren(...rows);
  const totalCell = $("#pnl-total");
  totalCell.textContent = rows.length ? `P&L ${fmt(total)}` : "";
  totalCell.className = total >= 0 ? "up" : "down";
}

// Orders

const OPEN = new Set(["new", "risk_checked", "routed", "partially_filled"]);
const RANK = { new: 0, risk_checked: 1, routed: 2, partially_filled: 3, filled: 4, rejected: 4, cancelled: 4 };

function remember(order) {
  const known = state.orders.get(order.order_id);
  // Events from two streams and a page load can arrive in any order: keep the furthest state.
  if (known && (RANK[known.status] > RANK[order.status] ||
      (known.status === order.status && known.filled_quantity > order.filled_quantity))) return;
  state.orders.set(order.order_id, order);
}

function renderOrders() {
  const body = $("#blotter tbody");
  const orders = [...state.orders.values()].sort((a, b) => b.created_at.localeCompare(a.created_at)).slice(0, 200);
  body.replaceChildren(...orders.map((o) => {
    const row = document.createElement("tr");
    row.dataset.orderId = o.order_id;
    const action = document.createElement("td");
    if (OPEN.has(o.status)) {
      const button = document.createElement("button");
      button.textContent = "Cancel";
      button.className = "cancel";
      button.onclick = () => cancel(o.order_id);
      action.append(button);
    }
    row.append(cell(new Date(o.created_at).toLocaleTimeString(), "text"), cell(o.order_id.slice(0, 8), "text"),
      cell(o.symbol, "text"), cell(o.side, "text"), cell(fmt(o.quantity, 4)), cell(o.order_type, "text"),
      cell(price(o.limit_price)), cell(o.status, `text status status-${o.status}`), cell(fmt(o.filled_quantity, 4), "filled"),
      cell(price(o.avg_fill_price)), action);
    return row;
  }));
}

async function loadOrders() {
  const answer = await fetch(`${API}/orders?limit=200`, { headers: headers() });
  if (!answer.ok) return;
  for (const order of (await answer.json()).orders) remember(order);
  renderOrders();
}

async function cancel(orderId) {
  const answer = await fetch(`${API}/orders/${encodeURIComponent(orderId)}/cancel`, { method: "POST", headers: headers() });
  if (answer.ok) { remember(await answer.json()); renderOrders(); }
  else say(`cancel refused: ${await reason(answer)}`, true);
}

async function reason(answer) {
  try {
    const body = await answer.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (error) { return `${answer.status}`; }
}

function say(text, error = false) {
  const result = $("#ticket-result");
  result.textContent = text;
  result.className = error ? "error" : "";
}

async function placeOrder(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const order = {
    client_order_id: `ui-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`,
    symbol: form.get("symbol"), side: form.get("side"), quantity: Number(form.get("quantity")),
    order_type: form.get("order_type"),
  };
  if (order.order_type === "limit") order.limit_price = Number(form.get("limit_price"));
  const answer = await fetch(`${API}/orders`, {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(order),
  });
  if (!answer.ok) { say(`order refused: ${await reason(answer)}`, true); return; }
  const placed = await answer.json();
  remember(placed);
  renderOrders();
  say(`${placed.side} ${placed.quantity} ${placed.symbol}: ${placed.status}${placed.reason ? ` (${placed.reason})` : ""}`,
    placed.status === "rejected");
}

// The live stream: Server-Sent Events over fetch, resumed from the last event id after a break.

function setConnection(live) {
  const badge = $("#connection");
  badge.textContent = live ? "live" : "offline";
  badge.className = `state ${live ? "live" : "down"}`;
}

function handle(event, data) {
  if (event === "hello") loadOrders();
  else if (event === "order") { remember(data); renderOrders(); }
  else if (event === "position") {
    state.positions.set(`${data.account || ""}/${data.symbol}`, data);
    renderPositions();
  } else if (event === "ticker") {
    state.tickers.set(data.symbol, { ...state.tickers.get(data.symbol), ...data });
    renderTickers();
  } else if (event === "reset") state.lastEventId = null;
}

async function follow() {
  const controller = new AbortController();
  state.stream = controller;
  try {
    const extra = state.lastEventId ? { "Last-Event-ID": state.lastEventId } : {};
    const answer = await fetch(`${API}/stream`, { headers: headers(extra), signal: controller.signal });
    if (!answer.ok) throw new Error(await reason(answer));
    setConnection(true);
    const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const fields = {};
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const at = line.indexOf(":");
          fields[line.slice(0, at)] = line.slice(at + 1).replace(/^ /, "");
        }
        if (fields.id) state.lastEventId = fields.id;
        if (fields.event) handle(fields.event, JSON.parse(fields.data || "null"));
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  setConnection(false);
  setTimeout(follow, 1000);
}

function restart() {
  state.stream?.abort();
  state.orders.clear();
  state.positions.clear();
  state.lastEventId = null;
  renderOrders();
  renderPositions();
  follow();
}

$("#ticket").addEventListener("submit", placeOrder);
$("#ticket select[name=order_type]").addEventListener("change", (event) => {
  $("#ticket input[name=limit_price]").disabled = event.target.value !== "limit";
});
$("#cancel-all").addEventListener("click", async () => {
  const answer = await fetch(`${API}/orders/cancel-all`, { method: "POST", headers: headers() });
  if (answer.ok) say(`cancelled ${(await answer.json()).cancelled.length} order(s)`);
  else say(`cancel-all refused: ${await reason(answer)}`, true);
});
$("#api-key").value = sessionStorage.getItem("tradingstack-key") || "";
$("#api-key").addEventListener("change", (event) => {
  sessionStorage.setItem("tradingstack-key", event.target.value.trim());
  restart();
});
loadTickers();
setInterval(loadTickers, 1000);
follow();
