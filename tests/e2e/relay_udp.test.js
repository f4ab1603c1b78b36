// callgate's TURN relay over UDP, as a real browser sees it, on the DEFAULT listening addresses
// (no --listening-ip: every address of this host) of a host with more than one address.
//
// With one wildcard UDP socket the relay answered requests sent to 127.0.0.1 from the host's other
// address (the kernel's pick for Chromium's socket on it), Chromium dropped those answers, and a
// relay-only call offered only `turn:…?transport=udp` never connected. Each address now has its own
// socket and answers from itself.
//
// Run: `npm test` here (after `cargo build`), or `cargo test --test browser` from the repo root.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import os from 'node:os';
import {
  Callgate, launchBrowser, openPerson, idOf, pollUntil, expectFramesFlowing, STEP_MS,
  selectedLocal,
} from './harness.js';

/** How soon the relayed call must connect once accepted (it took ~20 s, or forever, before). */
const CONNECT_MS = 5000;

/**
 * The default listening addresses: only what a test on a shared machine must change (ports the OS
 * picks, no TLS listener, relay sockets and peers on loopback because both browsers are here).
 */
const DEFAULT_LISTENING = [
  '--listening-port', '0',
  '--tls-listening-port', 'off',
  '--relay-ip', '127.0.0.1',
  '--allowed-peer-ip', '127.0.0.1',
];

/** This host's addresses besides loopback; the bug needs at least one. */
const otherAddresses = Object.values(os.networkInterfaces()).flat()
  .filter((a) => !a.internal && a.family === 'IPv4')
  .map((a) => a.address);
const noSecondAddress = otherAddresses.length === 0
  ? 'this host has no non-loopback IPv4 address, so it cannot show the two-address case'
  : false;
if (noSecondAddress && process.env.CI === 'true') throw new Error(`${noSecondAddress} (required under CI=true)`);

/**
 * Runs in the page before its scripts: RTCPeerConnection is given only the UDP `turn:` URLs of the
 * ICE servers the server sent (no STUN, no TCP, no TLS), and records what it was given.
 */
function onlyUdpTurn() {
  const Native = window.RTCPeerConnection;
  window.__offeredIceUrls = [];
  window.RTCPeerConnection = class extends Native {
    constructor(config = {}, ...rest) {
      const iceServers = (config.iceServers || [])
        .map((s) => ({ ...s, urls: [].concat(s.urls || []).filter((u) => /^turn:[^?]+\?transport=udp$/.test(u)) }))
        .filter((s) => s.urls.length > 0);
      window.__offeredIceUrls.push(...iceServers.flatMap((s) => s.urls));
      super({ ...config, iceServers }, ...rest);
    }
  };
}

let server;
let browser;
let url;
const people = [];

before(async () => {
  if (noSecondAddress) return;
  server = new Callgate({ turnArgs: DEFAULT_LISTENING });
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

test('a relay-only call offered only turn:…?transport=udp connects within seconds on the default listening addresses', { skip: noSecondAddress }, async () => {
  // The relay listens on every address of the host, each on its own socket.
  const udpListeners = server.logs.join('\n').match(/turn\+udp:\/\/[^\s,"]+/g) || [];
  assert.ok(udpListeners.some((l) => l.includes('127.0.0.1')), `UDP listeners: ${udpListeners}`);
  assert.ok(otherAddresses.some((ip) => udpListeners.some((l) => l.includes(ip))), `UDP listeners ${udpListeners} include one of ${otherAddresses}`);

  const a = await openPerson(browser, `${url}/?relay=1`, 'A', { initScript: onlyUdpTurn });
  const b = await openPerson(browser, `${url}/?relay=1`, 'B', { initScript: onlyUdpTurn });
  people.push(a, b);
  const calleeId = await idOf(b);
  await idOf(a);
  await a.page.fill('#callee-id', String(calleeId));
  await a.page.click('#call-btn');
  await b.page.waitForSelector('#incoming[open]', { timeout: STEP_MS });
  const accepted = Date.now();
  await b.page.click('#accept-btn');

  for (const p of [a, b]) {
    await pollUntil(
      () => p.page.evaluate(() => window.callgate.pc && window.callgate.pc.iceConnectionState),
      (s) => s === 'connected' || s === 'completed',
      { timeout: CONNECT_MS, every: 100, what: `${p.name}'s ICE connection through the UDP relay` },
    );
  }
  const took = Date.now() - accepted;
  assert.ok(took < CONNECT_MS, `connected ${took} ms after accepting`);

  for (const p of [a, b]) {
    const offered = await p.page.evaluate(() => window.__offeredIceUrls);
    assert.ok(offered.length > 0 && offered.every((u) => /^turn:127\.0\.0\.1:\d+\?transport=udp$/.test(u)), `${p.name} was offered ${JSON.stringify(offered)}`);
    const local = await selectedLocal(p.page);
    assert.equal(local?.type, 'relay', `${p.name}'s selected candidate: ${JSON.stringify(local)}`);
    assert.equal(local.relayProtocol, 'udp', `${p.name}'s selected candidate: ${JSON.stringify(local)}`);
  }
  await Promise.all([expectFramesFlowing(a), expectFramesFlowing(b)]);
});
