// The signaling connection: one WebSocket to wss://HOST/socket that survives blips.
//
// It owns the socket, the reconnect loop (exponential backoff with full jitter), the `resume`
// handshake that takes our ID back after a reconnect, and an application-level ping that notices
// half-open connections. It knows message *names* (docs/PROTOCOL.md) but not what calls mean: the
// call logic lives in call.js and client.js. It never touches the DOM.
//
// Delivery: the socket is opened with `?seq=1`, so every server message carries `seq`. We remember
// the highest one processed, acknowledge it cheaply (at most every `ackEvery` messages or after
// `ackDelayMs`), and send it as `last_seq` on resume, so the server replays exactly what we missed
// when a socket died with messages in flight. Duplicates (seq already seen) are dropped here.

/** Exponential backoff with full jitter: a uniform delay in [0, min(cap, base·2^attempt)]. */
export function backoffDelay(attempt, { baseMs = 500, capMs = 15000, random = Math.random } = {}) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 16));
  return Math.floor(random() * ceiling);
}

/** Adds `seq=1` to the socket URL: the server then numbers its messages and keeps them until acked. */
export function withSeq(url) {
  return url + (url.includes('?') ? '&' : '?') + 'seq=1';
}

/** WebSocket close codes the server uses (see protocol.rs `CloseCode`). */
const CLOSE_NORMAL = 1000;
const CLOSE_POLICY = 1008;

/**
 * Events (all `CustomEvent`, details in parentheses):
 * - `state` ({state}) — 'connecting' | 'open' | 'reconnecting' | 'closed'
 * - `retry` ({attempt, delayMs}) — the next connection attempt is scheduled
 * - `id` ({id, resumed, previousId, iceServers}) — we have an ID (fresh, resumed or replaced)
 * - `message` ({message}) — any other server message (each exactly once, in order)
 * - `missed` ({from, to}) — after a resume: the server had to drop messages `from`..=`to` for us
 * - `fatal` ({reason}) — the server told us not to come back (e.g. session taken over)
 */
export class Signaling extends EventTarget {
  constructor(url, { pingEveryMs = 15000, pongTimeoutMs = 8000, ackEvery = 16, ackDelayMs = 1000 } = {}) {
    super();
    this.url = withSeq(url);
    this.pingEveryMs = pingEveryMs;
    this.pongTimeoutMs = pongTimeoutMs;
    this.ackEvery = ackEvery;
    this.ackDelayMs = ackDelayMs;
    /** Highest `seq` processed for our ID, and the highest the server has been told of. */
    this.lastSeq = 0;
    this.ackedSeq = 0;
    this.ackTimer = 0;
    /** Highest `seq` seen on a fresh connection while its resume is pending (the throwaway ID's). */
    this.freshSeq = 0;
    /** Our ID and the token that lets us take it back; both from the last `id` message. */
    this.id = null;
    this.token = null;
    this.iceServers = [];
    this.state = 'connecting';
    /** Messages sent while the socket was down, flushed once our ID is back. */
    this.pending = [];
    this.attempt = 0;
    this.ws = null;
    this.resuming = false;
    this.stopped = false;
    this.retryTimer = 0;
    this.pingTimer = 0;
    this.pongTimer = 0;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  /** Closes for good (page unload); the server frees our ID at once. */
  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.stopHeartbeat();
    if (this.ws) this.ws.close(CLOSE_NORMAL, 'bye');
  }

  /** Drops the current socket as if the network broke, and reconnects. */
  reconnectNow() {
    if (this.ws) {
      const ws = this.ws;
      this.detach(ws);
      ws.close();
    }
    this.attempt = 0;
    this.scheduleReconnect(0);
  }

  get connected() {
    return this.state === 'open';
  }

  /**
   * Sends a message, adding our `id`. While reconnecting, call messages are held and sent after
   * the resume, in order, so a blip loses nothing; `ping` is never queued.
   */
  send(message) {
    const full = this.id != null && !('id' in message) ? { ...message, id: this.id } : message;
    if (this.state === 'open' && this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(full));
      return true;
    }
    if (message.type !== 'ping') this.pending.push(message);
    return false;
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent('state', { detail: { state } }));
  }

  connect() {
    clearTimeout(this.retryTimer);
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.resuming = false;
    this.freshSeq = 0;
    ws.onmessage = (ev) => this.onFrame(ev.data);
    ws.onclose = (ev) => this.onClose(ws, ev);
    // An error is always followed by close; nothing to do here.
    ws.onerror = () => {};
  }

  detach(ws) {
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = null;
    if (this.ws === ws) this.ws = null;
    this.stopHeartbeat();
    clearTimeout(this.ackTimer);
    this.ackTimer = 0;
  }

  onClose(ws, ev) {
    this.detach(ws);
    if (this.stopped) return;
    if (ev.code === CLOSE_POLICY && this.replaced) {
      this.setState('closed');
      this.dispatchEvent(new CustomEvent('fatal', { detail: { reason: 'replaced' } }));
      return;
    }
    this.scheduleReconnect();
  }

  scheduleReconnect(delay) {
    if (this.stopped) return;
    this.setState(this.id == null ? 'connecting' : 'reconnecting');
    const wait = delay ?? backoffDelay(this.attempt);
    this.attempt += 1;
    this.dispatchEvent(new CustomEvent('retry', { detail: { attempt: this.attempt, delayMs: wait } }));
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), wait);
  }

  onFrame(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    this.armPongTimeout();
    if (typeof message.seq === 'number') {
      if (this.resuming) {
        this.freshSeq = Math.max(this.freshSeq, message.seq);
      } else {
        // A replay after a resume never repeats what we acknowledged; this guards the rest.
        if (message.seq <= this.lastSeq) return;
        this.lastSeq = message.seq;
        this.scheduleAck();
      }
    }
    switch (message.type) {
      case 'id':
        this.onId(message);
        return;
      case 'pong':
        return;
      case 'error':
        if (message.code === 'resume_failed' && this.resuming) {
          this.resumeFailed();
          return;
        }
        if (message.code === 'session_replaced') this.replaced = true;
        break;
      default:
        break;
    }
    this.dispatchEvent(new CustomEvent('message', { detail: { message } }));
  }

  onId(message) {
    const fresh = { id: message.id, token: message.token };
    if (Array.isArray(message.iceServers)) this.iceServers = message.iceServers;
    else if (message.iceServers == null && !message.resumed) this.iceServers = [];
    if (message.resumed) {
      this.resuming = false;
      this.ackedSeq = Math.min(this.ackedSeq, this.lastSeq);
      this.adopt(fresh, message);
      if (Array.isArray(message.missed) && message.missed.length === 2) {
        const [from, to] = message.missed;
        this.dispatchEvent(new CustomEvent('missed', { detail: { from, to } }));
      }
      return;
    }
    if (this.id != null && this.token && !this.resuming) {
      // A new connection gave us a fresh ID; ask for our old one back before anyone notices.
      this.resuming = true;
      this.fallback = fresh;
      this.ws.send(JSON.stringify({
        type: 'resume', id: this.id, token: this.token, last_seq: this.lastSeq,
      }));
      return;
    }
    // A brand-new ID (first connection, or the server forgot us): its numbering starts afresh.
    this.lastSeq = this.freshSeq;
    this.ackedSeq = 0;
    this.adopt(fresh, message);
  }

  /**
   * Acknowledges `lastSeq` so the server can free what we read: at once after `ackEvery`
   * unacknowledged messages, else once `ackDelayMs` after the first. One small frame per batch.
   */
  scheduleAck() {
    if (this.lastSeq - this.ackedSeq >= this.ackEvery) {
      this.sendAck();
      return;
    }
    if (!this.ackTimer) this.ackTimer = setTimeout(() => this.sendAck(), this.ackDelayMs);
  }

  sendAck() {
    clearTimeout(this.ackTimer);
    this.ackTimer = 0;
    if (this.lastSeq <= this.ackedSeq || this.resuming) return;
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: 'ack', seq: this.lastSeq }));
      this.ackedSeq = this.lastSeq;
    }
  }

  /** The server did know our old ID any more (grace period over, or it restarted). */
  resumeFailed() {
    this.resuming = false;
    // Held call messages were addressed as the old ID; they mean nothing now.
    this.pending = [];
    // Sequence numbers belong to an ID: continue with the fresh one's.
    this.lastSeq = this.freshSeq;
    this.ackedSeq = 0;
    this.adopt(this.fallback, { resumed: false });
  }

  adopt({ id, token }, message) {
    const previousId = this.id;
    this.id = id;
    this.token = token ?? null;
    this.attempt = 0;
    this.setState('open');
    this.startHeartbeat(message.heartbeatMs);
    this.dispatchEvent(new CustomEvent('id', {
      detail: { id, previousId, resumed: !!message.resumed, iceServers: this.iceServers },
    }));
    const held = this.pending;
    this.pending = [];
    for (const m of held) this.send(m);
  }

  startHeartbeat(heartbeatMs) {
    this.stopHeartbeat();
    const every = heartbeatMs > 0 ? Math.min(this.pingEveryMs, heartbeatMs) : this.pingEveryMs;
    this.pingTimer = setInterval(() => {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) {
        this.ws.send(JSON.stringify({ type: 'ping' }));
        this.armPongTimeout(true);
      }
    }, every);
  }

  /** After a ping, any frame proves the connection alive; silence means it is half-open. */
  armPongTimeout(afterPing = false) {
    if (!afterPing) {
      clearTimeout(this.pongTimer);
      this.pongTimer = 0;
      return;
    }
    if (this.pongTimer) return;
    this.pongTimer = setTimeout(() => {
      this.pongTimer = 0;
      this.reconnectNow();
    }, this.pongTimeoutMs);
  }

  stopHeartbeat() {
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    this.pingTimer = 0;
    this.pongTimer = 0;
  }
}
