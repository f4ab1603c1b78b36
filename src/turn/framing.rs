//! TURN over TCP and TLS framing (RFC 8656 §3.1): where one STUN or ChannelData message ends on a
//! byte stream, and the padding ChannelData takes there.
//!
//! Pure functions of bytes, shared by the stream front (reading) and every path that writes to a
//! stream client (the engine's answers, oversized ChannelData). It must never do I/O.

/// Why a byte stream cannot be read as TURN frames; the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The first two bits are neither 00 (STUN) nor 01 (ChannelData): framing is lost.
    #[error("the TCP stream is not STUN or ChannelData framed (first byte {0:#04x})")]
    NotTurn(u8),
}

/// Given a frame's first four bytes, returns `(frame_len, wire_len)`: the bytes that make up the
/// message and the bytes it occupies on the stream (ChannelData is padded to a multiple of 4 on
/// streams; STUN lengths are already multiples of 4).
pub fn frame_length(header: [u8; 4]) -> Result<(usize, usize), FramingError> {
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    match header[0] >> 6 {
        0 => Ok((20 + len, 20 + len)),
        1 => Ok((4 + len, (4 + len).next_multiple_of(4))),
        _ => Err(FramingError::NotTurn(header[0])),
    }
}

/// Pads an outgoing ChannelData frame to 4 bytes; STUN is returned as is.
pub fn frame_for_stream(packet: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(packet.len() + 3);
    v.extend_from_slice(packet);
    if packet.first().is_some_and(|b| b >> 6 == 1) {
        v.resize(packet.len().next_multiple_of(4), 0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_stun_and_padded_channel_data() {
        assert_eq!(frame_length([0x00, 0x03, 0x00, 0x08]), Ok((28, 28)));
        assert_eq!(frame_length([0x00, 0x01, 0x00, 0x00]), Ok((20, 20)));
        assert_eq!(frame_length([0x40, 0x00, 0x00, 0x05]), Ok((9, 12)));
        assert_eq!(frame_length([0x7f, 0xff, 0x00, 0x04]), Ok((8, 8)));
        assert_eq!(frame_length([0x40, 0x00, 0xff, 0xff]), Ok((65539, 65540)));
        assert_eq!(
            frame_length([0x80, 0, 0, 0]),
            Err(FramingError::NotTurn(0x80))
        );
        assert_eq!(
            frame_length([0xc0, 0, 0, 0]),
            Err(FramingError::NotTurn(0xc0))
        );
        // Other protocols may look framed ("GET " reads as channel 0x4745); the gate then drops
        // what is not a bound channel or valid STUN.
        assert!(frame_length(*b"GET ").is_ok());
    }

    #[test]
    fn pads_outgoing_channel_data_only() {
        assert_eq!(
            frame_for_stream(&[0x40, 0, 0, 1, 9]),
            [0x40, 0, 0, 1, 9, 0, 0, 0]
        );
        assert_eq!(frame_for_stream(&[0x40, 0, 0, 0]), [0x40, 0, 0, 0]);
        let stun = [0u8; 20];
        assert_eq!(frame_for_stream(&stun), stun);
    }
}
