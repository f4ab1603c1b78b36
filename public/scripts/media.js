// Camera, microphone and screen: asking for them, explaining in plain words why we could not,
// and listing devices for the picker. No DOM, no calls.

/** Why a page cannot make calls at all, or null if it can. */
export function unsupportedReason() {
  if (!window.isSecureContext) {
    return 'This page was opened over an insecure connection, so the browser will not share a camera or microphone. Open it with https:// instead.';
  }
  if (typeof RTCPeerConnection !== 'function') {
    return 'This browser does not support video calls (WebRTC). Try a recent Chrome, Edge, Firefox or Safari.';
  }
  if (!navigator.mediaDevices || typeof navigator.mediaDevices.getUserMedia !== 'function') {
    return 'This browser cannot use a camera or microphone here. Try a recent Chrome, Edge, Firefox or Safari.';
  }
  return null;
}

/** A getUserMedia failure, turned into words a person can act on. */
export class MediaProblem extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind; // 'denied' | 'missing' | 'busy' | 'other'
  }
}

/** Turns a getUserMedia error into a MediaProblem about `wanted` ({audio, video}). */
function explain(err, wanted) {
  const what = wanted.video && wanted.audio ? 'camera and microphone'
    : wanted.video ? 'camera' : 'microphone';
  switch (err && err.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return new MediaProblem('denied', `You blocked access to your ${what}. To allow it, use the camera icon in the address bar, then try again.`);
    case 'NotFoundError':
    case 'OverconstrainedError':
      return new MediaProblem('missing', `No ${what} was found. Plug one in, or continue without it.`);
    case 'NotReadableError':
    case 'AbortError':
      return new MediaProblem('busy', `Your ${what} is in use by another app, or could not be started. Close other apps that use it and try again.`);
    default:
      return new MediaProblem('other', `Your ${what} could not be started${err && err.message ? ` (${err.message})` : ''}.`);
  }
}

/**
 * Opens the camera and/or microphone. `video` may be false (audio-only call). Resolves with a
 * MediaStream or rejects with a MediaProblem.
 */
export async function openMedia({ audio = true, video = true, audioDeviceId, videoDeviceId } = {}) {
  const constraints = {
    audio: audio ? { deviceId: audioDeviceId ? { exact: audioDeviceId } : undefined, echoCancellation: true, noiseSuppression: true } : false,
    video: video ? { deviceId: videoDeviceId ? { exact: videoDeviceId } : undefined, width: { ideal: 1280 }, height: { ideal: 720 }, facingMode: videoDeviceId ? undefined : 'user' } : false,
  };
  try {
    return await navigator.mediaDevices.getUserMedia(constraints);
  } catch (err) {
    throw explain(err, { audio, video });
  }
}

/** One new track of `kind` from a chosen device, for replaceTrack. */
export async function openDevice(kind, deviceId) {
  const stream = await openMedia({ audio: kind === 'audio', video: kind === 'video', audioDeviceId: deviceId, videoDeviceId: deviceId });
  return kind === 'audio' ? stream.getAudioTracks()[0] : stream.getVideoTracks()[0];
}

/** Cameras and microphones, labelled (labels are empty until permission is granted). */
export async function listDevices() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const label = (d, i, noun) => d.label || `${noun} ${i + 1}`;
  const cams = devices.filter((d) => d.kind === 'videoinput');
  const mics = devices.filter((d) => d.kind === 'audioinput');
  return {
    cameras: cams.map((d, i) => ({ id: d.deviceId, label: label(d, i, 'Camera') })),
    microphones: mics.map((d, i) => ({ id: d.deviceId, label: label(d, i, 'Microphone') })),
  };
}

/** Asks for a screen, window or tab. Resolves null if the person cancelled the picker. */
export async function openScreen() {
  if (!navigator.mediaDevices.getDisplayMedia) {
    throw new MediaProblem('other', 'This browser cannot share the screen.');
  }
  try {
    return await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio: false });
  } catch (err) {
    if (err && err.name === 'NotAllowedError') return null;
    throw new MediaProblem('other', `Screen sharing could not start${err && err.message ? ` (${err.message})` : ''}.`);
  }
}

export function stopStream(stream) {
  if (stream) for (const t of stream.getTracks()) t.stop();
}
