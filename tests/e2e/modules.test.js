// The app's pure functions, imported from public/scripts/ as the browser loads them (ES modules,
// no build step), and checked directly in node: backoff, stats summaries, ID parsing.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backoffDelay } from '../../public/scripts/signaling.js';
import { summarize, formatKbps } from '../../public/scripts/stats.js';
import { formatId, parseId, formatDuration } from '../../public/scripts/ui.js';

test('backoff is full jitter: uniform in [0, min(cap, base * 2^attempt))', () => {
  const opts = { baseMs: 500, capMs: 15000 };
  assert.equal(backoffDelay(0, { ...opts, random: () => 0 }), 0);
  assert.equal(backoffDelay(0, { ...opts, random: () => 0.999 }), 499);
  assert.equal(backoffDelay(3, { ...opts, random: () => 0.5 }), 2000);
  // The ceiling stops growing at the cap, even for absurd attempt counts.
  assert.equal(backoffDelay(10, { ...opts, random: () => 0.999 }), 14985);
  assert.equal(backoffDelay(10_000, { ...opts, random: () => 0.999 }), 14985);
  for (let attempt = 0; attempt < 20; attempt += 1) {
    const d = backoffDelay(attempt);
    assert.ok(d >= 0 && d < 15000 && Number.isInteger(d), `attempt ${attempt}: ${d}`);
  }
});

function snap(at, extra = {}) {
  return {
    at, rttMs: 20, route: 'direct', localType: 'host', protocol: 'udp',
    bytesIn: 0, bytesOut: 0, packetsIn: 0, packetsLost: 0, framesDecoded: 0, audioEnergy: 0,
    ...extra,
  };
}

test('stats summary: bitrates and loss from two snapshots, and a quality level', () => {
  const first = summarize(null, snap(1000));
  assert.equal(first.inKbps, null, 'no rate before a second snapshot');
  assert.equal(first.level, 'good');

  const a = snap(1000, { bytesIn: 0, bytesOut: 0, packetsIn: 100, packetsLost: 0 });
  const b = snap(2000, { bytesIn: 125_000, bytesOut: 62_500, packetsIn: 198, packetsLost: 2 });
  const s = summarize(a, b);
  assert.equal(s.inKbps, 1000);
  assert.equal(s.outKbps, 500);
  assert.equal(s.lossPct, 2);
  assert.equal(s.level, 'good');

  assert.equal(summarize(a, { ...b, packetsLost: 10 }).level, 'poor', '10 % loss');
  assert.equal(summarize(a, { ...b, rttMs: 400 }).level, 'fair');
  assert.equal(summarize(a, { ...b, rttMs: 900 }).level, 'poor');
  assert.equal(summarize(a, { ...b, bytesIn: 0 }).level, 'poor', 'nothing received');
  assert.equal(summarize(a, { ...b, route: null }).level, 'unknown', 'no selected pair yet');
  assert.equal(formatKbps(1500), '1.5 Mbit/s');
  assert.equal(formatKbps(320.4), '320 kbit/s');
  assert.equal(formatKbps(null), '—');
});

test('IDs: typed with spaces or dashes, shown in groups of three', () => {
  assert.equal(parseId('123 456 789'), 123456789);
  assert.equal(parseId(' 123-456-789 '), 123456789);
  assert.equal(parseId('12345'), null, 'too short');
  assert.equal(parseId('1234567890123456'), null, 'too long for an exact JS number');
  assert.equal(parseId('12345678x'), null);
  assert.equal(parseId(''), null);
  assert.equal(formatId(123456789), '123 456 789');
  assert.equal(formatId(1234567), '1 234 567');
  assert.equal(formatDuration(0), '00:00');
  assert.equal(formatDuration(61_999), '01:01');
  assert.equal(formatDuration(3_726_000), '1:02:06');
});
