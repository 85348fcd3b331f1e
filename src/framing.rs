//! HTTP/1 framing ahead of hyper: every request head is checked here before hyper
//! sees a byte of it, and the body that follows is skipped by the same rules hyper
//! reads it by, so that the next head is found where hyper will look for it.
//!
//! Why a second look: hyper refuses a bad head with an empty-bodied 400/414/431 of its
//! own, and it accepts `Content-Length` together with `Transfer-Encoding` (it drops the
//! length, reads chunked and closes after). Here such a head is refused with DESIGN.md's
//! JSON instead: [`crate::connection::GuardedIo`] hands hyper a stand-in request in its
//! place, which the handler answers with the refusal, and then closes.
//!
//! The rules are hyper's (1.x, `proto/h1/role.rs` and `decode.rs`) plus ours: heads
//! hyper would refuse are refused here first; heads it accepts are framed exactly as
//! hyper frames them. Where this scanner cannot follow the stream (a malformed chunk,
//! which hyper refuses too, ending the connection) it stops looking and leaves the rest
//! to hyper, so a disagreement can only cost a JSON body, never let a head through
//! unframed.

use std::mem::MaybeUninit;

use crate::errors::Refusal;
use crate::path::hex_value;

/// What the head checks need of `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
}

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Header slots on the stack; a `max_headers` above this takes a heap array per head.
const STACK_HEADERS: usize = 128;

/// The longest request line beyond the target itself (method, blanks, version, CRLF)
/// that is still waited for before the target is judged too long.
const REQUEST_LINE_SLACK: usize = 64;

/// The head hyper is handed in place of a refused one: a request the handler
/// recognises by its position on the connection (never by its bytes, which a client
/// could send too), answered with the refusal, after which hyper closes.
pub const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n";

/// The outcome of [`Framer::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The first `n` bytes may go to hyper. Bytes from `n` on are the start of a head
    /// that is not complete yet: hand them to `scan` again, with more behind them.
    Clear(usize),
    /// The head that starts at `at` is refused; the bytes before it may go to hyper.
    Refuse { at: usize, refusal: Refusal },
}

/// Where the scanner is in the byte stream of one connection.
#[derive(Debug)]
enum State {
    /// At the start of a head; `searched` bytes of it were already looked at for its end
    /// without finding one.
    Head { searched: usize },
    /// Inside a body of known length: this many bytes are left.
    Length(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not following the stream any more (HTTP/2, or a body hyper will refuse).
    Passthrough,
}

/// hyper's chunked decoder states (`ChunkedState`), data skipped in bulk.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk's size line: a trailer line or the final CRLF.
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

/// Follows the HTTP/1 requests of one connection through its bytes.
#[derive(Debug)]
pub struct Framer {
    limits: Limits,
    state: State,
    /// Heads cleared so far: the index the next head will have.
    heads: u64,
}

impl Framer {
    pub fn new(limits: Limits) -> Framer {
        Framer {
            limits,
            state: State::Head { searched: 0 },
            heads: 0,
        }
    }

    /// Heads cleared so far; a head refused now is the request of this index.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// True while the next bytes are (part of) a head, not a body.
    pub fn in_head(&self) -> bool {
        matches!(self.state, State::Head { .. })
    }

    /// True once the scanner no longer follows the stream (everything is clear).
    pub fn passthrough(&self) -> bool {
        matches!(self.state, State::Passthrough)
    }

    /// Scans `buf`, which continues the stream where the last call's cleared bytes
    /// ended (so when a head was incomplete, `buf` starts with that head again).
    pub fn scan(&mut self, buf: &[u8]) -> Scan {
        let mut at = 0;
        while at < buf.len() {
            let rest = &buf[at..];
            match &mut self.state {
                State::Passthrough => return Scan::Clear(buf.len()),
                State::Length(left) => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(rest.len());
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::Head { searched: 0 };
                    }
                    at += n;
                }
                State::Chunked(chunk) => match step_chunked(chunk, rest) {
                    Some((n, done)) => {
                        at += n;
                        if done {
                            self.state = State::Head { searched: 0 };
                        }
                    }
                    None => {
                        self.state = State::Passthrough;
                        return Scan::Clear(buf.len());
                    }
                },
                State::Head { searched } => {
                    if self.heads == 0
                        && at == 0
                        && H2_PREFACE.starts_with(&rest[..rest.len().min(24)])
                    {
                        if rest.len() < H2_PREFACE.len() {
                            return Scan::Clear(at);
                        }
                        self.state = State::Passthrough;
                        return Scan::Clear(buf.len());
                    }
                    // An incomplete head is parsed again only once its end may have
                    // come (an empty line), so a drip costs one search per read, not
                    // one parse.
                    let from = (*searched).saturating_sub(3).min(rest.len());
                    if *searched > 0 && !ends_head(&rest[from..]) {
                        return self.incomplete(at, rest);
                    }
                    match check_head(rest, &self.limits) {
                        Head::Partial => return self.incomplete(at, rest),
                        Head::Refused(refusal) => return Scan::Refuse { at, refusal },
                        Head::Complete { len, body } => {
                            self.heads += 1;
                            self.state = match body {
                                Body::None => State::Head { searched: 0 },
                                Body::Length(n) => State::Length(n),
                                Body::Chunked => State::Chunked(Chunk::Start),
                            };
                            at += len;
                        }
                    }
                }
            }
        }
        Scan::Clear(at)
    }

    /// The head starting at `at` (all of `rest`) is not complete: wait for more, or
    /// refuse it when it already passed a limit.
    fn incomplete(&mut self, at: usize, rest: &[u8]) -> Scan {
        let line = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        if line > self.limits.max_uri_bytes + REQUEST_LINE_SLACK {
            return Scan::Refuse {
                at,
                refusal: Refusal::UriTooLong,
            };
        }
        if rest.len() > self.limits.max_header_bytes {
            return Scan::Refuse {
                at,
                refusal: Refusal::HeadersTooLarge,
            };
        }
        self.state = State::Head {
            searched: rest.len(),
        };
        Scan::Clear(at)
    }
}

/// Whether `b` holds an empty line: `\n\n` or `\n\r\n`.
fn ends_head(b: &[u8]) -> bool {
    b.windows(2).any(|w| w == b"\n\n") || b.windows(3).any(|w| w == b"\n\r\n")
}

/// How a head's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, PartialEq, Eq)]
enum Head {
    Partial,
    Complete { len: usize, body: Body },
    Refused(Refusal),
}

/// Parses the head at the start of `buf` with httparse (hyper's parser) and applies
/// hyper's framing rules and ours.
fn check_head(buf: &[u8], limits: &Limits) -> Head {
    if limits.max_headers <= STACK_HEADERS {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        parse_head(buf, &mut headers[..limits.max_headers], limits)
    } else {
        let mut headers = vec![MaybeUninit::<httparse::Header<'_>>::uninit(); limits.max_headers];
        parse_head(buf, &mut headers, limits)
    }
}

fn parse_head<'b>(
    buf: &'b [u8],
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
    limits: &Limits,
) -> Head {
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(httparse::Error::TooManyHeaders) => return Head::Refused(Refusal::HeadersTooLarge),
        Err(_) => return Head::Refused(Refusal::BadRequest),
    };
    if len > limits.max_header_bytes {
        return Head::Refused(Refusal::HeadersTooLarge);
    }
    let target = req.path.unwrap_or("");
    if target.len() > limits.max_uri_bytes {
        return Head::Refused(Refusal::UriTooLong);
    }
    if !target_parses(target.as_bytes()) {
        return Head::Refused(Refusal::BadRequest);
    }
    match framing(req.version == Some(1), req.headers) {
        Ok(body) => Head::Complete { len, body },
        Err(refusal) => Head::Refused(refusal),
    }
}

/// hyper's body framing of a request (`Server::parse`), made stricter where it accepts
/// an ambiguous head: `Transfer-Encoding` must be exactly one `chunked` (DESIGN.md
/// section 2), never with `Content-Length`, never on HTTP/1.0; `Content-Length` is
/// digits, every copy the same.
fn framing(http_11: bool, headers: &[httparse::Header<'_>]) -> Result<Body, Refusal> {
    let mut te = 0usize;
    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut cl = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te += 1;
            chunked = trim(h.value).eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("content-length") {
            cl = true;
            let n = digits(trim(h.value)).ok_or(Refusal::BadRequest)?;
            if length.is_some_and(|prev| prev != n) {
                return Err(Refusal::BadRequest);
            }
            length = Some(n);
        }
    }
    if te > 0 {
        if !http_11 || cl || te > 1 || !chunked {
            return Err(Refusal::BadRequest);
        }
        return Ok(Body::Chunked);
    }
    Ok(match length {
        Some(0) | None => Body::None,
        Some(n) => Body::Length(n),
    })
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// hyper's `from_digits`: one or more ASCII digits, no sign, no overflow.
pub(crate) fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Whether hyper (`http::Uri`) takes this request target. An origin-form target of
/// bytes valid in both a path and a query is checked here; anything else goes to the
/// real parser (an allocation, but only for unusual targets).
fn target_parses(target: &[u8]) -> bool {
    const MAX: usize = u16::MAX as usize - 1;
    if target.first() == Some(&b'/')
        && target.len() <= MAX
        && target
            .iter()
            .fold(true, |ok, &b| ok & PLAIN_TARGET[usize::from(b)])
    {
        return true;
    }
    http::Uri::try_from(target).is_ok()
}

/// The bytes valid in both a path and a query of an origin-form target, as a lookup
/// table (a table and no branch per byte: about a third of the instructions of a match).
const PLAIN_TARGET: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x5F | 0x61..=0x7A | 0x7C | 0x7E);
        b += 1;
    }
    t
};

/// Advances through a chunked body: how many bytes of `buf` belong to it and whether it
/// ended there; `None` where hyper's decoder would fail.
fn step_chunked(state: &mut Chunk, buf: &[u8]) -> Option<(usize, bool)> {
    let mut i = 0;
    while i < buf.len() {
        if let Chunk::Data(left) = state {
            let n = usize::try_from(*left)
                .unwrap_or(usize::MAX)
                .min(buf.len() - i);
            *left -= n as u64;
            i += n;
            if *left == 0 {
                *state = Chunk::DataCr;
            }
            continue;
        }
        let b = buf[i];
        i += 1;
        *state = match (*state, b) {
            (Chunk::Start, _) => Chunk::Size(u64::from(hex_value(b)?)),
            (Chunk::Size(n), b' ' | b'\t') => Chunk::SizeLws(n),
            (Chunk::Size(n), b';') | (Chunk::SizeLws(n), b';') => Chunk::Extension(n),
            (Chunk::Size(n), b'\r') | (Chunk::SizeLws(n), b'\r') => Chunk::SizeLf(n),
            (Chunk::Size(n), _) => {
                Chunk::Size(n.checked_mul(16)?.checked_add(u64::from(hex_value(b)?))?)
            }
            (Chunk::SizeLws(n), b' ' | b'\t') => Chunk::SizeLws(n),
            (Chunk::Extension(n), b'\r') => Chunk::SizeLf(n),
            (Chunk::Extension(_), b'\n') => return None,
            (Chunk::Extension(n), _) => Chunk::Extension(n),
            (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
            (Chunk::SizeLf(n), b'\n') => Chunk::Data(n),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Start,
            (Chunk::EndCr, b'\r') => Chunk::EndLf,
            (Chunk::EndCr, _) | (Chunk::Trailer, _) if b != b'\r' => Chunk::Trailer,
            (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
            (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
            (Chunk::EndLf, b'\n') => {
                *state = Chunk::Start;
                return Some((i, true));
            }
            _ => return None,
        };
    }
    Some((i, false))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_header_bytes: 8192,
        max_headers: 20,
        max_uri_bytes: 1024,
    };

    fn scan_all(bytes: &[u8]) -> (Scan, u64) {
        let mut f = Framer::new(LIMITS);
        (f.scan(bytes), f.heads())
    }

    /// Feeds `bytes` in pieces of `step`, as reads would, keeping an incomplete head
    /// for the next call; returns how many bytes were cleared and the refusal, if any.
    fn scan_in_pieces(bytes: &[u8], step: usize) -> (usize, Option<Refusal>, u64) {
        let mut f = Framer::new(LIMITS);
        let mut cleared = 0;
        let mut end = 0;
        while end < bytes.len() {
            end = (end + step).min(bytes.len());
            match f.scan(&bytes[cleared..end]) {
                Scan::Clear(n) => cleared += n,
                Scan::Refuse { at, refusal } => return (cleared + at, Some(refusal), f.heads()),
            }
        }
        (cleared, None, f.heads())
    }

    #[test]
    fn pipelined_requests_with_bodies_are_framed_like_hyper() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: t\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(scan_all(stream), (Scan::Clear(stream.len()), 4));
        for step in 1..40 {
            assert_eq!(
                scan_in_pieces(stream, step),
                (stream.len(), None, 4),
                "step {step}"
            );
        }
    }

    #[test]
    fn an_incomplete_head_is_held_back() {
        let stream = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHo";
        assert_eq!(scan_all(stream), (Scan::Clear(28), 1));
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused_at_its_head() {
        let first = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        for head in [
            &b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n",
            b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\ncontent-length: x\r\n\r\n",
        ] {
            let stream = [&first[..], head, b"0\r\n\r\n"].concat();
            assert_eq!(
                scan_all(&stream),
                (
                    Scan::Refuse {
                        at: first.len(),
                        refusal: Refusal::BadRequest
                    },
                    1
                )
            );
        }
    }

    #[test]
    fn framing_hyper_refuses_is_refused_here() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0x2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.2\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\n\r\n",
            "GET http://[::1 HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                scan_all(head.as_bytes()).0,
                Scan::Refuse {
                    at: 0,
                    refusal: Refusal::BadRequest
                },
                "{head:?}"
            );
        }
    }

    #[test]
    fn framing_hyper_accepts_is_framed_the_same() {
        for (head, body) in [
            (
                "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
                Body::Length(2),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length:  2 \r\n\r\n",
                Body::Length(2),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding:\tCHUNKED\t\r\n\r\n",
                Body::Chunked,
            ),
            ("POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n", Body::None),
            ("GET http://x/a?b={c} HTTP/1.1\r\n\r\n", Body::None),
            ("GET /a{b}|c HTTP/1.1\r\n\r\n", Body::None),
            ("OPTIONS * HTTP/1.1\r\n\r\n", Body::None),
        ] {
            assert_eq!(
                check_head(head.as_bytes(), &LIMITS),
                Head::Complete {
                    len: head.len(),
                    body
                },
                "{head:?}"
            );
        }
    }

    #[test]
    fn limits_are_refused_with_their_own_status() {
        let many: String = (0..21).map(|i| format!("x{i}: y\r\n")).collect();
        for (case, head, refusal) in [
            (
                "target too long",
                format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(1024)),
                Refusal::UriTooLong,
            ),
            // Refused before its line ends.
            (
                "endless target",
                format!("GET /{}", "a".repeat(1100)),
                Refusal::UriTooLong,
            ),
            (
                "21 headers, limit 20",
                format!("GET / HTTP/1.1\r\n{many}\r\n"),
                Refusal::HeadersTooLarge,
            ),
        ] {
            assert_eq!(
                scan_all(head.as_bytes()).0,
                Scan::Refuse { at: 0, refusal },
                "{case}"
            );
        }
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n", "y".repeat(8200));
        assert_eq!(
            scan_in_pieces(big.as_bytes(), 1000),
            (0, Some(Refusal::HeadersTooLarge), 0)
        );
    }

    /// The fast path never takes a target the `http` crate refuses, byte by byte.
    #[test]
    fn plain_target_bytes_are_ones_http_takes() {
        for b in 0..=255u8 {
            let target = [b'/', b'a', b, b'c'];
            if PLAIN_TARGET[usize::from(b)] {
                assert!(http::Uri::try_from(&target[..]).is_ok(), "byte {b:#04x}");
            }
            assert_eq!(
                target_parses(&target),
                http::Uri::try_from(&target[..]).is_ok(),
                "byte {b:#04x}"
            );
        }
    }

    #[test]
    fn the_h2_preface_switches_to_passthrough() {
        let mut f = Framer::new(LIMITS);
        assert_eq!(f.scan(&H2_PREFACE[..10]), Scan::Clear(0));
        let mut stream = H2_PREFACE.to_vec();
        stream.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0garbage");
        assert_eq!(f.scan(&stream), Scan::Clear(stream.len()));
        assert!(f.passthrough());
        // Only as the first bytes of a connection.
        let late = [&b"GET / HTTP/1.1\r\n\r\n"[..], H2_PREFACE].concat();
        assert!(matches!(scan_all(&late).0, Scan::Refuse { at: 18, .. }));
    }

    #[test]
    fn a_chunk_hyper_would_refuse_stops_the_scan() {
        for body in ["zz\r\n", "3\n", "3;a\nb\r\n", "3\r\nabcX\r\n"] {
            let stream = format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}GET /x HTTP/1.1\r\n\r\n"
            );
            let mut f = Framer::new(LIMITS);
            assert_eq!(
                f.scan(stream.as_bytes()),
                Scan::Clear(stream.len()),
                "{body:?}"
            );
            assert!(f.passthrough(), "{body:?}");
        }
    }

    #[test]
    fn leading_empty_lines_are_skipped_like_httparse() {
        let stream = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(scan_all(stream), (Scan::Clear(stream.len()), 1));
        assert_eq!(scan_in_pieces(stream, 1), (stream.len(), None, 1));
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        use super::test_requests::request;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// However the stream is cut into reads, every head is found where it
            /// starts (bodies may hold anything, heads included), all of it is cleared,
            /// and nothing is refused.
            #[test]
            fn pipelined_requests_are_framed_whatever_the_reads(
                reqs in proptest::collection::vec(request(), 1..8),
                step in 1usize..600,
            ) {
                let stream = reqs.concat();
                prop_assert_eq!(
                    scan_in_pieces(&stream, step),
                    (stream.len(), None, reqs.len() as u64)
                );
            }

            /// Any bytes, cut anywhere: no panic, and what is cleared never shrinks.
            #[test]
            fn any_bytes_are_scanned_without_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..2000),
                step in 1usize..300,
            ) {
                let (cleared, _, _) = scan_in_pieces(&bytes, step);
                prop_assert!(cleared <= bytes.len());
            }

            /// A CL+TE head anywhere in a pipeline is refused at its own start, after
            /// exactly the requests before it.
            #[test]
            fn a_cl_te_head_is_refused_where_it_starts(
                before in proptest::collection::vec(request(), 0..5),
                step in 1usize..600,
            ) {
                let mut stream = before.concat();
                let at = stream.len();
                stream.extend_from_slice(
                    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                );
                prop_assert_eq!(
                    scan_in_pieces(&stream, step),
                    (at, Some(Refusal::BadRequest), before.len() as u64)
                );
            }
        }
    }

    /// Requests as a client might frame them, for property tests here and in
    /// `connection`: no body, a `Content-Length` body, or a chunked body in chunks (an
    /// extension, upper- or lower-case sizes and a trailer now and then); the path may
    /// carry a query.
    pub(crate) mod test_requests {
        use proptest::prelude::*;

        pub(crate) fn request() -> impl Strategy<Value = Vec<u8>> {
            let path = "/[a-z0-9/._~-]{0,30}(\\?[a-z0-9=&]{0,10})?";
            let body = proptest::collection::vec(any::<u8>(), 0..300);
            let chunks =
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 0..4);
            prop_oneof![
                path.prop_map(|p| format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()),
                (path, body).prop_map(|(p, body)| {
                    let mut b = format!(
                        "POST {p} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    b.extend_from_slice(&body);
                    b
                }),
                (path, chunks, any::<(bool, bool, bool)>()).prop_map(
                    |(p, chunks, (ext, upper, trailer))| {
                        let mut b = format!(
                            "PUT {p} HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        )
                        .into_bytes();
                        for c in chunks {
                            let ext = if ext { ";a=b" } else { "" };
                            let size = if upper {
                                format!("{:X}", c.len())
                            } else {
                                format!("{:x}", c.len())
                            };
                            b.extend_from_slice(format!("{size}{ext}\r\n").as_bytes());
                            b.extend_from_slice(&c);
                            b.extend_from_slice(b"\r\n");
                        }
                        b.extend_from_slice(b"0\r\n");
                        if trailer {
                            b.extend_from_slice(b"x-t: 1\r\n");
                        }
                        b.extend_from_slice(b"\r\n");
                        b
                    }
                ),
            ]
        }
    }
}
