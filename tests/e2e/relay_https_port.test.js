// TURN over TLS on the HTTPS port (`turn-on-https-port`, issue 14), as a real browser sees it: a
// relay-only call whose pages are offered ONLY `turns:HOST:HTTPS-PORT?transport=tcp` connects and
// shows video. Chromium's `turns:` connection offers no ALPN (and no SNI for an IP address), so the
// HTTPS listener must tell it from HTTP by its first bytes (a STUN header) and hand it to TURN.
//
// Run: `npm test` here (after `cargo build`), or `cargo test --test browser` from the repo root.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  Callgate, launchBrowser, openPerson, idOf, pollUntil, expectFramesFlowing, STEP_MS,
  selectedLocal,
} from './harness.js';

/**
 * Loopback TURN without its own TLS port (5349 off), so the only `turns:` URL is the HTTPS port's;
 * relay sockets and peers on loopback because both browsers are here.
 */
const TURN_ON_HTTPS_ONLY = [
  '--listening-ip', '127.0.0.1',
  '--listening-port', '0',
  '--tls-listening-port', 'off',
  '--relay-ip', '127.0.0.1',
  '--allowed-peer-ip', '127.0.0.1',
  '--turn-on-https-port', 'true',
];

/**
 * Runs in the page before its scripts: RTCPeerConnection is given only the `turns:` URLs on the
 * port the page was loaded from (the HTTPS port), and records what it was given.
 */
function onlyTurnsOnThisPort() {
  const Native = window.RTCPeerConnection;
  const port = window.location.port;
  window.__offeredIceUrls = [];
  window.RTCPeerConnection = class extends Native {
    constructor(config = {}, ...rest) {
      const iceServers = (config.iceServers || [])
        .map((s) => ({ ...s, urls: [].concat(s.urls || []).filter((u) => u.startsWith('turns:') && u.includes(`:${port}?`)) }))
        .filter((s) => s.urls.length > 0);
      window.__offeredIceUrls.push(...iceServers.flatMap((s) => s.urls));
      super({ ...config, iceServers, iceTransportPolicy: 'relay' }, ...rest);
    }
  };
}

let server;
let browser;
let url;
const people = [];

before(async () => {
  server = new Callgate({ turnArgs: TURN_ON_HTTPS_ONLY });
  url = await server.start();
  browser = await launchBrowser(server.spkiHash());
});

after(async () => {
  for (const p of people) await p.context.close().catch(() => {});
  if (browser) await browser.close();
  if (server) {
    await server.stop();
    server.cleanup();
  }
});

test('a relay-only call offered only turns: on the HTTPS port connects and shows video', async () => {
  const a = await openPerson(browser, `${url}/?relay=1`, 'A', { initScript: onlyTurnsOnThisPort });
  const b = await openPerson(browser, `${url}/?relay=1`, 'B', { initScript: onlyTurnsOnThisPort });
  people.push(a, b);
  const calleeId = await idOf(b);
  await idOf(a);
  await a.page.fill('#callee-id', String(calleeId));
  await a.page.click('#call-btn');
  await b.page.waitForSelector('#incoming[open]', { timeout: STEP_MS });
  await b.page.click('#accept-btn');

  for (const p of [a, b]) {
    await pollUntil(
      () => p.page.evaluate(() => window.callgate.pc && window.callgate.pc.iceConnectionState),
      (s) => s === 'connected' || s === 'completed',
      { timeout: STEP_MS, every: 100, what: `${p.name}'s ICE connection through TURN on the HTTPS port` },
    );
  }
  for (const p of [a, b]) {
    const offered = await p.page.evaluate(() => window.__offeredIceUrls);
    assert.ok(
      offered.length > 0 && offered.every((u) => u === `turns:127.0.0.1:${server.port}?transport=tcp`),
      `${p.name} was offered ${JSON.stringify(offered)}`,
    );
    const local = await selectedLocal(p.page);
    assert.equal(local?.type, 'relay', `${p.name}'s selected candidate: ${JSON.stringify(local)}`);
    assert.equal(local.relayProtocol, 'tls', `${p.name}'s selected candidate: ${JSON.stringify(local)}`);
  }
  await Promise.all([expectFramesFlowing(a), expectFramesFlowing(b)]);
});
