//! Bodies shared by the fake backend and the test client: a body sent as a sequence of
//! frames without a known length (so HTTP/1.1 frames it with chunked encoding), and
//! deterministic test payloads.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A body that yields its chunks one frame at a time and announces no length, so it is
/// streamed (chunked on HTTP/1.1) rather than sent with `Content-Length`.
#[derive(Debug, Default)]
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
}

impl ChunkedBody {
    pub fn new(chunks: impl IntoIterator<Item = Bytes>) -> ChunkedBody {
        ChunkedBody {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
        }
    }

    /// `data` cut into frames of at most `chunk` bytes (cheap: the frames share `data`).
    pub fn split(data: &Bytes, chunk: usize) -> ChunkedBody {
        assert!(chunk > 0, "chunk size must be positive");
        let mut chunks = VecDeque::new();
        let mut at = 0;
        while at < data.len() {
            let end = (at + chunk).min(data.len());
            chunks.push_back(data.slice(at..end));
            at = end;
        }
        ChunkedBody { chunks }
    }
}

impl Body for ChunkedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        // Never claim the end up front: that would let hyper send `Content-Length: 0`.
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// `len` bytes of a deterministic pseudo-random sequence (xorshift64*), so that a
/// truncated, reordered or duplicated chunk changes the content, not only the length.
pub fn payload(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Lower-case hex SHA-256, for comparing large bodies in assertion messages.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
