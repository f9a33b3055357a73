// The urbanstream web console: the city map and alerts from /v1/city (live over server-sent
// events), and, when served by `urbanstream serve`, the queries and a SQL editor over the
// REST API. Every value from the server is written as text, never as markup.
'use strict';

const LOS = {
  A: { color: '#1a9850', vi: 'Tự do', en: 'Free flow' },
  B: { color: '#91cf60', vi: 'Khá tự do', en: 'Reasonably free' },
  C: { color: '#d9ef8b', vi: 'Ổn định', en: 'Stable' },
  D: { color: '#fee08b', vi: 'Gần mất ổn định', en: 'Approaching unstable' },
  E: { color: '#fc8d59', vi: 'Không ổn định', en: 'Unstable' },
  F: { color: '#d73027', vi: 'Ùn tắc', en: 'Congested' },
};
const NO_DATA = '#9e9e9e';
// VN_AQI categories and colours (Decision 1459/QĐ-TCMT).
const AQI = [
  { max: 50, color: 'rgb(0,228,0)', vi: 'Tốt', en: 'Good' },
  { max: 100, color: 'rgb(255,255,0)', vi: 'Trung bình', en: 'Moderate' },
  { max: 150, color: 'rgb(255,126,0)', vi: 'Kém', en: 'Poor' },
  { max: 200, color: 'rgb(255,0,0)', vi: 'Xấu', en: 'Bad' },
  { max: 300, color: 'rgb(143,63,151)', vi: 'Rất xấu', en: 'Very bad' },
  { max: Infinity, color: 'rgb(126,0,35)', vi: 'Nguy hại', en: 'Hazardous' },
];
// Parking occupancy and water warning levels.
const PARKING = [
  { max: 70, color: '#2c7bb6', vi: 'Còn chỗ', en: 'Spaces free' },
  { max: 90, color: '#fdae61', vi: 'Gần đầy', en: 'Filling' },
  { max: Infinity, color: '#7b3294', vi: 'Đầy', en: 'Full' },
];
const WATER = [
  { color: '#74add1', vi: 'Bình thường', en: 'Below level I' },
  { color: '#ffd92f', vi: 'Báo động I', en: 'Warning level I' },
  { color: '#fc8d59', vi: 'Báo động II', en: 'Warning level II' },
  { color: '#b2182b', vi: 'Báo động III', en: 'Warning level III' },
];
const SVG = 'http://www.w3.org/2000/svg';
function parkingCategory(pct) { return PARKING.find((c) => pct < c.max) || PARKING[PARKING.length - 1]; }
const $ = (id) => document.getElementById(id);

const state = { map: null, snapshot: null, offsetMinutes: 420, zone: 'UTC+07:00', hasConsole: false, seen: new Map() };

// ---------- API ----------

function token() { return localStorage.getItem('urbanstream.token') || ''; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  // A header carries printable ASCII only: a token with another character (a pasted dash)
  // threw out of every request and left the page "connecting…" with no form to fix it.
  if (token() && !/^[\x21-\x7e]+$/.test(token())) {
    $('token-form').hidden = false;
    return new Response(JSON.stringify({ message: 'the stored API token has a character a token cannot have: enter it again' }), { status: 401 });
  }
  if (token()) headers.Authorization = 'Bearer ' + token();
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) $('token-form').hidden = false;
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  let body = null;
  const text = await response.text();
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = { message: text }; }
  return { ok: response.ok, status: response.status, body };
}

// ---------- helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    // Colours go through the CSSOM: the page's CSP refuses style attributes.
    if (k === 'class') node.className = v;
    else if (k === 'background') node.style.background = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function showTime(ms) {
  if (typeof ms !== 'number' || ms <= 0) return '-';
  const local = new Date(ms + state.offsetMinutes * 60000);
  // A time no date can hold (a query wrote nanoseconds, say) is shown as it is.
  if (!Number.isFinite(local.getTime())) return String(ms);
  return local.toISOString().slice(0, 19).replace('T', ' ');
}

function duration(ms) {
  if (ms === null || ms === undefined) return '-';
  const s = Math.round(ms / 1000);
  if (Math.abs(s) < 120) return s + ' s';
  if (Math.abs(s) < 7200) return Math.round(s / 60) + ' min';
  return (s / 3600).toFixed(1) + ' h';
}

function bytes(n) {
  if (!n) return '0';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + ' ' + units[i];
}

function aqiCategory(aqi) { return AQI.find((c) => aqi <= c.max); }

// ---------- map ----------

function legends() {
  const los = $('legend-los');
  for (const [level, d] of Object.entries(LOS)) {
    los.append(el('li', {}, el('span', { class: 'swatch', background: d.color }), `${level} ${d.vi} / ${d.en}`));
  }
  los.append(el('li', {}, el('span', { class: 'swatch', background: NO_DATA }), 'chưa có dữ liệu / no data'));
  const aqi = $('legend-aqi');
  let low = 0;
  for (const c of AQI) {
    const range = c.max === Infinity ? `${low}+` : `${low}–${c.max}`;
    aqi.append(el('li', {}, el('span', { class: 'swatch', background: c.color }), `${range} ${c.vi} / ${c.en}`));
    low = c.max + 1;
  }
  const other = $('legend-other');
  for (const c of PARKING) {
    other.append(el('li', {}, el('span', { class: 'swatch', background: c.color }), `■ ${c.vi} / ${c.en}`));
  }
  for (const c of WATER) {
    other.append(el('li', {}, el('span', { class: 'swatch', background: c.color }), `◆ ${c.vi} / ${c.en}`));
  }
}

function drawMap(map) {
  const root = $('map');
  root.replaceChildren();
  // The view fits the road segments (the city centre); wards beyond it are listed in the
  // ward table only.
  const points = map.segments.flatMap((seg) => seg.coords);
  const lons = points.map((p) => p[0]), lats = points.map((p) => p[1]);
  const [w0, s0, e0, n0] = points.length
    ? [Math.min(...lons), Math.min(...lats), Math.max(...lons), Math.max(...lats)]
    : map.bounds;
  const marginLon = (e0 - w0) * 0.08 || 0.01, marginLat = (n0 - s0) * 0.08 || 0.01;
  const [w, s, e, n] = [w0 - marginLon, s0 - marginLat, e0 + marginLon, n0 + marginLat];
  const k = Math.cos(((s + n) / 2) * Math.PI / 180);
  const width = 1000, height = 700, pad = 40;
  const scale = Math.min((width - 2 * pad) / ((e - w) * k || 1), (height - 2 * pad) / ((n - s) || 1));
  const project = (lon, lat) => [pad + (lon - w) * k * scale, pad + (n - lat) * scale];
  const wards = svg('g', { id: 'wards-layer' });
  for (const ward of map.wards) {
    if (ward.lon < w || ward.lon > e || ward.lat < s || ward.lat > n) continue;
    const [x, y] = project(ward.lon, ward.lat);
    const circle = svg('circle', { class: 'ward', cx: x.toFixed(1), cy: y.toFixed(1), r: 22, fill: NO_DATA, 'data-ward': ward.id });
    const title = svg('title');
    title.textContent = ward.name;
    circle.append(title);
    const label = svg('text', { class: 'ward-label', x: x.toFixed(1), y: (y + 34).toFixed(1) });
    label.textContent = ward.name;
    wards.append(circle, label);
  }
  const segments = svg('g', { id: 'segments-layer' });
  for (const seg of map.segments) {
    const points = seg.coords.map(([lon, lat]) => project(lon, lat).map((v) => v.toFixed(1)).join(',')).join(' ');
    const line = svg('polyline', { class: 'segment', points, stroke: NO_DATA, 'data-segment': seg.id, 'data-los': '' });
    const title = svg('title');
    title.textContent = seg.name;
    line.append(title);
    segments.append(line);
  }
  // Parking lots as squares, gauges as diamonds, where they fall inside the view.
  const inside = (p) => p.lon >= w && p.lon <= e && p.lat >= s && p.lat <= n;
  const marks = svg('g', { id: 'points-layer' });
  for (const lot of map.lots || []) {
    if (!inside(lot)) continue;
    const [x, y] = project(lot.lon, lot.lat);
    const square = svg('rect', { class: 'lot', x: (x - 6).toFixed(1), y: (y - 6).toFixed(1), width: 12, height: 12, fill: NO_DATA, 'data-lot': lot.id });
    const title = svg('title');
    title.textContent = lot.name;
    square.append(title);
    marks.append(square);
  }
  for (const gauge of map.gauges || []) {
    if (!inside(gauge)) continue;
    const [x, y] = project(gauge.lon, gauge.lat);
    const d = `M${x.toFixed(1)},${(y - 9).toFixed(1)} L${(x + 9).toFixed(1)},${y.toFixed(1)} L${x.toFixed(1)},${(y + 9).toFixed(1)} L${(x - 9).toFixed(1)},${y.toFixed(1)} Z`;
    const diamond = svg('path', { class: 'gauge', d, fill: NO_DATA, 'data-gauge': gauge.id, 'data-warning': '' });
    const title = svg('title');
    title.textContent = gauge.name;
    diamond.append(title);
    marks.append(diamond);
  }
  root.append(wards, segments, marks);
}

function paint(snapshot) {
  state.offsetMinutes = snapshot.offset_minutes ?? state.offsetMinutes;
  state.zone = snapshot.time_zone || state.zone;
  const names = new Map((state.map?.segments || []).map((s) => [s.id, s.name]));
  const wardNames = new Map((state.map?.wards || []).map((w) => [w.id, w.name]));
  const rows = snapshot.congestion?.segments || {};
  for (const line of document.querySelectorAll('#map .segment')) {
    const id = line.dataset.segment;
    const row = rows[id];
    const level = row && LOS[row.los] ? row.los : '';
    line.setAttribute('stroke', level ? LOS[level].color : NO_DATA);
    line.dataset.los = level;
    line.classList.toggle('stale', Boolean(row && row.stale));
    const speed = row ? (row.space_mean_speed_kmh ?? row.mean_speed_kmh) : null;
    line.querySelector('title').textContent = row
      ? `${names.get(id) || id}\nLOS ${row.los ?? '-'} · ${row.vehicles} xe/veh · ${speed === null || speed === undefined ? '-' : speed.toFixed(1)} km/h · TTI ${row.tti === null || row.tti === undefined ? '-' : row.tti.toFixed(2)}\n${showTime(row.window_start)} (${state.zone})`
      : `${names.get(id) || id}\nchưa có dữ liệu / no data`;
  }
  const air = snapshot.air?.wards || {};
  for (const circle of document.querySelectorAll('#map .ward')) {
    const id = circle.dataset.ward;
    const row = air[id];
    const cat = row && row.aqi !== null && row.aqi !== undefined ? aqiCategory(row.aqi) : null;
    circle.setAttribute('fill', cat ? cat.color : NO_DATA);
    circle.dataset.aqi = cat ? String(row.aqi) : '';
    circle.querySelector('title').textContent = row
      ? `${wardNames.get(id) || id}: VN_AQI ${row.aqi ?? '-'} ${cat ? cat.vi + ' / ' + cat.en : ''}`
      : `${wardNames.get(id) || id}: chưa có dữ liệu / no data`;
  }
  const window = snapshot.congestion?.window;
  const hour = snapshot.air?.hour;
  $('map-meta').textContent =
    `phút / minute ${window || '-'} · giờ / hour ending ${hour || '-'} (${state.zone}) · ` +
    `${Object.keys(rows).length} đoạn đường / segments with data`;
  $('clock').textContent = window ? `${window} ${state.zone}` : '';
  for (const th of document.querySelectorAll('th[data-zone]')) th.textContent = `${th.dataset.zone} (${state.zone})`;
  paintPoints(snapshot);
  paintAlerts(snapshot);
  paintWater(snapshot);
  paintParking(snapshot, wardNames);
  paintWards(snapshot, wardNames);
}

function paintPoints(snapshot) {
  const lots = snapshot.parking?.lots || {};
  const lotNames = new Map((state.map?.lots || []).map((l) => [l.id, l.name]));
  for (const square of document.querySelectorAll('#map .lot')) {
    const id = square.dataset.lot;
    const row = lots[id];
    const pct = row ? row.occupancy_pct : null;
    const cat = pct === null || pct === undefined ? null : parkingCategory(pct);
    square.setAttribute('fill', cat ? cat.color : NO_DATA);
    square.querySelector('title').textContent = cat
      ? `${lotNames.get(id) || id}: ${pct.toFixed(1)} % · ${Math.round(row.free_spaces ?? 0)}/${row.capacity} chỗ trống / free`
      : `${lotNames.get(id) || id}: chưa có dữ liệu / no data`;
  }
  const gauges = snapshot.water?.gauges || {};
  const gaugeNames = new Map((state.map?.gauges || []).map((g) => [g.id, g.name]));
  for (const diamond of document.querySelectorAll('#map .gauge')) {
    const id = diamond.dataset.gauge;
    const row = gauges[id];
    const level = row ? Math.max(0, Math.min(3, row.warning_level)) : null;
    diamond.setAttribute('fill', level === null ? NO_DATA : WATER[level].color);
    diamond.dataset.warning = level === null ? '' : String(level);
    diamond.querySelector('title').textContent = row
      ? `${gaugeNames.get(id) || id}: ${row.level_cm ?? '-'} cm · ${WATER[level].vi} / ${WATER[level].en}`
      : `${gaugeNames.get(id) || id}: chưa có dữ liệu / no data`;
  }
}

function paintWater(snapshot) {
  const body = $('water').tBodies[0];
  const gaugeNames = new Map((state.map?.gauges || []).map((g) => [g.id, g.name]));
  const rows = Object.entries(snapshot.water?.gauges || {})
    .sort((a, b) => b[1].warning_level - a[1].warning_level || (b[1].level_cm ?? 0) - (a[1].level_cm ?? 0));
  const num = (v) => (v === null || v === undefined ? '-' : v.toFixed(1));
  body.replaceChildren(...rows.map(([id, r]) => {
    const level = Math.max(0, Math.min(3, r.warning_level));
    return el('tr', { 'data-gauge': id },
      el('td', {}, gaugeNames.get(id) || id),
      el('td', { class: 'num' }, num(r.level_cm)),
      el('td', {}, el('span', { class: 'swatch', background: WATER[level].color }), ` ${WATER[level].vi} / ${WATER[level].en}`),
      el('td', { class: 'num' }, num(r.rise_cm_h)),
      el('td', { class: 'num' }, num(r.rainfall_mm_h)));
  }));
}

function paintParking(snapshot, wardNames) {
  const body = $('parking').tBodies[0];
  const rows = Object.entries(snapshot.parking?.wards || {})
    .sort((a, b) => (b[1].occupancy_pct ?? 0) - (a[1].occupancy_pct ?? 0));
  body.replaceChildren(...rows.map(([id, r]) => {
    const pct = r.occupancy_pct ?? 0;
    const cat = parkingCategory(pct);
    return el('tr', { 'data-ward': id },
      el('td', {}, wardNames.get(id) || id),
      el('td', { class: 'num' }, String(Math.round(r.free_spaces ?? 0))),
      el('td', { class: 'num' }, String(r.capacity)),
      el('td', {}, el('span', { class: 'swatch', background: cat.color }), ` ${pct.toFixed(1)} %`));
  }));
}

function paintAlerts(snapshot) {
  const list = $('alerts');
  const alerts = snapshot.alerts || [];
  $('alert-count').textContent = String(snapshot.alerts_active ?? alerts.length);
  if (alerts.length === 0) {
    list.replaceChildren(el('li', { class: 'empty' }, 'Không có cảnh báo / no active alert'));
    return;
  }
  list.replaceChildren(...alerts.map((a) => el('li', { class: 'alert sev-' + (a.severity ?? 0), 'data-alert-id': a.alert_id },
    el('div', { class: 'what' }, `${a.kind} · ${a.entity_name || a.entity_id}`),
    el('div', { class: 'when' }, `${a.state} · mức / severity ${a.severity ?? '-'} · từ / since ${a.started || showTime(a.started_at)}`),
    el('div', { class: 'why' }, a.message || ''))));
}

function paintWards(snapshot, wardNames) {
  const body = $('wards').tBodies[0];
  const rows = Object.entries(snapshot.air?.wards || {})
    .filter(([, r]) => r.aqi !== null && r.aqi !== undefined)
    .sort((a, b) => b[1].aqi - a[1].aqi);
  body.replaceChildren(...rows.map(([id, r]) => {
    const cat = aqiCategory(r.aqi);
    return el('tr', { 'data-ward': id },
      el('td', {}, wardNames.get(id) || id),
      el('td', { class: 'num' }, r.aqi),
      el('td', {}, el('span', { class: 'swatch', background: cat.color }), ` ${cat.vi} / ${cat.en}`),
      el('td', {}, r.dominant_pollutant || '-'));
  }));
}

async function streamCity() {
  for (;;) {
    let reader = null;
    try {
      const response = await api('/v1/city/events', { headers: { Accept: 'text/event-stream' } });
      if (!response.ok || !response.body) throw new Error('HTTP ' + response.status);
      setConnection('live', 'live');
      reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
          if (data) {
            // One bad snapshot is skipped, not allowed to end the stream.
            try {
              state.snapshot = JSON.parse(data);
              // The reference tables changed: draw their map first.
              const version = state.snapshot.map_version;
              if (version !== undefined && version !== state.map.version) {
                const r = await apiJson('/v1/city/map');
                if (r.ok) {
                  state.map = r.body;
                  drawMap(state.map);
                }
              }
              paint(state.snapshot);
            } catch (e) {
              console.warn('snapshot not shown: ' + e.message);
            }
          }
        }
      }
      setConnection('down', 'disconnected, retrying…');
    } catch (e) {
      setConnection('down', 'no connection, retrying… (' + e.message + ')');
    } finally {
      // Never leave a stream open behind a new one (browsers allow six per host).
      if (reader) reader.cancel().catch(() => {});
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function setConnection(kind, text) {
  const c = $('connection');
  c.className = 'conn ' + kind;
  c.textContent = text;
}

// ---------- queries ----------

async function refreshQueries() {
  const { ok, status, body } = await apiJson('/v1/queries');
  if (status === 404) {
    $('console').hidden = true;
    $('console-absent').hidden = false;
    return false;
  }
  if (!ok) return true;
  $('console').hidden = false;
  state.hasConsole = true;
  const tbody = $('queries').tBodies[0];
  const now = performance.now();
  // Rates from the counts of the previous poll.
  const rate = (q, field) => {
    const before = state.seen.get(q.name);
    if (!before || now <= before.at || q[field] < before[field]) return '-';
    return ((q[field] - before[field]) * 1000 / (now - before.at)).toFixed(0) + '/s';
  };
  const rates = new Map(body.map((q) => [q.name, [rate(q, 'rows_in'), rate(q, 'rows_out')]]));
  state.seen = new Map(body.map((q) => [q.name, { at: now, rows_in: q.rows_in, rows_out: q.rows_out }]));
  tbody.replaceChildren(...body.map((q) => {
    const action = q.state === 'PAUSED' ? 'resume' : 'pause';
    const button = el('button', { type: 'button', 'data-action': action, 'data-query': q.name }, action === 'pause' ? 'Pause' : 'Resume');
    button.addEventListener('click', async () => {
      button.disabled = true;
      const r = await apiJson(`/v1/queries/${encodeURIComponent(q.name)}/${action}`, { method: 'POST' });
      if (!r.ok) showResult('error', r.body?.message || `HTTP ${r.status}`);
      await refreshQueries();
    });
    return el('tr', { 'data-query': q.name },
      el('td', {}, q.name + (q.builtin ? ' (built-in)' : '')),
      el('td', { class: 'state-' + q.state, title: q.error || '' }, q.state),
      el('td', { class: 'num' }, `${q.rows_in} (${rates.get(q.name)[0]})`),
      el('td', { class: 'num' }, `${q.rows_out} (${rates.get(q.name)[1]})`),
      el('td', {}, showTime(q.watermark_ms)),
      el('td', { class: 'num' }, duration(q.watermark_lag_ms)),
      el('td', { class: 'num' }, `${q.state_groups} groups · ${bytes(q.state_bytes)}`),
      el('td', {}, q.last_checkpoint ? showTime(q.last_checkpoint.at_ms) : '-'),
      el('td', {}, button));
  }));
  return true;
}

function showResult(kind, ...content) {
  $('sql-result').replaceChildren(el('div', { class: kind }, ...content));
}

function sqlError(body, status) {
  const where = body?.position ? ` (line ${body.position.line}, column ${body.position.column})` : '';
  return (body?.message || `HTTP ${status}`) + where;
}

function rowsTable(rows) {
  if (!rows.length) return el('p', {}, 'no rows');
  const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  return el('table', { class: 'preview' },
    el('thead', {}, el('tr', {}, ...columns.map((c) => el('th', {}, c)))),
    el('tbody', {}, ...rows.map((r) => el('tr', {}, ...columns.map((c) => el('td', {}, r[c] === null || r[c] === undefined ? '' : typeof r[c] === 'object' ? JSON.stringify(r[c]) : r[c]))))));
}

function editor() {
  const sql = () => $('sql').value;
  $('validate').addEventListener('click', async () => {
    const r = await apiJson('/v1/queries/validate', { method: 'POST', body: JSON.stringify({ sql: sql() }) });
    if (r.ok) showResult('ok', 'Hợp lệ / valid: ' + JSON.stringify(r.body));
    else showResult('error', sqlError(r.body, r.status));
  });
  $('explain').addEventListener('click', async () => {
    const r = await apiJson('/v1/queries/explain', { method: 'POST', body: JSON.stringify({ sql: sql() }) });
    if (r.ok) showResult('ok', el('pre', {}, JSON.stringify(r.body, null, 2)));
    else showResult('error', sqlError(r.body, r.status));
  });
  $('preview').addEventListener('click', async () => {
    showResult('ok', 'reading the last 15 minutes of its topic…');
    const body = { sql: sql(), topic: { from_ms: Date.now() - 15 * 60000 }, limit: 50 };
    const r = await apiJson('/v1/queries/preview', { method: 'POST', body: JSON.stringify(body) });
    if (!r.ok) { showResult('error', sqlError(r.body, r.status)); return; }
    const b = r.body;
    const counts = Object.entries(b).filter(([k, v]) => typeof v === 'number').map(([k, v]) => `${k} ${v}`).join(' · ');
    showResult('ok', el('p', {}, `${b.rows.length} rows shown${b.truncated ? ' (more not shown)' : ''} · ${counts}`), rowsTable(b.rows));
  });
  $('register').addEventListener('click', async () => {
    const name = $('query-name').value.trim();
    if (!name) { showResult('error', 'Give the query a name (letters, digits, _).'); return; }
    const r = await apiJson('/v1/queries', { method: 'POST', body: JSON.stringify({ name, sql: sql() }) });
    if (r.ok) { showResult('ok', `Đã đăng ký / registered: ${name} (${r.body?.state || ''})`); await refreshQueries(); }
    else showResult('error', sqlError(r.body, r.status));
  });
}

// ---------- start ----------

async function start() {
  legends();
  $('token').value = token();
  $('token-button').addEventListener('click', () => { $('token-form').hidden = !$('token-form').hidden; });
  $('token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    localStorage.setItem('urbanstream.token', $('token').value);
    location.reload();
  });
  editor();
  for (;;) {
    const r = await apiJson('/v1/city/map');
    if (r.ok) { state.map = r.body; break; }
    setConnection('down', r.status === 401 ? 'API token needed' : 'map not available (' + r.status + ')');
    await new Promise((res) => setTimeout(res, 2000));
  }
  drawMap(state.map);
  streamCity();
  let polling = null;
  const poll = async () => {
    try {
      // The demo serves no queries: stop asking once it says so.
      if (!(await refreshQueries()) && polling) clearInterval(polling);
    } catch (e) {
      console.warn('queries not shown: ' + e.message);
    }
  };
  polling = setInterval(poll, 3000);
  await poll();
}

document.addEventListener('DOMContentLoaded', start);
