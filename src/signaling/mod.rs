//! WebSocket signaling: the seed's message format, made unspoofable, long-lived and resumable.
