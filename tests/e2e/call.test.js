// The calling app in a real browser against the real callgate binary: two or three people (each a
// fresh browser context with Chromium's fake camera and microphone) call each other through the
// server's signaling, and media is checked with getStats, not just by looking at <video> elements.
//
// Run: `npm test` here (after `cargo build`), or `cargo test --test browser` from the repo root.

import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  Callgate, CuttableProxy, launchBrowser, openPerson, idOf, screenshot, framesDecoded,
  audioEnergy, selectedRoute, pollUntil, expectFramesFlowing, cspViolations, STEP_MS,
} from './harness.js';

let server;
let browser;
let url;
/** Everyone opened by the current test; closed after it so tests do not leak calls. */
let people = [];

before(async () => {
  server = new Callgate();
  url = await server.start();
  browser = await launchBrowser(server.spkiHash());
});

after(async () => {
  if (browser) await browser.close();
  if (server) {
    await server.stop();
    server.cleanup();
  }
});

afterEach(async () => {
  for (const p of people) await p.context.close().catch(() => {});
  people = [];
});

async function person(name, options = {}) {
  const p = await openPerson(browser, options.url || `${url}/`, name, options);
  people.push(p);
  return p;
}

function waitState(p, state) {
  return p.page.waitForFunction((s) => window.callgate.state === s, state, { timeout: STEP_MS });
}

/** The text of the home screen's message once it contains `needle`. */
async function homeMessage(p, needle) {
  await p.page.waitForFunction(
    (n) => document.getElementById('home-message').textContent.includes(n),
    needle,
    { timeout: STEP_MS },
  );
  return p.page.textContent('#home-message');
}

/** `caller` types `callee`'s ID and presses Call; resolves when the callee sees the dialog. */
async function dial(caller, callee) {
  const id = await idOf(callee);
  await idOf(caller);
  await caller.page.fill('#callee-id', String(id));
  await caller.page.click('#call-btn');
  await callee.page.waitForSelector('#incoming[open]', { timeout: STEP_MS });
  return id;
}

/** A full call set-up: dial, ringing, accept, and video decoded on both sides. */
async function connect(caller, callee) {
  await dial(caller, callee);
  await caller.page.waitForFunction(
    () => document.getElementById('outgoing-status').textContent === 'Ringing…',
    null,
    { timeout: STEP_MS },
  );
  await callee.page.click('#accept-btn');
  await Promise.all([waitState(caller, 'incall'), waitState(callee, 'incall')]);
  await Promise.all([expectFramesFlowing(caller), expectFramesFlowing(callee)]);
}

function assertClean(...ps) {
  for (const p of ps) assert.deepEqual(p.problems, [], `${p.name} had console errors`);
}

// ---- tests --------------------------------------------------------------------------------------

test('the page loads under the CSP without errors and shows a 9-digit ID and a call link', async () => {
  const a = await person('A');
  const response = await a.page.goto(`${url}/`);
  const csp = response.headers()['content-security-policy'];
  assert.match(csp, /script-src 'self'/, 'the server sends the CSP the app must live with');
  const id = await idOf(a);
  assert.match(String(id), /^\d{9}$/);
  assert.equal(await a.page.getAttribute('#my-id', 'data-id'), String(id));
  assert.equal((await a.page.textContent('#my-id')).replace(/\s/g, ''), String(id));
  assert.equal(await a.page.inputValue('#my-link'), `${url}/?call=${id}`);
  assert.equal(await a.page.getAttribute('#net-status', 'data-state'), 'online');
  assert.equal(await a.page.isEnabled('#call-btn'), true);
  assert.deepEqual(await cspViolations(a), []);
  assertClean(a);
  await screenshot(a, 'home-desktop');
  const phone = await person('phone', { viewport: { width: 390, height: 844 }, colorScheme: 'dark' });
  await idOf(phone);
  await screenshot(phone, 'home-phone-dark');
  const idBox = await phone.page.locator('#my-id').boundingBox();
  assert.ok(idBox.height < 60, `the ID fits on one line on a phone (${idBox.height}px high)`);
  // prefers-color-scheme is honoured: the dark page has a dark background.
  const bg = await phone.page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  const [r, g, b] = bg.match(/\d+/g).map(Number);
  assert.ok(r + g + b < 120, `dark background, got ${bg}`);
  // Nothing on a phone-sized screen may be wider than the screen.
  const overflow = await phone.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `page is ${overflow}px wider than a phone screen`);
});

test('A calls B by typing the ID, B accepts: video both ways, chat, mute, hang up', async () => {
  const a = await person('A');
  const b = await person('B');
  const bId = await dial(a, b);
  assert.equal((await b.page.textContent('#incoming-caller')).replace(/\s/g, ''), String(await idOf(a)));
  // The dialog is keyboard-ready: Accept has focus.
  assert.equal(await b.page.evaluate(() => document.activeElement.id), 'accept-btn');
  await a.page.waitForFunction(() => document.getElementById('outgoing-status').textContent === 'Ringing…', null, { timeout: STEP_MS });
  await screenshot(b, 'incoming-dialog');
  await b.page.click('#accept-btn');
  await Promise.all([waitState(a, 'incall'), waitState(b, 'incall')]);
  assert.equal((await a.page.textContent('#call-peer')).replace(/\s/g, ''), String(bId));

  // Video decoded on both sides (frames counted by the decoder, not just an element with a src).
  await Promise.all([expectFramesFlowing(a, 20), expectFramesFlowing(b, 20)]);
  // The connection indicator shows real numbers from getStats.
  await a.page.waitForFunction(() => window.callgate.quality && window.callgate.quality.route === 'direct', null, { timeout: STEP_MS });
  await a.page.waitForFunction(() => /ms/.test(document.getElementById('quality-label').textContent), null, { timeout: STEP_MS });

  // Chat over the data channel, both ways.
  await a.page.waitForSelector('#chat-input:not([disabled])', { state: 'attached', timeout: STEP_MS });
  await a.page.click('#btn-chat');
  await a.page.fill('#chat-input', 'Hello from A');
  await a.page.press('#chat-input', 'Enter');
  await b.page.waitForFunction(() => [...document.querySelectorAll('.msg-them .msg-text')].some((m) => m.textContent === 'Hello from A'), null, { timeout: STEP_MS });
  assert.equal(await b.page.textContent('#chat-unread'), '1', 'B sees an unread badge');
  await b.page.click('#btn-chat');
  await b.page.fill('#chat-input', 'Hi A, B here');
  await b.page.click('#chat-send');
  await a.page.waitForFunction(() => [...document.querySelectorAll('.msg-them .msg-text')].some((m) => m.textContent === 'Hi A, B here'), null, { timeout: STEP_MS });
  await a.page.click('#chat-close');
  await b.page.click('#chat-close');

  // Mute: A's audio reaching B goes silent (B's decoder sees no energy), and B's UI says so.
  const sampleEnergy = async () => {
    const e1 = await audioEnergy(b.page);
    await b.page.waitForTimeout(1200); // a measuring window, not synchronisation
    return (await audioEnergy(b.page)) - e1;
  };
  await pollUntil(sampleEnergy, (d) => d > 0, { what: 'B hearing A before mute', every: 0 });
  await a.page.click('#btn-mic');
  assert.equal(await a.page.getAttribute('#btn-mic', 'aria-pressed'), 'true');
  await b.page.waitForSelector('#remote-muted', { state: 'visible', timeout: STEP_MS });
  await pollUntil(sampleEnergy, (d) => d < 1e-6, { what: 'B hearing silence after A muted', every: 0 });
  await a.page.click('#btn-mic');
  await b.page.waitForSelector('#remote-muted', { state: 'hidden', timeout: STEP_MS });
  await pollUntil(sampleEnergy, (d) => d > 0, { what: 'B hearing A again after unmute', every: 0 });

  // Camera off shows a placeholder on the other side; back on shows video again.
  await b.page.click('#btn-cam');
  await a.page.waitForSelector('#remote-placeholder', { state: 'visible', timeout: STEP_MS });
  await b.page.click('#btn-cam');
  await a.page.waitForSelector('#remote-placeholder', { state: 'hidden', timeout: STEP_MS });

  await a.page.waitForTimeout(1500); // let the timer and stats show real values for the picture
  await screenshot(a, 'in-call-desktop');
  await a.page.click('#quality');
  await screenshot(a, 'in-call-quality-details');

  // Hang up ends the call on both sides.
  await a.page.click('#btn-hangup');
  await Promise.all([waitState(a, 'idle'), waitState(b, 'idle')]);
  await homeMessage(b, 'hung up');
  assert.equal(await b.page.isVisible('#view-home'), true);
  assert.equal(await a.page.evaluate(() => window.callgate.pc), null);
  assertClean(a, b);
});

test('B declines: A is told in plain words', async () => {
  const a = await person('A');
  const b = await person('B');
  await dial(a, b);
  await a.page.waitForFunction(() => document.getElementById('outgoing-status').textContent === 'Ringing…', null, { timeout: STEP_MS });
  await screenshot(a, 'outgoing-ringing');
  await b.page.click('#decline-btn');
  const text = await homeMessage(a, 'declined');
  assert.match(text, /declined the call/);
  await Promise.all([waitState(a, 'idle'), waitState(b, 'idle')]);
  assert.equal(await b.page.isVisible('#incoming'), false);
  assertClean(a, b);
});

test('busy: calling someone who is in a call says they are busy', async () => {
  const a = await person('A');
  const b = await person('B');
  const c = await person('C');
  await connect(a, b);
  const bId = await idOf(b);
  await idOf(c);
  await c.page.fill('#callee-id', String(bId));
  await c.page.click('#call-btn');
  const text = await homeMessage(c, 'in another call');
  assert.match(text, /is in another call/);
  // The call in progress is untouched.
  assert.equal(await b.page.isVisible('#incoming'), false);
  await expectFramesFlowing(a);
  assertClean(a, b, c);
});

test('calling an ID nobody has, and cancelling while it rings', async () => {
  const a = await person('A');
  await idOf(a);
  const nobody = (await idOf(a)) === 123456789 ? 987654321 : 123456789;
  await a.page.fill('#callee-id', String(nobody));
  await a.page.click('#call-btn');
  assert.match(await homeMessage(a, 'Nobody is using'), /Nobody is using 123 456 789|Nobody is using 987 654 321/);

  const b = await person('B');
  await dial(a, b);
  await a.page.click('#cancel-btn');
  await Promise.all([waitState(a, 'idle'), waitState(b, 'idle')]);
  await homeMessage(b, 'Missed call');
  assertClean(a, b);
});

test('nobody answers: after 45 s the caller gives up and the callee sees a missed call', async () => {
  const a = await person('A');
  const b = await person('B');
  // A's timers run on Playwright's clock so the 45-second wait takes no time; B and the server
  // keep real time.
  await a.page.clock.install();
  await dial(a, b);
  await a.page.waitForFunction(() => document.getElementById('outgoing-status').textContent === 'Ringing…', null, { timeout: STEP_MS });
  await a.page.clock.fastForward(44_000);
  assert.equal(await a.page.evaluate(() => window.callgate.state), 'outgoing', 'still ringing at 44 s');
  assert.equal(await b.page.isVisible('#incoming'), true);
  await a.page.clock.fastForward(2_000);
  assert.match(await homeMessage(a, 'did not answer'), /did not answer/);
  await Promise.all([waitState(a, 'idle'), waitState(b, 'idle')]);
  await homeMessage(b, 'Missed call');
  assertClean(a, b);
});

test('opening a shared link calls its owner', async () => {
  const b = await person('B');
  const bId = await idOf(b);
  const link = await b.page.inputValue('#my-link');
  const a = await person('A', { url: link });
  await b.page.waitForSelector('#incoming[open]', { timeout: STEP_MS });
  assert.equal((await b.page.textContent('#incoming-caller')).replace(/\s/g, ''), String(await idOf(a)));
  await b.page.click('#accept-btn');
  await Promise.all([waitState(a, 'incall'), waitState(b, 'incall')]);
  await Promise.all([expectFramesFlowing(a), expectFramesFlowing(b)]);
  assert.equal((await a.page.textContent('#call-peer')).replace(/\s/g, ''), String(bId));
  // The link is consumed: reloading must not call again.
  assert.equal(new URL(a.page.url()).searchParams.get('call'), null);
  assertClean(a, b);
});

test('screen share renegotiates mid-call (perfect negotiation) and the peer sees it', async (t) => {
  const a = await person('A');
  const b = await person('B');
  await connect(a, b);
  // The callee (polite side) starts it, then the caller: both directions of renegotiation.
  for (const [sharer, viewer] of [[b, a], [a, b]]) {
    await sharer.page.click('#btn-screen');
    await sharer.page.waitForFunction(() => document.getElementById('btn-screen').getAttribute('aria-pressed') === 'true', null, { timeout: STEP_MS });
    await viewer.page.waitForSelector('#remote-screen', { state: 'visible', timeout: STEP_MS });
    // Two inbound video streams now, and the screen one decodes frames.
    await pollUntil(
      () => viewer.page.evaluate(async () => {
        const out = [];
        (await window.callgate.pc.getStats()).forEach((r) => {
          if (r.type === 'inbound-rtp' && r.kind === 'video') out.push(r.framesDecoded || 0);
        });
        return out;
      }),
      (frames) => frames.length === 2 && frames.every((n) => n > 0),
      { what: `${viewer.name} decoding both camera and screen` },
    );
    if (sharer === b) await screenshot(viewer, 'in-call-screen-share');
    await sharer.page.click('#btn-screen');
    await viewer.page.waitForSelector('#remote-screen', { state: 'hidden', timeout: STEP_MS });
  }
  // Both start sharing at the same instant: the offers cross ("glare"). The caller (impolite)
  // ignores the callee's offer, the callee (polite) rolls back and answers, then offers again.
  await Promise.all([a.page.click('#btn-screen'), b.page.click('#btn-screen')]);
  for (const viewer of [a, b]) {
    await viewer.page.waitForSelector('#remote-screen', { state: 'visible', timeout: STEP_MS });
    const start = await viewer.page.evaluate(async () => {
      const out = [];
      (await window.callgate.pc.getStats()).forEach((r) => {
        if (r.type === 'inbound-rtp' && r.kind === 'video') out.push(r.framesDecoded || 0);
      });
      return out;
    });
    await pollUntil(
      () => viewer.page.evaluate(async () => {
        const out = [];
        (await window.callgate.pc.getStats()).forEach((r) => {
          if (r.type === 'inbound-rtp' && r.kind === 'video') out.push(r.framesDecoded || 0);
        });
        return out;
      }),
      (frames) => frames.length === 2 && frames.every((n, i) => n > (start[i] || 0) + 5),
      { what: `${viewer.name} decoding camera and screen after simultaneous shares` },
    );
  }
  for (const p of [a, b]) {
    assert.equal(await p.page.evaluate(() => window.callgate.pc.signalingState), 'stable');
  }
  const glare = await Promise.all([a, b].map((p) => p.page.evaluate(() => window.callgate.collisions)));
  t.diagnostic(`offer collisions seen (caller, callee): ${glare.join(', ')}`);
  await Promise.all([expectFramesFlowing(a), expectFramesFlowing(b)]);
  assertClean(a, b);
});

test('on a phone screen the call view fits and the controls are reachable', async () => {
  const viewport = { width: 390, height: 844 };
  const a = await person('A', { viewport });
  const b = await person('B', { viewport });
  await connect(a, b);
  await a.page.waitForTimeout(1200); // let the timer tick for the picture
  await screenshot(a, 'in-call-phone');
  for (const id of ['#btn-mic', '#btn-cam', '#btn-screen', '#btn-chat', '#btn-hangup']) {
    const box = await a.page.locator(id).boundingBox();
    assert.ok(box && box.x >= 0 && box.x + box.width <= viewport.width && box.y + box.height <= viewport.height, `${id} is on screen`);
  }
  await a.page.click('#btn-chat');
  await screenshot(a, 'in-call-phone-chat');
  await a.page.keyboard.press('Escape');
  assertClean(a, b);
});

test('forced through callgate\'s TURN relay (?relay=1)', async () => {
  const probe = await person('probe');
  await idOf(probe);
  const turnUrls = await probe.page.evaluate(() => (window.callgate.iceServers || [])
    .flatMap((s) => [].concat(s.urls || []).filter((u) => /^turns?:/.test(u))));
  assert.ok(turnUrls.length > 0, 'the "id" message offers callgate\'s TURN relay');
  const a = await person('A', { url: `${url}/?relay=1` });
  const b = await person('B', { url: `${url}/?relay=1` });
  await connect(a, b);
  const route = await selectedRoute(a.page);
  assert.equal(route.local, 'relay', `A's selected candidate is ${JSON.stringify(route)}`);
  await a.page.waitForFunction(() => window.callgate.quality && window.callgate.quality.route === 'relayed', null, { timeout: STEP_MS });
  await expectFramesFlowing(b, 20);
  await a.page.waitForFunction(() => /Relayed/.test(document.getElementById('quality-label').textContent), null, { timeout: STEP_MS });
  await a.page.click('#quality');
  assert.match(await a.page.textContent('#q-route'), /^Relayed/);
  await screenshot(a, 'in-call-relayed');
  assertClean(a, b);
});

test('signaling cut mid-call: both pages reconnect, keep their IDs, and media keeps flowing', async () => {
  const proxy = new CuttableProxy(server.port);
  await proxy.listen();
  try {
    const base = `${new URL(url).protocol}//127.0.0.1:${proxy.port}/`;
    const a = await person('A', { url: base });
    const b = await person('B', { url: base });
    const aId = await idOf(a);
    const bId = await idOf(b);
    await connect(a, b);

    const ufrag = (p) => p.page.evaluate(() => /a=ice-ufrag:(\S+)/.exec(window.callgate.pc.remoteDescription.sdp)[1]);
    const ufragsBefore = await Promise.all([ufrag(a), ufrag(b)]);
    const lastSeq = (p) => p.page.evaluate(() => window.callgate.lastSeq);
    const seqsBefore = await Promise.all([lastSeq(a), lastSeq(b)]);
    assert.ok(seqsBefore.every((n) => n > 0), `the server numbers the app's messages: ${seqsBefore}`);

    // The network goes down (existing connections reset, new ones refused) until resumed below.
    proxy.pause();
    const cut = proxy.cut();
    assert.ok(cut > 0, 'the proxy had connections to cut');
    // Both show the reconnecting state, then are back online with the same IDs.
    await Promise.all([a, b].map((p) => p.page.waitForFunction(
      () => window.callgate.signaling !== 'open', null, { timeout: STEP_MS },
    )));
    // An ICE restart while signaling is down (what the app does when ICE fails): its offer waits
    // for the resume and then completes through perfect negotiation.
    await a.page.evaluate(() => window.callgate.pc.restartIce());
    await a.page.waitForFunction(() => {
      const el = document.getElementById('banner');
      return !el.hidden && /Reconnecting/.test(el.textContent);
    }, null, { timeout: STEP_MS });
    await screenshot(a, 'in-call-reconnecting');
    proxy.resume();
    await Promise.all([a, b].map((p) => p.page.waitForFunction(
      () => window.callgate.signaling === 'open', null, { timeout: STEP_MS },
    )));
    assert.equal(await idOf(a), aId, 'A resumed its ID');
    assert.equal(await idOf(b), bId, 'B resumed its ID');
    // The numbering continued across the resume (the app sent last_seq; nothing was lost).
    const seqsAfter = await Promise.all([lastSeq(a), lastSeq(b)]);
    assert.ok(seqsAfter[0] >= seqsBefore[0] && seqsAfter[1] >= seqsBefore[1], `${seqsBefore} → ${seqsAfter}`);
    assert.equal(await a.page.isVisible('#banner'), false);

    // The call never stopped, and still works end to end: media, chat, and signaling (hang up).
    assert.equal(await a.page.evaluate(() => window.callgate.state), 'incall');
    await pollUntil(
      () => Promise.all([ufrag(a), ufrag(b)]),
      ([ua, ub]) => ua !== ufragsBefore[0] && ub !== ufragsBefore[1],
      { what: 'new ICE credentials on both sides after the restart' },
    );
    await Promise.all([expectFramesFlowing(a), expectFramesFlowing(b)]);
    await b.page.click('#btn-hangup');
    await Promise.all([waitState(a, 'idle'), waitState(b, 'idle')]);
    // After the resume, the server still routes calls to the same IDs.
    await dial(b, a);
    await a.page.click('#decline-btn');
    await homeMessage(b, 'declined');
    // Only the expected "connection failed" noise from the cut, nothing else.
    for (const p of [a, b]) {
      const unexpected = p.problems.filter((m) => !/WebSocket|ERR_CONNECTION|net::/.test(m));
      assert.deepEqual(unexpected, [], `${p.name} had unexpected errors`);
    }
  } finally {
    await proxy.close();
  }
});

test('server restart mid-call: pages say so, come back online, and the call\'s media keeps flowing', async (t) => {
  if (server.external) {
    t.skip('needs to restart the server, and CALLGATE_URL points at one this test does not own');
    return;
  }
  const a = await person('A');
  const b = await person('B');
  const aId = await idOf(a);
  await connect(a, b);

  // A restart on the same address: SIGTERM (clients are told 1001, "going away"), then start again.
  await server.stop();
  await a.page.waitForFunction(() => window.callgate.signaling !== 'open', null, { timeout: STEP_MS });
  await a.page.waitForSelector('#banner:not([hidden])', { timeout: STEP_MS });
  assert.match(await a.page.textContent('#banner'), /Reconnecting/);
  await server.start({ listen: `127.0.0.1:${server.port}` });

  await Promise.all([a, b].map((p) => p.page.waitForFunction(
    () => window.callgate.signaling === 'open', null, { timeout: 30000 },
  )));
  // The restarted server knows nothing of the old IDs (in-memory directory, see PROTOCOL.md), so
  // each page carries on with a new one and says so, while the call itself is peer to peer.
  const newId = await idOf(a);
  if (newId !== aId) {
    await a.page.waitForFunction(() => /new ID/.test(document.getElementById('toasts').textContent), null, { timeout: STEP_MS });
  }
  assert.equal(await a.page.evaluate(() => window.callgate.state), 'incall');
  await Promise.all([expectFramesFlowing(a), expectFramesFlowing(b)]);
  // Hanging up still reaches the other side (over the data channel if signaling lost the call).
  await a.page.click('#btn-hangup');
  await Promise.all([waitState(a, 'idle'), waitState(b, 'idle')]);
  for (const p of [a, b]) {
    const unexpected = p.problems.filter((m) => !/WebSocket|ERR_CONNECTION|net::/.test(m));
    assert.deepEqual(unexpected, [], `${p.name} had unexpected errors`);
  }
});

test('switching camera in the device picker swaps the track without renegotiating', async () => {
  const a = await person('A');
  const b = await person('B');
  await connect(a, b);
  await a.page.click('#btn-devices');
  await a.page.waitForSelector('#devices[open]', { timeout: STEP_MS });
  const cameras = await a.page.$$eval('#camera-select option', (os) => os.map((o) => ({ id: o.value, label: o.textContent })));
  assert.equal(cameras.length, 3, 'the picker lists all three fake cameras');
  const before = await a.page.evaluate(() => ({
    sdp: window.callgate.pc.localDescription.sdp,
    device: window.callgate.pc.getSenders().find((s) => s.track && s.track.kind === 'video').track.getSettings().deviceId,
  }));
  // Chromium's fake_device_1 is a Y16 depth camera, which WebRTC cannot encode; fake_device_2 is
  // an ordinary (MJPEG) camera.
  const other = cameras.find((c) => c.label === 'fake_device_2').id;
  assert.notEqual(other, before.device);
  await a.page.selectOption('#camera-select', other);
  await a.page.waitForFunction((id) => window.callgate.pc.getSenders()
    .some((s) => s.track && s.track.kind === 'video' && s.track.getSettings().deviceId === id), other, { timeout: STEP_MS });
  await a.page.click('#devices button[type=submit]');
  await expectFramesFlowing(b, 20);
  const sdpAfter = await a.page.evaluate(() => window.callgate.pc.localDescription.sdp);
  assert.equal(sdpAfter, before.sdp, 'no renegotiation: the local description is unchanged');
  assert.equal(await a.page.evaluate(() => document.getElementById('local-video').srcObject.getVideoTracks()[0].getSettings().deviceId), other, 'the preview shows the new camera');
  assertClean(a, b);
});

test('camera or microphone blocked: plain words, then audio-only or receive-only calls work', async () => {
  // A browser without the auto-accept flag, so permissions are exactly what this test sets.
  const strict = await launchBrowser(server.spkiHash(), { fakeUi: false });
  try {
    const cdp = await strict.newBrowserCDPSession();
    const blocked = async (name, deny) => {
      const context = await strict.newContext({ viewport: { width: 1280, height: 800 } });
      const { browserContextIds } = await cdp.send('Target.getBrowserContexts');
      const contextId = browserContextIds[browserContextIds.length - 1];
      for (const permission of ['camera', 'microphone']) {
        await cdp.send('Browser.setPermission', {
          permission: { name: permission },
          setting: deny.includes(permission) ? 'denied' : 'granted',
          origin: url,
          browserContextId: contextId,
        });
      }
      const page = await context.newPage();
      const p = { name, context, page, problems: [] };
      page.on('console', (msg) => { if (msg.type() === 'error') p.problems.push(msg.text()); });
      page.on('pageerror', (err) => p.problems.push(err.message));
      await page.goto(`${url}/`);
      people.push(p);
      return p;
    };
    const b = await person('B');
    const bId = await idOf(b);

    // Camera blocked, microphone allowed: the app says so and offers audio only.
    const a = await blocked('A (camera blocked)', ['camera']);
    await idOf(a);
    await a.page.fill('#callee-id', String(bId));
    await a.page.click('#call-btn');
    await a.page.waitForSelector('#media-problem[open]', { timeout: STEP_MS });
    assert.match(await a.page.textContent('#media-problem-text'), /blocked access to your camera\./);
    assert.equal(await a.page.isVisible('#media-audio'), true, 'audio only is offered');
    await screenshot(a, 'camera-blocked');
    await a.page.click('#media-audio');
    await b.page.waitForSelector('#incoming[open]', { timeout: STEP_MS });
    await b.page.click('#accept-btn');
    await Promise.all([waitState(a, 'incall'), waitState(b, 'incall')]);
    await expectFramesFlowing(a); // A still sees B
    await b.page.waitForSelector('#remote-placeholder', { state: 'visible', timeout: STEP_MS });
    const e1 = await pollUntil(() => audioEnergy(b.page), (e) => e > 0, { what: 'B hearing A' });
    assert.ok(e1 > 0);
    await a.page.click('#btn-hangup');
    await Promise.all([waitState(a, 'idle'), waitState(b, 'idle')]);

    // Both blocked: no audio-only offer, but the call can go ahead receive-only.
    const c = await blocked('C (both blocked)', ['camera', 'microphone']);
    await idOf(c);
    await c.page.fill('#callee-id', String(bId));
    await c.page.click('#call-btn');
    await c.page.waitForSelector('#media-problem[open]', { timeout: STEP_MS });
    assert.match(await c.page.textContent('#media-problem-text'), /blocked access to your camera and microphone/);
    assert.equal(await c.page.isVisible('#media-audio'), false);
    await c.page.click('#media-receive');
    await b.page.waitForSelector('#incoming[open]', { timeout: STEP_MS });
    await b.page.click('#accept-btn');
    await Promise.all([waitState(c, 'incall'), waitState(b, 'incall')]);
    await expectFramesFlowing(c);
    assert.equal(await c.page.getAttribute('#btn-mic', 'aria-label'), 'Turn microphone on');
    for (const p of [a, c]) {
      // Chromium logs nothing for a denied permission; any error is the app's.
      assert.deepEqual(p.problems, [], `${p.name} had console errors`);
    }
  } finally {
    await strict.close();
  }
});

test('keyboard only: call, answer, mute and hang up without a mouse', async () => {
  const a = await person('A');
  const b = await person('B');
  const bId = await idOf(b);
  await idOf(a);
  // Tab from the top of the page reaches the ID field; Enter submits the call.
  await a.page.focus('body');
  for (let i = 0; i < 10; i += 1) {
    await a.page.keyboard.press('Tab');
    if (await a.page.evaluate(() => document.activeElement.id === 'callee-id')) break;
  }
  assert.equal(await a.page.evaluate(() => document.activeElement.id), 'callee-id', 'Tab reaches the ID field');
  await a.page.keyboard.type(String(bId));
  await a.page.keyboard.press('Enter');
  await b.page.waitForSelector('#incoming[open]', { timeout: STEP_MS });
  // Accept has focus in the dialog: Enter answers.
  await b.page.keyboard.press('Enter');
  await Promise.all([waitState(a, 'incall'), waitState(b, 'incall')]);
  await expectFramesFlowing(a);
  // M toggles the microphone; the focused control shows a visible focus ring.
  await a.page.keyboard.press('m');
  await b.page.waitForSelector('#remote-muted', { state: 'visible', timeout: STEP_MS });
  assert.equal(await a.page.evaluate(() => document.activeElement.id), 'btn-hangup', 'Hang up has focus in a call');
  const outline = await a.page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
  assert.notEqual(outline, 'none', 'the focused control has a visible outline');
  await a.page.keyboard.press('Enter');
  await Promise.all([waitState(a, 'idle'), waitState(b, 'idle')]);
  assertClean(a, b);
});
