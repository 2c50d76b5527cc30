//! Accepts any `:authority` a gRPC client sends over a unix socket.
//!
//! grpcio (Python, C++) 1.85 and later send the socket path, percent-encoded, as `:authority`
//! (`tmp%2Fcsi.sock`). The HTTP/2 server under tonic refuses such a value as a malformed
//! authority and resets the stream, so every call from such a client failed. On a unix socket
//! the authority means nothing, so this reader sits between the socket and the server: it
//! decodes each header block the client sends (HPACK, with the client's dynamic table),
//! replaces an `:authority` the `http` crate would refuse by `localhost`, and encodes the block
//! again for the server (with a table of its own, in step with the server's decoder). Every
//! other frame passes through as it came; what the server writes is not touched.

use fluke_hpack::{Decoder, Encoder};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer accepts; re-encoded blocks are split to it.
const MAX_FRAME: usize = 16_384;
/// The most bytes one header block may take before it is refused (tonic's default header list
/// limit is 16 KiB; this leaves room).
const MAX_BLOCK: usize = 1 << 20;

/// A header block being received: its stream, whether it ends the stream, its bytes so far.
struct Pending {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

/// An HTTP/2 server connection whose client's header blocks are checked and re-encoded.
pub struct AuthorityFix<S> {
    inner: S,
    /// Raw bytes read from the client, not yet parsed.
    raw: Vec<u8>,
    /// Bytes ready for the server.
    ready: Vec<u8>,
    preface_left: usize,
    pending: Option<Pending>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps the server side of a connection.
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            raw: Vec::new(),
            ready: Vec::new(),
            preface_left: PREFACE,
            pending: None,
            decoder: Decoder::new(),
            encoder: Encoder::new(),
            eof: false,
        }
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what `raw` holds of whole frames to `ready`, re-encoding header blocks.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.raw.len());
            self.ready.extend(self.raw.drain(..n));
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        loop {
            if self.raw.len() < FRAME_HEADER {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            if self.raw.len() < FRAME_HEADER + len {
                return Ok(());
            }
            let (kind, flags) = (self.raw[3], self.raw[4]);
            let stream = u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]])
                & 0x7fff_ffff;
            let frame: Vec<u8> = self.raw.drain(..FRAME_HEADER + len).collect();
            let payload = &frame[FRAME_HEADER..];
            match kind {
                HEADERS => {
                    let mut body = payload;
                    let mut pad = 0;
                    if flags & PADDED != 0 {
                        pad = *body.first().ok_or_else(|| bad("empty padded HEADERS"))? as usize;
                        body = &body[1..];
                    }
                    if flags & PRIORITY != 0 {
                        body = body.get(5..).ok_or_else(|| bad("short PRIORITY fields"))?;
                    }
                    let end = body
                        .len()
                        .checked_sub(pad)
                        .ok_or_else(|| bad("padding longer than HEADERS"))?;
                    let pending = Pending {
                        stream,
                        end_stream: flags & END_STREAM != 0,
                        block: body[..end].to_vec(),
                    };
                    self.pending = Some(pending);
                    if flags & END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                CONTINUATION => {
                    let pending = self
                        .pending
                        .as_mut()
                        .filter(|p| p.stream == stream)
                        .ok_or_else(|| bad("CONTINUATION without HEADERS"))?;
                    pending.block.extend_from_slice(payload);
                    if pending.block.len() > MAX_BLOCK {
                        return Err(bad("header block too large"));
                    }
                    if flags & END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                _ => self.ready.extend_from_slice(&frame),
            }
        }
    }

    /// Decodes the pending block, fixes `:authority`, and queues it re-encoded.
    fn finish_block(&mut self) -> io::Result<()> {
        let Pending {
            stream,
            end_stream,
            block,
        } = self.pending.take().expect("a pending block");
        let mut headers = self
            .decoder
            .decode(&block)
            .map_err(|e| bad(&format!("HPACK: {e:?}")))?;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = b"localhost".to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut first = true;
        // An empty block still needs its HEADERS frame.
        let empty: &[u8] = &[];
        let mut next = chunks.next().unwrap_or(empty);
        loop {
            let last = chunks.peek().is_none();
            let kind = if first { HEADERS } else { CONTINUATION };
            let mut flags = if last { END_HEADERS } else { 0 };
            if first && end_stream {
                flags |= END_STREAM;
            }
            let len = (next.len() as u32).to_be_bytes();
            self.ready
                .extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            self.ready.extend_from_slice(&stream.to_be_bytes());
            self.ready.extend_from_slice(next);
            if last {
                return Ok(());
            }
            first = false;
            next = chunks.next().expect("peeked");
        }
    }
}

fn bad(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from client: {why}"),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if !me.ready.is_empty() {
                let n = me.ready.len().min(buf.remaining());
                buf.put_slice(&me.ready[..n]);
                me.ready.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if me.eof {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 16 << 10];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        me.eof = true;
                        continue;
                    }
                    me.raw.extend_from_slice(rb.filled());
                    me.process()?;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = <tokio::net::UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A decoded header block.
    type Block = Vec<(Vec<u8>, Vec<u8>)>;

    /// Parses frames back (kind, stream) and decodes header blocks as the server would.
    fn server_view(bytes: &[u8]) -> (Vec<(u8, u32)>, Vec<Block>) {
        let mut decoder = Decoder::new();
        let (mut frames, mut blocks, mut block) = (Vec::new(), Vec::new(), Vec::new());
        let mut rest = &bytes[PREFACE..];
        while rest.len() >= FRAME_HEADER {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            frames.push((kind, stream));
            let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&block).unwrap());
                    block.clear();
                }
            }
            rest = &rest[FRAME_HEADER + len..];
        }
        (frames, blocks)
    }

    #[tokio::test]
    async fn a_percent_encoded_authority_becomes_localhost_and_the_rest_is_kept() {
        let mut client = Encoder::new();
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let path_hdr: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/csi.v1.Identity/Probe"),
            (b":authority", b"tmp%2Fcsi.sock"),
            (b"te", b"trailers"),
        ];
        let block = client.encode(path_hdr.iter().copied());
        // Split over HEADERS + CONTINUATION, padded, to exercise both.
        let (a, b) = block.split_at(block.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        wire.extend(frame(HEADERS, PADDED, 1, &padded));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        wire.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        // A second request reuses the client's dynamic table.
        let again = client.encode(path_hdr.iter().copied());
        wire.extend(frame(HEADERS, END_HEADERS, 3, &again));
        let (mut near, far) = tokio::io::duplex(1 << 20);
        let mut fixed = AuthorityFix::new(far);
        // Written in odd pieces, as a socket may deliver them.
        for piece in wire.chunks(7) {
            near.write_all(piece).await.unwrap();
        }
        drop(near);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        assert_eq!(&out[..PREFACE], &wire[..PREFACE]);
        let (frames, blocks) = server_view(&out);
        assert_eq!(frames, [(0x4, 0), (HEADERS, 1), (0x0, 1), (HEADERS, 3)]);
        for headers in blocks {
            let auth = headers.iter().find(|(n, _)| n == b":authority").unwrap();
            assert_eq!(auth.1, b"localhost");
            let path = headers.iter().find(|(n, _)| n == b":path").unwrap();
            assert_eq!(path.1, b"/csi.v1.Identity/Probe");
            assert_eq!(headers.len(), 5);
        }
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        let mut client = Encoder::new();
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let block = client.encode([(&b":authority"[..], &b"localhost:50051"[..])]);
        wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
        let (mut near, far) = tokio::io::duplex(1 << 16);
        near.write_all(&wire).await.unwrap();
        drop(near);
        let mut out = Vec::new();
        AuthorityFix::new(far).read_to_end(&mut out).await.unwrap();
        let (_, blocks) = server_view(&out);
        assert_eq!(blocks[0][0].1, b"localhost:50051");
    }
}
