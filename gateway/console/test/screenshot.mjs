#!/usr/bin/env node
// Opens the HCP console page in headless Chromium and checks what it shows.
//
//   node gateway/console/test/screenshot.mjs --url URL --out PNG
//        [--timeout-ms 30000] [--expect connected|refused]
//        [--chromium /usr/bin/chromium]
//
// --expect connected (the default): waits for body[data-state=connected], for
// noVNC's canvas to have a size and for it to show something (pixels other
// than the most common colour, the same count on consecutive reads), then
// saves a screenshot of the canvas to --out.
// --expect refused: waits for body[data-state] to become refused or
// disconnected; succeeds on refused. --out, if given, gets the whole page.
// --expect typed (the serial console page): waits for connected, types
// --type TEXT and Enter into the terminal, and waits for its lines to
// contain --until TEXT; --out gets the whole page. "terminal" carries the
// terminal's last lines.
//
// A page whose requests were aborted because the host's network changed
// (net::ERR_NETWORK_CHANGED) before its websocket opened is loaded again, at
// most MAX_RELOADS times; "reloads" counts them.
//
// Prints one JSON line on stdout:
//   {"state", "canvas": {"width","height"} | null, "non_background_pixels",
//    "distinct_colours", "reason", "stable", "error"}
// "reason" is the page's data-reason (the server's close reason, if any);
// "error" is null on success and says what went wrong otherwise. For a
// failure's diagnosis it also carries "socket" (what the page's websockets
// did: opened, frames each way, closed) and "log" (the page's errors and
// warnings and failed requests, the last few).
// Exits 0 when it saw what it waited for, 1 otherwise. Diagnostics go to
// stderr.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];
const POLL_MS = 400;
const STABLE_READS = 3;     // non-background counts read in a row that must agree
const STABLE_WOBBLE_PX = 64; // ... to within this many pixels or 1%
const FINISH_TIMEOUT_MS = 15000; // for the screenshot itself, after the wait
// Chromium aborts requests in flight with net::ERR_NETWORK_CHANGED when an
// interface comes or goes on the host: on the test bed, libvirt adding or
// removing the tap device of another test's VM. The page then never loads
// noVNC's modules and never opens its websocket. Before the websocket opens
// the single-use token is unused, so the page is loaded again, as a person
// would press reload; after it opens, never.
const MAX_RELOADS = 3;

function log(msg) {
  process.stderr.write(`[console-screenshot] ${msg}\n`);
}

function usage(msg) {
  process.stderr.write(`${msg}\nusage: node screenshot.mjs --url URL --out PNG ` +
    '[--timeout-ms 30000] [--expect connected|refused] [--chromium PATH]\n');
  process.exit(2);
}

let opts;
try {
  opts = parseArgs({
    options: {
      url: { type: 'string' },
      out: { type: 'string' },
      'timeout-ms': { type: 'string', default: '30000' },
      expect: { type: 'string', default: 'connected' },
      type: { type: 'string', default: '' },
      until: { type: 'string', default: '' },
      chromium: { type: 'string', default: '/usr/bin/chromium' },
    },
    strict: true,
  }).values;
} catch (err) {
  usage(err.message);
}
const timeoutMs = Number(opts['timeout-ms']);
if (!opts.url) usage('--url is required');
if (!['connected', 'refused', 'typed'].includes(opts.expect)) {
  usage('--expect must be connected, refused or typed');
}
if (opts.expect !== 'refused' && !opts.out) usage('--out is required');
if (opts.expect === 'typed' && (!opts.type || !opts.until)) usage('--expect typed needs --type and --until');
if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) usage('--timeout-ms must be a positive number');

const deadline = Date.now() + timeoutMs;
const remaining = () => Math.max(1, deadline - Date.now());
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const result = {
  state: null,
  canvas: null,
  non_background_pixels: 0,
  distinct_colours: 0,
  reason: '',
  stable: false,
  error: null,
  socket: { opened: 0, frames_in: 0, frames_out: 0, closed: 0, errors: [] },
  reloads: 0,
  log: [],
  terminal: '',
};
const LOG_KEEP = 20;

function note(msg) {
  log(msg);
  result.log.push(msg);
  if (result.log.length > LOG_KEEP) result.log.shift();
}

// Runs in the page: counts the canvas's colours. The most common colour is
// taken as the background.
function canvasStats() {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || canvas.width === 0 || canvas.height === 0) return null;
  const ctx = canvas.getContext('2d');
  const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const pixels = new Uint32Array(data.buffer);
  const counts = new Map();
  for (const p of pixels) counts.set(p, (counts.get(p) || 0) + 1);
  let top = 0;
  for (const n of counts.values()) if (n > top) top = n;
  return {
    width: canvas.width,
    height: canvas.height,
    non_background_pixels: pixels.length - top,
    distinct_colours: counts.size,
  };
}

async function pageState(page) {
  return page.evaluate(() => ({
    state: document.body ? document.body.dataset.state || null : null,
    reason: document.body ? document.body.dataset.reason || '' : '',
  }));
}

async function expectConnected(page) {
  await page.waitForFunction(
    () => ['connected', 'refused', 'disconnected'].includes(document.body && document.body.dataset.state),
    null, { timeout: remaining(), polling: 100 });
  Object.assign(result, await pageState(page));
  if (result.state !== 'connected') {
    throw new Error(`page state is ${result.state}, expected connected`);
  }

  await page.waitForFunction(() => {
    const c = document.querySelector('#screen canvas');
    if (!c || c.width === 0 || c.height === 0) return false;
    const box = c.getBoundingClientRect();
    return box.width > 0 && box.height > 0;
  }, null, { timeout: remaining(), polling: 100 });

  // Wait for the canvas to show something and settle. A blinking text cursor
  // changes a few pixels all the time, so "settled" allows a small wobble.
  const reads = [];
  for (;;) {
    const { state, reason } = await pageState(page);
    if (state !== 'connected') {
      Object.assign(result, { state, reason });
      throw new Error(`page state became ${state} while waiting for the screen`);
    }
    const stats = await page.evaluate(canvasStats);
    if (stats) {
      result.canvas = { width: stats.width, height: stats.height };
      result.non_background_pixels = stats.non_background_pixels;
      result.distinct_colours = stats.distinct_colours;
      reads.push(stats.non_background_pixels);
      const recent = reads.slice(-STABLE_READS);
      const lo = Math.min(...recent);
      const hi = Math.max(...recent);
      if (recent.length === STABLE_READS && lo > 0 && hi - lo <= Math.max(STABLE_WOBBLE_PX, hi * 0.01)) {
        result.stable = true;
        break;
      }
    }
    if (Date.now() + POLL_MS >= deadline) {
      if (result.non_background_pixels > 0) {
        log('screen still changing at the timeout; taking the screenshot anyway');
        break;
      }
      throw new Error('the console canvas stayed blank');
    }
    await sleep(POLL_MS);
  }

  await page.locator('#screen canvas').screenshot({ path: opts.out, timeout: FINISH_TIMEOUT_MS });
}

// The serial console page: types a command into the terminal and waits
// for what it must print.
async function expectTyped(page) {
  await page.waitForFunction(
    () => ['connected', 'refused', 'disconnected'].includes(document.body && document.body.dataset.state),
    null, { timeout: remaining(), polling: 100 });
  Object.assign(result, await pageState(page));
  if (result.state !== 'connected') {
    throw new Error(`page state is ${result.state}, expected connected`);
  }
  await page.waitForFunction(() => typeof window.hcpConsoleText === 'function', null,
    { timeout: remaining(), polling: 100 });
  await page.locator('#screen').click();
  // A fresh prompt first: the guest printed its last one long ago.
  await page.keyboard.press('Enter');
  await page.keyboard.type(opts.type, { delay: 20 });
  await page.keyboard.press('Enter');
  for (;;) {
    result.terminal = (await page.evaluate(() => window.hcpConsoleText())).trimEnd().slice(-1500);
    const { state, reason } = await pageState(page);
    if (result.terminal.includes(opts.until)) break;
    if (state !== 'connected') {
      Object.assign(result, { state, reason });
      throw new Error(`page state became ${state} while waiting for ${JSON.stringify(opts.until)}`);
    }
    if (Date.now() + POLL_MS >= deadline) {
      throw new Error(`the terminal never showed ${JSON.stringify(opts.until)}`);
    }
    await sleep(POLL_MS);
  }
  await page.screenshot({ path: opts.out, timeout: FINISH_TIMEOUT_MS });
}

async function expectRefused(page) {
  await page.waitForFunction(
    () => ['refused', 'disconnected'].includes(document.body && document.body.dataset.state),
    null, { timeout: remaining(), polling: 100 });
  Object.assign(result, await pageState(page));
  if (opts.out) {
    await page.screenshot({ path: opts.out, timeout: FINISH_TIMEOUT_MS });
  }
  if (result.state !== 'refused') {
    throw new Error(`page state is ${result.state}, expected refused`);
  }
}

async function main() {
  const userDataDir = await mkdtemp(join(tmpdir(), 'hcp-console-chromium-'));
  let context = null;
  let page = null;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: opts.chromium,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1280, height: 800 },
      deviceScaleFactor: 1,
      timeout: remaining(),
    });
    page = context.pages()[0] || await context.newPage();
    page.on('pageerror', (err) => note(`page error: ${err.message}`));
    page.on('console', (msg) => {
      // (Our own getImageData polling draws a hint about willReadFrequently.)
      if ((msg.type() === 'error' || msg.type() === 'warning') && !msg.text().includes('willReadFrequently')) {
        note(`page ${msg.type()}: ${msg.text()}`);
      }
    });
    // Resolved when the host's network change aborted a request of the
    // page before its websocket opened (see MAX_RELOADS).
    let networkChanged = null;
    let onNetworkChange = () => {};
    page.on('requestfailed', (req) => {
      const why = req.failure() ? req.failure().errorText : '?';
      note(`request failed: ${new URL(req.url()).pathname} (${why})`);
      if (why === 'net::ERR_NETWORK_CHANGED' && result.socket.opened === 0) onNetworkChange();
    });
    // The websocket's life, without its URL (which carries the token).
    const started = Date.now();
    page.on('websocket', (ws) => {
      result.socket.opened += 1;
      note(`websocket opened after ${Date.now() - started} ms`);
      ws.on('framereceived', () => { result.socket.frames_in += 1; });
      ws.on('framesent', () => { result.socket.frames_out += 1; });
      ws.on('socketerror', (err) => result.socket.errors.push(String(err)));
      ws.on('close', () => {
        result.socket.closed += 1;
        note(`websocket closed after ${Date.now() - started} ms`);
      });
    });
    for (;;) {
      networkChanged = new Promise((resolve) => { onNetworkChange = () => resolve('network changed'); });
      const loaded = page.goto(opts.url, { waitUntil: 'load', timeout: remaining() })
        .then(() => ({ refused: expectRefused, typed: expectTyped }[opts.expect] || expectConnected)(page))
        .then(() => 'done');
      const outcome = await Promise.race([loaded, networkChanged]);
      if (outcome === 'done') return 0;
      // The abandoned wait fails when the page navigates away; that is expected.
      loaded.catch(() => {});
      if (result.socket.opened > 0 || result.reloads >= MAX_RELOADS) {
        throw new Error('the host network changed while the page loaded, and it could not be loaded again');
      }
      result.reloads += 1;
      note(`the host network changed before the websocket opened; loading the page again (${result.reloads})`);
    }
  } catch (err) {
    if (page && !result.state) {
      try { Object.assign(result, await pageState(page)); } catch { /* page gone */ }
    }
    result.error = (err && err.message ? err.message : String(err)).split('\n')[0];
    return 1;
  } finally {
    if (context) {
      try { await context.close(); } catch (err) { log(`closing the browser: ${err.message}`); }
    }
    await rm(userDataDir, { recursive: true, force: true });
  }
}

const code = await main();
process.stdout.write(`${JSON.stringify(result)}\n`);
process.exit(code);
