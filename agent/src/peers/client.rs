//! Fetching blobs from other agents (see [`super`]).

use super::{BAN, PeerSecret, blob_path};
use crate::fetch::{PlannedFile, Progress, Wanted, WantedGuard};
use crate::store::{Store, StoreError};
use futures::StreamExt;
use modelcache_core::hash::{ContentHash, Hasher};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How long a node that starts fetching waits, its wants made known, before asking its peers
/// what they hold and want: nodes that start the same model within it split the work.
pub const SETTLE: Duration = Duration::from_secs(1);

/// The longest a node waits for the peer that owns a blob to get it from the hub, while that
/// peer says it still wants it.
pub const WAVE_WAIT: Duration = Duration::from_secs(600);

/// How often a waiting node asks the owner again.
const POLL: Duration = Duration::from_millis(250);

/// Who gets each blob of a first wave from the hub: the node (of those that want it at once)
/// whose rendezvous score for it is highest. The others take it from that node.
#[derive(Debug, Default)]
pub struct Wave {
    owners: HashMap<ContentHash, Owner>,
    /// The peers that said they hold a blob: asked for it before the others.
    holders: HashMap<ContentHash, Vec<String>>,
    /// The blobs this node gets from the hub that peers wait for.
    awaited: std::collections::HashSet<ContentHash>,
    /// This node's claims on the blobs it owns, made known to peers until the fetch ends.
    _claims: Option<WantedGuard>,
}

/// A blob's owner in a [`Wave`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node: it asks the hub.
    Me,
    /// A peer: this node waits for it, then takes the blob from it.
    Peer(String),
}

impl Wave {
    /// The owner of `hash`, when the wave gave it one.
    pub fn owner(&self, hash: &ContentHash) -> Option<&Owner> {
        self.owners.get(hash)
    }

    /// How many blobs this node takes from peers that get them from the hub now.
    pub fn followed(&self) -> usize {
        self.owners
            .values()
            .filter(|o| matches!(o, Owner::Peer(_)))
            .count()
    }

    /// Whether peers wait for this node to get `hash` from the hub (they read it as it grows,
    /// so it had better grow from its first byte on).
    pub fn awaited(&self, hash: &ContentHash) -> bool {
        self.awaited.contains(hash)
    }
}

/// `url`'s rendezvous score for `hash`.
fn score(url: &str, hash: &ContentHash) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(url.as_bytes());
    h.update(hash.file_name().as_bytes());
    h.finalize().into()
}

/// The other agents this one may fetch from: a list given, or found by DNS ([`discover`]).
#[derive(Debug)]
pub struct Peers {
    urls: RwLock<Vec<String>>,
    /// This node's own URL as its peers know it, when it serves them: it may own blobs.
    own: Option<String>,
    /// The blobs this node gets from the hub for its peers, until its fetch ends: its peer
    /// server tells them, so that a node starting later takes them from here.
    claims: Wanted,
    secret: PeerSecret,
    http: reqwest::Client,
    banned: Mutex<HashMap<String, Instant>>,
}

/// A peer list that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BadPeers {
    /// Not an http(s) URL with a host.
    #[error("--peers {0:?} is not an http:// or https:// URL with a host")]
    Url(String),
    /// The HTTP client could not be built.
    #[error("cannot make the peers' HTTP client: {0}")]
    Client(String),
}

/// The most peers a discovery keeps.
pub const MAX_PEERS: usize = 1024;

/// How often [`discover`] asks DNS again.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(15);

/// Where to find peers by DNS: a name whose addresses are the agents (a headless Service), the
/// port they serve on, and this agent's own address to leave out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// `host:port`, e.g. `modelcache-peers.modelcache.svc:7475`.
    pub name: String,
    /// This agent's address (its pod IP), left out of the peers.
    pub own_ip: Option<std::net::IpAddr>,
}

impl Discovery {
    /// The peers' URLs the name resolves to now: sorted, without this agent, at most
    /// [`MAX_PEERS`].
    pub async fn resolve(&self) -> std::io::Result<Vec<String>> {
        let mut addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(&self.name)
            .await?
            .filter(|a| Some(a.ip()) != self.own_ip)
            .collect();
        addrs.sort();
        addrs.dedup();
        addrs.truncate(MAX_PEERS);
        Ok(addrs.into_iter().map(|a| format!("http://{a}")).collect())
    }
}

/// Keeps `peers` to what `discovery` resolves to, every [`DISCOVERY_INTERVAL`], until
/// `shutdown`. A failed lookup keeps the last answer.
pub async fn discover(
    peers: Arc<Peers>,
    discovery: Discovery,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(DISCOVERY_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match discovery.resolve().await {
            Ok(urls) => {
                if urls != peers.urls() {
                    tracing::info!(peers = ?urls, "peers found");
                    peers.set_urls(urls);
                }
            }
            Err(e) => {
                tracing::warn!(name = %discovery.name, error = %e, "cannot look peers up; keeping the last answer")
            }
        }
    }
}

/// Why no peer gave a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMiss(pub Vec<String>);

impl std::fmt::Display for PeerMiss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no peer to ask (all banned for wrong bytes)");
        }
        f.write_str(&self.0.join("; "))
    }
}

/// What one peer did with a request.
enum Asked {
    Gave,
    Miss(String),
    /// Busy with other uploads (503, 429): ask again.
    Busy(String),
}

/// How long a peer busy with other uploads is waited for, outside a first wave.
const BUSY_PATIENCE: Duration = Duration::from_secs(30);

/// The pause before asking a busy peer again (its Retry-After).
const BUSY_WAIT: Duration = Duration::from_secs(1);

impl Peers {
    /// Peers at `urls` (`http://host:port`), asked with `secret`.
    pub fn new(urls: &[String], secret: PeerSecret) -> Result<Self, BadPeers> {
        let mut clean = Vec::new();
        for u in urls {
            let parsed = reqwest::Url::parse(u).map_err(|_| BadPeers::Url(u.clone()))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(BadPeers::Url(u.clone()));
            }
            let u = u.trim_end_matches('/').to_owned();
            if !clean.contains(&u) {
                clean.push(u);
            }
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("modelcache-peer/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(2))
            // A blob still downloading grows by a 16 MiB range at a time on the ranged path:
            // this waits for the next one at 560 KB/s and more; a slower owner is passed over.
            .read_timeout(Duration::from_secs(30))
            // Peers are in the cluster: a proxy from the environment must not carry the secret.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| BadPeers::Client(e.to_string()))?;
        Ok(Peers {
            urls: RwLock::new(clean),
            own: None,
            claims: Wanted::default(),
            secret,
            http,
            banned: Mutex::default(),
        })
    }

    /// This node serves its peers at `own` (as they know it): in a first wave it takes its
    /// share of blobs from the hub for them.
    pub fn with_own_url(mut self, own: Option<String>) -> Self {
        self.own = own;
        self
    }

    /// The blobs this node claims, for its peer server to tell.
    pub fn claims(&self) -> &Wanted {
        &self.claims
    }

    /// Records claims in `claims` (shared with a peer server made first).
    pub fn with_claims(mut self, claims: Wanted) -> Self {
        self.claims = claims;
        self
    }

    /// The peers' URLs now.
    pub fn urls(&self) -> Vec<String> {
        self.urls.read().expect("peers lock").clone()
    }

    /// Replaces the peers (a discovery's answer).
    pub fn set_urls(&self, urls: Vec<String>) {
        *self.urls.write().expect("peers lock") = urls;
    }

    /// The peers to ask for `hash`, best first: highest rendezvous score, banned ones left out.
    /// Every node orders a blob's peers alike, and different blobs differently.
    fn order(&self, hash: &ContentHash) -> Vec<String> {
        let mut banned = self.banned.lock().expect("bans lock");
        banned.retain(|_, until| *until > Instant::now());
        let mut scored: Vec<([u8; 32], String)> = self
            .urls()
            .into_iter()
            .filter(|u| !banned.contains_key(u) && Some(u) != self.own.as_ref())
            .map(|u| (score(&u, hash), u))
            .collect();
        scored.sort_by_key(|s| std::cmp::Reverse(s.0));
        scored.into_iter().map(|(_, u)| u).collect()
    }

    fn ban(&self, url: &str) {
        self.banned
            .lock()
            .expect("bans lock")
            .insert(url.to_owned(), Instant::now() + BAN);
    }

    /// What `url` holds and wants of `names`; None when it does not answer.
    async fn status(&self, url: &str, names: &[String]) -> Option<super::server::Status> {
        let req = super::server::StatusRequest {
            blobs: names.to_vec(),
        };
        let resp = self
            .http
            .post(format!("{url}/v1/status"))
            .header(reqwest::header::AUTHORIZATION, self.secret.bearer())
            .json(&req)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        // Bounded, as every JSON answer the agent reads.
        modelcache_hub::client::read_json(resp, url, "a peer's status")
            .await
            .ok()
    }

    /// Splits the blobs `missing` among the nodes that want them now: after [`SETTLE`] (when
    /// this node may own blobs), asks every peer what it holds, claims and wants. A blob a peer
    /// holds gets no owner (it is taken from a holder); one a peer claims (it is getting it from
    /// the hub) is owned by that peer. Any other blob goes to the highest rendezvous score among
    /// the peers that want it and this node: nodes that start within [`SETTLE`] of each other
    /// compute the same owners. This node then claims what it owns, so a node that starts later
    /// takes those from it.
    pub async fn plan_wave(&self, missing: &[ContentHash]) -> Wave {
        let peers = self.urls();
        if missing.is_empty() || peers.is_empty() {
            return Wave::default();
        }
        if self.own.is_some() {
            tokio::time::sleep(SETTLE).await;
        }
        let names: Vec<String> = missing.iter().map(ContentHash::file_name).collect();
        let asked = futures::future::join_all(peers.iter().map(|u| self.status(u, &names))).await;
        let mut holders: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut wanters: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut claimers: HashMap<&str, Vec<&str>> = HashMap::new();
        for (url, status) in peers.iter().zip(&asked) {
            let Some(status) = status else { continue };
            for name in &status.have {
                holders.entry(name.as_str()).or_default().push(url.as_str());
            }
            for name in &status.want {
                wanters.entry(name.as_str()).or_default().push(url.as_str());
            }
            for name in &status.claim {
                claimers
                    .entry(name.as_str())
                    .or_default()
                    .push(url.as_str());
            }
        }
        let mut wave = Wave::default();
        for (hash, name) in missing.iter().zip(&names) {
            if let Some(held) = holders.get(name.as_str()) {
                let held = held.iter().map(|u| (*u).to_owned()).collect();
                wave.holders.insert(hash.clone(), held);
                continue;
            }
            if let Some(claimed) = claimers.get(name.as_str())
                && let Some(best) = claimed.iter().max_by_key(|u| score(u, hash))
            {
                wave.owners
                    .insert(hash.clone(), Owner::Peer((*best).to_owned()));
                continue;
            }
            let mut candidates: Vec<&str> = wanters.get(name.as_str()).cloned().unwrap_or_default();
            let waiting = !candidates.is_empty();
            if let Some(own) = &self.own {
                candidates.push(own);
            }
            let Some(best) = candidates.into_iter().max_by_key(|u| score(u, hash)) else {
                continue;
            };
            let owner = match &self.own {
                Some(own) if own == best => {
                    if waiting {
                        wave.awaited.insert(hash.clone());
                    }
                    Owner::Me
                }
                _ => Owner::Peer(best.to_owned()),
            };
            wave.owners.insert(hash.clone(), owner);
        }
        let mine: Vec<ContentHash> = wave
            .owners
            .iter()
            .filter(|(_, o)| **o == Owner::Me)
            .map(|(h, _)| h.clone())
            .collect();
        tracing::info!(
            blobs = missing.len(),
            from_hub_here = mine.len(),
            from_peers = wave.owners.len() - mine.len(),
            "first wave split with peers"
        );
        wave._claims = Some(self.claims.hold(mine));
        wave
    }

    /// Makes `file`'s blob present from the first peer that has it with the right bytes: in
    /// a first wave, from its owner once the owner holds it (or from the hub, when this node
    /// owns it). `Ok(Err(miss))` when no peer gave it (the next tier is tried); `Err` when the
    /// store fails.
    pub async fn fetch(
        &self,
        store: &Arc<Store>,
        file: &PlannedFile,
        progress: &Progress,
        wave: &Wave,
    ) -> Result<Result<(), PeerMiss>, StoreError> {
        let mut misses = Vec::new();
        let mut asked_owner = None;
        match wave.owner(&file.hash) {
            Some(Owner::Me) => {
                return Ok(Err(PeerMiss(vec![
                    "this node gets it from the hub, for its peers too".into(),
                ])));
            }
            Some(Owner::Peer(owner)) => {
                // The owner sends what it has written as it downloads, and says "not started
                // yet" (503) until it starts: asked again until it gives it, or stops getting it.
                asked_owner = Some(owner.as_str());
                let until = Instant::now() + WAVE_WAIT;
                match self
                    .take_from(owner, store, file, progress, until, POLL)
                    .await?
                {
                    Asked::Gave => return Ok(Ok(())),
                    Asked::Miss(why) | Asked::Busy(why) => misses.push(format!("{owner}: {why}")),
                }
            }
            None => {}
        }
        let until = Instant::now() + BUSY_PATIENCE;
        // Those that hold it first: one that only wants it too has nothing to give yet.
        let mut order = self.order(&file.hash);
        if let Some(held) = wave.holders.get(&file.hash) {
            order.sort_by_key(|u| !held.contains(u));
        }
        for url in order {
            if Some(url.as_str()) == asked_owner {
                continue;
            }
            match self
                .take_from(&url, store, file, progress, until, BUSY_WAIT)
                .await?
            {
                Asked::Gave => return Ok(Ok(())),
                Asked::Miss(why) | Asked::Busy(why) => misses.push(format!("{url}: {why}")),
            }
        }
        Ok(Err(PeerMiss(misses)))
    }

    /// Asks `url` for `file` until it gives it or misses; a peer busy with other uploads is
    /// asked again a second later, until `until` (the hub is no better place for a blob a
    /// peer holds).
    async fn take_from(
        &self,
        url: &str,
        store: &Arc<Store>,
        file: &PlannedFile,
        progress: &Progress,
        until: Instant,
        pause: Duration,
    ) -> Result<Asked, StoreError> {
        loop {
            let counted = AtomicU64::new(0);
            let asked = self.ask(url, store, file, progress, &counted).await;
            progress.sub_done(counted.load(Ordering::Relaxed));
            match asked? {
                Asked::Gave => {
                    progress.record_peer_bytes(file.size);
                    tracing::debug!(file = %file.path, peer = url, bytes = file.size, "verified, from a peer");
                    return Ok(Asked::Gave);
                }
                Asked::Busy(_) if Instant::now() < until => tokio::time::sleep(pause).await,
                other => return Ok(other),
            }
        }
    }

    /// Asks one peer; wrong bytes ban it.
    async fn ask(
        &self,
        url: &str,
        store: &Arc<Store>,
        file: &PlannedFile,
        progress: &Progress,
        counted: &AtomicU64,
    ) -> Result<Asked, StoreError> {
        let resp = match self
            .http
            .get(format!("{url}{}", blob_path(&file.hash)))
            .header(reqwest::header::AUTHORIZATION, self.secret.bearer())
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return Ok(Asked::Miss(format!("unreachable ({e})"))),
        };
        match resp.status() {
            reqwest::StatusCode::OK => {}
            reqwest::StatusCode::NOT_FOUND => return Ok(Asked::Miss("does not hold it".into())),
            reqwest::StatusCode::UNAUTHORIZED => {
                tracing::warn!(
                    peer = url,
                    "a peer refused this node's peer secret: check that every agent has the same --peer-token-file"
                );
                return Ok(Asked::Miss("refused the peer secret".into()));
            }
            s @ (reqwest::StatusCode::SERVICE_UNAVAILABLE
            | reqwest::StatusCode::TOO_MANY_REQUESTS) => {
                return Ok(Asked::Busy(format!("busy ({s})")));
            }
            s => return Ok(Asked::Miss(format!("answered {s}"))),
        }
        let tmp = store.staging_file()?;
        let std_file = tmp
            .reopen()
            .map_err(|e| StoreError::from_io("reopen", tmp.path(), e))?;
        let mut out = tokio::io::BufWriter::with_capacity(
            super::TRANSFER_BUFFER,
            tokio::fs::File::from_std(std_file),
        );
        let mut hasher = Hasher::new(file.hash.algo(), file.size);
        let mut body = std::pin::pin!(resp.bytes_stream());
        let mut got = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => return Ok(Asked::Miss(format!("broke off after {got} bytes ({e})"))),
            };
            got += chunk.len() as u64;
            if got > file.size {
                self.ban(url);
                tracing::warn!(peer = url, file = %file.path, "a peer sent more bytes than the file holds; not asked again for a while");
                return Ok(Asked::Miss("sent too many bytes (banned)".into()));
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| StoreError::from_io("write", tmp.path(), e))?;
            progress.add_done(chunk.len() as u64);
            counted.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        out.flush()
            .await
            .map_err(|e| StoreError::from_io("write", tmp.path(), e))?;
        let actual = hasher.finish();
        if got != file.size || actual != file.hash {
            self.ban(url);
            tracing::warn!(peer = url, file = %file.path, expected = %file.hash, got = %actual, bytes = got, "a peer sent wrong bytes; not asked again for a while");
            return Ok(Asked::Miss("sent wrong bytes (banned)".into()));
        }
        let (store, hash) = (store.clone(), file.hash.clone());
        tokio::task::spawn_blocking(move || store.commit_blob(tmp, &hash))
            .await
            .expect("commit task does not panic")?;
        Ok(Asked::Gave)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::PeerServer;
    use modelcache_core::repo::RepoPath;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::atomic::AtomicUsize;

    const SECRET: &str = "the-cluster-secret-0123456789";

    fn secret() -> PeerSecret {
        PeerSecret::new(SECRET).unwrap()
    }

    /// A store holding one blob of `bytes`, served on loopback; its URL, the blob's file and the
    /// served-bytes counter.
    async fn serving(
        dir: &std::path::Path,
        bytes: &[u8],
        max_uploads: usize,
    ) -> (String, PlannedFile, Counter) {
        let store = Arc::new(Store::open(dir.join("a")).unwrap());
        let hash = crate::store::tests::put_blob(&store, bytes);
        let served = Counter::default();
        let server = PeerServer::new(
            store,
            Wanted::default(),
            Wanted::default(),
            secret(),
            max_uploads,
            served.clone(),
        );
        let url = spawn(server).await;
        let file = PlannedFile {
            path: RepoPath::parse("w.bin").unwrap(),
            hash,
            size: bytes.len() as u64,
        };
        (url, file, served)
    }

    /// Serves `server` on loopback; its URL.
    async fn spawn(server: PeerServer) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(server.serve(listener, tokio_util::sync::CancellationToken::new()));
        url
    }

    /// A peer server over `store` that wants and claims nothing.
    fn plain(store: Arc<Store>) -> PeerServer {
        PeerServer::new(
            store,
            Wanted::default(),
            Wanted::default(),
            secret(),
            8,
            Counter::default(),
        )
    }

    /// Fetches `file` through `peers` in `wave` into a new store at `dir`, where it must
    /// arrive; how long that took.
    async fn take(
        peers: &Peers,
        dir: &std::path::Path,
        file: &PlannedFile,
        wave: &Wave,
    ) -> Duration {
        let store = Arc::new(Store::open(dir).unwrap());
        let started = Instant::now();
        peers
            .fetch(&store, file, &Progress::default(), wave)
            .await
            .unwrap()
            .unwrap();
        assert!(store.has_blob(&file.hash));
        started.elapsed()
    }

    /// A plain HTTP client, for requests a peer would not make.
    fn test_client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    fn weights(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_blob_comes_verified_from_the_peer_that_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = weights(3 << 20);
        let (url, file, served) = serving(dir.path(), &bytes, 8).await;
        // A peer that is down is passed over.
        let peers = Peers::new(&["http://127.0.0.1:9".to_owned(), url], secret()).unwrap();
        let store = Arc::new(Store::open(dir.path().join("b")).unwrap());
        let progress = Progress::default();
        peers
            .fetch(&store, &file, &progress, &Wave::default())
            .await
            .unwrap()
            .unwrap();
        assert!(store.has_blob(&file.hash));
        assert_eq!(std::fs::read(store.blob_path(&file.hash)).unwrap(), bytes);
        let v = progress.view();
        assert_eq!((v.bytes_done, v.bytes_from_peers), (file.size, file.size));
        assert_eq!(served.get(), file.size);
    }

    #[tokio::test]
    async fn the_server_wants_the_secret_and_serves_blobs_only_by_hash_with_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = weights(1000);
        let (url, file, _) = serving(dir.path(), &bytes, 8).await;
        let http = test_client();
        let get = |path: String, auth: Option<&str>, range: Option<&str>| {
            let mut req = http.get(format!("{url}{path}"));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            if let Some(r) = range {
                req = req.header("range", r);
            }
            req.send()
        };
        let blob = blob_path(&file.hash);
        let ok = format!("Bearer {SECRET}");
        for auth in [
            None,
            Some("Bearer wrong-secret-but-long-enough"),
            Some(SECRET),
        ] {
            let r = get(blob.clone(), auth, None).await.unwrap();
            assert_eq!(r.status(), 401, "{auth:?}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
        }
        let r = get(blob.clone(), Some(&ok), None).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), bytes);
        let r = get(blob.clone(), Some(&ok), Some("bytes=10-19"))
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(r.headers()["content-range"], "bytes 10-19/1000");
        assert_eq!(r.bytes().await.unwrap(), bytes[10..20]);
        let r = get(blob.clone(), Some(&ok), Some("bytes=1000-"))
            .await
            .unwrap();
        assert_eq!(r.status(), 416);
        assert_eq!(r.headers()["content-range"], "bytes */1000");
        // Names, never paths: anything but <algo>-<hex> is refused, and an absent blob is 404.
        for bad in [
            "/v1/blobs/..%2F..%2Fetc%2Fpasswd",
            "/v1/blobs/sha256-XYZ",
            "/v1/blobs/snapshots",
        ] {
            let r = get(bad.to_owned(), Some(&ok), None).await.unwrap();
            assert_eq!(r.status(), 400, "{bad}");
        }
        let absent = format!("/v1/blobs/sha1-{}", "0".repeat(40));
        assert_eq!(get(absent, Some(&ok), None).await.unwrap().status(), 404);
        assert_eq!(
            get("/v1/other".into(), Some(&ok), None)
                .await
                .unwrap()
                .status(),
            404
        );
    }

    #[tokio::test]
    async fn uploads_past_the_cap_are_told_to_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let (url, file, _) = serving(dir.path(), &weights(32 << 20), 1).await;
        let http = test_client();
        let get = || {
            http.get(format!("{url}{}", blob_path(&file.hash)))
                .header("authorization", format!("Bearer {SECRET}"))
                .send()
        };
        // The first body is not read: its upload holds the one place.
        let first = get().await.unwrap();
        assert_eq!(first.status(), 200);
        let second = get().await.unwrap();
        assert_eq!(second.status(), 503);
        assert_eq!(second.headers()["retry-after"], "1");
        // A node that wants the blob waits for the busy peer rather than going to the hub.
        let peers = Peers::new(std::slice::from_ref(&url), secret()).unwrap();
        let b = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(b.path()).unwrap());
        let waiting = {
            let (store, file) = (store.clone(), file.clone());
            tokio::spawn(async move {
                peers
                    .fetch(&store, &file, &Progress::default(), &Wave::default())
                    .await
                    .unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!waiting.is_finished(), "the busy peer was given up on");
        drop(first);
        waiting.await.unwrap().unwrap();
        assert!(store.has_blob(&file.hash));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if get().await.unwrap().status() == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "the place was not given back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A peer that answers every blob with the wrong bytes.
    async fn liar(asked: Arc<AtomicUsize>) -> String {
        let app = axum::Router::new().fallback(move || {
            let asked = asked.clone();
            async move {
                asked.fetch_add(1, Ordering::Relaxed);
                vec![0u8; 1000]
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    #[tokio::test]
    async fn a_peer_that_sends_wrong_bytes_is_not_asked_again_and_nothing_it_sent_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = weights(1000);
        let (honest, file, _) = serving(dir.path(), &bytes, 8).await;
        let asked = Arc::new(AtomicUsize::new(0));
        let liar = liar(asked.clone()).await;
        let store = Arc::new(Store::open(dir.path().join("b")).unwrap());
        let progress = Progress::default();

        let alone = Peers::new(std::slice::from_ref(&liar), secret()).unwrap();
        let miss = alone
            .fetch(&store, &file, &progress, &Wave::default())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            miss.to_string().contains("sent wrong bytes (banned)"),
            "{miss}"
        );
        assert!(!store.has_blob(&file.hash));
        assert_eq!(progress.view().bytes_done, 0);
        // Banned: not asked again.
        let miss = alone
            .fetch(&store, &file, &progress, &Wave::default())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(miss, PeerMiss(vec![]));
        assert_eq!(asked.load(Ordering::Relaxed), 1);

        // With an honest peer beside it, the blob comes, whichever is asked first.
        let both = Peers::new(&[liar, honest], secret()).unwrap();
        both.fetch(&store, &file, &progress, &Wave::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(std::fs::read(store.blob_path(&file.hash)).unwrap(), bytes);
    }

    #[test]
    fn peers_are_urls_and_each_blob_has_its_own_order() {
        for bad in ["10.0.0.1:7475", "ftp://a", "http://", ""] {
            assert!(Peers::new(&[bad.to_owned()], secret()).is_err(), "{bad:?}");
        }
        let urls: Vec<String> = (0..8).map(|i| format!("http://10.0.0.{i}:7475")).collect();
        let peers = Peers::new(&urls, secret()).unwrap();
        let firsts: std::collections::BTreeSet<usize> = (0..64u32)
            .map(|i| {
                let h = ContentHash::new(
                    modelcache_core::hash::Algo::Sha256,
                    &hex::encode(Sha256::digest(i.to_le_bytes())),
                )
                .unwrap();
                let order = peers.order(&h);
                assert_eq!(order.len(), 8);
                assert_eq!(order, peers.order(&h), "the same order every time");
                urls.iter().position(|u| *u == order[0]).unwrap()
            })
            .collect();
        // 64 blobs spread over the 8 peers.
        assert!(firsts.len() >= 6, "{firsts:?}");
    }

    #[tokio::test]
    async fn discovery_finds_the_addresses_of_a_name_but_its_own() {
        let port = 7475;
        let d = Discovery {
            name: format!("localhost:{port}"),
            own_ip: None,
        };
        let found = d.resolve().await.unwrap();
        assert!(
            found.contains(&format!("http://127.0.0.1:{port}")),
            "{found:?}"
        );
        let d = Discovery {
            own_ip: Some("127.0.0.1".parse().unwrap()),
            ..d
        };
        let found = d.resolve().await.unwrap();
        assert!(!found.iter().any(|u| u.contains("127.0.0.1")), "{found:?}");
        // A discovery's answer replaces the list the order is taken from.
        let peers = Peers::new(&[], secret()).unwrap();
        assert!(peers.urls().is_empty());
        peers.set_urls(vec!["http://10.1.0.1:7475".into()]);
        let h = ContentHash::new(modelcache_core::hash::Algo::GitSha1, &"a".repeat(40)).unwrap();
        assert_eq!(peers.order(&h), ["http://10.1.0.1:7475"]);
    }

    /// A peer server over an empty store whose running fetch wants `hashes`: its URL, the
    /// guard of its wants, and its claims (to share with its client side).
    async fn wanting(
        dir: &std::path::Path,
        hashes: &[ContentHash],
    ) -> (String, crate::fetch::WantedGuard, Wanted) {
        let store = Arc::new(Store::open(dir).unwrap());
        let wanted = Wanted::default();
        let claims = Wanted::default();
        let guard = wanted.hold(hashes.iter().cloned());
        let server = PeerServer::new(
            store,
            wanted,
            claims.clone(),
            secret(),
            8,
            Counter::default(),
        );
        let url = spawn(server).await;
        (url, guard, claims)
    }

    #[tokio::test]
    async fn nodes_that_start_at_once_agree_who_gets_each_blob_and_later_ones_take_from_them() {
        let dir = tempfile::tempdir().unwrap();
        let hashes: Vec<ContentHash> = (0..40u32)
            .map(|i| {
                ContentHash::new(
                    modelcache_core::hash::Algo::Sha256,
                    &hex::encode(Sha256::digest(i.to_le_bytes())),
                )
                .unwrap()
            })
            .collect();
        // Three nodes, each serving and wanting the same blobs, planning at once.
        let mut nodes = Vec::new();
        for i in 0..3 {
            nodes.push(wanting(&dir.path().join(i.to_string()), &hashes).await);
        }
        let urls: Vec<String> = nodes.iter().map(|(u, _, _)| u.clone()).collect();
        let hashes = &hashes;
        let plans = (0..3).map(|i| {
            let others: Vec<String> = urls.iter().filter(|u| **u != urls[i]).cloned().collect();
            let peers = Peers::new(&others, secret())
                .unwrap()
                .with_own_url(Some(urls[i].clone()))
                .with_claims(nodes[i].2.clone());
            async move {
                let wave = peers.plan_wave(hashes).await;
                (peers, wave)
            }
        });
        let waves: Vec<(Peers, Wave)> = futures::future::join_all(plans).await;
        let mut per_node = [0; 3];
        for h in hashes {
            // Exactly one node owns it, and the others name that node.
            let owners: Vec<usize> = (0..3)
                .filter(|&i| waves[i].1.owner(h) == Some(&Owner::Me))
                .collect();
            assert_eq!(owners.len(), 1, "{h}");
            let owner = owners[0];
            per_node[owner] += 1;
            for i in (0..3).filter(|&i| i != owner) {
                assert_eq!(waves[i].1.owner(h), Some(&Owner::Peer(urls[owner].clone())));
            }
            // Its claim is told to peers while the fetch lasts.
            assert!(nodes[owner].2.contains(h));
        }
        // The work is split: each node gets some blobs from the hub.
        assert!(per_node.iter().all(|&n| n >= 5), "{per_node:?}");

        // A node that starts later, with a rendezvous score of its own, owns nothing: every
        // blob comes from the node that claimed it.
        let late = Peers::new(&urls, secret())
            .unwrap()
            .with_own_url(Some("http://127.0.0.1:1".into()));
        let wave = late.plan_wave(hashes).await;
        for h in hashes {
            let owner = (0..3)
                .find(|&i| waves[i].1.owner(h) == Some(&Owner::Me))
                .unwrap();
            assert_eq!(
                wave.owner(h),
                Some(&Owner::Peer(urls[owner].clone())),
                "{h}"
            );
        }
        // Once the fetches end, the claims go.
        drop(waves);
        assert!(hashes.iter().all(|h| !nodes[0].2.contains(h)));
    }

    #[tokio::test]
    async fn an_owner_that_does_not_answer_is_bypassed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = weights(1000);
        let (holder, file, _) = serving(dir.path(), &bytes, 8).await;
        let dead = "http://127.0.0.1:9".to_owned();
        let wave = Wave {
            owners: [(file.hash.clone(), Owner::Peer(dead.clone()))].into(),
            ..Wave::default()
        };
        let peers = Peers::new(&[dead, holder], secret()).unwrap();
        let took = take(&peers, &dir.path().join("b"), &file, &wave).await;
        assert!(took < Duration::from_secs(5), "{took:?}");
        // Alone, the miss says why, and the hub is next.
        let lone = Peers::new(&["http://127.0.0.1:9".to_owned()], secret()).unwrap();
        let other = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(other.path()).unwrap());
        let miss = lone
            .fetch(&store, &file, &Progress::default(), &wave)
            .await
            .unwrap()
            .unwrap_err();
        assert!(miss.to_string().contains("unreachable"), "{miss}");
    }

    /// Nodes that start a model a holder has: each asks the holder, not first the other
    /// newcomer, which wants the blob too and would say "not started yet" until it gave up.
    #[tokio::test]
    async fn a_blob_is_asked_first_of_the_peers_that_hold_it() {
        let dir = tempfile::tempdir().unwrap();
        let holder_store = Arc::new(Store::open(dir.path().join("h")).unwrap());
        // A blob for which the wanting peer comes first in rendezvous order (about one in two).
        let mut found = None;
        for i in 0..64usize {
            let bytes = weights(1000 + i);
            let hash = crate::store::tests::put_blob(&holder_store, &bytes);
            let (wanter, guard, _) = wanting(
                &dir.path().join(format!("w{i}")),
                std::slice::from_ref(&hash),
            )
            .await;
            let peers =
                Peers::new(&[wanter.clone(), "http://127.0.0.1:9".into()], secret()).unwrap();
            if peers.order(&hash)[0] == wanter {
                found = Some((bytes, hash, wanter, guard));
                break;
            }
        }
        let (bytes, hash, wanter, _wants) = found.expect("a blob the wanter ranks first for");
        let holder = spawn(plain(holder_store)).await;
        let peers = Peers::new(&[wanter, holder], secret()).unwrap();
        let file = PlannedFile {
            path: RepoPath::parse("w.bin").unwrap(),
            hash: hash.clone(),
            size: bytes.len() as u64,
        };
        let wave = peers.plan_wave(std::slice::from_ref(&hash)).await;
        let took = take(&peers, &dir.path().join("b"), &file, &wave).await;
        assert!(
            took < BUSY_WAIT,
            "took {took:?}: the wanting peer was asked first"
        );
    }

    #[tokio::test]
    async fn uploads_share_the_upload_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let bytes = weights(384 << 10);
        let hash = crate::store::tests::put_blob(&store, &bytes);
        let url = spawn(plain(store).with_upload_limit(Some(1 << 20))).await;
        let http = test_client();
        let started = Instant::now();
        let get = || async {
            http.get(format!("{url}{}", blob_path(&hash)))
                .header("authorization", format!("Bearer {SECRET}"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .len()
        };
        let (a, b) = tokio::join!(get(), get());
        assert_eq!((a, b), (384 << 10, 384 << 10));
        // 768 KiB at 1 MiB/s, the two uploads together.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(600), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn a_peer_that_dies_mid_transfer_is_passed_over_and_its_bytes_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = weights(1 << 20);
        let (honest, file, _) = serving(dir.path(), &bytes, 8).await;
        // Sends the first half of the right bytes, then the connection breaks.
        let half = bytes[..bytes.len() / 2].to_vec();
        let app = axum::Router::new().fallback(move || {
            let half = half.clone();
            async move {
                let stream = futures::stream::iter([
                    Ok::<_, std::io::Error>(bytes::Bytes::from(half)),
                    Err(std::io::Error::other("killed")),
                ]);
                axum::body::Body::from_stream(stream)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dying = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let store = Arc::new(Store::open(dir.path().join("b")).unwrap());
        let alone = Peers::new(std::slice::from_ref(&dying), secret()).unwrap();
        let progress = Progress::default();
        let miss = alone
            .fetch(&store, &file, &progress, &Wave::default())
            .await
            .unwrap()
            .unwrap_err();
        assert!(miss.to_string().contains("broke off"), "{miss}");
        assert_eq!(progress.view().bytes_done, 0);
        assert!(!store.has_blob(&file.hash));
        // Beside an honest peer, the blob comes whole.
        let both = Peers::new(&[dying, honest], secret()).unwrap();
        both.fetch(&store, &file, &progress, &Wave::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(std::fs::read(store.blob_path(&file.hash)).unwrap(), bytes);
        assert_eq!(progress.view().bytes_done, file.size);
    }

    /// A peer halfway through a download already sends the half it has, then the rest as it
    /// comes; a download that fails breaks the body off, and nothing is kept.
    #[tokio::test]
    async fn a_blob_still_downloading_is_served_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = weights(2 << 20);
        let h = {
            let mut h = modelcache_core::hash::Hasher::new(
                modelcache_core::hash::Algo::GitSha1,
                bytes.len() as u64,
            );
            h.update(&bytes);
            h.finish()
        };
        let file = PlannedFile {
            path: RepoPath::parse("w.bin").unwrap(),
            hash: h.clone(),
            size: bytes.len() as u64,
        };
        for fails in [false, true] {
            let a = Arc::new(Store::open(dir.path().join(format!("a-{fails}"))).unwrap());
            let growing = crate::fetch::Growing::default();
            let url = spawn(plain(a).with_growing(growing.clone())).await;
            let path = dir.path().join(format!("growing-{fails}"));
            let half = bytes.len() / 2;
            std::fs::write(&path, &bytes[..half]).unwrap();
            let grower = growing.start(&h, path.clone(), bytes.len() as u64);
            grower.grow(half as u64);
            let b = Arc::new(Store::open(dir.path().join(format!("b-{fails}"))).unwrap());
            let peers = Peers::new(std::slice::from_ref(&url), secret()).unwrap();
            let taking = {
                let (b, file) = (b.clone(), file.clone());
                tokio::spawn(async move {
                    peers
                        .fetch(&b, &file, &Progress::default(), &Wave::default())
                        .await
                        .unwrap()
                })
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!taking.is_finished(), "gave up on a growing blob");
            if fails {
                drop(grower);
                let miss = taking.await.unwrap().unwrap_err();
                assert!(miss.to_string().contains("broke off"), "{miss}");
                assert!(!b.has_blob(&h));
            } else {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                f.write_all(&bytes[half..]).unwrap();
                grower.grow(bytes.len() as u64);
                grower.done();
                taking.await.unwrap().unwrap();
                assert_eq!(std::fs::read(b.blob_path(&h)).unwrap(), bytes);
            }
        }
    }

    /// In a first wave every node follows the others' shares as they download: those
    /// uploads go at the download's pace and have places of their own, so a node with one
    /// upload place still feeds four followers (and a fifth is told to come back), and its
    /// upload place stays free for a blob it holds.
    #[tokio::test]
    async fn followers_of_a_blob_still_downloading_have_places_of_their_own() {
        use crate::peers::server::FOLLOWERS_PER_UPLOAD;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path().join("a")).unwrap());
        let held = weights(1 << 20);
        let held_hash = crate::store::tests::put_blob(&store, &held);
        let growing = crate::fetch::Growing::default();
        let server = PeerServer::new(
            store,
            Wanted::default(),
            Wanted::default(),
            secret(),
            1,
            Counter::default(),
        )
        .with_growing(growing.clone());
        let url = spawn(server).await;
        let path = dir.path().join("growing");
        std::fs::write(&path, weights(4096)).unwrap();
        let hash = ContentHash::new(
            modelcache_core::hash::Algo::Sha256,
            &hex::encode(Sha256::digest(b"a blob on its way")),
        )
        .unwrap();
        let grower = growing.start(&hash, path, 1 << 20);
        grower.grow(4096);
        let http = test_client();
        let get = |h: &ContentHash| {
            http.get(format!("{url}{}", blob_path(h)))
                .header("authorization", format!("Bearer {SECRET}"))
                .send()
        };
        // Bodies not read: each follower holds its place.
        let mut following = Vec::new();
        for _ in 0..FOLLOWERS_PER_UPLOAD {
            let r = get(&hash).await.unwrap();
            assert_eq!(r.status(), 200);
            following.push(r);
        }
        assert_eq!(get(&hash).await.unwrap().status(), 503);
        let whole = get(&held_hash).await.unwrap();
        assert_eq!(whole.status(), 200);
        assert_eq!(whole.bytes().await.unwrap().as_ref(), held.as_slice());
        drop(grower);
    }

    /// A peer's status answer is read up to a bound: a huge one counts as no answer.
    #[tokio::test]
    async fn a_huge_status_answer_is_no_answer() {
        let app = axum::Router::new().fallback(|| async {
            // Valid JSON, but for its size.
            let mut body = br#"{"want": [], "have": ["#.to_vec();
            body.resize(20 << 20, b' ');
            body.extend_from_slice(b"]}");
            body
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let peers = Peers::new(std::slice::from_ref(&url), secret()).unwrap();
        assert_eq!(peers.status(&url, &["x".into()]).await, None);
    }
}
