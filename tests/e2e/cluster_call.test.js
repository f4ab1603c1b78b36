// A call between two Chromium pages held by two different callgate nodes (one Redis between
// them), and the call surviving the death (SIGKILL) or the drain (SIGTERM) of one node: its page reconnects through
// HAProxy, resumes its ID on the other node, and the media, relayed through the dead node's TURN
// server until then, comes back through the survivor's relay after the app's ICE restart.
//
// Run by tests/browser_cluster.rs (`cargo test --test browser_cluster`), which starts
// redis-server, the two nodes and HAProxy and passes them here:
//   CALLGATE_CLUSTER_LB           https://… of HAProxy (`balance first`: node A while it lives)
//   CALLGATE_CLUSTER_NODE_B       https://… of node B itself
//   CALLGATE_CLUSTER_NODE_A_PID   node A's process, stopped here
//   CALLGATE_CLUSTER_STOP         how: SIGKILL (death, the default) or SIGTERM (drain: /readyz 503,
//                                 then WebSockets closed with 1001 after shutdown-drain-delay)
//   CALLGATE_CLUSTER_METRICS_A/B  each node's /metrics
//   CALLGATE_CLUSTER_CERT         the certificate every node serves
// Without them (e.g. `npm test` or tests/browser.rs) the test is skipped and says why.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  launchBrowser, openPerson, idOf, screenshot, selectedLocal, pollUntil, expectFramesFlowing,
  spkiHashOf, STEP_MS,
} from './harness.js';

const env = process.env;
const signal = env.CALLGATE_CLUSTER_STOP || 'SIGKILL';
const how = signal === 'SIGTERM' ? 'drain' : 'death';
const skip = env.CALLGATE_CLUSTER_LB
  ? false
  : 'needs Redis, two callgate nodes and HAProxy: run it with `cargo test --test browser_cluster`';

/** The bound: a killed (or drained) node's clients resume elsewhere within this. */
const RESUME_MS = 5000;
/** ICE notices the dead relay, restarts and connects through the other one within this. */
const MEDIA_BACK_MS = 30000;

let browser;
const people = [];

after(async () => {
  for (const p of people) await p.context.close().catch(() => {});
  if (browser) await browser.close();
});

/** One sample of `series` (summed over its label sets) in a node's /metrics text; 0 if absent. */
async function metric(url, series) {
  const text = await (await fetch(url)).text();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const name = line.split(/[{\s]/, 1)[0];
    if (name === series) sum += Number(line.trim().split(/\s+/).pop());
  }
  return sum;
}

function waitMetric(url, series, accept, what) {
  return pollUntil(() => metric(url, series), accept, { what: `${what} (${series})` });
}

function waitState(p, state, timeout = STEP_MS) {
  return p.page.waitForFunction((s) => window.callgate.state === s, state, { timeout });
}

/** The `turn:`/`turns:` URLs the page's node gave it (each node advertises its own relay). */
function turnUrls(p) {
  return p.page.evaluate(() => (window.callgate.iceServers || [])
    .flatMap((s) => [].concat(s.urls || []))
    .filter((u) => /^turns?:/.test(u)));
}

/** The host:port of a TURN URL, the part that names the node. */
function relayOf(url) {
  return /^turns?:([^?]+)/.exec(url || '')?.[1] ?? null;
}

test(`a call across two nodes survives the ${how} of one: resume through HAProxy, media through the other relay`, { skip }, async (t) => {
  browser = await launchBrowser(spkiHashOf(env.CALLGATE_CLUSTER_CERT));
  const open = async (url, name) => {
    const p = await openPerson(browser, url, name);
    people.push(p);
    return p;
  };

  // Page 1 through HAProxy lands on node A; page 2 opens node B directly.
  const a = await open(`${env.CALLGATE_CLUSTER_LB}/?relay=1`, 'page 1 (node A via HAProxy)');
  const aId = await idOf(a);
  await waitMetric(env.CALLGATE_CLUSTER_METRICS_A, 'callgate_websocket_connections_open', (n) => n === 1, 'page 1 on node A');
  const b = await open(`${env.CALLGATE_CLUSTER_NODE_B}/?relay=1`, 'page 2 (node B)');
  const bId = await idOf(b);
  await waitMetric(env.CALLGATE_CLUSTER_METRICS_B, 'callgate_websocket_connections_open', (n) => n === 1, 'page 2 on node B');
  const relaysA = new Set((await turnUrls(a)).map(relayOf));
  const relaysB = new Set((await turnUrls(b)).map(relayOf));
  assert.ok(relaysA.size > 0 && relaysB.size > 0, 'each node offers its own TURN relay');
  assert.ok([...relaysA].every((r) => !relaysB.has(r)), `node A's relay ${[...relaysA]} is not node B's ${[...relaysB]}`);

  // Page 1 calls page 2 by ID across the nodes: ringing, accept, video both ways.
  await a.page.fill('#callee-id', String(bId));
  await a.page.click('#call-btn');
  await b.page.waitForSelector('#incoming[open]', { timeout: STEP_MS });
  await a.page.waitForFunction(
    () => document.getElementById('outgoing-status').textContent === 'Ringing…',
    null,
    { timeout: STEP_MS },
  );
  await b.page.click('#accept-btn');
  await Promise.all([waitState(a, 'incall'), waitState(b, 'incall')]);
  await Promise.all([expectFramesFlowing(a), expectFramesFlowing(b)]);
  // Page 1's media goes through node A's relay: the one that is about to die.
  const before = await selectedLocal(a.page);
  assert.equal(before.type, 'relay', `page 1's selected candidate: ${JSON.stringify(before)}`);
  assert.ok(relaysA.has(relayOf(before.url)), `page 1 relays through node A (${[...relaysA]}): ${JSON.stringify(before)}`);
  const crossNode = await metric(env.CALLGATE_CLUSTER_METRICS_B, 'callgate_cluster_messages_total');
  assert.ok(crossNode > 0, `node B counted the messages that crossed to or from node A (${crossNode})`);
  // The call is counted once when the nodes' gauges are summed (the dashboard's cluster-wide panel).
  const inProgress = (url) => metric(url, 'callgate_calls_in_progress');
  const perNode = await Promise.all([inProgress(env.CALLGATE_CLUSTER_METRICS_A), inProgress(env.CALLGATE_CLUSTER_METRICS_B)]);
  assert.equal(perNode[0] + perNode[1], 1, `calls in progress on nodes A and B: ${perNode}`);
  await screenshot(a, 'cluster-call-before-kill');

  // From now on page 2 must never leave the call.
  await b.page.evaluate(() => {
    window.__states = [window.callgate.state];
    setInterval(() => {
      const s = window.callgate.state;
      if (s !== window.__states[window.__states.length - 1]) window.__states.push(s);
    }, 20);
  });

  // kill -9 node A, or SIGTERM it (it drains: its clients are told 1001 after the drain delay).
  const killedAt = Date.now();
  process.kill(Number(env.CALLGATE_CLUSTER_NODE_A_PID), signal);
  await a.page.waitForFunction(() => window.callgate.signaling !== 'open', null, { timeout: STEP_MS });
  const offlineAt = Date.now();
  await a.page.waitForFunction(() => window.callgate.signaling === 'open', null, { timeout: STEP_MS });
  const resumeMs = Date.now() - offlineAt;
  t.diagnostic(`${signal}: page 1 lost node A ${offlineAt - killedAt} ms after the signal and was back online ${resumeMs} ms later`);
  assert.equal(await idOf(a), aId, 'page 1 resumed its ID on node B');
  assert.ok(resumeMs <= RESUME_MS, `resumed within ${RESUME_MS} ms (took ${resumeMs} ms)`);
  await waitMetric(env.CALLGATE_CLUSTER_METRICS_B, 'callgate_websocket_connections_open', (n) => n === 2, 'both pages on node B');
  const relaysAfter = new Set((await turnUrls(a)).map(relayOf));
  assert.deepEqual(relaysAfter, relaysB, 'after the resume page 1 is offered node B\'s relay');
  assert.equal(await a.page.evaluate(() => window.callgate.state), 'incall');

  // The media comes back through node B's relay (ICE restart with the new ICE servers).
  const through = await pollUntil(
    () => selectedLocal(a.page).catch(() => null),
    (l) => l && l.type === 'relay' && relaysB.has(relayOf(l.url)),
    { timeout: MEDIA_BACK_MS, every: 250, what: `page 1's media through node B's relay (${[...relaysB]})` },
  );
  await Promise.all([expectFramesFlowing(a, 20), expectFramesFlowing(b, 20)]);
  t.diagnostic(`media through node B's relay ${Date.now() - offlineAt} ms after page 1 lost node A: ${JSON.stringify(through)}`);
  await screenshot(a, 'cluster-call-after-kill');

  assert.deepEqual(await b.page.evaluate(() => window.__states), ['incall'], 'page 2 never saw the call end');
  assert.equal(await idOf(b), bId);

  // Signaling still works end to end: page 2 hangs up, page 1 hears it.
  await b.page.click('#btn-hangup');
  await Promise.all([waitState(a, 'idle'), waitState(b, 'idle')]);

  // Only the connection noise of the kill, nothing else.
  for (const p of [a, b]) {
    const unexpected = p.problems.filter((m) => !/WebSocket|ERR_CONNECTION|net::/.test(m));
    assert.deepEqual(unexpected, [], `${p.name} had unexpected errors`);
  }
});
