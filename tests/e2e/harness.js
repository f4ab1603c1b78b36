// Test harness: the real callgate binary, Debian's Chromium driven by playwright-core, and a TCP
// proxy that can cut connections the way a flaky network does. Nothing here is a stand-in: the
// page talks to the real server over real TLS, and media flows between real browser pages.

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createHash, X509Certificate } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, mkdirSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '..', '..');
export const artifactsDir = path.join(repoRoot, 'tests', 'artifacts');
export const chromiumPath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

/** How long to wait for any single thing the app should do promptly. */
export const STEP_MS = 15000;

/**
 * The embedded TURN relay on loopback, on ports the OS picks, allowed to relay to loopback peers:
 * both browsers are on this machine, and the relay refuses loopback peers by default.
 */
export const TURN_ARGS = [
  '--listening-ip', '127.0.0.1',
  '--listening-port', '0',
  '--tls-listening-port', 'off',
  '--allowed-peer-ip', '127.0.0.1',
];

/** A running callgate binary, started on 127.0.0.1:0 with its own certificate directory. */
export class Callgate {
  /** `turnArgs` replaces the loopback-only TURN settings above (e.g. to test the defaults). */
  constructor({ certsDir, extraArgs = [], turnArgs = TURN_ARGS } = {}) {
    this.bin = process.env.CALLGATE_BIN || path.join(repoRoot, 'target', 'debug', 'callgate');
    this.ownsCerts = !certsDir;
    this.certsDir = certsDir || mkdtempSync(path.join(tmpdir(), 'callgate-e2e-certs-'));
    this.extraArgs = extraArgs;
    this.turnArgs = turnArgs;
    this.logs = [];
    this.proc = null;
    this.url = null;
  }

  /** Starts the binary and resolves once its "callgate ready" log line names the listener. */
  async start({ listen = '127.0.0.1:0' } = {}) {
    if (process.env.CALLGATE_URL) {
      // An already running server (e.g. a staging instance): nothing to start or stop.
      this.url = process.env.CALLGATE_URL.replace(/\/$/, '');
      this.port = Number(new URL(this.url).port);
      this.external = true;
      return this.url;
    }
    const args = [
      '--https-listen', listen,
      '--http-listen', 'off',
      // No admin listener: its fixed default port would collide with anything else running.
      '--metrics-listen', 'off',
      ...this.turnArgs,
      '--public-dir', path.join(repoRoot, 'public'),
      '--certs-dir', this.certsDir,
      '--log-format', 'json',
      ...this.extraArgs,
    ];
    const proc = spawn(this.bin, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    this.proc = proc;
    const lines = readline.createInterface({ input: proc.stderr });
    const ready = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`callgate did not log "callgate ready" within ${STEP_MS} ms:\n${this.logs.join('\n')}`)), STEP_MS);
      proc.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`callgate exited early (code ${code}, signal ${signal}):\n${this.logs.join('\n')}`));
      });
      lines.on('line', (line) => {
        this.logs.push(line);
        if (!line.includes('callgate ready')) return;
        const event = JSON.parse(line);
        const listeners = String(event.listeners ?? event.fields?.listeners ?? '');
        const url = listeners.split(/[\s,]+/).find((u) => u.startsWith('https://'));
        if (!url) return;
        clearTimeout(timer);
        resolve(url.replace(/\/$/, ''));
      });
    });
    proc.once('error', (err) => this.logs.push(`spawn error: ${err.message}`));
    this.url = await ready;
    this.external = false;
    this.port = Number(new URL(this.url).port);
    return this.url;
  }

  /** SIGTERM, then waits for the process to exit. */
  async stop() {
    if (this.external || !this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const exited = once(this.proc, 'exit');
    this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 12000);
    await exited;
    clearTimeout(timer);
  }

  cleanup() {
    if (this.ownsCerts) rmSync(this.certsDir, { recursive: true, force: true });
  }

  /** base64 SHA-256 of the certificate's public key, for --ignore-certificate-errors-spki-list. */
  spkiHash() {
    if (this.external) return '';
    const cert = new X509Certificate(readFileSync(path.join(this.certsDir, 'cert.pem')));
    const spki = cert.publicKey.export({ type: 'spki', format: 'der' });
    return createHash('sha256').update(spki).digest('base64');
  }
}

/** base64 SHA-256 of a PEM certificate's public key (e.g. a test cluster's shared certificate). */
export function spkiHashOf(certPath) {
  const cert = new X509Certificate(readFileSync(certPath));
  const spki = cert.publicKey.export({ type: 'spki', format: 'der' });
  return createHash('sha256').update(spki).digest('base64');
}

/**
 * A TCP proxy in front of callgate. `cut()` destroys every open connection at once (TCP RST, no
 * WebSocket close frame), which is what a dropped Wi-Fi looks like to both ends.
 */
export class CuttableProxy {
  constructor(targetPort) {
    this.targetPort = targetPort;
    this.sockets = new Set();
    this.paused = false;
    this.server = net.createServer((client) => {
      // While paused the network is "down": new connections are reset at once.
      if (this.paused) {
        client.resetAndDestroy();
        return;
      }
      const upstream = net.connect(this.targetPort, '127.0.0.1');
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => {});
      }
      client.pipe(upstream);
      upstream.pipe(client);
      client.on('close', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
    });
  }

  async listen() {
    this.server.listen(0, '127.0.0.1');
    await once(this.server, 'listening');
    this.port = this.server.address().port;
    return this.port;
  }

  /** Refuses new connections until `resume()`, so a test can observe the offline state. */
  pause() {
    this.paused = true;
  }

  resume() {
    this.paused = false;
  }

  cut() {
    const n = this.sockets.size;
    for (const s of this.sockets) s.resetAndDestroy();
    this.sockets.clear();
    return n;
  }

  async close() {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * Debian's Chromium with fake camera and microphone, trusting only callgate's certificate
 * (`executablePath`: e.g. a wrapper that starts it inside a network namespace).
 */
export async function launchBrowser(spkiHash, { fakeUi = true, executablePath = chromiumPath } = {}) {
  return chromium.launch({
    executablePath,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--use-fake-device-for-media-stream=device-count=3',
      // Accept every camera/microphone prompt; without it, permissions are whatever the test sets.
      ...(fakeUi ? ['--use-fake-ui-for-media-stream'] : []),
      '--autoplay-policy=no-user-gesture-required',
      // Trust exactly callgate's certificate; for a server we did not start, its hash is unknown.
      spkiHash ? `--ignore-certificate-errors-spki-list=${spkiHash}` : '--ignore-certificate-errors',
    ],
  });
}

/**
 * One person: a fresh browser context (own storage, own permissions) with one page, and every
 * console error, uncaught exception and CSP violation collected so tests can assert there were none.
 */
export async function openPerson(browser, url, name, { viewport = { width: 1280, height: 800 }, colorScheme = 'light', initScript } = {}) {
  const context = await browser.newContext({ viewport, colorScheme, ignoreHTTPSErrors: false });
  // Runs in the page before any of its scripts (e.g. to change what RTCPeerConnection is given).
  if (initScript) await context.addInitScript(initScript);
  const page = await context.newPage();
  const problems = [];
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`);
  });
  page.on('pageerror', (err) => problems.push(`uncaught: ${err.message}`));
  await page.goto(url);
  // CSP violations are reported to the page as events; collect them from the start.
  await page.evaluate(() => {
    window.__cspViolations = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__cspViolations.push(`${e.violatedDirective}: ${e.blockedURI}`);
    });
  });
  return { name, context, page, problems };
}

/** Waits until the page shows its ID, and returns it. */
export async function idOf(person) {
  const handle = await person.page.waitForFunction(() => window.callgate && window.callgate.id, null, { timeout: STEP_MS });
  return handle.jsonValue();
}

export async function screenshot(person, name) {
  mkdirSync(artifactsDir, { recursive: true });
  const file = path.join(artifactsDir, `${name}.png`);
  await person.page.screenshot({ path: file });
  return file;
}

/** Inbound video frames decoded so far on this page's call (0 without a call). */
export async function framesDecoded(page) {
  return page.evaluate(async () => {
    const pc = window.callgate.pc;
    if (!pc) return 0;
    let frames = 0;
    (await pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') frames += r.framesDecoded || 0;
    });
    return frames;
  });
}

/** Total energy of the inbound audio so far; it stops growing while the peer is muted. */
export async function audioEnergy(page) {
  return page.evaluate(async () => {
    const pc = window.callgate.pc;
    if (!pc) return 0;
    let energy = 0;
    (await pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'audio') energy += r.totalAudioEnergy || 0;
    });
    return energy;
  });
}

/** The selected ICE candidate pair's local and remote candidate types. */
export async function selectedRoute(page) {
  return page.evaluate(async () => {
    const pc = window.callgate.pc;
    const stats = await pc.getStats();
    const byId = new Map();
    stats.forEach((r) => byId.set(r.id, r));
    let pair = null;
    stats.forEach((r) => {
      if (r.type === 'transport' && r.selectedCandidatePairId) pair = byId.get(r.selectedCandidatePairId);
    });
    if (!pair) return null;
    return {
      local: byId.get(pair.localCandidateId)?.candidateType,
      remote: byId.get(pair.remoteCandidateId)?.candidateType,
    };
  });
}

/** The selected pair's local candidate: its type, relay protocol, address and the TURN URL it came from. */
export async function selectedLocal(page) {
  return page.evaluate(async () => {
    const stats = await window.callgate.pc.getStats();
    const byId = new Map();
    stats.forEach((r) => byId.set(r.id, r));
    let local = null;
    stats.forEach((r) => {
      if (r.type === 'transport' && r.selectedCandidatePairId) {
        local = byId.get(byId.get(r.selectedCandidatePairId)?.localCandidateId) || null;
      }
    });
    return local && { type: local.candidateType, relayProtocol: local.relayProtocol, address: local.address, url: local.url };
  });
}

/**
 * Polls `probe` until `accept(value)` holds, for values the browser only exposes by polling
 * (getStats). Fails with the last value seen. Use page.waitForFunction for DOM state instead.
 */
export async function pollUntil(probe, accept, { timeout = STEP_MS, every = 250, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await probe();
    if (accept(last)) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last value: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** Asserts media really flows: the decoded frame count grows by at least `min` frames. */
export async function expectFramesFlowing(person, min = 10) {
  const start = await framesDecoded(person.page);
  return pollUntil(() => framesDecoded(person.page), (n) => n >= start + min, { what: `${person.name} decoding ${min} more video frames (from ${start})` });
}

export async function cspViolations(person) {
  return person.page.evaluate(() => window.__cspViolations || []);
}
