// The calling app: wires the signaling connection (signaling.js), the call (call.js), media
// (media.js), stats (stats.js) and the page (ui.js) together, and owns the call's life cycle:
//
//   idle ──call──▶ outgoing (calling → ringing) ──accepted──▶ in call ──hang up──▶ idle
//   idle ◀─video-answer-request─▶ incoming ──accept──▶ in call
//
// Message and field names are those of docs/PROTOCOL.md.

import { Signaling } from './signaling.js';
import { Call } from './call.js';
import {
  openMedia, openDevice, openScreen, listDevices, stopStream, unsupportedReason, MediaProblem,
} from './media.js';
import { StatsMonitor, formatKbps } from './stats.js';
import {
  $, formatId, parseId, formatDuration, showView, toast, banner, setNetStatus,
  appendChat, appendChatNote, Ringer,
} from './ui.js';

/** How long the caller waits for an answer before giving up. */
const NO_ANSWER_MS = 45000;
/** How long a call may stay without a media connection before we give up on it. */
const MEDIA_LOST_MS = 30000;

const params = new URLSearchParams(location.search);
/** `?relay=1` forces media through the TURN relay (for testing the relay, or strict networks). */
const FORCE_RELAY = params.get('relay') === '1';

const app = {
  /** 'idle' | 'outgoing' | 'incoming' | 'incall' */
  state: 'idle',
  peerId: null,
  call: null,
  /** The incoming call's offer and early candidates, kept until Accept. */
  incoming: null,
  localStream: null,
  screenStream: null,
  muted: false,
  cameraOff: false,
  startedAt: 0,
  timer: 0,
  noAnswerTimer: 0,
  mediaLostTimer: 0,
  stats: null,
  lastSummary: null,
  unread: 0,
  /** A pending `?call=ID` from a shared link, dialled once we have our own ID. */
  linkCallee: parseId(params.get('call') || ''),
};

const ringer = new Ringer();
let sig = null;

// ---- start-up ----------------------------------------------------------------------------------

function main() {
  const reason = unsupportedReason();
  if (reason) {
    $('unsupported-text').textContent = reason;
    showView('view-unsupported');
    setNetStatus('offline', 'Unavailable');
    return;
  }
  bindUi();
  showView('view-home');
  if (app.linkCallee) $('callee-id').value = String(app.linkCallee);

  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/socket`;
  sig = new Signaling(url);
  sig.addEventListener('state', (e) => onSignalingState(e.detail.state));
  sig.addEventListener('id', (e) => onId(e.detail));
  sig.addEventListener('retry', ({ detail: { attempt } }) => {
    // One quick retry is a blip; after that, say so.
    if (attempt >= 3 && sig.id == null) {
      banner('Can’t reach the callgate server. Check your internet connection; retrying automatically…', 'warn');
    }
  });
  sig.addEventListener('message', (e) => onMessage(e.detail.message).catch((err) => console.error(err)));
  // The server had to drop messages for us while we were away (its per-ID budget ran out).
  sig.addEventListener('missed', () => onSignalingGap('Some call messages for you were lost while reconnecting.'));
  sig.addEventListener('fatal', () => {
    banner('This ID is now open in another tab or window. Reload this page to get a new ID.', 'error');
    setNetStatus('offline', 'Disconnected');
    endCall({ message: null });
  });
  sig.start();
  // Closing the tab frees our ID at once instead of after the resume grace period.
  window.addEventListener('pagehide', () => {
    if (app.call) app.call.close({ tellPeer: true });
    sig.stop();
  });
}

/** A handle for support and for the browser tests; it changes nothing by itself. */
window.callgate = {
  get id() { return sig ? sig.id : null; },
  get state() { return app.state; },
  get signaling() { return sig ? sig.state : null; },
  /** The highest signaling `seq` processed (the server numbers messages for `?seq=1`). */
  get lastSeq() { return sig ? sig.lastSeq : 0; },
  get pc() { return app.call ? app.call.pc : null; },
  get quality() { return app.lastSummary; },
  get iceServers() { return sig ? sig.iceServers : []; },
  get collisions() { return app.call ? app.call.collisions : 0; },
  forceRelay: FORCE_RELAY,
};

function onSignalingState(state) {
  switch (state) {
    case 'open':
      setNetStatus('online', 'Online');
      banner(null);
      break;
    case 'reconnecting':
      setNetStatus('reconnecting', 'Reconnecting…');
      banner(app.state === 'incall'
        ? 'Connection to the server lost. Reconnecting… Your call continues meanwhile.'
        : 'Connection to the server lost. Reconnecting…', 'warn');
      break;
    case 'connecting':
      setNetStatus('connecting', 'Connecting…');
      break;
    default:
      setNetStatus('offline', 'Offline');
  }
  updateCallButton();
}

function onId({ id, previousId, resumed, iceServers }) {
  $('my-id').textContent = formatId(id);
  $('my-id').dataset.id = String(id);
  $('my-link').value = `${location.origin}/?call=${id}`;
  $('copy-id').disabled = false;
  $('copy-link').disabled = false;
  updateCallButton();
  if (resumed) {
    toast('Reconnected.');
    adoptIceServers(iceServers);
  } else if (previousId != null) {
    // The server forgot us (restart, or we were away too long): a new ID, and any call setup
    // that was waiting on the old one is gone.
    toast(`Reconnected with a new ID: ${formatId(id)}. Share it again.`, { kind: 'warn', ms: 8000 });
    if (app.state === 'outgoing' || app.state === 'incoming') {
      endCall({ message: 'The connection to the server was lost, so the call could not go through.' });
    } else if (app.state === 'incall') {
      showNotice('The server lost track of this call. Media still flows directly; hang up when done.');
    }
  }
  if (app.linkCallee && app.state === 'idle' && !resumed) {
    const callee = app.linkCallee;
    app.linkCallee = null;
    // Reloading the page must not call again.
    history.replaceState(null, '', location.pathname + (FORCE_RELAY ? '?relay=1' : ''));
    if (callee !== id) startCall(callee);
    else showHomeMessage('That link is your own. Send it to someone else so they can call you.');
  }
}

/**
 * After a resume the server may be another node of a cluster, with its own TURN relay. The call
 * takes the ICE servers the resume brought (fresh credentials in any case), and when the relay
 * changed it restarts ICE at once: an allocation on the node we lost (killed, or draining) will
 * carry no more media, and waiting for ICE to notice costs seconds of frozen video.
 */
function adoptIceServers(iceServers) {
  const call = app.call;
  if (!call || call.closed || !Array.isArray(iceServers)) return;
  const urlsOf = (servers) => JSON.stringify((servers || []).flatMap((s) => [].concat(s.urls || [])).sort());
  const config = call.pc.getConfiguration();
  const moved = urlsOf(config.iceServers) !== urlsOf(iceServers);
  try {
    call.pc.setConfiguration({ ...config, iceServers });
  } catch (err) {
    console.warn('could not update the ICE servers', err);
    return;
  }
  if (moved) call.restartIce();
}

function updateCallButton() {
  $('call-btn').disabled = !(sig && sig.connected && app.state === 'idle');
}

// ---- server messages ---------------------------------------------------------------------------

async function onMessage(m) {
  switch (m.type) {
    case 'video-answer-request':
      return onIncoming(m.callerId, m.offer);
    case 'ringing':
      if (app.state === 'outgoing' && m.clientId === app.peerId) {
        $('outgoing-status').textContent = 'Ringing…';
        ringer.start('ringback');
      }
      return undefined;
    case 'busy':
      if (app.state === 'outgoing' && m.clientId === app.peerId) {
        endCall({ message: `${formatId(m.clientId)} is in another call. Try again later.` });
      }
      return undefined;
    case 'server-reply':
      return onReply(m);
    case 'close-call-server':
      return onPeerClosed(m.clientId, m.reason);
    case 'ice-candidate':
      if (m.clientId !== app.peerId) return undefined;
      if (app.call) return app.call.onRemoteCandidate(m.candidate);
      if (app.incoming) app.incoming.candidates.push(m.candidate);
      return undefined;
    case 'offer':
    case 'answer':
      if (app.call && m.clientId === app.peerId) {
        return app.call.onRemoteDescription(m.type === 'offer' ? m.offer : m.answer);
      }
      return undefined;
    case 'error':
      return onServerError(m);
    default:
      return undefined;
  }
}

function onServerError({ code, message, request, reason }) {
  const peer = app.peerId ? formatId(app.peerId) : '';
  if (app.state === 'outgoing' && (request === 'video-offer-request' || !request)) {
    const words = {
      unknown_client: `Nobody is using ${peer} right now. Check the number, or ask them to open callgate.`,
      cannot_call_self: 'That is your own ID. Enter the ID of the person you want to call.',
      already_in_call: 'You are already in a call.',
      too_many_calls: 'Too many calls in a short time. Wait a minute and try again.',
      server_full: 'The server is busy. Try again in a moment.',
    };
    if (words[code]) {
      endCall({ message: words[code] });
      return;
    }
  }
  if (code === 'unknown_client' && app.state !== 'idle') {
    endCall({ message: `${peer} is no longer reachable.` });
    return;
  }
  if (code === 'session_replaced') return;
  if (code === 'undelivered') {
    // Our message could not reach the peer (it is away and its queue is full, or it did not come
    // back), or, with `node_failed`, the server holding the peer failed and what we sent lately
    // may not have arrived: either way the call's signaling may have a hole in it.
    onSignalingGap(reason === 'node_failed'
      ? `The server of ${peer || 'the other side'} failed; messages to them may not have arrived.`
      : `A message to ${peer || 'the other side'} could not be delivered.`);
    return;
  }
  console.warn('signaling error', code, message, request);
}

/**
 * Call-setup messages were lost in one direction. A connected call renegotiates with an ICE
 * restart (its new offer carries everything the lost messages did); a call still being set up
 * cannot be repaired, so it ends with a word to the user and to the peer.
 */
function onSignalingGap(what) {
  if (app.state === 'incall' && app.call && app.call.established) {
    app.call.restartIce();
    showNotice(`${what} Reconnecting the media…`);
    return;
  }
  if (app.state === 'outgoing' || app.state === 'incoming') {
    endCall({ message: `${what} Please call again.`, tellPeer: true });
    return;
  }
  toast(what, { kind: 'warn' });
}

// ---- placing a call ----------------------------------------------------------------------------

async function startCall(peerId, { audioOnly = $('opt-audio-only').checked } = {}) {
  if (app.state !== 'idle') return;
  if (!sig.connected) {
    showHomeMessage('Not connected to the server yet. Wait a moment and try again.');
    return;
  }
  if (peerId === sig.id) {
    fieldError('That is your own ID. Enter the ID of the person you want to call.');
    return;
  }
  fieldError('');
  showHomeMessage('');
  app.state = 'outgoing';
  app.peerId = peerId;
  updateCallButton();
  $('outgoing-title').textContent = formatId(peerId);
  $('outgoing-status').textContent = 'Starting camera…';
  showView('view-outgoing');
  $('cancel-btn').focus();

  const stream = await getLocalMedia({ video: !audioOnly });
  if (app.state !== 'outgoing' || app.peerId !== peerId) {
    stopStream(stream);
    return;
  }
  if (stream === 'cancel') {
    resetToIdle();
    return;
  }
  app.localStream = stream;
  if (stream && stream.getVideoTracks().length) {
    $('outgoing-preview').srcObject = stream;
    $('outgoing-preview').hidden = false;
    $('outgoing-avatar').hidden = true;
  }
  const call = newCall(peerId, false);
  await call.addLocalMedia(stream);
  const offer = await call.createInitialOffer();
  if (app.call !== call) return;
  sig.send({ type: 'video-offer-request', calleeId: peerId, offer });
  // The server relays candidates in any phase of the call, so they may trickle before the answer.
  call.releaseCandidates();
  $('outgoing-status').textContent = 'Calling…';
  app.noAnswerTimer = setTimeout(() => {
    if (app.state !== 'outgoing') return;
    sig.send({ type: 'cancel', clientId: peerId });
    endCall({ message: `${formatId(peerId)} did not answer.` });
  }, NO_ANSWER_MS);
}

async function onReply({ reply, calleeId, answer }) {
  if (app.state !== 'outgoing' || calleeId !== app.peerId) return;
  clearTimeout(app.noAnswerTimer);
  ringer.stop();
  if (String(reply) !== '1' || !answer) {
    endCall({ message: `${formatId(calleeId)} declined the call.` });
    return;
  }
  await app.call.acceptAnswer(answer);
  enterCall();
}

function cancelOutgoing() {
  if (app.state !== 'outgoing') return;
  if (app.call) sig.send({ type: 'cancel', clientId: app.peerId });
  endCall({ message: 'Call cancelled.' });
}

// ---- receiving a call --------------------------------------------------------------------------

function onIncoming(callerId, offer) {
  if (app.state !== 'idle') {
    // The server answers `busy` for us; this only guards against a race.
    sig.send({ type: 'client-reply', reply: '0', callerId, answer: null });
    return;
  }
  app.state = 'incoming';
  app.peerId = callerId;
  app.incoming = { offer, candidates: [] };
  updateCallButton();
  $('incoming-caller').textContent = formatId(callerId);
  const dialog = $('incoming');
  if (!dialog.open) dialog.showModal();
  $('accept-btn').focus();
  ringer.start('ring');
  document.title = `Incoming call · ${formatId(callerId)}`;
  sig.send({ type: 'ringing', clientId: callerId });
}

function closeIncomingDialog() {
  ringer.stop();
  document.title = 'callgate';
  if ($('incoming').open) $('incoming').close();
}

async function acceptIncoming({ audioOnly = false } = {}) {
  if (app.state !== 'incoming') return;
  // `incoming` keeps collecting the caller's candidates while the camera starts.
  const { incoming } = app;
  const callerId = app.peerId;
  closeIncomingDialog();
  app.state = 'incall';
  const stream = await getLocalMedia({ video: !audioOnly });
  if (app.peerId !== callerId || app.state !== 'incall') {
    stopStream(stream);
    return;
  }
  if (stream === 'cancel') {
    sig.send({ type: 'client-reply', reply: '0', callerId, answer: null });
    resetToIdle();
    return;
  }
  app.localStream = stream;
  const call = newCall(callerId, true);
  call.remoteCandidates.push(...incoming.candidates);
  app.incoming = null;
  enterCall();
  const answer = await call.answerOffer(incoming.offer, stream);
  if (app.call !== call) return;
  sig.send({ type: 'client-reply', reply: '1', callerId, answer });
  call.releaseCandidates();
}

function declineIncoming() {
  if (app.state !== 'incoming') return;
  sig.send({ type: 'client-reply', reply: '0', callerId: app.peerId, answer: null });
  closeIncomingDialog();
  resetToIdle();
}

// ---- in a call ---------------------------------------------------------------------------------

function newCall(peerId, polite) {
  const rtcConfig = { iceServers: sig.iceServers || [] };
  if (FORCE_RELAY) rtcConfig.iceTransportPolicy = 'relay';
  const call = new Call({ peerId, polite, rtcConfig, send: (m) => sig.send(m) });
  app.call = call;
  const remoteStream = new MediaStream();
  $('remote-video').srcObject = remoteStream;

  call.addEventListener('track', ({ detail: { track, role } }) => {
    if (role === 'screen') {
      $('remote-screen').srcObject = new MediaStream([track]);
      return;
    }
    for (const old of remoteStream.getTracks()) {
      if (old.kind === track.kind) remoteStream.removeTrack(old);
    }
    remoteStream.addTrack(track);
    playRemote();
  });
  call.addEventListener('connection', ({ detail: { state } }) => onMediaState(state));
  call.addEventListener('channel-open', () => {
    $('chat-input').disabled = false;
    $('chat-send').disabled = false;
    call.sendState({ mic: !app.muted, cam: !app.cameraOff && hasVideo(), screen: !!app.screenStream });
  });
  call.addEventListener('chat', ({ detail: { text, at } }) => {
    appendChat('them', text, at);
    if ($('chat').hidden) {
      app.unread += 1;
      $('chat-unread').textContent = String(app.unread);
      $('chat-unread').hidden = false;
    }
  });
  call.addEventListener('peer-state', ({ detail: { state } }) => onPeerState(state));
  call.addEventListener('bye', () => {
    if (app.call !== call) return;
    // The peer said goodbye peer to peer. It told the server too, but if that message was lost
    // (its signaling was down), this keeps the server's view of both of us "not in a call".
    sig.send({ type: 'close-call-client', clientId: peerId });
    endCall({ message: `${formatId(peerId)} hung up.` });
  });
  return call;
}

function hasVideo() {
  return !!(app.localStream && app.localStream.getVideoTracks().length);
}

function enterCall() {
  clearTimeout(app.noAnswerTimer);
  ringer.stop();
  app.state = 'incall';
  updateCallButton();
  $('call-peer').textContent = formatId(app.peerId);
  $('call-timer').textContent = '00:00';
  $('chat-log').replaceChildren();
  appendChatNote('Messages go directly to the other person and are not stored.');
  $('local-video').srcObject = app.localStream || null;
  $('local-tile').hidden = false;
  setLocalCameraUi();
  setMicUi();
  setQuality({ level: 'unknown' }, 'Connecting…');
  showView('view-call');
  $('btn-hangup').focus();
  app.startedAt = Date.now();
  clearInterval(app.timer);
  app.timer = setInterval(() => {
    $('call-timer').textContent = formatDuration(Date.now() - app.startedAt);
  }, 1000);
  app.stats = new StatsMonitor(app.call, (s) => {
    app.lastSummary = s;
    renderQuality(s);
  });
}

function onMediaState(state) {
  clearTimeout(app.mediaLostTimer);
  if (state === 'connected') {
    hideNotice();
  } else if (state === 'disconnected' || state === 'failed') {
    showNotice('Connection interrupted. Trying to reconnect…');
    app.mediaLostTimer = setTimeout(() => {
      if (app.state === 'incall' && app.call && app.call.pc.connectionState !== 'connected') {
        sig.send({ type: 'close-call-client', clientId: app.peerId, reason: 'failed' });
        endCall({ message: 'The call was lost: no connection to the other person for 30 seconds.' });
      }
    }, MEDIA_LOST_MS);
  }
}

function onPeerState(state) {
  $('remote-muted').hidden = state.mic !== false;
  const camOff = state.cam === false;
  $('remote-placeholder').hidden = !camOff;
  $('remote-placeholder-text').textContent = 'Camera is off';
  $('remote-video').classList.toggle('is-off', camOff);
  const screen = !!state.screen;
  $('remote-screen').hidden = !screen;
  document.body.classList.toggle('peer-sharing', screen);
}

function playRemote() {
  const video = $('remote-video');
  video.play().catch(() => {
    // Autoplay with sound needs a tap first (e.g. when a shared link dialled by itself).
    video.muted = true;
    video.play().catch(() => {});
    $('unmute-remote').hidden = false;
  });
}

function onPeerClosed(clientId, reason) {
  if (clientId !== app.peerId) return;
  const who = formatId(clientId);
  if (app.state === 'incoming') {
    closeIncomingDialog();
    resetToIdle();
    showHomeMessage(`Missed call from ${who}.`);
    return;
  }
  const words = {
    hangup: app.state === 'outgoing' ? `${who} is unavailable.` : `${who} hung up.`,
    cancelled: 'The call was cancelled.',
    failed: `The connection to ${who} failed.`,
    peer_gone: `${who} lost their connection.`,
  };
  endCall({ message: words[reason] || `${who} hung up.` });
}

function hangUp() {
  if (app.state !== 'incall') return;
  sig.send({ type: 'close-call-client', clientId: app.peerId });
  endCall({ message: 'Call ended.', tellPeer: true });
}

/** Leaves any call state and goes back home, showing `message`. */
function endCall({ message, tellPeer = false }) {
  const duration = app.state === 'incall' && app.startedAt ? Date.now() - app.startedAt : 0;
  if (app.call) app.call.close({ tellPeer });
  closeIncomingDialog();
  resetToIdle();
  if (message) {
    showHomeMessage(duration > 0 ? `${message} (${formatDuration(duration)})` : message);
  }
}

function resetToIdle() {
  clearTimeout(app.noAnswerTimer);
  clearTimeout(app.mediaLostTimer);
  clearInterval(app.timer);
  ringer.stop();
  if (app.stats) app.stats.stop();
  stopStream(app.localStream);
  stopStream(app.screenStream);
  Object.assign(app, {
    state: 'idle', peerId: null, call: null, incoming: null, localStream: null, screenStream: null,
    muted: false, cameraOff: false, startedAt: 0, stats: null, lastSummary: null, unread: 0,
  });
  for (const id of ['remote-video', 'remote-screen', 'local-video', 'outgoing-preview']) $(id).srcObject = null;
  $('outgoing-preview').hidden = true;
  $('outgoing-avatar').hidden = false;
  $('remote-video').muted = false;
  $('unmute-remote').hidden = true;
  $('remote-screen').hidden = true;
  $('remote-placeholder').hidden = true;
  $('remote-muted').hidden = true;
  $('chat').hidden = true;
  $('btn-chat').setAttribute('aria-pressed', 'false');
  $('chat-unread').hidden = true;
  $('chat-input').disabled = true;
  $('chat-send').disabled = true;
  $('btn-screen').setAttribute('aria-pressed', 'false');
  document.body.classList.remove('peer-sharing', 'sharing');
  hideNotice();
  showView('view-home');
  updateCallButton();
}

// ---- local media -------------------------------------------------------------------------------

/**
 * Opens camera and mic; if that fails, explains why and offers audio-only or receive-only.
 * Resolves with a MediaStream, null (receive-only) or 'cancel'.
 */
async function getLocalMedia({ video }) {
  try {
    return await openMedia({ audio: true, video });
  } catch (err) {
    if (!(err instanceof MediaProblem)) throw err;
    // Find out whether only the camera is the problem, so we can say so and offer audio only.
    let problem = err;
    let audioWorks = false;
    if (video) {
      try {
        const audioOnly = await openMedia({ audio: true, video: false });
        audioWorks = true;
        stopStream(audioOnly);
        try {
          stopStream(await openMedia({ audio: false, video: true }));
        } catch (camErr) {
          if (camErr instanceof MediaProblem) problem = camErr;
        }
      } catch {
        audioWorks = false;
      }
    }
    const title = audioWorks ? 'Camera unavailable'
      : video ? 'Camera and microphone unavailable' : 'Microphone unavailable';
    const choice = await askMediaProblem(title, problem.message, audioWorks);
    if (choice === 'audio') return openMedia({ audio: true, video: false }).catch(() => null);
    if (choice === 'receive') return null;
    return 'cancel';
  }
}

function askMediaProblem(title, text, offerAudio) {
  const dialog = $('media-problem');
  $('media-problem-title').textContent = title;
  $('media-problem-text').textContent = text;
  $('media-audio').hidden = !offerAudio;
  return new Promise((resolve) => {
    const done = (value) => {
      for (const b of buttons) b.onclick = null;
      dialog.oncancel = null;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    const buttons = [$('media-cancel'), $('media-audio'), $('media-receive')];
    for (const b of buttons) b.onclick = () => done(b.value);
    dialog.oncancel = (e) => {
      e.preventDefault();
      done('cancel');
    };
    dialog.showModal();
  });
}

function toggleMic() {
  if (app.state !== 'incall') return;
  const track = app.localStream && app.localStream.getAudioTracks()[0];
  if (!track) {
    // Started without a microphone: try to add one now (no renegotiation: the sender exists).
    addDevice('audio');
    return;
  }
  app.muted = !app.muted;
  track.enabled = !app.muted;
  setMicUi();
  app.call.sendState({ mic: !app.muted });
}

function toggleCamera() {
  if (app.state !== 'incall') return;
  const track = app.localStream && app.localStream.getVideoTracks()[0];
  if (!track) {
    addDevice('video');
    return;
  }
  app.cameraOff = !app.cameraOff;
  track.enabled = !app.cameraOff;
  setLocalCameraUi();
  app.call.sendState({ cam: !app.cameraOff });
}

async function addDevice(kind, deviceId) {
  try {
    const track = await openDevice(kind, deviceId);
    if (!app.call) {
      track.stop();
      return;
    }
    if (!app.localStream) app.localStream = new MediaStream();
    const old = kind === 'audio' ? app.localStream.getAudioTracks()[0] : app.localStream.getVideoTracks()[0];
    if (old) {
      track.enabled = old.enabled;
      app.localStream.removeTrack(old);
      old.stop();
    } else if (kind === 'audio') {
      app.muted = false;
    } else {
      app.cameraOff = false;
    }
    app.localStream.addTrack(track);
    await app.call.replaceTrack(kind, track);
    $('local-video').srcObject = app.screenStream || app.localStream;
    setMicUi();
    setLocalCameraUi();
    app.call.sendState({ mic: !app.muted && !!app.localStream.getAudioTracks().length, cam: !app.cameraOff && hasVideo() });
  } catch (err) {
    toast(err.message || String(err), { kind: 'error', ms: 8000 });
  }
}

function setMicUi() {
  const hasMic = !!(app.localStream && app.localStream.getAudioTracks().length);
  const off = app.muted || !hasMic;
  const btn = $('btn-mic');
  btn.setAttribute('aria-pressed', String(off));
  btn.setAttribute('aria-label', !hasMic ? 'Turn microphone on' : off ? 'Unmute microphone' : 'Mute microphone');
  btn.title = `${btn.getAttribute('aria-label')} (M)`;
  btn.classList.toggle('is-off', off);
}

function setLocalCameraUi() {
  const off = app.cameraOff || !hasVideo();
  const btn = $('btn-cam');
  btn.setAttribute('aria-pressed', String(off));
  btn.setAttribute('aria-label', off ? 'Turn camera on' : 'Turn camera off');
  btn.title = `${btn.getAttribute('aria-label')} (V)`;
  btn.classList.toggle('is-off', off);
  $('local-off').hidden = !off || !!app.screenStream;
  $('local-video').classList.toggle('is-off', off && !app.screenStream);
}

async function toggleScreen() {
  if (app.state !== 'incall') return;
  if (app.screenStream) {
    stopScreenShare();
    return;
  }
  try {
    const stream = await openScreen();
    if (!stream || !app.call) {
      stopStream(stream);
      return;
    }
    const track = stream.getVideoTracks()[0];
    app.screenStream = stream;
    track.addEventListener('ended', () => stopScreenShare());
    await app.call.startScreen(track, stream);
    $('local-video').srcObject = stream;
    document.body.classList.add('sharing');
    $('btn-screen').setAttribute('aria-pressed', 'true');
    $('btn-screen').setAttribute('aria-label', 'Stop sharing your screen');
    setLocalCameraUi();
    toast('You are sharing your screen.');
  } catch (err) {
    toast(err.message || String(err), { kind: 'error', ms: 8000 });
  }
}

function stopScreenShare() {
  if (!app.screenStream) return;
  stopStream(app.screenStream);
  app.screenStream = null;
  if (app.call) app.call.stopScreen();
  $('local-video').srcObject = app.localStream;
  document.body.classList.remove('sharing');
  $('btn-screen').setAttribute('aria-pressed', 'false');
  $('btn-screen').setAttribute('aria-label', 'Share your screen');
  setLocalCameraUi();
}

async function openDevicePicker() {
  const dialog = $('devices');
  $('devices-error').textContent = '';
  try {
    const { cameras, microphones } = await listDevices();
    fillSelect($('camera-select'), cameras, currentDeviceId('video'), 'No camera found');
    fillSelect($('mic-select'), microphones, currentDeviceId('audio'), 'No microphone found');
  } catch (err) {
    $('devices-error').textContent = `Could not list devices: ${err.message}`;
  }
  dialog.showModal();
}

function currentDeviceId(kind) {
  const track = app.localStream && (kind === 'audio' ? app.localStream.getAudioTracks()[0] : app.localStream.getVideoTracks()[0]);
  return track ? track.getSettings().deviceId : null;
}

function fillSelect(select, devices, current, emptyLabel) {
  select.replaceChildren();
  for (const d of devices) {
    const option = new Option(d.label, d.id, false, d.id === current);
    select.append(option);
  }
  if (!devices.length) select.append(new Option(emptyLabel, '', true, true));
  select.disabled = !devices.length;
}

// ---- chat, quality, notices --------------------------------------------------------------------

function sendChat(event) {
  event.preventDefault();
  const input = $('chat-input');
  const text = input.value.trim();
  if (!text || !app.call) return;
  if (app.call.sendChat(text)) {
    appendChat('me', text);
    input.value = '';
  } else {
    toast('The message could not be sent: the chat is not connected yet.', { kind: 'warn' });
  }
}

function toggleChat(open = $('chat').hidden) {
  $('chat').hidden = !open;
  $('btn-chat').setAttribute('aria-pressed', String(open));
  $('btn-chat').setAttribute('aria-label', open ? 'Close chat' : 'Open chat');
  document.body.classList.toggle('chat-open', open);
  if (open) {
    app.unread = 0;
    $('chat-unread').hidden = true;
    $('chat-input').focus();
  } else {
    $('btn-chat').focus();
  }
}

function setQuality({ level }, label) {
  $('quality').dataset.level = level;
  $('quality-label').textContent = label;
}

function renderQuality(s) {
  const route = s.route === 'relayed' ? `Relayed${s.protocol ? ` (${s.protocol.toUpperCase()})` : ''}` : s.route === 'direct' ? 'Direct' : '—';
  const words = { good: 'Good', fair: 'Fair', poor: 'Poor', unknown: 'Connecting…' };
  const rtt = s.rttMs != null ? `${s.rttMs} ms` : '—';
  const relayed = s.route === 'relayed' ? ' · Relayed' : '';
  setQuality(s, s.level === 'unknown' ? words.unknown : `${words[s.level]} · ${rtt}${relayed}`);
  $('quality').setAttribute('aria-label', `Connection ${words[s.level]}. ${route}, round trip ${rtt}.`);
  $('q-route').textContent = route;
  $('q-rtt').textContent = rtt;
  $('q-loss').textContent = s.lossPct != null ? `${s.lossPct.toFixed(1)} %` : '—';
  $('q-in').textContent = formatKbps(s.inKbps);
  $('q-out').textContent = formatKbps(s.outKbps);
}

function showNotice(text) {
  $('call-notice').textContent = text;
  $('call-notice').hidden = false;
}

function hideNotice() {
  $('call-notice').hidden = true;
}

function showHomeMessage(text) {
  $('home-message').textContent = text;
}

function fieldError(text) {
  $('call-error').textContent = text;
  $('callee-id').setAttribute('aria-invalid', text ? 'true' : 'false');
}

async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    toast(`${what} copied.`);
  } catch {
    toast(`Could not copy. Select the ${what.toLowerCase()} and copy it by hand.`, { kind: 'warn' });
  }
}

// ---- wiring ------------------------------------------------------------------------------------

function bindUi() {
  $('call-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const id = parseId($('callee-id').value);
    if (id == null) {
      fieldError('An ID is a number with 9 digits, like 123 456 789.');
      $('callee-id').focus();
      return;
    }
    startCall(id);
  });
  $('callee-id').addEventListener('input', () => fieldError(''));
  $('copy-id').addEventListener('click', () => copy(String(sig.id), 'ID'));
  $('copy-link').addEventListener('click', () => copy($('my-link').value, 'Link'));
  $('my-link').addEventListener('focus', (e) => e.target.select());
  $('cancel-btn').addEventListener('click', cancelOutgoing);

  $('accept-btn').addEventListener('click', () => acceptIncoming());
  $('accept-audio-btn').addEventListener('click', () => acceptIncoming({ audioOnly: true }));
  $('decline-btn').addEventListener('click', declineIncoming);
  // Escape on the incoming dialog declines, instead of hiding a ringing call.
  $('incoming').addEventListener('cancel', (e) => {
    e.preventDefault();
    declineIncoming();
  });

  $('btn-mic').addEventListener('click', toggleMic);
  $('btn-cam').addEventListener('click', toggleCamera);
  $('btn-screen').addEventListener('click', toggleScreen);
  // Phones cannot share their screen from a browser: no button rather than one that fails.
  $('btn-screen').hidden = typeof navigator.mediaDevices.getDisplayMedia !== 'function';
  $('btn-devices').addEventListener('click', openDevicePicker);
  $('btn-chat').addEventListener('click', () => toggleChat());
  $('chat-close').addEventListener('click', () => toggleChat(false));
  $('btn-hangup').addEventListener('click', hangUp);
  $('chat-form').addEventListener('submit', sendChat);
  $('unmute-remote').addEventListener('click', () => {
    $('remote-video').muted = false;
    $('remote-video').play().catch(() => {});
    $('unmute-remote').hidden = true;
  });
  $('quality').addEventListener('click', () => {
    const open = $('quality-details').hidden;
    $('quality-details').hidden = !open;
    $('quality').setAttribute('aria-expanded', String(open));
  });
  $('camera-select').addEventListener('change', (e) => addDevice('video', e.target.value));
  $('mic-select').addEventListener('change', (e) => addDevice('audio', e.target.value));

  // M and V toggle mic and camera during a call, unless typing.
  document.addEventListener('keydown', (e) => {
    if (app.state !== 'incall' || e.ctrlKey || e.metaKey || e.altKey) return;
    const tag = e.target && e.target.tagName;
    if (tag === 'INPUT' || tag === 'TEXTAREA' || tag === 'SELECT') return;
    if (e.key === 'm' || e.key === 'M') toggleMic();
    else if (e.key === 'v' || e.key === 'V') toggleCamera();
  });
}

main();
