// Connection quality from RTCPeerConnection.getStats(): round-trip time, packet loss, bitrate and
// whether media goes direct or through the TURN relay. `summarize` is a pure function of two
// snapshots so it can be reasoned about without a call; `StatsMonitor` polls it once a second.

/** Turns a getStats() report into the numbers we show. Keeps what the next delta needs. */
export function snapshot(report) {
  const s = {
    at: 0, rttMs: null, route: null, localType: null, protocol: null,
    bytesIn: 0, bytesOut: 0, packetsIn: 0, packetsLost: 0,
    framesDecoded: 0, audioEnergy: 0,
  };
  let pair = null;
  const byId = new Map();
  report.forEach((r) => byId.set(r.id, r));
  report.forEach((r) => {
    if (r.type === 'transport' && r.selectedCandidatePairId) pair = byId.get(r.selectedCandidatePairId);
  });
  if (!pair) {
    report.forEach((r) => {
      if (r.type === 'candidate-pair' && r.state === 'succeeded' && r.nominated && !pair) pair = r;
    });
  }
  report.forEach((r) => {
    if (r.timestamp > s.at) s.at = r.timestamp;
    if (r.type === 'inbound-rtp') {
      s.bytesIn += r.bytesReceived || 0;
      s.packetsIn += r.packetsReceived || 0;
      s.packetsLost += Math.max(0, r.packetsLost || 0);
      if (r.kind === 'video') s.framesDecoded += r.framesDecoded || 0;
      if (r.kind === 'audio') s.audioEnergy += r.totalAudioEnergy || 0;
    } else if (r.type === 'outbound-rtp') {
      s.bytesOut += r.bytesSent || 0;
    }
  });
  if (pair) {
    if (typeof pair.currentRoundTripTime === 'number') s.rttMs = Math.round(pair.currentRoundTripTime * 1000);
    const local = byId.get(pair.localCandidateId);
    const remote = byId.get(pair.remoteCandidateId);
    if (local) {
      s.localType = local.candidateType;
      s.protocol = local.relayProtocol || local.protocol || null;
      s.route = local.candidateType === 'relay' || (remote && remote.candidateType === 'relay') ? 'relayed' : 'direct';
    }
  }
  return s;
}

/** Rates and a quality level from two snapshots taken about a second apart. */
export function summarize(prev, cur) {
  const seconds = prev && cur.at > prev.at ? (cur.at - prev.at) / 1000 : 0;
  const rate = (a, b) => (seconds > 0 ? Math.max(0, ((b - a) * 8) / seconds / 1000) : null);
  const inKbps = prev ? rate(prev.bytesIn, cur.bytesIn) : null;
  const outKbps = prev ? rate(prev.bytesOut, cur.bytesOut) : null;
  let lossPct = null;
  if (prev) {
    const received = cur.packetsIn - prev.packetsIn;
    const lost = cur.packetsLost - prev.packetsLost;
    lossPct = received + lost > 0 ? (100 * Math.max(0, lost)) / (received + lost) : 0;
  }
  let level = 'unknown';
  if (cur.route) {
    level = 'good';
    if ((cur.rttMs ?? 0) > 250 || (lossPct ?? 0) > 2) level = 'fair';
    if ((cur.rttMs ?? 0) > 600 || (lossPct ?? 0) > 8 || inKbps === 0) level = 'poor';
  }
  return { rttMs: cur.rttMs, lossPct, inKbps, outKbps, route: cur.route, protocol: cur.protocol, level };
}

export function formatKbps(kbps) {
  if (kbps == null) return '—';
  return kbps >= 1000 ? `${(kbps / 1000).toFixed(1)} Mbit/s` : `${Math.round(kbps)} kbit/s`;
}

/** Polls a call's stats and reports a summary once a second. */
export class StatsMonitor {
  constructor(call, onSummary, everyMs = 1000) {
    this.call = call;
    this.onSummary = onSummary;
    this.prev = null;
    this.timer = setInterval(() => this.tick(), everyMs);
  }

  async tick() {
    if (this.call.closed) return;
    try {
      const cur = snapshot(await this.call.getStats());
      this.onSummary(summarize(this.prev, cur));
      this.prev = cur;
    } catch {
      // The connection closed between the check and the call; the next tick stops.
    }
  }

  stop() {
    clearInterval(this.timer);
  }
}
