// pxeserver dashboard: ages and clocks, stalled marking, and live updates over Server-Sent
// Events. Plain JavaScript, no build step. Every value from the server goes into the page as
// text (textContent), never as HTML: event messages hold what clients asked for.
"use strict";
(function () {
  const body = document.body;
  const stalledAfter = Number(body.dataset.stalledAfter || 0);
  const LIVE = ["netbooting", "installing"];

  function ago(seconds) {
    if (seconds < 60) return Math.max(0, Math.floor(seconds)) + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " d ago";
  }

  function tick() {
    const now = Date.now() / 1000;
    document.querySelectorAll("td.age").forEach(function (cell) {
      const t = Number(cell.dataset.time);
      cell.textContent = t ? ago(now - t) : "never";
    });
    document.querySelectorAll("[data-clock]").forEach(function (cell) {
      if (!cell.textContent) cell.textContent = new Date(Number(cell.dataset.clock) * 1000).toLocaleString();
    });
    if (stalledAfter) {
      document.querySelectorAll("tr[data-mac]").forEach(function (tr) {
        const t = Number(tr.dataset.time || 0);
        const stalled = LIVE.includes(tr.dataset.status) && tr.dataset.netboot === "on" && now - t > stalledAfter;
        if (stalled && !tr.classList.contains("stalled")) {
          tr.classList.add("stalled");
          statusCell(tr.querySelector("td.status"), tr.dataset.status, true, true);
        }
      });
    }
  }

  function badge(text, cls) {
    const span = document.createElement("span");
    span.className = "badge " + cls;
    span.textContent = text;
    return span;
  }

  function statusCell(cell, status, stalled, netboot) {
    cell.replaceChildren(badge(status, status));
    if (stalled) cell.append(" ", badge("stalled", "stalled"));
    if (!netboot) {
      const off = document.createElement("span");
      off.className = "muted";
      off.textContent = "netboot off";
      cell.append(" ", off);
    }
  }

  function updateRow(tr, row) {
    tr.dataset.status = row.status;
    tr.dataset.time = row.last_time || "";
    tr.dataset.netboot = row.netboot ? "on" : "off";
    tr.classList.toggle("stalled", row.stalled);
    statusCell(tr.querySelector("td.status"), row.status, row.stalled, row.netboot);
    const last = tr.querySelector("td.last");
    const source = document.createElement("span");
    source.className = "source";
    source.textContent = row.last_source;
    last.replaceChildren(source, " " + row.last_message);
    tr.querySelector("td.age").dataset.time = row.last_time || "";
    tr.classList.remove("flash-row");
    void tr.offsetWidth; // restart the highlight animation
    tr.classList.add("flash-row");
  }

  function cells(tr, values) {
    values.forEach(function (value, index) {
      const td = document.createElement("td");
      if (index === 0) td.className = "mono";
      if (value instanceof Node) td.append(value); else td.textContent = value;
      tr.append(td);
    });
  }

  function source(text) {
    const span = document.createElement("span");
    span.className = "source";
    span.textContent = text;
    return span;
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleString();
  }

  function seconds(s) {
    if (s < 60) return "+" + s.toFixed(1) + " s";
    return "+" + Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  }

  const timeline = document.getElementById("timeline");
  const feed = document.getElementById("feed");

  function onEvent(event) {
    if (timeline && event.mac === timeline.dataset.mac) {
      const rows = timeline.tBodies[0].rows;
      const start = Number(timeline.dataset.start || event.time);
      if (!timeline.dataset.start) timeline.dataset.start = String(event.time);
      const previous = rows.length ? Number(rows[rows.length - 1].dataset.time || 0) : 0;
      const tr = document.createElement("tr");
      tr.dataset.time = event.time;
      cells(tr, [clock(event.time), seconds(event.time - start),
                 previous ? seconds(event.time - previous) : "", source(event.source), event.message]);
      timeline.tBodies[0].append(tr);
    }
    if (feed) {
      const tr = document.createElement("tr");
      const link = document.createElement("a");
      link.href = "/hosts/" + event.mac;
      link.textContent = event.hostname;
      cells(tr, [clock(event.time), link, source(event.source), event.message]);
      feed.tBodies[0].prepend(tr);
      while (feed.tBodies[0].rows.length > 500) feed.tBodies[0].lastElementChild.remove();
    }
    if (window.pxeChart) window.pxeChart(event);
  }

  function onMessage(message) {
    const data = JSON.parse(message.data);
    Object.entries(data.hosts || {}).forEach(function ([mac, row]) {
      document.querySelectorAll('tr[data-mac="' + mac + '"]').forEach(function (tr) { updateRow(tr, row); });
    });
    (data.events || []).forEach(onEvent);
    Object.entries(data.counts || {}).forEach(function ([key, count]) {
      const cell = document.querySelector('[data-count="' + key + '"]');
      if (cell) cell.textContent = count;
    });
    tick();
  }

  if (timeline) {
    Array.from(timeline.tBodies[0].rows).forEach(function (tr) {
      const cell = tr.querySelector("[data-clock]");
      if (cell) tr.dataset.time = cell.dataset.clock;
    });
  }
  tick();
  setInterval(tick, 2000);

  const live = document.getElementById("live");
  if (window.EventSource && body.dataset.stream && document.querySelector("#hosts, #feed, #timeline")) {
    // The server ends each stream after a while and EventSource reconnects with the last id.
    const source = new EventSource(body.dataset.stream + "?since=" + encodeURIComponent(body.dataset.feedLast));
    source.onopen = function () { live.classList.add("on"); };
    source.onerror = function () { live.classList.remove("on"); };
    source.onmessage = onMessage;
  }

  // Activity chart: uPlot (vendored) over the page's data, counting live boots and installs.
  const chartData = document.getElementById("chart-data");
  if (chartData && window.uPlot) {
    const data = JSON.parse(chartData.textContent);
    const columns = [data.times, data.boots, data.installs];
    const bucket = data.bucket;
    const el = document.getElementById("chart");
    const plot = new uPlot({
      width: Math.max(400, el.clientWidth), height: 220,
      series: [{}, {label: "boots", stroke: "#2f6fdf", fill: "rgba(47,111,223,0.15)"},
               {label: "installs", stroke: "#1f9d55", fill: "rgba(31,157,85,0.15)"}],
      axes: [{}, {label: "per 10 min"}],
    }, columns, el);
    window.pxeChart = function (event) {
      let index = -1;
      if (event.source === "policy" && event.message.endsWith("-> netbooting")) index = 1;
      else if (event.source === "callback" && event.message.startsWith("install complete")) index = 2;
      if (index < 0) return;
      const slot = Math.floor(event.time / bucket) * bucket;
      if (slot > columns[0][columns[0].length - 1]) { columns.forEach(function (c, i) { c.push(i ? 0 : slot); }); }
      columns[index][columns[index].length - 1] += 1;
      plot.setData(columns);
    };
  }
})();
