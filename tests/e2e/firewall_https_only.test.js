// The strictest firewall (issue 14): callers who can open nothing but TCP to the HTTPS port, every
// UDP packet dropped. Two Chromium pages in a network namespace whose nftables output policy drops
// everything except TCP to callgate's HTTPS port still get a call through, relayed by TURN over TLS
// on that port (`turn-on-https-port`). Callgate runs in a second namespace, joined by a veth pair.
//
// Needs root, `ip` (iproute2) and `nft` (nftables). Without them the test says why and is skipped,
// except under CI=true, where that is a failure. The namespaces are named `turnport-…` and deleted
// afterwards.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  Callgate, launchBrowser, openPerson, idOf, pollUntil, expectFramesFlowing, chromiumPath, STEP_MS,
  selectedLocal,
} from './harness.js';

const tag = String(process.pid % 10000);
const SERVER_NS = `turnport-s${tag}`;
const CLIENT_NS = `turnport-c${tag}`;
const net = 1 + (process.pid % 250);
const SERVER_IP = `10.77.${net}.1`;
const CLIENT_IP = `10.77.${net}.2`;

function has(cmd) {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

const missing = [
  ...(process.getuid && process.getuid() === 0 ? [] : ['root (network namespaces)']),
  ...(has('ip') ? [] : ['ip (apt-get install iproute2)']),
  ...(has('nft') ? [] : ['nft (apt-get install nftables)']),
];
const skip = missing.length ? `the firewall test needs ${missing.join(', ')}` : false;
if (skip && process.env.CI === 'true') throw new Error(`${skip} (required under CI=true)`);

const ip = (...args) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
const inNs = (ns, ...cmd) => execFileSync('ip', ['netns', 'exec', ns, ...cmd], { stdio: ['pipe', 'ignore', 'pipe'] });

/** A script that runs `program` inside namespace `ns` (exec, so signals reach the program). */
function wrapper(dir, ns, program) {
  const file = path.join(dir, `in-${ns}`);
  writeFileSync(file, `#!/bin/sh\nexec ip netns exec ${ns} ${program} "$@"\n`, { mode: 0o755 });
  return file;
}

let server;
let browser;
let url;
let scratch;
const people = [];

before(async () => {
  if (skip) return;
  scratch = mkdtempSync(path.join(tmpdir(), 'turnport-fw-'));
  for (const ns of [SERVER_NS, CLIENT_NS]) {
    try { ip('netns', 'del', ns); } catch { /* not left over */ }
    ip('netns', 'add', ns);
    ip('-n', ns, 'link', 'set', 'lo', 'up');
  }
  const [vs, vc] = [`tp${tag}s`, `tp${tag}c`];
  ip('link', 'add', vs, 'netns', SERVER_NS, 'type', 'veth', 'peer', 'name', vc, 'netns', CLIENT_NS);
  ip('-n', SERVER_NS, 'addr', 'add', `${SERVER_IP}/30`, 'dev', vs);
  ip('-n', CLIENT_NS, 'addr', 'add', `${CLIENT_IP}/30`, 'dev', vc);
  ip('-n', SERVER_NS, 'link', 'set', vs, 'up');
  ip('-n', CLIENT_NS, 'link', 'set', vc, 'up');

  server = new Callgate({
    turnArgs: [
      '--listening-ip', SERVER_IP,
      '--listening-port', '0',
      // The TURN TLS port stays on (as in production); the firewall blocks it.
      '--tls-listening-port', '0',
      '--relay-ip', SERVER_IP,
      '--allowed-peer-ip', SERVER_IP,
    ],
  });
  server.bin = wrapper(scratch, SERVER_NS, server.bin);
  url = await server.start({ listen: `${SERVER_IP}:0` });

  // The callers' firewall: only TCP to the HTTPS port leaves; all UDP (and everything else) drops.
  const rules = `table inet turnport_fw {
  chain output {
    type filter hook output priority 0; policy drop;
    ip daddr ${SERVER_IP} tcp dport ${server.port} accept
  }
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
  }
}
`;
  execFileSync('ip', ['netns', 'exec', CLIENT_NS, 'nft', '-f', '-'], { input: rules });
  browser = await launchBrowser(server.spkiHash(), { executablePath: wrapper(scratch, CLIENT_NS, chromiumPath) });
});

after(async () => {
  for (const p of people) await p.context.close().catch(() => {});
  if (browser) await browser.close();
  if (server) {
    await server.stop();
    server.cleanup();
  }
  if (!skip) {
    for (const ns of [SERVER_NS, CLIENT_NS]) {
      try { ip('netns', 'del', ns); } catch { /* already gone */ }
    }
  }
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

test('behind a firewall that opens only the HTTPS port and drops all UDP, two pages still get a call', { skip }, async () => {
  // The firewall really is closed to UDP (the send itself is refused), and open to the HTTPS port.
  assert.throws(() => inNs(CLIENT_NS, 'bash', '-c', `echo x > /dev/udp/${SERVER_IP}/3478`));
  inNs(CLIENT_NS, 'bash', '-c', `exec 3<>/dev/tcp/${SERVER_IP}/${server.port}`);
  const a = await openPerson(browser, url, 'A');
  const b = await openPerson(browser, url, 'B');
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
      { timeout: 2 * STEP_MS, every: 200, what: `${p.name}'s ICE connection through the firewall` },
    );
  }
  for (const p of [a, b]) {
    const local = await selectedLocal(p.page);
    assert.equal(local?.type, 'relay', `${p.name}'s selected candidate: ${JSON.stringify(local)}`);
    assert.equal(local.relayProtocol, 'tls', `${p.name}'s selected candidate: ${JSON.stringify(local)}`);
    assert.ok(String(local.url).includes(`:${server.port}?`), `${p.name}'s candidate came from ${local.url}, not the HTTPS port`);
  }
  await Promise.all([expectFramesFlowing(a), expectFramesFlowing(b)]);
});
