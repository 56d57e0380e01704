//! Request coalescing on a node (#11).
//!
//! Owns the blob downloads in progress, one per digest. The first `GET` of
//! an uncached blob (whole, no `Range`) starts a download: from a peer
//! ([`super::peers`]) or from upstream. The download is written to the
//! cache's temp file by a task of its own; every client of that digest,
//! the first included, reads from that file as it grows, so a client that
//! joins late gets the bytes already written, then follows the stream. Only
//! one fetch reaches the source, however many clients ask.
//!
//! What a client may be sent is what has been written except the last
//! chunk, which is held back until the whole body matches its digest and
//! length (#13); a failed download aborts every client's connection, as
//! an upstream failure always did, because containerd does not retry a
//! truncated blob against the next host. The download runs at most
//! [`AHEAD`] bytes ahead of its fastest client, and stops when every
//! client has gone, so a slow or vanished client costs no more upstream
//! bytes or disk than before.
//!
//! A peer source that fails is replaced by upstream with a `Range` request
//! from the offset already written (all of which is hashed): when the
//! peer's connection breaks or stalls, from the end of what arrived; when
//! its body does not verify at its end, from the start of its held-back
//! last chunk, which no client has been sent. A Range from the offset
//! costs upstream only the missing bytes, where a re-fetch of the whole
//! blob would cost all of them again; and since the hash covers every
//! byte, bytes from the peer that were wrong before the last chunk still
//! fail the final check and abort the clients (the peer is not asked for
//! that blob again). An upstream that answers the Range with anything but
//! the 206 asked for fails the download.
//!
//! Aborting is not enough once wrong bytes have been sent: containerd
//! resumes a broken blob with a Range request from what it has (which
//! this proxy passes upstream), completes it with the wrong prefix, fails
//! the commit ("unexpected commit digest"), and keeps that complete ingest,
//! so every later pull of the blob on that node fails the same way. Seen
//! with containerd 1.6; the same holds for an upstream that sends wrong
//! bytes early (#13). `peers.hold_until_verified` (on by default)
//! therefore releases nothing of a download that began at a peer until all
//! of it has verified: containerd then never sees a peer's wrong bytes, at
//! the cost of receiving the blob only after it has fully arrived. A held
//! peer download that fails (breaks, stalls or does not verify) is thrown
//! away whole and the blob fetched from upstream from its start, streaming
//! as it arrives: none of the peer's bytes is trusted, and none was sent.
//! With the key off, a peer's bytes stream as they arrive, as the
//! paragraph above describes.
//!
//! The fan-out tree (#23). A download is also served to other nodes on
//! the peer port as it arrives, before it has verified: each node verifies
//! the whole blob itself, so what a relay passes on unverified reaches no
//! containerd unchecked. Peer clients read what has been written except
//! the last chunk (`relayable`), which a corrupt source's undo may still
//! replace; containerd's clients read what is released, as above. A peer
//! source that breaks off (a relay or owner killed, drained or stalled) is
//! resumed from the bytes written, all of which are hashed: from the
//! owner when the source was a relay it named ([`super::peers::Peers::resume`],
//! a `Range` from the offset), else from upstream; so a departing relay
//! costs its children a reconnect, never a restart from 0. With
//! `peers.hold_until_verified` the bytes kept stay held, and if the whole
//! then does not verify (the broken source's bytes were wrong too), nothing
//! has been sent and the blob is fetched from upstream from its start. A
//! peer whose bytes did not verify is skipped for that blob, then its
//! owner is asked, then upstream, as above. A download switches source at
//! most [`MAX_SWITCHES`] times.
//!
//! Range requests for a blob being downloaded are served from the file when
//! the whole range has been written and released; otherwise they go
//! upstream as before (uncached), rather than wait: containerd asks for a
//! range only to resume a broken transfer, and the upstream answers at
//! once. `HEAD` requests and manifests go upstream as before.
//!
//! Needs `cache.dir` (the file is the cache's temp file, committed when the
//! download verifies). Writes only through [`super::cache`]. Clients read
//! the download from that file, so a write that fails (a full disk) fails
//! the download; for [`BYPASS_AFTER_WRITE_FAILURE`] after that, requests
//! stream as before coalescing, uncached when the disk stays full, so that
//! a full disk costs one retry, not every pull.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use tokio::sync::{oneshot, watch, Notify};
use tracing::{debug, info, warn};

use super::cache::{Cache, Writer};
use super::route::{Digest, Route};
use super::{BoxError, InFlight, ProxyBody, ProxyState, RESPONSE_HEADERS};
use crate::admin::metrics::{PeerResult, SourceLabel};
use crate::idle::Idle;

/// How far a download may run ahead of its fastest client.
pub const AHEAD: u64 = 8 << 20;
/// How long requests skip coalescing after a cache write failed.
pub const BYPASS_AFTER_WRITE_FAILURE: Duration = Duration::from_secs(60);
/// The largest chunk a client is sent at once.
const CHUNK: u64 = 256 << 10;
/// Source switches a download makes at most (a relay, its owner, upstream,
/// and upstream again from the start): then it fails.
pub const MAX_SWITCHES: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum CoalesceError {
    #[error("{source_kind} body for {digest} broke off: {message}")]
    Broken {
        source_kind: &'static str,
        digest: Digest,
        message: String,
    },
    #[error("{source_kind} body for {digest} stalled for {idle:?}")]
    Stalled {
        source_kind: &'static str,
        digest: Digest,
        idle: Duration,
    },
    #[error("{source_kind} sent {got} bytes for {digest}, which do not match its digest or length {want:?}")]
    Mismatch {
        source_kind: &'static str,
        digest: Digest,
        got: u64,
        want: Option<u64>,
    },
    #[error("bytes of {digest} from peer {peer} were wrong before its last chunk; upstream's rest did not make them match")]
    EarlyCorruption { peer: SocketAddr, digest: Digest },
    #[error("upstream did not resume {digest} at byte {offset}: {message}")]
    Resume {
        digest: Digest,
        offset: u64,
        message: String,
    },
    #[error("cache temp file for {digest}: {message}")]
    File { digest: Digest, message: String },
    #[error("every client of {digest} went away")]
    Abandoned { digest: Digest },
}

/// Where a download stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Its task is asking the source; no response head yet.
    Pending,
    /// Bytes are arriving.
    Streaming,
    /// All bytes arrived and verified.
    Done,
    /// Aborted: every client's connection is aborted.
    Failed,
    /// The source did not answer 200: every client asks on its own.
    Declined,
}

/// The response head every client of a download is sent.
pub struct Head {
    headers: Vec<(HeaderName, HeaderValue)>,
    len: Option<u64>,
    file: Arc<std::fs::File>,
}

#[derive(Clone)]
pub struct Progress {
    pub phase: Phase,
    /// Bytes that clients may be sent.
    pub released: u64,
    /// Bytes that other nodes may be sent (#23): written, except the last
    /// chunk; they verify the whole themselves.
    pub relayable: u64,
    head: Option<Arc<Head>>,
}

/// One download in progress.
pub struct Download {
    /// Started with the client's credentials: the peer port lets no one
    /// join it before the registry has served the blob without them.
    pub credentialed: AtomicBool,
    /// The leading client's share of [`DOWNLOADS_PER_CLIENT`].
    _slot: Option<ClientSlot>,
    progress: watch::Sender<Progress>,
    /// The furthest any client has read.
    read_max: AtomicU64,
    readers: AtomicUsize,
    wake: Notify,
    /// Where each source's bytes start: `(offset, source)`, ascending.
    segments: Mutex<Vec<(u64, SourceLabel)>>,
    /// Peer hops between the registry and these bytes (#23): 0 from
    /// upstream, else the serving peer's depth plus one.
    depth: AtomicU32,
}

impl Download {
    fn new(slot: Option<ClientSlot>) -> Download {
        Download {
            credentialed: AtomicBool::new(false),
            _slot: slot,
            progress: watch::Sender::new(Progress {
                phase: Phase::Pending,
                released: 0,
                relayable: 0,
                head: None,
            }),
            read_max: AtomicU64::new(0),
            readers: AtomicUsize::new(0),
            wake: Notify::new(),
            segments: Mutex::new(Vec::new()),
            depth: AtomicU32::new(0),
        }
    }

    fn set(&self, f: impl FnOnce(&mut Progress)) {
        self.progress.send_modify(f);
    }
}

/// Uncached downloads one client may lead at once (#18 point 4). Past it,
/// its next miss streams as before coalescing: paced by its own reading,
/// so a client that reads nothing holds no more than a socket's buffers.
/// containerd pulls at most 3 layers of an image at once by default.
pub const DOWNLOADS_PER_CLIENT: usize = 8;

/// A client's share of [`DOWNLOADS_PER_CLIENT`], given back on drop.
struct ClientSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("client counts lock");
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// The downloads in progress, by digest.
#[derive(Default)]
pub struct Downloads {
    map: Mutex<HashMap<Digest, Arc<Download>>>,
    /// Downloads led per client address.
    led: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Until when requests skip coalescing (a cache write failed).
    bypass_until: Mutex<Option<std::time::Instant>>,
}

/// A client of a download; dropping it lets the download notice when every
/// client has gone.
pub struct Reader(Arc<Download>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::SeqCst);
        self.0.wake.notify_one();
    }
}

impl Downloads {
    /// Join the download of `digest`, or start one: whether this client
    /// leads (must find a source). `None`: `client` already leads
    /// [`DOWNLOADS_PER_CLIENT`] downloads.
    pub fn join(&self, digest: &Digest, client: Option<IpAddr>) -> Option<(Reader, bool)> {
        let mut map = self.map.lock().expect("downloads lock");
        let (dl, leader) = match map.get(digest) {
            Some(d) => (d.clone(), false),
            None => {
                let slot = match client {
                    Some(ip) => {
                        let mut c = self.led.lock().expect("client counts lock");
                        let n = c.entry(ip).or_insert(0);
                        if *n >= DOWNLOADS_PER_CLIENT {
                            return None;
                        }
                        *n += 1;
                        Some(ClientSlot {
                            counts: self.led.clone(),
                            ip,
                        })
                    }
                    None => None,
                };
                let d = Arc::new(Download::new(slot));
                map.insert(digest.clone(), d.clone());
                (d, true)
            }
        };
        // Under the map lock: a download that sees no readers removes
        // itself under the same lock, so a client never joins one that
        // has just given up.
        dl.readers.fetch_add(1, Ordering::SeqCst);
        Some((Reader(dl), leader))
    }

    /// Whether a download of `digest` is in progress, and if so whether it
    /// was started with the client's credentials.
    pub fn credentialed(&self, digest: &Digest) -> Option<bool> {
        let map = self.map.lock().expect("downloads lock");
        map.get(digest)
            .map(|d| d.credentialed.load(Ordering::SeqCst))
    }

    /// Join the download of `digest` if one is in progress (under the map
    /// lock, like [`Downloads::join`]).
    pub fn join_existing(&self, digest: &Digest) -> Option<Reader> {
        let map = self.map.lock().expect("downloads lock");
        let dl = map.get(digest)?.clone();
        dl.readers.fetch_add(1, Ordering::SeqCst);
        Some(Reader(dl))
    }

    /// Remove `dl` (and only it) from the map.
    fn remove(&self, digest: &Digest, dl: &Arc<Download>) {
        let mut map = self.map.lock().expect("downloads lock");
        if map.get(digest).is_some_and(|d| Arc::ptr_eq(d, dl)) {
            map.remove(digest);
        }
    }

    /// Remove `dl` if it has no readers; whether it did.
    fn remove_if_abandoned(&self, digest: &Digest, dl: &Arc<Download>) -> bool {
        let mut map = self.map.lock().expect("downloads lock");
        if dl.readers.load(Ordering::SeqCst) != 0 {
            return false;
        }
        if map.get(digest).is_some_and(|d| Arc::ptr_eq(d, dl)) {
            map.remove(digest);
        }
        true
    }

    /// A cache write failed: skip coalescing for a while.
    pub fn bypass(&self) {
        *self.bypass_until.lock().expect("bypass lock") =
            Some(std::time::Instant::now() + BYPASS_AFTER_WRITE_FAILURE);
    }

    /// Whether requests skip coalescing now.
    pub fn bypassing(&self) -> bool {
        self.bypass_until
            .lock()
            .expect("bypass lock")
            .is_some_and(|t| t > std::time::Instant::now())
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("downloads lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Split the bytes `[start, end)` over the sources they came from.
pub fn attribute(segments: &[(u64, SourceLabel)], start: u64, end: u64) -> Vec<(SourceLabel, u64)> {
    let mut out = Vec::new();
    for (i, &(from, source)) in segments.iter().enumerate() {
        let to = segments.get(i + 1).map_or(u64::MAX, |s| s.0);
        let (a, b) = (start.max(from), end.min(to));
        if a < b {
            out.push((source, b - a));
        }
    }
    out
}

/// Serve a whole `GET` of a blob through the download of its digest;
/// `None` when the first client's source declined (not 200) and this one
/// should ask on its own. `via_peer`: the request came in on the peer port,
/// so it is never relayed to another peer.
pub async fn serve(
    state: &Arc<ProxyState>,
    cache: &Arc<Cache>,
    route: &Route,
    headers: &HeaderMap,
    via_peer: bool,
    client: Option<IpAddr>,
) -> Option<Response<ProxyBody>> {
    let digest = route.digest()?.clone();
    if state.downloads.bypassing() {
        return None;
    }
    let Some((reader, leader)) = state.downloads.join(&digest, client) else {
        debug!(%digest, ?client, "client leads {DOWNLOADS_PER_CLIENT} downloads already; streaming uncoalesced");
        return None;
    };
    let mut own_answer = None;
    if leader {
        reader.0.credentialed.store(
            headers.contains_key(header::AUTHORIZATION),
            Ordering::SeqCst,
        );
        let (tx, rx) = oneshot::channel();
        own_answer = Some(rx);
        tokio::spawn(lead(
            state.clone(),
            cache.clone(),
            route.clone(),
            headers.clone(),
            via_peer,
            reader.0.clone(),
            tx,
        ));
    } else {
        state.metrics.coalesced.inc();
        debug!(%digest, "joined a download in progress");
    }
    follow(state, reader, own_answer, via_peer).await
}

/// For a relay (#23): serve a blob being downloaded here, whole or a
/// single range, as it arrives; `None` when no download of it is in
/// progress (nothing is fetched for the asker).
pub async fn serve_held(
    state: &Arc<ProxyState>,
    digest: &Digest,
    range: Option<&HeaderValue>,
) -> Option<Response<ProxyBody>> {
    match range {
        Some(r) => serve_range(state, digest, r, true),
        None => {
            let reader = state.downloads.join_existing(digest)?;
            state.metrics.coalesced.inc();
            follow(state, reader, None, true).await
        }
    }
}

/// Serve a single range of a blob being downloaded, if all of it has been
/// released.
/// `relay`: for another node (#23), which may follow the download as it
/// arrives, so any range within the blob's length is served.
pub fn serve_range(
    state: &Arc<ProxyState>,
    digest: &Digest,
    range: &HeaderValue,
    relay: bool,
) -> Option<Response<ProxyBody>> {
    // Joined like any client, so the download does not give up under it;
    // dropped again (unjoined) when the range is not there.
    let reader = state.downloads.join_existing(digest)?;
    let p = reader.0.progress.borrow().clone();
    let head = p.head.clone()?;
    let (a, b) = super::single_range(range, head.len?)?;
    if (!relay && b >= p.released) || !matches!(p.phase, Phase::Streaming | Phase::Done) {
        return None;
    }
    let mut out = Response::builder().status(StatusCode::PARTIAL_CONTENT);
    for (k, v) in &head.headers {
        if k != header::CONTENT_LENGTH && k != header::CONTENT_RANGE {
            out = out.header(k, v);
        }
    }
    out = out.header(header::CONTENT_LENGTH, b - a + 1).header(
        header::CONTENT_RANGE,
        format!("bytes {a}-{b}/{}", head.len?),
    );
    if relay {
        out = out.header(
            super::peers::DEPTH_HEADER,
            reader.0.depth.load(Ordering::SeqCst),
        );
    }
    let body = reading(state, reader, head, a, Some(b + 1), relay);
    out.body(body).ok()
}

/// A download's pending phase, from its first request to the source's
/// response head, as a task of its own (#18 point 1). It ran inside the
/// first client's request before, so that client leaving (containerd
/// cancels a pull, or a peer gives up) declined the download for every
/// other client, and each then went upstream on its own: 8 upstream GETs
/// for 8 clients when the registry's head came 4 s late. Now it ends only
/// when the source answers, or when no client is left.
///
/// `answer`: the first client's own response when the source declines (it
/// gets the source's answer, as before; the others ask on their own).
async fn lead(
    state: Arc<ProxyState>,
    cache: Arc<Cache>,
    route: Route,
    headers: HeaderMap,
    via_peer: bool,
    dl: Arc<Download>,
    answer: oneshot::Sender<Response<ProxyBody>>,
) {
    let Some(digest) = route.digest().cloned() else {
        return;
    };
    let mut guard = Pending {
        state: &state,
        digest: &digest,
        dl: &dl,
        armed: true,
    };
    tokio::select! {
        started = start(&state, &cache, &route, &headers, via_peer, &dl) => match started {
            Ok(()) => guard.armed = false,
            // `guard` marks the download declined once the first client
            // has the source's own answer.
            Err(resp) => {
                let _ = answer.send(resp);
            }
        },
        () = abandoned(&state, &digest, &dl) => {
            debug!(%digest, "every client left before the source answered; download given up");
        }
    }
}

/// Resolves once the download has no client left and is out of the map.
async fn abandoned(state: &ProxyState, digest: &Digest, dl: &Arc<Download>) {
    // Bounded: each turn waits for a client to leave, or one second.
    loop {
        let left = dl.wake.notified();
        if dl.readers.load(Ordering::SeqCst) == 0 && state.downloads.remove_if_abandoned(digest, dl)
        {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), left).await;
    }
}

/// Marks a download declined unless disarmed: its source did not answer
/// 200, every client left, or the task was cancelled (runtime shutdown);
/// the clients still there then ask on their own instead of waiting.
struct Pending<'a> {
    state: &'a ProxyState,
    digest: &'a Digest,
    dl: &'a Arc<Download>,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.downloads.remove(self.digest, self.dl);
            self.dl.set(|p| p.phase = Phase::Declined);
        }
    }
}

/// Find a source for the download and start its task; `Err` with the
/// response for this client when the source did not answer 200.
async fn start(
    state: &Arc<ProxyState>,
    cache: &Arc<Cache>,
    route: &Route,
    headers: &HeaderMap,
    via_peer: bool,
    dl: &Arc<Download>,
) -> Result<(), Response<ProxyBody>> {
    let digest = route.digest().expect("a blob route").clone();
    if !via_peer {
        if let Some(peers) = &state.peers {
            let deadline = super::peers::phase_deadline(state.timeouts().response);
            if let Some(pb) = peers.fetch(route, headers, deadline).await {
                let (len, depth, owner) = (pb.len, pb.depth, pb.owner);
                // Before the head is out: a child that joins at once
                // reads this node's depth with it.
                dl.depth.store(depth, Ordering::SeqCst);
                if let Ok(mut task) =
                    Task::new(state, cache, dl, route, headers, pb.response, Some(pb.peer))
                {
                    task.want_len = Some(len);
                    task.owner = owner;
                    task.set_depth(depth);
                    tokio::spawn(task.run());
                    return Ok(());
                }
            }
        }
    }
    let resp = super::upstream_response(state, &Method::GET, route, headers).await?;
    if resp.status() != StatusCode::OK {
        return Err(super::relay(
            state,
            &Method::GET,
            route,
            None,
            headers,
            resp,
        ));
    }
    match Task::new(state, cache, dl, route, headers, resp, None) {
        Ok(task) => {
            tokio::spawn(task.run());
            Ok(())
        }
        // No temp file: this client streams as before, uncoalesced.
        Err(resp) => {
            debug!(%digest, "no cache temp file; not coalesced");
            Err(super::relay(
                state,
                &Method::GET,
                route,
                None,
                headers,
                *resp,
            ))
        }
    }
}

/// Serve one client from the download. `own_answer`: the first client's,
/// for the source's answer when it declines.
/// `relay`: the client is another node (#23), sent bytes as they are
/// written (see the module header) and this node's depth.
async fn follow(
    state: &Arc<ProxyState>,
    reader: Reader,
    mut own_answer: Option<oneshot::Receiver<Response<ProxyBody>>>,
    relay: bool,
) -> Option<Response<ProxyBody>> {
    let mut rx = reader.0.progress.subscribe();
    // Bounded: the phase leaves Pending once, when the source answers
    // (within the peer and upstream deadlines) or every client has gone.
    let head = loop {
        let p = rx.borrow_and_update().clone();
        match (p.phase, p.head) {
            (Phase::Streaming | Phase::Done, Some(h)) => break h,
            // The answer is sent before the phase is set.
            (Phase::Declined, _) => return own_answer.as_mut().and_then(|a| a.try_recv().ok()),
            (Phase::Failed, _) => {
                return Some(super::unavailable(
                    "the download this request joined failed".into(),
                ))
            }
            _ => {}
        }
        if rx.changed().await.is_err() {
            return None;
        }
    };
    let mut out = Response::builder().status(StatusCode::OK);
    for (k, v) in &head.headers {
        out = out.header(k, v);
    }
    if relay {
        out = out.header(
            super::peers::DEPTH_HEADER,
            reader.0.depth.load(Ordering::SeqCst),
        );
    }
    let body = reading(state, reader, head, 0, None, relay);
    out.body(body).ok()
}

/// The body of one client: bytes `[start, end)` of the download as they
/// are released.
fn reading(
    state: &Arc<ProxyState>,
    reader: Reader,
    head: Arc<Head>,
    start: u64,
    end: Option<u64>,
    relay: bool,
) -> ProxyBody {
    struct R {
        relay: bool,
        reader: Reader,
        rx: watch::Receiver<Progress>,
        head: Arc<Head>,
        pos: u64,
        end: Option<u64>,
        finished: bool,
        state: Arc<ProxyState>,
        _in_flight: InFlight,
    }
    let r = R {
        relay,
        rx: reader.0.progress.subscribe(),
        reader,
        head,
        pos: start,
        end,
        finished: false,
        state: state.clone(),
        _in_flight: InFlight::new(&state.metrics),
    };
    let stream = futures_util::stream::unfold(r, |mut r| async move {
        if r.finished {
            return None;
        }
        // Bounded: each turn sends a chunk, ends, or waits for the
        // download to move (it always ends Done or Failed).
        loop {
            let p = r.rx.borrow_and_update().clone();
            let ready = if r.relay {
                p.released.max(p.relayable)
            } else {
                p.released
            };
            let limit = r.end.map_or(ready, |e| e.min(ready));
            if r.pos < limit {
                let n = (limit - r.pos).min(CHUNK) as usize;
                let mut buf = vec![0u8; n];
                if let Err(e) = r.head.file.read_exact_at(&mut buf, r.pos) {
                    r.finished = true;
                    warn!(error = %e, "cannot read a download's temp file; aborting the client connection");
                    return Some((Err(Box::new(e) as BoxError), r));
                }
                let segments = r.reader.0.segments.lock().expect("segments").clone();
                for (source, bytes) in attribute(&segments, r.pos, r.pos + n as u64) {
                    r.state.metrics.bytes_from(source).inc_by(bytes);
                }
                r.pos += n as u64;
                r.reader.0.read_max.fetch_max(r.pos, Ordering::SeqCst);
                r.reader.0.wake.notify_one();
                return Some((Ok(Frame::data(Bytes::from(buf))), r));
            }
            if r.end.is_some_and(|e| r.pos >= e) || (p.phase == Phase::Done && r.pos >= p.released)
            {
                super::mark_pull(&r.state.metrics);
                return None;
            }
            if matches!(p.phase, Phase::Failed | Phase::Declined) {
                debug!(
                    pos = r.pos,
                    released = p.released,
                    "download failed; aborting a client"
                );
                r.finished = true;
                return Some((
                    Err("the download failed; aborting the client connection".into()),
                    r,
                ));
            }
            if r.rx.changed().await.is_err() {
                r.finished = true;
                return Some((Err("the download went away".into()), r));
            }
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// The task that moves a download from its source into the temp file.
struct Task {
    state: Arc<ProxyState>,
    dl: Arc<Download>,
    route: Route,
    digest: Digest,
    headers: HeaderMap,
    writer: Writer,
    /// The source's body, ended with a stall after
    /// `proxy.body_idle_timeout_secs` of waiting ([`crate::idle`]).
    body: Idle<Incoming>,
    /// The peer the bytes come from; `None`: upstream.
    peer: Option<SocketAddr>,
    /// The peer that was replaced by upstream, if one was.
    replaced: Option<SocketAddr>,
    /// When `peer` is a relay: the owner that named it, asked next if the
    /// relay fails (#23).
    owner: Option<SocketAddr>,
    /// This node's depth with these bytes (#23).
    depth: u32,
    /// Source switches so far ([`MAX_SWITCHES`]).
    switches: u8,
    /// Release nothing before the whole body verified
    /// (`peers.hold_until_verified`, for a download that began at a peer).
    hold: bool,
    want_len: Option<u64>,
    guard: TaskGuard,
}

/// Fails the download unless disarmed: a task cancelled (runtime
/// shutdown) or panicking must not leave its clients waiting.
struct TaskGuard {
    state: Arc<ProxyState>,
    dl: Arc<Download>,
    digest: Digest,
    armed: bool,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.armed {
            self.state.downloads.remove(&self.digest, &self.dl);
            self.dl.set(|p| p.phase = Phase::Failed);
        }
    }
}

impl Task {
    #[allow(clippy::too_many_arguments)]
    fn new(
        state: &Arc<ProxyState>,
        cache: &Arc<Cache>,
        dl: &Arc<Download>,
        route: &Route,
        headers: &HeaderMap,
        resp: Response<Incoming>,
        peer: Option<SocketAddr>,
    ) -> Result<Task, Box<Response<Incoming>>> {
        let Some(digest) = route.digest().cloned() else {
            return Err(Box::new(resp));
        };
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let len = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let meta = super::cache::Meta {
            content_type,
            len,
            credentialed: headers.contains_key(header::AUTHORIZATION),
        };
        let Some(writer) = cache.writer(&digest, meta) else {
            return Err(Box::new(resp));
        };
        let file = match writer.reader() {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "cache: cannot reopen a temp file");
                return Err(Box::new(resp));
            }
        };
        let mut kept = Vec::new();
        for name in RESPONSE_HEADERS {
            for v in resp.headers().get_all(name) {
                kept.push((HeaderName::from_static(name), v.clone()));
            }
        }
        let source = if peer.is_some() {
            SourceLabel::Peer
        } else {
            SourceLabel::Upstream
        };
        *dl.segments.lock().expect("segments") = vec![(0, source)];
        dl.set(|p| {
            p.phase = Phase::Streaming;
            p.head = Some(Arc::new(Head {
                headers: kept,
                len,
                file: Arc::new(file),
            }));
        });
        debug!(%digest, ?peer, len, "download started");
        Ok(Task {
            state: state.clone(),
            dl: dl.clone(),
            route: route.clone(),
            digest: digest.clone(),
            headers: headers.clone(),
            writer,
            body: Idle::new(resp.into_body(), state.timeouts().body_idle),
            peer,
            replaced: None,
            owner: None,
            depth: 0,
            switches: 0,
            hold: peer.is_some()
                && state
                    .peers
                    .as_ref()
                    .is_some_and(|p| p.config.hold_until_verified),
            want_len: len,
            guard: TaskGuard {
                state: state.clone(),
                dl: dl.clone(),
                digest,
                armed: true,
            },
        })
    }

    fn set_depth(&mut self, depth: u32) {
        self.depth = depth;
        self.dl.depth.store(depth, Ordering::SeqCst);
    }

    fn source_kind(&self) -> &'static str {
        if self.peer.is_some() {
            "peer"
        } else {
            "upstream"
        }
    }

    async fn run(mut self) {
        match self.pump().await {
            Ok(()) => {
                self.guard.armed = false;
                let len = self.writer.len();
                self.dl.set(|p| {
                    p.phase = Phase::Done;
                    p.released = len;
                    p.relayable = len;
                });
                if let Some(peer) = self.peer {
                    self.state.metrics.peer_request(PeerResult::Served);
                    self.state.metrics.peer_depth.observe(f64::from(self.depth));
                    debug!(%peer, digest = %self.digest, len, depth = self.depth, "blob from a peer verified");
                }
                let Task {
                    state,
                    dl,
                    digest,
                    writer,
                    ..
                } = self;
                // Verifying, fsync and rename can take a while under I/O
                // load; the download stays in the map until the blob is in
                // the cache, so a request in between joins instead of
                // missing both.
                let _ = tokio::task::spawn_blocking(move || writer.finish()).await;
                state.downloads.remove(&digest, &dl);
            }
            Err(e) => {
                warn!(error = %e, "download failed; aborting its clients' connections");
                self.fail();
            }
        }
    }

    fn fail(&mut self) {
        self.guard.armed = false;
        self.state.downloads.remove(&self.digest, &self.dl);
        self.dl.set(|p| p.phase = Phase::Failed);
    }

    /// Move every byte; switches from a failing peer to upstream once.
    async fn pump(&mut self) -> Result<(), CoalesceError> {
        let idle = self.state.timeouts().body_idle;
        // Bounded: every turn consumes one frame of a finite body, waits
        // for a client (and gives up when none is left), or switches
        // source, which happens at most once.
        loop {
            self.pace().await?;
            let frame = match self.body.frame().await {
                None => None,
                Some(Err(e)) => {
                    let e = if crate::idle::is_stall(e.as_ref()) {
                        CoalesceError::Stalled {
                            source_kind: self.source_kind(),
                            digest: self.digest.clone(),
                            idle,
                        }
                    } else {
                        CoalesceError::Broken {
                            source_kind: self.source_kind(),
                            digest: self.digest.clone(),
                            message: e.to_string(),
                        }
                    };
                    self.replace_peer(e, PeerResult::Failed, false).await?;
                    continue;
                }
                Some(Ok(f)) => Some(f),
            };
            if let Some(frame) = frame {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers: nothing to store
                };
                if !data.is_empty() {
                    let before = self.writer.len();
                    self.writer.write(&data);
                    if self.writer.failed() {
                        self.state.downloads.bypass();
                        return Err(CoalesceError::File {
                            digest: self.digest.clone(),
                            message: "a write failed".into(),
                        });
                    }
                    // The last chunk is held back until the end verifies
                    // (with `hold`, everything is); other nodes may have
                    // the rest at once (#23).
                    let hold = self.hold;
                    self.dl.set(|p| {
                        p.relayable = before;
                        if !hold {
                            p.released = before;
                        }
                    });
                }
                if !http_body::Body::is_end_stream(&self.body) {
                    continue;
                }
            }
            // The body ended.
            let got = self.writer.len();
            if self.want_len.is_none_or(|w| w == got) && self.writer.matches() {
                return Ok(());
            }
            let e = CoalesceError::Mismatch {
                source_kind: self.source_kind(),
                digest: self.digest.clone(),
                got,
                want: self.want_len,
            };
            if self.peer.is_none() {
                if let Some(peer) = self.replaced {
                    if self.hold && self.switches < MAX_SWITCHES {
                        // Held, so nothing was sent: the bytes kept from a
                        // peer that broke off were wrong. Start over from
                        // upstream (#23).
                        warn!(%peer, digest = %self.digest, "the bytes kept from a peer did not verify; fetching the whole blob from upstream");
                        if let Some(peers) = &self.state.peers {
                            peers.mark_bad(peer, &self.digest);
                        }
                        self.switches += 1;
                        self.upstream_from(0).await?;
                        continue;
                    }
                    // Upstream's part did not fix it: the peer's bytes
                    // before its last chunk were wrong too (and were sent;
                    // the clients' retry goes upstream without that peer).
                    // Already counted as the peer's `corrupt`.
                    return Err(CoalesceError::EarlyCorruption {
                        peer,
                        digest: self.digest.clone(),
                    });
                }
                self.state.metrics.digest_mismatches.inc();
                return Err(e);
            }
            self.replace_peer(e, PeerResult::Corrupt, true).await?;
        }
    }

    /// Wait while the download is [`AHEAD`] of its fastest client; give up
    /// when no client is left.
    async fn pace(&mut self) -> Result<(), CoalesceError> {
        // Bounded: each turn waits for a client to read or leave (or one
        // second), and ends when no client is left.
        loop {
            if self.dl.readers.load(Ordering::SeqCst) == 0
                && self
                    .state
                    .downloads
                    .remove_if_abandoned(&self.digest, &self.dl)
            {
                return Err(CoalesceError::Abandoned {
                    digest: self.digest.clone(),
                });
            }
            let read = self.dl.read_max.load(Ordering::SeqCst);
            // Held back, nothing can be read yet: no client to wait for.
            if self.hold || self.writer.len() <= read + AHEAD {
                return Ok(());
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.dl.wake.notified()).await;
        }
    }

    /// The peer source failed with `e`: continue from the bytes kept (see
    /// the module header), from the owner that named it when it was a
    /// relay (#23), else from upstream with a Range; an upstream source
    /// fails the download. `corrupt`: the peer's body did not verify, so
    /// its last chunk (never sent to a client) is dropped first, and with
    /// `hold` all of it.
    async fn replace_peer(
        &mut self,
        e: CoalesceError,
        result: PeerResult,
        corrupt: bool,
    ) -> Result<(), CoalesceError> {
        let Some(peer) = self.peer.take() else {
            return Err(e);
        };
        self.replaced = Some(peer);
        self.switches += 1;
        self.state.metrics.peer_request(result);
        if let Some(peers) = &self.state.peers {
            peers.mark_bad(peer, &self.digest);
        }
        if self.switches > MAX_SWITCHES {
            return Err(e);
        }
        let file_err = |e: std::io::Error| CoalesceError::File {
            digest: self.digest.clone(),
            message: e.to_string(),
        };
        // Held and corrupt: no client has any of the peer's bytes, and
        // none of them is trusted (a wrong byte anywhere fails only the
        // final check), so the next source sends the whole blob. A break
        // keeps every byte: the final check covers them, and with `hold`
        // nothing is released before it.
        let offset = if corrupt && self.hold {
            self.writer.reset().map_err(file_err)?;
            self.dl.set(|p| p.relayable = 0);
            0
        } else if corrupt {
            self.writer.undo_last().map_err(file_err)?
        } else {
            self.writer.len()
        };
        if let (Some(owner), Some(peers)) = (self.owner.take(), self.state.peers.clone()) {
            let deadline = super::peers::phase_deadline(self.state.timeouts().response);
            match peers
                .resume(
                    owner,
                    Some(peer),
                    &self.route,
                    &self.headers,
                    offset,
                    deadline,
                )
                .await
            {
                Some(pb) if self.want_len.is_none_or(|w| w == pb.len) => {
                    warn!(relay = %peer, %owner, digest = %self.digest, offset, error = %e, "relay skipped for this blob; continuing from its owner");
                    self.peer = Some(owner);
                    self.want_len = Some(pb.len);
                    self.writer.expect_len(Some(pb.len));
                    self.set_depth(pb.depth);
                    self.segments_push(offset, SourceLabel::Peer);
                    self.body = Idle::new(pb.response.into_body(), self.state.timeouts().body_idle);
                    return Ok(());
                }
                Some(pb) => {
                    warn!(%owner, digest = %self.digest, len = pb.len, want = ?self.want_len, "the owner's length differs from the relay's; going upstream");
                }
                None => {}
            }
        }
        warn!(%peer, error = %e, offset, "peer skipped for this blob; continuing from upstream");
        self.upstream_from(offset).await
    }

    /// Continue the download from upstream at `offset` (0: the whole blob
    /// again, the file emptied first; it then streams as it arrives).
    async fn upstream_from(&mut self, offset: u64) -> Result<(), CoalesceError> {
        if offset == 0 {
            if !self.writer.is_empty() {
                self.writer.reset().map_err(|e| CoalesceError::File {
                    digest: self.digest.clone(),
                    message: e.to_string(),
                })?;
                self.dl.set(|p| p.relayable = 0);
            }
            self.hold = false;
        }
        self.set_depth(0);
        let mut headers = self.headers.clone();
        if offset > 0 {
            headers.insert(
                header::RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-")).expect("ascii"),
            );
        }
        let resume = |message: String| CoalesceError::Resume {
            digest: self.digest.clone(),
            offset,
            message,
        };
        let resp = super::upstream_response(&self.state, &Method::GET, &self.route, &headers)
            .await
            .map_err(|r| resume(format!("status {}", r.status())))?;
        let total = if offset == 0 {
            let len = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            if resp.status() != StatusCode::OK {
                return Err(resume(format!("status {}", resp.status())));
            }
            len
        } else {
            let range = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let total = parse_content_range(&range, offset);
            if resp.status() != StatusCode::PARTIAL_CONTENT || total.is_none() {
                return Err(resume(format!(
                    "status {} with Content-Range {range:?}",
                    resp.status()
                )));
            }
            total
        };
        info!(digest = %self.digest, offset, "resumed from upstream");
        self.peer = None;
        self.want_len = total;
        self.writer.expect_len(total);
        self.segments_push(offset, SourceLabel::Upstream);
        self.body = Idle::new(resp.into_body(), self.state.timeouts().body_idle);
        Ok(())
    }

    fn segments_push(&self, offset: u64, source: SourceLabel) {
        let mut s = self.dl.segments.lock().expect("segments");
        s.retain(|(o, _)| *o < offset);
        s.push((offset, source));
    }
}

/// `bytes <offset>-<end>/<total>`: the total, if the range starts at
/// `offset` and runs to the end.
pub fn parse_content_range(v: &str, offset: u64) -> Option<u64> {
    let rest = v.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b, total): (u64, u64, u64) = (a.parse().ok()?, b.parse().ok()?, total.parse().ok()?);
    (a == offset && b + 1 == total).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_attributed_to_their_source() {
        let s = [(0, SourceLabel::Peer), (100, SourceLabel::Upstream)];
        assert_eq!(attribute(&s, 0, 50), vec![(SourceLabel::Peer, 50)]);
        assert_eq!(
            attribute(&s, 90, 120),
            vec![(SourceLabel::Peer, 10), (SourceLabel::Upstream, 20)]
        );
        assert_eq!(attribute(&s, 100, 101), vec![(SourceLabel::Upstream, 1)]);
        assert!(attribute(&s, 5, 5).is_empty());
    }

    #[test]
    fn content_range_must_resume_at_the_offset() {
        assert_eq!(parse_content_range("bytes 10-99/100", 10), Some(100));
        assert_eq!(parse_content_range("bytes 0-99/100", 10), None);
        assert_eq!(parse_content_range("bytes 10-50/100", 10), None);
        assert_eq!(parse_content_range("bytes 10-99/*", 10), None);
        assert_eq!(parse_content_range("", 10), None);
    }

    fn digest() -> Digest {
        Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap()
    }

    #[test]
    fn the_first_client_leads_the_others_join_and_readers_are_counted() {
        let d = Downloads::default();
        let (a, lead_a) = d.join(&digest(), None).unwrap();
        let (b, lead_b) = d.join(&digest(), None).unwrap();
        assert!(lead_a && !lead_b);
        assert!(Arc::ptr_eq(&a.0, &b.0));
        let dl = a.0.clone();
        assert_eq!(dl.readers.load(Ordering::SeqCst), 2);
        drop(a);
        assert!(!d.remove_if_abandoned(&digest(), &dl));
        drop(b);
        assert!(d.remove_if_abandoned(&digest(), &dl));
        assert!(d.is_empty());
        // After it is gone, the next client leads a new download.
        let (c, lead_c) = d.join(&digest(), None).unwrap();
        assert!(lead_c && !Arc::ptr_eq(&c.0, &dl));
        assert!(!d.bypassing());
        d.bypass();
        assert!(d.bypassing());
    }

    /// #18 point 4: one client leads at most DOWNLOADS_PER_CLIENT
    /// downloads; joining one in progress needs no share; a finished one
    /// gives its share back.
    #[test]
    fn a_client_leads_a_bounded_number_of_downloads() {
        let d = Downloads::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let dg = |i: usize| Digest::parse(&format!("sha256:{i:064x}")).unwrap();
        let led: Vec<Reader> = (0..DOWNLOADS_PER_CLIENT)
            .map(|i| d.join(&dg(i), Some(ip)).unwrap().0)
            .collect();
        assert!(d.join(&dg(99), Some(ip)).is_none(), "one more is refused");
        assert!(d.join(&dg(0), Some(ip)).is_some(), "joining needs no share");
        assert!(d.join(&dg(99), Some(other)).is_some(), "per client");
        let second = led[1].0.clone();
        drop(led);
        assert!(d.remove_if_abandoned(&dg(1), &second));
        drop(second);
        assert!(d.join(&dg(100), Some(ip)).is_some(), "a share came back");
    }
}
