//! The S3 backend: any S3-compatible object store (AWS S3, Garage, MinIO, Ceph RGW, …) through
//! the `object_store` crate, path-style addressing by default (what self-hosted stores expect).
//!
//! URL: `s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME[&addressing=path|virtual]`. Credentials
//! never appear in the URL: they come from [`OpenOptions::s3_credentials`] and are never
//! printed (`Secret`'s `Debug` and `Display` hide them; request errors name the method and
//! object URL only).
//!
//! Visibility: an object is written with one `PUT` (objects up to [`PART_SIZE`]) or a multipart
//! upload, which S3 makes visible only when it is completed; a failed multipart upload is
//! aborted. The upload runs in a task of its own, so a client hanging up mid-request cannot
//! leave it half done. Memory per upload is bounded by `(UPLOAD_CONCURRENCY + 1) ×` part size,
//! whatever the object's size.
//!
//! Failures: every request has bounded timeouts ([`CONNECT_TIMEOUT`], [`REQUEST_TIMEOUT`], and
//! for streamed downloads [`READ_TIMEOUT`] between two reads) and at most [`MAX_RETRIES`]
//! retries within [`RETRY_TIMEOUT`], so an unreachable store fails a request within seconds
//! ([`ObjectError::Unavailable`]) and a store that comes back is used again by the next request.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, FuturesUnordered};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore as _, ObjectStoreExt as _,
    PutPayload, RetryConfig,
};
use tokio::io::AsyncReadExt;

use super::{ListedObject, ObjectBody, ObjectError, OpenOptions};

/// Time to establish a connection to the store.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for the next bytes of a streamed download (no total limit: a large NAR
/// streamed to a slow client takes as long as the client needs).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest time of any other request (a `HEAD`, a `DELETE`, one upload part).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Retries of a failed request (connection errors, timeouts of idempotent requests, 5xx).
pub const MAX_RETRIES: usize = 2;
/// No retry starts later than this after the first attempt.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(10);
/// Objects up to this size are one `PUT`; larger ones a multipart upload with parts of this
/// size (more for objects above `PART_SIZE × MAX_PARTS`).
pub const PART_SIZE: usize = 8 << 20;
/// S3 allows 10 000 parts per upload; keep a margin.
const MAX_PARTS: u64 = 9_000;
/// Parts of one upload in flight at once.
pub const UPLOAD_CONCURRENCY: usize = 2;

/// A secret string: shown as `***` by `Debug`, and without a `Display`.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// S3 credentials: an access key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

/// A bucket (and key prefix) of an S3-compatible store.
#[derive(Debug, Clone)]
pub struct S3Objects {
    /// Client for everything but streamed downloads (every request has a total timeout).
    ops: Arc<AmazonS3>,
    /// Client for streamed downloads and presigned URLs (a timeout between reads only).
    reads: Arc<AmazonS3>,
    /// Key prefix inside the bucket, without a trailing `/`; empty for the bucket's root.
    prefix: String,
    staging: PathBuf,
    /// Whether the last request found the store unreachable (cleared by the next success):
    /// lets uploads be refused before their body is read while the store is down.
    down: Arc<AtomicBool>,
}

/// Builds the HTTP client with larder's timeouts: `object_store`'s own options only know a
/// total timeout, which would cut a long download short.
#[derive(Debug)]
struct Connector {
    total_timeout: Option<Duration>,
}

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("larder/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = self.total_timeout {
            builder = builder.timeout(t);
        }
        let client = builder.build().map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        })?;
        Ok(HttpClient::new(client))
    }
}

fn invalid(url: &str, reason: impl Into<String>) -> ObjectError {
    ObjectError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

/// What the URL says: bucket, prefix, endpoint, region, addressing.
#[derive(Debug, PartialEq, Eq)]
struct S3Url {
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    region: String,
    virtual_hosted: bool,
}

fn parse_url(raw: &str) -> Result<S3Url, ObjectError> {
    let url = url::Url::parse(raw).map_err(|e| invalid(raw, e.to_string()))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Do not echo the URL: it holds a secret.
        return Err(invalid(
            "s3://…",
            "credentials do not belong in the storage URL \
             (set s3_access_key_id and s3_secret_access_key, or AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY)",
        ));
    }
    let bucket = url.host_str().unwrap_or_default().to_owned();
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(invalid(
            raw,
            "expected s3://BUCKET (3 to 63 of a-z 0-9 . -)",
        ));
    }
    let prefix = url.path().trim_matches('/').to_owned();
    if !prefix.is_empty() && super::check_key(&prefix).is_err() {
        return Err(invalid(raw, "the key prefix may use a-z 0-9 / . _ - only"));
    }
    let mut parsed = S3Url {
        bucket,
        prefix,
        endpoint: None,
        region: "us-east-1".to_owned(),
        virtual_hosted: false,
    };
    for (k, v) in url.query_pairs() {
        match &*k {
            "endpoint" => {
                let e = url::Url::parse(&v).map_err(|_| invalid(raw, "endpoint is not a URL"))?;
                if !matches!(e.scheme(), "http" | "https") || e.host_str().is_none() {
                    return Err(invalid(raw, "endpoint must be an http:// or https:// URL"));
                }
                parsed.endpoint = Some(v.trim_end_matches('/').to_owned());
            }
            "region" => parsed.region = v.into_owned(),
            "addressing" => {
                parsed.virtual_hosted = match &*v {
                    "path" => false,
                    "virtual" => true,
                    _ => return Err(invalid(raw, "addressing is `path` or `virtual`")),
                }
            }
            other => {
                return Err(invalid(
                    raw,
                    format!("unknown parameter {other:?} (known: endpoint, region, addressing)"),
                ))
            }
        }
    }
    Ok(parsed)
}

/// Map an `object_store` error: a missing object is [`ObjectError::NotFound`]; anything else
/// means the store did not do what was asked (unreachable, timed out, 5xx after retries,
/// credentials refused) and the request may work later.
fn classify(op: &'static str, key: &str, e: object_store::Error) -> ObjectError {
    match e {
        object_store::Error::NotFound { .. } => ObjectError::NotFound(key.to_owned()),
        other => ObjectError::Unavailable {
            op,
            key: key.to_owned(),
            source: Box::new(Flat(other)),
        },
    }
}

/// An `object_store` error whose message already includes its causes: logged once, not
/// once more per level of its source chain.
#[derive(Debug)]
struct Flat(object_store::Error);

impl std::fmt::Display for Flat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Flat {}

fn local_io(op: &'static str, key: &str, e: std::io::Error) -> ObjectError {
    ObjectError::Io {
        key: format!("{key} ({op})"),
        source: e,
    }
}

impl S3Objects {
    pub fn open(raw: &str, options: OpenOptions) -> Result<Self, ObjectError> {
        let url = parse_url(raw)?;
        let creds = options.s3_credentials.ok_or_else(|| {
            ObjectError::Misconfigured(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                 s3_access_key_id and s3_secret_access_key in the config file"
                    .to_owned(),
            )
        })?;
        let build = |total_timeout| {
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(&url.bucket)
                .with_region(&url.region)
                .with_virtual_hosted_style_request(url.virtual_hosted)
                .with_access_key_id(&creds.access_key_id)
                .with_secret_access_key(creds.secret_access_key.expose())
                .with_retry(RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(1),
                        base: 2.,
                    },
                    max_retries: MAX_RETRIES,
                    retry_timeout: RETRY_TIMEOUT,
                })
                .with_http_connector(Connector { total_timeout });
            if let Some(endpoint) = &url.endpoint {
                b = b
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            b.build().map(Arc::new).map_err(|e| {
                ObjectError::Misconfigured(format!("cannot set up the S3 client: {e}"))
            })
        };
        std::fs::create_dir_all(&options.staging_dir).map_err(|source| ObjectError::Io {
            key: String::new(),
            source,
        })?;
        Ok(S3Objects {
            ops: build(Some(REQUEST_TIMEOUT))?,
            reads: build(None)?,
            prefix: url.prefix,
            staging: options.staging_dir,
            down: Arc::default(),
        })
    }

    /// Record how a request went (see `down`), passing its result through.
    pub(super) fn note<T>(&self, r: Result<T, ObjectError>) -> Result<T, ObjectError> {
        match &r {
            Err(e) if e.is_unavailable() => self.down.store(true, Ordering::Relaxed),
            Ok(_) => self.down.store(false, Ordering::Relaxed),
            Err(_) => {}
        }
        r
    }

    /// Cheap while the store answers (no request); once a request found it unreachable, a
    /// `ping` decides.
    pub(super) async fn check_available(&self) -> Result<(), ObjectError> {
        if !self.down.load(Ordering::Relaxed) {
            return Ok(());
        }
        let r = self.ping().await;
        self.note(r)
    }

    pub(super) fn staging_dir(&self) -> &Path {
        &self.staging
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    pub(super) async fn put_file(&self, key: &str, src: &Path) -> Result<(), ObjectError> {
        self.store_file(key, src, false).await
    }

    /// [`Self::put_file`] that uploads even when the object exists (a `PUT` replaces an
    /// object atomically).
    pub(super) async fn replace_file(&self, key: &str, src: &Path) -> Result<(), ObjectError> {
        self.store_file(key, src, true).await
    }

    async fn store_file(&self, key: &str, src: &Path, replace: bool) -> Result<(), ObjectError> {
        // The whole put (the existence check, the upload, consuming `src`) is a task of its
        // own, started at the first poll: cancelling the caller (a client hanging up) must not
        // stop an upload half-way, nor leave the staged file behind; it completes or is aborted.
        let store = self.ops.clone();
        let (path, k, file) = (self.path(key), key.to_owned(), src.to_owned());
        tokio::spawn(async move {
            if replace || !exists(&store, &path, &k).await? {
                upload(&store, &path, &k, &file).await?;
            }
            match tokio::fs::remove_file(&file).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(local_io("put", &k, e)),
                _ => Ok(()),
            }
        })
        .await
        .map_err(|e| local_io("put", key, std::io::Error::other(e)))?
    }

    pub(super) async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<ObjectBody, ObjectError> {
        let path = self.path(key);
        if let Some(r) = &range {
            if r.start >= r.end {
                // S3 cannot express an empty range: check the object exists, send nothing.
                self.ops
                    .head(&path)
                    .await
                    .map_err(|e| classify("head", key, e))?;
                return Ok(ObjectBody {
                    len: 0,
                    stream: futures::stream::empty().boxed(),
                });
            }
        }
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let res = self
            .reads
            .get_opts(&path, opts)
            .await
            .map_err(|e| classify("get", key, e))?;
        let len = res.range.end - res.range.start;
        let stream = res.into_stream().map_err(std::io::Error::other).boxed();
        Ok(ObjectBody { len, stream })
    }

    pub(super) async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        exists(&self.ops, &self.path(key), key).await
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        match self.ops.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify("delete", key, e)),
        }
    }

    pub(super) fn list(&self) -> BoxStream<'static, Result<ListedObject, ObjectError>> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        self.ops
            .list(prefix.as_ref())
            .map_err(|e| classify("list", "", e))
            .try_filter_map(move |meta| {
                let listed = meta
                    .location
                    .as_ref()
                    .strip_prefix(&strip)
                    .filter(|k| super::check_key(k).is_ok())
                    .map(|key| ListedObject {
                        key: key.to_owned(),
                        size: meta.size,
                        modified: meta.last_modified.into(),
                    });
                futures::future::ready(Ok(listed))
            })
            .boxed()
    }

    pub(super) async fn presigned_get(
        &self,
        key: &str,
        ttl: Duration,
    ) -> Result<String, ObjectError> {
        let url = self
            .reads
            .signed_url(http::Method::GET, &self.path(key), ttl)
            .await
            .map_err(|e| classify("presign", key, e))?;
        Ok(url.to_string())
    }

    /// List the (prefix of the) bucket. When that fails, a `HEAD` of a key never written
    /// tells an unreachable store from a wrong configuration (`object_store` reports a failed
    /// listing without its status, a `HEAD` with it).
    pub(super) async fn ping(&self) -> Result<(), ObjectError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let listed = match self.ops.list_with_delimiter(prefix.as_ref()).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        match self.ops.head(&self.path("larder-ping")).await {
            Err(
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. },
            ) => Err(ObjectError::Misconfigured(
                "the S3 credentials were rejected".to_owned(),
            )),
            // The store answers for objects but cannot list the bucket: it is not there.
            Ok(_) | Err(object_store::Error::NotFound { .. })
                if listed.to_string().contains("NoSuchBucket") =>
            {
                Err(ObjectError::Misconfigured(
                    "the bucket does not exist".to_owned(),
                ))
            }
            _ => Err(classify("list", "", listed)),
        }
    }
}

/// Read up to `n` bytes (less only at the end of the file).
async fn read_part(file: &mut tokio::fs::File, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    while buf.len() < n {
        let got = file
            .take((n - buf.len()) as u64)
            .read_to_end(&mut buf)
            .await?;
        if got == 0 {
            break;
        }
    }
    Ok(buf)
}

async fn exists(store: &AmazonS3, path: &ObjectPath, key: &str) -> Result<bool, ObjectError> {
    match store.head(path).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(classify("head", key, e)),
    }
}

async fn upload(
    store: &AmazonS3,
    path: &ObjectPath,
    key: &str,
    src: &Path,
) -> Result<(), ObjectError> {
    let io = |e| local_io("put", key, e);
    let mut file = tokio::fs::File::open(src).await.map_err(io)?;
    let size = file.metadata().await.map_err(io)?.len();
    if size <= PART_SIZE as u64 {
        let data = read_part(&mut file, PART_SIZE).await.map_err(io)?;
        store
            .put(path, PutPayload::from(data))
            .await
            .map_err(|e| classify("put", key, e))?;
        return Ok(());
    }
    let part_size = (PART_SIZE as u64).max(size.div_ceil(MAX_PARTS)) as usize;
    let mut up = store
        .put_multipart(path)
        .await
        .map_err(|e| classify("put", key, e))?;
    let result = async {
        let mut in_flight: FuturesUnordered<object_store::UploadPart> = FuturesUnordered::new();
        loop {
            let part = read_part(&mut file, part_size).await.map_err(io)?;
            if part.is_empty() {
                break;
            }
            while in_flight.len() >= UPLOAD_CONCURRENCY {
                if let Some(r) = in_flight.next().await {
                    let r: object_store::Result<()> = r;
                    r.map_err(|e| classify("put", key, e))?;
                }
            }
            let last = part.len() < part_size;
            in_flight.push(up.put_part(PutPayload::from(part)));
            if last {
                break;
            }
        }
        while let Some(r) = in_flight.next().await {
            r.map_err(|e| classify("put", key, e))?;
        }
        up.complete()
            .await
            .map_err(|e| classify("put", key, e))
            .map(|_| ())
    }
    .await;
    if result.is_err() {
        // Parts of an aborted upload are freed; nothing was ever visible.
        let _ = up.abort().await;
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("s3://nars?endpoint=http://127.0.0.1:3900&region=garage").unwrap();
        assert_eq!(
            u,
            S3Url {
                bucket: "nars".into(),
                prefix: String::new(),
                endpoint: Some("http://127.0.0.1:3900".into()),
                region: "garage".into(),
                virtual_hosted: false,
            }
        );
        let u = parse_url("s3://my.bucket/larder/prod/?addressing=virtual").unwrap();
        assert_eq!(u.prefix, "larder/prod");
        assert!(u.virtual_hosted);
        assert_eq!(u.region, "us-east-1");
        for bad in [
            "s3://ab",
            "s3://Bucket",
            "s3://bucket?endpointt=x",
            "s3://bucket?endpoint=ftp://x",
            "s3://bucket/Prefix",
            "s3://bucket?addressing=sideways",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
        let e = parse_url("s3://AKIA:hunter2@bucket")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2") && !e.contains("AKIA"), "{e}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = S3Credentials {
            access_key_id: "GK1".into(),
            secret_access_key: Secret::new("hunter2"),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn missing_credentials_are_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = S3Objects::open(
            "s3://nars?endpoint=http://127.0.0.1:1",
            OpenOptions {
                staging_dir: dir.path().to_owned(),
                s3_credentials: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
    }
}
