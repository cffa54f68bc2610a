//! Reading another Nix binary cache for `larder import`: a `file://` directory (what
//! `nix copy --to file://…` writes) or an `http(s)://` cache (any Nix binary cache server).
//!
//! The closure of the paths to import is collected from the source's narinfos; each NAR is then
//! streamed by the push pipeline ([`crate::push::execute`] with this module as its
//! [`NarSource`]): downloaded, its FileHash/FileSize checked against the source's narinfo,
//! decompressed, its NarHash/NarSize checked, recompressed for the target and uploaded, so
//! memory stays bounded whatever the NAR size. The server verifies the NAR once more.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::path::PathBuf;

use larder_nix::cache_info::CacheInfo;
use larder_nix::hash::Sha256Hasher;
use larder_nix::narinfo::NarInfo;
use larder_nix::store_path::{StorePath, STORE_DIR};

use crate::local_store::{LocalStoreError, PathInfo};
use crate::push::NarSource;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "unsupported source {0:?}\nhint: give a binary cache as file:///path/to/dir or \
         http(s)://host/cache"
    )]
    BadSource(String),
    #[error("cannot read {what} from {source_url}: {message}")]
    Read {
        source_url: String,
        what: String,
        message: String,
    },
    #[error("{source_url} is not a binary cache of {STORE_DIR}: its nix-cache-info says StoreDir: {store_dir}")]
    OtherStore {
        source_url: String,
        store_dir: String,
    },
    #[error("{source_url} has no narinfo for {path}{}", match referrer { Some(r) => format!(" (a reference of {r})"), None => String::new() })]
    NotInSource {
        source_url: String,
        path: String,
        referrer: Option<String>,
    },
    #[error("the narinfo of {path} in {source_url} is invalid: {message}")]
    BadNarinfo {
        source_url: String,
        path: String,
        message: String,
    },
}

/// A Nix binary cache to import from.
pub struct Source {
    kind: Kind,
    /// As the user gave it, for messages.
    url: String,
    /// For blocking reads of HTTP bodies from the push pipeline's threads.
    runtime: tokio::runtime::Handle,
    /// Where each path's file is and how to check it.
    nars: std::sync::Mutex<HashMap<String, NarLocation>>,
}

enum Kind {
    Dir(PathBuf),
    Http {
        client: reqwest::Client,
        base: String,
        token: Option<String>,
    },
}

#[derive(Clone)]
struct NarLocation {
    url: String,
    compression: String,
    file_hash: Option<larder_nix::hash::Sha256>,
    file_size: Option<u64>,
}

/// The compressions a NAR may come in.
const DECOMPRESSORS: [&str; 4] = ["none", "", "xz", "zstd"];

impl Source {
    /// `file:///dir`, `http://…` or `https://…`; `token` is sent as a Bearer token to HTTP
    /// sources (private caches).
    pub fn open(url: &str, token: Option<String>) -> Result<Self, ImportError> {
        let kind = if let Some(dir) = url.strip_prefix("file://") {
            let dir = dir.split('?').next().unwrap_or(dir);
            Kind::Dir(PathBuf::from(dir))
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let client = crate::api::http_builder()
                .map_err(|e| ImportError::BadSource(format!("{url}: {e}")))?
                .connect_timeout(std::time::Duration::from_secs(10))
                .build()
                .map_err(|e| ImportError::BadSource(format!("{url}: {e}")))?;
            Kind::Http {
                client,
                base: url.trim_end_matches('/').to_owned(),
                token,
            }
        } else {
            return Err(ImportError::BadSource(url.to_owned()));
        };
        Ok(Self {
            kind,
            url: url.to_owned(),
            runtime: tokio::runtime::Handle::current(),
            nars: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn read_err(&self, what: impl Into<String>, message: impl ToString) -> ImportError {
        ImportError::Read {
            source_url: self.url.clone(),
            what: what.into(),
            message: message.to_string(),
        }
    }

    /// A small file of the cache (`nix-cache-info`, a narinfo); `None` when it is not there.
    async fn small_file(&self, name: &str) -> Result<Option<String>, ImportError> {
        match &self.kind {
            Kind::Dir(dir) => match tokio::fs::read_to_string(dir.join(name)).await {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.read_err(name, e)),
            },
            Kind::Http {
                client,
                base,
                token,
            } => {
                let mut rb = client.get(format!("{base}/{name}"));
                if let Some(t) = token {
                    rb = rb.bearer_auth(t);
                }
                let resp = rb.send().await.map_err(|e| self.read_err(name, e))?;
                match resp.status().as_u16() {
                    200 => Ok(Some(resp.text().await.map_err(|e| self.read_err(name, e))?)),
                    404 | 403 | 410 => Ok(None),
                    401 => Err(self.read_err(
                        name,
                        "401 Unauthorized (a private cache: pass its token with --source-token)",
                    )),
                    s => Err(self.read_err(name, format!("HTTP {s}"))),
                }
            }
        }
    }

    /// Check `nix-cache-info`: the source must be a cache of `/nix/store`.
    pub async fn check(&self) -> Result<(), ImportError> {
        let text = self
            .small_file("nix-cache-info")
            .await?
            .ok_or_else(|| self.read_err("nix-cache-info", "not found: is this a binary cache?"))?;
        let info = CacheInfo::parse(&text).map_err(|e| self.read_err("nix-cache-info", e))?;
        if info.store_dir != STORE_DIR {
            return Err(ImportError::OtherStore {
                source_url: self.url.clone(),
                store_dir: info.store_dir,
            });
        }
        Ok(())
    }

    /// Every path a `file://` source has a narinfo for; `None` for HTTP (no listing exists).
    pub async fn list(&self) -> Result<Option<Vec<StorePath>>, ImportError> {
        let Kind::Dir(dir) = &self.kind else {
            return Ok(None);
        };
        let mut rd = tokio::fs::read_dir(dir)
            .await
            .map_err(|e| self.read_err(dir.display().to_string(), e))?;
        let mut hashes = Vec::new();
        while let Some(e) = rd
            .next_entry()
            .await
            .map_err(|e| self.read_err(dir.display().to_string(), e))?
        {
            let name = e.file_name();
            let Some(hash) = name.to_str().and_then(|n| n.strip_suffix(".narinfo")) else {
                continue;
            };
            if larder_nix::store_path::validate_hash_part(hash).is_ok() {
                hashes.push(hash.to_owned());
            }
        }
        hashes.sort();
        let mut paths = Vec::new();
        for h in hashes {
            paths.push(self.narinfo(&h, None).await?.store_path);
        }
        Ok(Some(paths))
    }

    async fn narinfo(&self, hash: &str, referrer: Option<&str>) -> Result<NarInfo, ImportError> {
        let name = format!("{hash}.narinfo");
        let text = self
            .small_file(&name)
            .await?
            .ok_or_else(|| ImportError::NotInSource {
                source_url: self.url.clone(),
                path: hash.to_owned(),
                referrer: referrer.map(str::to_owned),
            })?;
        let bad = |message: String| ImportError::BadNarinfo {
            source_url: self.url.clone(),
            path: hash.to_owned(),
            message,
        };
        let info = NarInfo::parse(&text).map_err(|e| bad(e.to_string()))?;
        if info.store_path.hash_part() != hash {
            return Err(bad(format!("it describes {}", info.store_path)));
        }
        if let Some(p) = larder_nix::narinfo::url_problem(&info.url) {
            return Err(bad(format!("URL {:?}: {p}", info.url)));
        }
        if info.url.starts_with('/') || info.url.split('/').any(|c| c == ".." || c == ".") {
            return Err(bad(format!("URL {:?} leaves the cache", info.url)));
        }
        if !DECOMPRESSORS.contains(&info.compression.as_str()) {
            return Err(bad(format!(
                "compression {:?} is not supported (xz, zstd and none are)",
                info.compression
            )));
        }
        Ok(info)
    }

    /// The closures of `roots` in the source, in dependency order (references first), as the
    /// push pipeline takes them.
    pub async fn closure(&self, roots: &[StorePath]) -> Result<Vec<PathInfo>, ImportError> {
        let mut infos: HashMap<String, NarInfo> = HashMap::new();
        let mut queue: VecDeque<(StorePath, Option<String>)> =
            roots.iter().map(|r| (r.clone(), None)).collect();
        let mut seen: HashSet<String> = HashSet::new();
        // Fetch narinfos 16 at a time.
        while !queue.is_empty() {
            let mut batch = Vec::new();
            while batch.len() < 16 {
                let Some((p, referrer)) = queue.pop_front() else {
                    break;
                };
                if seen.insert(p.hash_part()) {
                    batch.push((p, referrer));
                }
            }
            let fetched = futures::future::join_all(
                batch.iter().map(|(p, r)| self.narinfo_for(p, r.as_deref())),
            )
            .await;
            for r in fetched {
                let info = r?;
                for reference in &info.references {
                    if !seen.contains(&reference.hash_part()) {
                        queue.push_back((reference.clone(), Some(info.store_path.to_absolute())));
                    }
                }
                infos.insert(info.store_path.hash_part(), info);
            }
        }
        let mut locations = self.nars.lock().unwrap_or_else(|p| p.into_inner());
        for (h, i) in &infos {
            locations.insert(
                h.clone(),
                NarLocation {
                    url: i.url.clone(),
                    compression: i.compression.clone(),
                    file_hash: i.file_hash,
                    file_size: i.file_size,
                },
            );
        }
        drop(locations);
        Ok(dependency_order(infos))
    }

    async fn narinfo_for(
        &self,
        p: &StorePath,
        referrer: Option<&str>,
    ) -> Result<NarInfo, ImportError> {
        let info = self.narinfo(&p.hash_part(), referrer).await?;
        if info.store_path != *p {
            return Err(ImportError::BadNarinfo {
                source_url: self.url.clone(),
                path: p.to_absolute(),
                message: format!("it describes {}", info.store_path),
            });
        }
        Ok(info)
    }

    /// A blocking reader of the file at `url` (relative to the cache).
    fn open_file(&self, url: &str) -> Result<Box<dyn Read + Send>, String> {
        match &self.kind {
            Kind::Dir(dir) => std::fs::File::open(dir.join(url))
                .map(|f| Box::new(f) as Box<dyn Read + Send>)
                .map_err(|e| format!("cannot open {url}: {e}")),
            Kind::Http {
                client,
                base,
                token,
            } => {
                let mut rb = client.get(format!("{base}/{url}"));
                if let Some(t) = token {
                    rb = rb.bearer_auth(t);
                }
                let resp = self
                    .runtime
                    .block_on(rb.send())
                    .map_err(|e| format!("cannot fetch {url}: {e}"))?;
                if !resp.status().is_success() {
                    return Err(format!("cannot fetch {url}: HTTP {}", resp.status()));
                }
                Ok(Box::new(HttpReader {
                    runtime: self.runtime.clone(),
                    resp,
                    buf: bytes::Bytes::new(),
                }))
            }
        }
    }
}

/// Sort narinfos so that every path comes after its references (cycles other than
/// self-references cannot occur in a store).
fn dependency_order(mut infos: HashMap<String, NarInfo>) -> Vec<PathInfo> {
    let mut keys: Vec<String> = infos.keys().cloned().collect();
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    let mut state: HashMap<String, bool> = HashMap::new(); // false: visiting, true: done
    fn visit(
        k: &str,
        infos: &HashMap<String, NarInfo>,
        state: &mut HashMap<String, bool>,
        order: &mut Vec<String>,
    ) {
        if state.contains_key(k) {
            return;
        }
        state.insert(k.to_owned(), false);
        if let Some(i) = infos.get(k) {
            for r in &i.references {
                let h = r.hash_part();
                if h != k {
                    visit(&h, infos, state, order);
                }
            }
        }
        state.insert(k.to_owned(), true);
        order.push(k.to_owned());
    }
    let mut order = Vec::new();
    for k in &keys {
        visit(k, &infos, &mut state, &mut order);
    }
    for k in order {
        if let Some(i) = infos.remove(&k) {
            out.push(PathInfo {
                path: i.store_path,
                nar_hash: i.nar_hash,
                nar_size: i.nar_size,
                references: i.references,
                deriver: i.deriver,
                sigs: i.sigs.iter().map(ToString::to_string).collect(),
                ca: i.ca,
                registration_time: 0,
            });
        }
    }
    out
}

/// Reads a reqwest body from a blocking thread.
struct HttpReader {
    runtime: tokio::runtime::Handle,
    resp: reqwest::Response,
    buf: bytes::Bytes,
}

impl Read for HttpReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.runtime.block_on(self.resp.chunk()) {
                Ok(Some(b)) => self.buf = b,
                Ok(None) => return Ok(0),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

/// Hashes and counts what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256Hasher,
    n: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.hasher.update(&out[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

impl NarSource for Source {
    fn write_nar(&self, info: &PathInfo, out: &mut dyn Write) -> Result<(), LocalStoreError> {
        let fail = |message: String| LocalStoreError::Source {
            path: info.path.clone(),
            message,
        };
        let loc = self
            .nars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&info.path.hash_part())
            .cloned()
            .ok_or_else(|| fail("no narinfo was read for it".into()))?;
        let file = Hashing {
            inner: self.open_file(&loc.url).map_err(fail)?,
            hasher: Sha256Hasher::new(),
            n: 0,
        };
        let mut file = file;
        let mut nar_hasher = Sha256Hasher::new();
        let mut nar_size = 0u64;
        {
            let mut decoder: Box<dyn Read + '_> = match loc.compression.as_str() {
                "xz" => Box::new(xz2::read::XzDecoder::new_multi_decoder(&mut file)),
                "zstd" => Box::new(
                    zstd::stream::read::Decoder::new(&mut file)
                        .map_err(|e| fail(format!("{}: {e}", loc.url)))?,
                ),
                _ => Box::new(&mut file),
            };
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match decoder.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(fail(format!("reading {}: {e}", loc.url))),
                };
                nar_hasher.update(&buf[..n]);
                nar_size += n as u64;
                if nar_size > info.nar_size {
                    return Err(fail(format!(
                        "{} holds more than the {} bytes its narinfo says",
                        loc.url, info.nar_size
                    )));
                }
                out.write_all(&buf[..n])
                    .map_err(|source| LocalStoreError::Write {
                        path: info.path.clone(),
                        source,
                    })?;
            }
        }
        // The whole file counts for FileHash/FileSize, whatever the decoder left unread.
        io::copy(&mut file, &mut io::sink())
            .map_err(|e| fail(format!("reading {}: {e}", loc.url)))?;
        if let Some(size) = loc.file_size {
            if size != file.n {
                return Err(fail(format!(
                    "{} is {} bytes, its narinfo says FileSize {size}",
                    loc.url, file.n
                )));
            }
        }
        if let Some(h) = loc.file_hash {
            let got = file.hasher.finalize();
            if got != h {
                return Err(fail(format!(
                    "{} has hash {}, its narinfo says FileHash {}",
                    loc.url,
                    got.to_typed_nix32(),
                    h.to_typed_nix32()
                )));
            }
        }
        let got = nar_hasher.finalize();
        if got != info.nar_hash || nar_size != info.nar_size {
            return Err(fail(format!(
                "its NAR does not match its narinfo: {} ({nar_size} bytes), expected {} ({} bytes)",
                got.to_typed_nix32(),
                info.nar_hash.to_typed_nix32(),
                info.nar_size
            )));
        }
        Ok(())
    }
}
