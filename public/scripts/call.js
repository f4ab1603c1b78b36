// One call: the RTCPeerConnection, its negotiation, trickle ICE, the chat data channel and ICE
// restarts. It never touches the DOM and never sees the WebSocket: it asks `send` to deliver
// signaling messages and reports what happens through events.
//
// Negotiation uses the "perfect negotiation" pattern: either side may offer at any time (screen
// share, ICE restart); when two offers cross, the impolite peer (the caller) ignores the incoming
// one and the polite peer (the callee) rolls its own back and answers. The first offer/answer goes
// through the seed's call-setup messages (`video-offer-request` / `client-reply`); every later one
// through the in-call `offer` / `answer` messages.

/** How long ICE may stay `disconnected` before we restart it (it often recovers by itself). */
const DISCONNECTED_GRACE_MS = 4000;

/**
 * Events: `track` ({track, streams, transceiver, role}) · `connection` ({state}) ·
 * `chat` ({text, at}) · `peer-state` ({state}) — the peer's mic/camera/screen flags ·
 * `channel-open` · `bye` · `failed`.
 */
export class Call extends EventTarget {
  /**
   * @param {object} options
   * @param {number} options.peerId the other party's ID
   * @param {boolean} options.polite true for the callee (see above)
   * @param {RTCConfiguration} options.rtcConfig ICE servers and transport policy
   * @param {(message: object) => void} options.send delivers a signaling message
   */
  constructor({ peerId, polite, rtcConfig, send }) {
    super();
    this.peerId = peerId;
    this.polite = polite;
    this.sendSignal = send;
    this.pc = new RTCPeerConnection(rtcConfig);
    this.makingOffer = false;
    this.ignoreOffer = false;
    /** Offers that crossed ours (glare), resolved by the polite/impolite roles. */
    this.collisions = 0;
    /** Set once the first offer/answer is done; later negotiations use in-call offer/answer. */
    this.established = false;
    /** Remote candidates that arrived before the remote description. */
    this.remoteCandidates = [];
    /** Our candidates, held until the peer has our description (see `releaseCandidates`). */
    this.localCandidates = [];
    this.candidatesReleased = false;
    this.closed = false;
    this.disconnectedTimer = 0;
    this.cameraSender = null;
    this.micSender = null;
    this.screenTransceiver = null;

    // Created on both sides with the same id, so neither waits for `datachannel` (and the first
    // offer already carries the SCTP section).
    this.channel = this.pc.createDataChannel('chat', { negotiated: true, id: 0, ordered: true });
    this.channel.onopen = () => this.emit('channel-open');
    this.channel.onmessage = (ev) => this.onChannelMessage(ev.data);

    this.pc.onicecandidate = ({ candidate }) => {
      // `null` marks the end of this generation's candidates; the peer's `addIceCandidate()`
      // understands it, and the protocol relays it verbatim.
      const message = { type: 'ice-candidate', clientId: this.peerId, candidate: candidate ? candidate.toJSON() : null };
      if (this.candidatesReleased) this.sendSignal(message);
      else this.localCandidates.push(message);
    };
    this.pc.ontrack = (ev) => this.emit('track', {
      track: ev.track,
      streams: ev.streams,
      transceiver: ev.transceiver,
      role: this.roleOf(ev.transceiver),
    });
    this.pc.onconnectionstatechange = () => this.onConnectionState();
    this.pc.oniceconnectionstatechange = () => this.onIceState();
    this.pc.onnegotiationneeded = () => this.negotiate();
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** Adds our microphone and camera (either may be missing: audio-only or receive-only). */
  async addLocalMedia(stream) {
    const audio = stream ? stream.getAudioTracks()[0] : null;
    const video = stream ? stream.getVideoTracks()[0] : null;
    // Always one audio and one video transceiver, so a later device switch or "camera on" is a
    // replaceTrack and never a renegotiation, and the callee can send even if the caller does not.
    const existing = this.pc.getTransceivers();
    const audioT = existing.find((t) => t.receiver.track.kind === 'audio' && !t.sender.track);
    const videoT = existing.find((t) => t.receiver.track.kind === 'video' && !t.sender.track);
    this.micSender = await this.attach(audioT, 'audio', audio, stream);
    this.cameraSender = await this.attach(videoT, 'video', video, stream);
  }

  async attach(transceiver, kind, track, stream) {
    if (transceiver) {
      transceiver.direction = 'sendrecv';
      if (track) {
        await transceiver.sender.replaceTrack(track);
        if (stream) transceiver.sender.setStreams(stream);
      }
      return transceiver.sender;
    }
    const t = this.pc.addTransceiver(track || kind, {
      direction: 'sendrecv',
      streams: stream ? [stream] : [],
    });
    return t.sender;
  }

  /** Which picture a remote video track is: the first video section is the camera. */
  roleOf(transceiver) {
    if (transceiver.receiver.track.kind !== 'video') return 'audio';
    const firstVideo = this.pc.getTransceivers().find((t) => t.receiver.track.kind === 'video');
    return transceiver === firstVideo ? 'camera' : 'screen';
  }

  // ---- first negotiation ---------------------------------------------------------------------

  /** Caller: the first offer, sent with `video-offer-request`. */
  async createInitialOffer() {
    this.makingOffer = true;
    try {
      await this.pc.setLocalDescription();
      return this.pc.localDescription.toJSON();
    } finally {
      this.makingOffer = false;
    }
  }

  /** Caller: the callee accepted with this answer. */
  async acceptAnswer(answer) {
    await this.pc.setRemoteDescription(answer);
    await this.flushRemoteCandidates();
    this.established = true;
  }

  /** Callee: take the caller's offer and produce the answer for `client-reply`. */
  async answerOffer(offer, stream) {
    await this.pc.setRemoteDescription(offer);
    // Reuses the transceivers the offer created, so the answer says sendrecv.
    await this.addLocalMedia(stream);
    await this.flushRemoteCandidates();
    await this.pc.setLocalDescription();
    this.established = true;
    return this.pc.localDescription.toJSON();
  }

  /**
   * Starts sending our own candidates: the caller right after its offer went out, the callee once
   * its answer is sent (a candidate must never overtake the description it belongs to).
   */
  releaseCandidates() {
    if (this.candidatesReleased) return;
    this.candidatesReleased = true;
    const held = this.localCandidates;
    this.localCandidates = [];
    for (const m of held) this.sendSignal(m);
  }

  // ---- perfect negotiation -------------------------------------------------------------------

  async negotiate() {
    // The first offer goes out with the call request; only later changes renegotiate here.
    if (!this.established || this.closed) return;
    try {
      this.makingOffer = true;
      await this.pc.setLocalDescription();
      this.sendSignal({ type: 'offer', clientId: this.peerId, offer: this.pc.localDescription.toJSON() });
    } catch (err) {
      console.warn('renegotiation failed', err);
    } finally {
      this.makingOffer = false;
    }
  }

  /** In-call `offer` or `answer` from the peer. */
  async onRemoteDescription(description) {
    if (this.closed) return;
    const offerCollision = description.type === 'offer'
      && (this.makingOffer || this.pc.signalingState !== 'stable');
    this.ignoreOffer = !this.polite && offerCollision;
    if (offerCollision) this.collisions += 1;
    if (this.ignoreOffer) return;
    // On a collision the polite side's setRemoteDescription rolls its own offer back implicitly.
    await this.pc.setRemoteDescription(description);
    await this.flushRemoteCandidates();
    if (description.type === 'offer') {
      await this.pc.setLocalDescription();
      this.sendSignal({ type: 'answer', clientId: this.peerId, answer: this.pc.localDescription.toJSON() });
    }
  }

  async onRemoteCandidate(candidate) {
    if (this.closed) return;
    if (!this.pc.remoteDescription) {
      this.remoteCandidates.push(candidate);
      return;
    }
    try {
      await this.pc.addIceCandidate(candidate ?? undefined);
    } catch (err) {
      // Candidates for an offer we ignored (perfect negotiation) are expected to fail.
      if (!this.ignoreOffer) console.warn('addIceCandidate failed', err);
    }
  }

  async flushRemoteCandidates() {
    const held = this.remoteCandidates;
    this.remoteCandidates = [];
    for (const c of held) {
      try {
        await this.pc.addIceCandidate(c ?? undefined);
      } catch (err) {
        console.warn('addIceCandidate failed', err);
      }
    }
  }

  // ---- keeping media alive -------------------------------------------------------------------

  onIceState() {
    const state = this.pc.iceConnectionState;
    clearTimeout(this.disconnectedTimer);
    if (state === 'failed') {
      this.restartIce();
    } else if (state === 'disconnected') {
      this.disconnectedTimer = setTimeout(() => {
        if (this.pc.iceConnectionState === 'disconnected') this.restartIce();
      }, DISCONNECTED_GRACE_MS);
    }
  }

  restartIce() {
    if (this.closed || !this.established) return;
    // Fires `negotiationneeded`; the offer carries new ICE credentials.
    this.pc.restartIce();
  }

  onConnectionState() {
    this.emit('connection', { state: this.pc.connectionState });
  }

  // ---- local media changes -------------------------------------------------------------------

  /** Swaps the camera or microphone track in place: no renegotiation. */
  async replaceTrack(kind, track) {
    const sender = kind === 'audio' ? this.micSender : this.cameraSender;
    if (sender) await sender.replaceTrack(track);
  }

  /**
   * Screen share goes out as a second video section (so the peer keeps seeing our camera too);
   * adding it, and stopping it, renegotiate through perfect negotiation.
   */
  async startScreen(track, stream) {
    if (this.screenTransceiver) {
      await this.screenTransceiver.sender.replaceTrack(track);
      this.screenTransceiver.sender.setStreams(stream);
      this.screenTransceiver.direction = 'sendonly';
    } else {
      this.screenTransceiver = this.pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
    }
    this.sendState({ screen: true });
  }

  async stopScreen() {
    if (!this.screenTransceiver) return;
    await this.screenTransceiver.sender.replaceTrack(null);
    this.screenTransceiver.direction = 'inactive';
    this.sendState({ screen: false });
  }

  // ---- data channel --------------------------------------------------------------------------

  sendChat(text) {
    return this.sendChannel({ kind: 'chat', text, at: Date.now() });
  }

  /** Tells the peer about our mic/camera/screen so it can show "muted" and the like. */
  sendState(state) {
    this.localState = { ...this.localState, ...state };
    return this.sendChannel({ kind: 'state', ...this.localState });
  }

  sendChannel(message) {
    if (this.channel.readyState !== 'open') return false;
    this.channel.send(JSON.stringify(message));
    return true;
  }

  onChannelMessage(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (message.kind === 'chat' && typeof message.text === 'string') {
      this.emit('chat', { text: message.text.slice(0, 2000), at: Date.now() });
    } else if (message.kind === 'state') {
      this.emit('peer-state', { state: message });
    } else if (message.kind === 'bye') {
      // The peer hung up; also said over signaling, but this arrives even if signaling is down.
      this.emit('bye');
    }
  }

  // ---- stats ---------------------------------------------------------------------------------

  getStats() {
    return this.pc.getStats();
  }

  // ---- end -----------------------------------------------------------------------------------

  close({ tellPeer = false } = {}) {
    if (this.closed) return;
    if (tellPeer) this.sendChannel({ kind: 'bye' });
    this.closed = true;
    clearTimeout(this.disconnectedTimer);
    this.pc.onicecandidate = null;
    this.pc.ontrack = null;
    this.pc.onnegotiationneeded = null;
    this.pc.onconnectionstatechange = null;
    this.pc.oniceconnectionstatechange = null;
    // Give the "bye" a moment to leave before the transport goes.
    const pc = this.pc;
    const channel = this.channel;
    if (tellPeer && channel.readyState === 'open' && channel.bufferedAmount > 0) {
      const done = () => pc.close();
      channel.bufferedAmountLowThreshold = 0;
      channel.onbufferedamountlow = done;
      setTimeout(done, 1000);
    } else {
      pc.close();
    }
  }
}
