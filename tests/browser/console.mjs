// Drives Debian's Chromium through the web console for engine/tests/web_console.rs.
//
// node console.mjs <url> <token> <screenshot dir> <segments>
//
// The test and this script take turns over stdin/stdout: the script prints `ok <step>` when
// a step's checks hold (or `fail <step>: <why>` and exits 1), then waits for the test's next
// line, a JSON object {"step": …, …} saying what it changed in Kafka.
import { chromium } from 'playwright-core';
import readline from 'node:readline';
import path from 'node:path';

const [url, token, shots, segments] = process.argv.slice(2);
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const next = async () => {
  const { value, done } = await lines.next();
  if (done) throw new Error('the test closed stdin');
  return JSON.parse(value);
};
const LOS_F = 'rgb(215, 48, 39)';
const TIMEOUT = 60000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let step = 'start';
const page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
const errors = [];
page.on('pageerror', (e) => errors.push(e.message));
// The refused SQL of step 4 is a 400 on purpose; any other failed request or script error
// fails the test.
page.on('console', (m) => {
  if (m.type() === 'error' && !m.text().includes('status of 400')) errors.push(m.text());
});
const shot = (name) => page.screenshot({ path: path.join(shots, name), fullPage: true });
try {
  // 0. A stored token a header cannot carry (a pasted en dash) asks for the token again,
  // without a script error (it once left the page "connecting…" with no form).
  step = 'token';
  const other = await browser.newPage();
  const otherErrors = [];
  other.on('pageerror', (e) => otherErrors.push(e.message));
  await other.addInitScript(() => localStorage.setItem('urbanstream.token', 's3cret\u2013token'));
  await other.goto(url);
  await other.waitForFunction(() => !document.getElementById('token-form').hidden, null, { timeout: TIMEOUT });
  if (otherErrors.length) throw new Error('script errors with a bad token: ' + otherErrors.join('; '));
  await other.close();

  // 1. The map draws every segment of the reference, coloured by the LOS in Kafka.
  step = 'map';
  await page.addInitScript((t) => localStorage.setItem('urbanstream.token', t), token);
  await page.goto(url);
  await page.waitForFunction((n) => document.querySelectorAll('#map .segment').length === n,
    Number(segments), { timeout: TIMEOUT });
  await page.waitForFunction((n) => document.querySelectorAll('#map .segment[data-los="A"]').length === n,
    Number(segments), { timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelectorAll('#map .ward[data-aqi]:not([data-aqi=""])').length > 0,
    null, { timeout: TIMEOUT });
  // Flood warnings and parking beside them: the gauge at level II, the ward's parking.
  await page.waitForFunction(() => document.querySelector('#map .gauge[data-gauge="wl-001"]')?.dataset.warning === '2',
    null, { timeout: TIMEOUT });
  await page.waitForSelector('#water tr[data-gauge="wl-001"]', { timeout: TIMEOUT });
  const water = await page.textContent('#water tr[data-gauge="wl-001"]');
  if (!water.includes('21.5') || !water.includes('Warning level II')) throw new Error('water row: ' + water);
  await page.waitForSelector('#parking tr[data-ward="hoan_kiem"]', { timeout: TIMEOUT });
  const parking = await page.textContent('#parking tr[data-ward="hoan_kiem"]');
  if (!parking.includes('96.5 %') || !parking.includes('570')) throw new Error('parking row: ' + parking);
  if ((await page.$$('#map .lot')).length === 0) throw new Error('no parking lot on the map');
  const legend = await page.textContent('#legend-aqi');
  if (!legend.includes('Nguy hại') || !legend.includes('Hazardous')) throw new Error('AQI legend: ' + legend);
  const connection = await page.textContent('#connection');
  if (connection !== 'live') throw new Error('connection: ' + connection);
  await shot('1-map.png');
  console.log('ok map');

  // 2. Segments whose LOS falls to F turn red without a reload.
  let input = await next();
  step = input.step;
  await page.waitForFunction((ids) => ids.every((id) => {
    const line = document.querySelector(`#map .segment[data-segment="${id}"]`);
    return line && line.dataset.los === 'F';
  }), input.segments, { timeout: TIMEOUT });
  for (const id of input.segments) {
    const stroke = await page.$eval(`#map .segment[data-segment="${id}"]`, (e) => getComputedStyle(e).stroke);
    if (stroke !== LOS_F) throw new Error(`${id} is drawn ${stroke}, not LOS F red`);
  }
  const stillA = await page.$$eval('#map .segment[data-los="A"]', (e) => e.length);
  if (stillA !== Number(segments) - input.segments.length) throw new Error(`${stillA} segments still A`);
  await shot('2-los-changed.png');
  console.log('ok ' + step);

  // 3. An alert appears with its explanation, written as text (never as markup).
  input = await next();
  step = input.step;
  const selector = `#alerts li[data-alert-id="${input.alert_id}"]`;
  await page.waitForSelector(selector, { timeout: TIMEOUT });
  const text = await page.textContent(selector);
  if (!text.includes(input.message)) throw new Error('alert text: ' + text);
  if (await page.$(`${selector} b, ${selector} img`)) throw new Error('the alert message was rendered as markup');
  await shot('3-alert.png');
  console.log('ok ' + step);

  // 3b. A segment added to the reference table is drawn, with its LOS, without a reload.
  input = await next();
  step = input.step;
  await page.waitForFunction((id) => {
    const line = document.querySelector(`#map .segment[data-segment="${id}"]`);
    return line && line.dataset.los === 'F';
  }, input.id, { timeout: TIMEOUT });
  await shot('3b-segment.png');
  console.log('ok ' + step);

  // 4. The SQL editor refuses bad SQL with the service's message, then validates and
  // registers a query, which the query table lists.
  input = await next();
  step = input.step;
  await page.waitForSelector('#console:not([hidden])', { timeout: TIMEOUT });
  await page.fill('#sql', 'SELEC oops');
  await page.click('#validate');
  await page.waitForSelector('#sql-result .error', { timeout: TIMEOUT });
  const refusal = await page.textContent('#sql-result');
  if (!/line 1/.test(refusal)) throw new Error('refusal without its position: ' + refusal);
  await page.fill('#sql', input.sql);
  await page.fill('#query-name', input.name);
  await page.click('#validate');
  await page.waitForSelector('#sql-result .ok', { timeout: TIMEOUT });
  await page.click('#explain');
  await page.waitForFunction(() => document.querySelector('#sql-result pre')?.textContent.includes('queries'),
    null, { timeout: TIMEOUT });
  await page.click('#register');
  await page.waitForFunction((name) => document.querySelector('#sql-result .ok')?.textContent.includes(name),
    input.name, { timeout: TIMEOUT });
  await page.waitForSelector(`#queries tr[data-query="${input.name}"]`, { timeout: TIMEOUT });
  await shot('4-registered.png');
  console.log('ok ' + step);

  // 5. Pause from the query table.
  input = await next();
  step = input.step;
  await page.click(`#queries button[data-query="${input.name}"][data-action="pause"]`);
  await page.waitForSelector(`#queries tr[data-query="${input.name}"] .state-PAUSED`, { timeout: TIMEOUT });
  await shot('5-paused.png');
  if (errors.length) throw new Error('errors in the page: ' + [...new Set(errors)].slice(0, 3).join(' | '));
  console.log('ok ' + step);
  await browser.close();
  process.exit(0);
} catch (e) {
  try { await shot('failed-' + step + '.png'); } catch (_) { /* the page may be gone */ }
  console.log(`fail ${step}: ${e.message.split('\n')[0]}`);
  await browser.close();
  process.exit(1);
}
