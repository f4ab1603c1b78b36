// The page: views, messages, the chat log, the call timer, the ring. Everything that touches the
// DOM lives here or in client.js; nothing here knows about WebRTC or the socket.
// Only classes and the `hidden` attribute change how things look: the CSP forbids inline styles.

export const $ = (id) => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing #${id}`);
  return el;
};

/** 123456789 → "123 456 789", easier to read aloud. */
export function formatId(id) {
  return String(id).replace(/\B(?=(\d{3})+(?!\d))/g, ' ');
}

/** "123 456-789" → 123456789, or null if it cannot be an ID. */
export function parseId(text) {
  const digits = String(text).replace(/[\s.-]/g, '');
  if (!/^\d{6,15}$/.test(digits)) return null;
  return Number(digits);
}

export function formatDuration(ms) {
  const total = Math.max(0, Math.floor(ms / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const two = (n) => String(n).padStart(2, '0');
  return h > 0 ? `${h}:${two(m)}:${two(s)}` : `${two(m)}:${two(s)}`;
}

const VIEWS = ['view-home', 'view-outgoing', 'view-call', 'view-unsupported'];

export function showView(id) {
  for (const v of VIEWS) $(v).hidden = v !== id;
  document.body.dataset.view = id.replace('view-', '');
}

/** A short message that goes away by itself (and is read out by screen readers). */
export function toast(text, { kind = 'info', ms = 5000 } = {}) {
  const box = $('toasts');
  const item = document.createElement('p');
  item.className = `toast toast-${kind}`;
  item.textContent = text;
  box.append(item);
  setTimeout(() => item.remove(), ms);
  while (box.children.length > 3) box.firstElementChild.remove();
}

/** The sticky banner under the header, for states that last (reconnecting, offline). */
export function banner(text, kind = 'warn') {
  const el = $('banner');
  if (!text) {
    el.hidden = true;
    el.textContent = '';
    return;
  }
  el.textContent = text;
  el.className = `banner banner-${kind}`;
  el.hidden = false;
}

export function setNetStatus(state, text) {
  $('net-status').dataset.state = state;
  $('net-status-text').textContent = text;
}

export function appendChat(who, text, at = Date.now()) {
  const log = $('chat-log');
  const item = document.createElement('li');
  item.className = `msg msg-${who}`;
  const body = document.createElement('p');
  body.className = 'msg-text';
  body.textContent = text;
  const time = document.createElement('time');
  time.className = 'msg-time';
  const d = new Date(at);
  time.dateTime = d.toISOString();
  time.textContent = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  item.append(body, time);
  log.append(item);
  log.scrollTop = log.scrollHeight;
}

export function appendChatNote(text) {
  const item = document.createElement('li');
  item.className = 'msg msg-note';
  item.textContent = text;
  $('chat-log').append(item);
}

/** A two-tone ring made with Web Audio (no audio file to fetch). Silent if autoplay forbids it. */
export class Ringer {
  constructor() {
    this.ctx = null;
    this.timer = 0;
  }

  start(pattern = 'ring') {
    this.stop();
    try {
      this.ctx = this.ctx || new AudioContext();
      this.ctx.resume().catch(() => {});
    } catch {
      return;
    }
    const burst = () => {
      const ctx = this.ctx;
      if (!ctx || ctx.state !== 'running') return;
      const t = ctx.currentTime;
      const gain = ctx.createGain();
      gain.gain.setValueAtTime(0, t);
      gain.gain.linearRampToValueAtTime(0.12, t + 0.02);
      gain.gain.setValueAtTime(0.12, t + (pattern === 'ring' ? 0.8 : 1.2));
      gain.gain.linearRampToValueAtTime(0, t + (pattern === 'ring' ? 0.85 : 1.25));
      gain.connect(ctx.destination);
      const freqs = pattern === 'ring' ? [440, 480] : [425];
      for (const f of freqs) {
        const osc = ctx.createOscillator();
        osc.frequency.value = f;
        osc.connect(gain);
        osc.start(t);
        osc.stop(t + 1.3);
      }
    };
    burst();
    this.timer = setInterval(burst, pattern === 'ring' ? 2000 : 4000);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = 0;
  }
}
