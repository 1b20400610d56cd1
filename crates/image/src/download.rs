//! Verified downloads into Lima's download cache.
//!
//! One URL has one directory, `<lima download cache>/by-url-sha256/<sha256(url)>/`, laid out
//! as Lima lays it out, so Lima and Colima reuse what vmoat fetched and the other way round:
//!
//! ```text
//! data            the file as served (a .gz stays compressed)
//! data.part       an interrupted download, resumed with an HTTP Range request
//! url             the URL
//! time type etag  the Last-Modified, Content-Type and ETag response headers
//! sha512.digest   `sha512:<hex>`, written once `data` was verified
//! ```
//!
//! The directory is locked with `flock` for the whole fetch, as Lima does, so two VMs created
//! at once (in vmoat, Lima or Colima) download once. sha512 is computed while streaming; a
//! mismatch removes the download. `data` appears only by a rename after verification, so
//! nothing a later run would trust is left behind by a failure or a kill. A verified `data`
//! gets vmoat's stamp (`vmoat-verified.json`: digest, size, mtime, inode); while the stamp
//! holds it is trusted without re-reading, and any change makes vmoat re-hash it and, if it
//! does not match, fetch it again.
//!
//! The caller may ask for a second copy, unpacked: a `.gz` is gunzipped with flate2 in the
//! same pass (other files are copied), written sparse.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha512};

use crate::digest::{Stamp, is_sha512_hex, sha512_file};
use crate::error::ImageError;
use crate::paths::lima_entry_dir;
use crate::progress::Progress;

/// Names of the files in one cache entry.
const DATA: &str = "data";
const PART: &str = "data.part";
const URL: &str = "url";
const TIME: &str = "time";
const TYPE: &str = "type";
const ETAG_FILE: &str = "etag";
const DIGEST: &str = "sha512.digest";
const STAMP: &str = "vmoat-verified.json";

/// Largest `.sha512sum` file vmoat reads.
const CHECKSUM_FILE_MAX: usize = 64 * 1024;

/// Batches in flight between the network and the writer thread.
const PIPELINE_DEPTH: usize = 8;

/// Bytes per batch handed to the writer thread (one write, one hash update).
const BATCH: usize = 1 << 20;

/// What to fetch.
#[derive(Clone, Copy, Debug)]
pub struct FetchRequest<'a> {
    /// The URL (redirects are followed; the cache is keyed by this URL).
    pub url: &'a str,
    /// The expected sha512 in hex; `None` reads `<url>.sha512sum`.
    pub sha512: Option<&'a str>,
    /// Also write an unpacked copy here (gunzipped when the URL ends in `.gz`).
    pub unpack_to: Option<&'a Path>,
}

/// How a fetch was satisfied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The cache already held a verified copy.
    Cached,
    /// Bytes came over the network.
    Downloaded {
        /// Bytes transferred in this run.
        transferred: u64,
        /// Bytes of an earlier interrupted download that were kept.
        resumed_from: u64,
    },
}

/// A verified file in Lima's cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The cached file (`…/data`).
    pub data: PathBuf,
    /// Its sha512 in hex.
    pub sha512: String,
    /// How it was obtained.
    pub outcome: Outcome,
    /// Size of the unpacked copy, when one was asked for.
    pub unpacked_size: Option<u64>,
}

/// vmoat's record that `data` was verified.
#[derive(Debug, Serialize, Deserialize)]
struct VerifiedStamp {
    sha512: String,
    stamp: Stamp,
}

/// Downloads into one Lima download cache.
#[derive(Clone, Debug)]
pub struct Fetcher {
    download_cache: PathBuf,
}

impl Fetcher {
    /// A fetcher for the Lima download cache at `download_cache` (`…/lima/download`).
    pub fn new(download_cache: impl Into<PathBuf>) -> Fetcher {
        Fetcher {
            download_cache: download_cache.into(),
        }
    }

    /// The cache directory of `url`.
    pub fn entry_dir(&self, url: &str) -> PathBuf {
        lima_entry_dir(&self.download_cache, url)
    }

    /// Returns a verified copy of `request.url` from the cache, or downloads it.
    pub async fn fetch(
        &self,
        request: FetchRequest<'_>,
        progress: &Progress,
    ) -> Result<Fetched, ImageError> {
        let url = request.url;
        let dir = self.entry_dir(url);
        create_private_dir(&dir)?;
        let _lock = lock_dir(&dir).await?;

        let expected = match request.sha512 {
            Some(digest) if is_sha512_hex(digest) => digest.to_ascii_lowercase(),
            Some(other) => {
                return Err(ImageError::ChecksumFile {
                    url: url.to_owned(),
                    reason: format!("`{other}` is not a sha512 digest"),
                });
            }
            None => checksum_file(url).await?,
        };

        if let Some(data) = trusted_data(&dir, &expected, progress)? {
            let unpacked_size = match request.unpack_to {
                Some(out) => Some(unpack_local(&data, out, url, &expected, progress).await?),
                None => None,
            };
            return Ok(Fetched {
                data,
                sha512: expected,
                outcome: Outcome::Cached,
                unpacked_size,
            });
        }

        download(&dir, url, &expected, request.unpack_to, progress).await
    }
}

/// Creates a cache directory (0700 like Lima's, parents as needed).
fn create_private_dir(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ImageError::io("create", dir, e))
}

/// Takes the exclusive `flock` on a directory (Lima's lock on a cache entry); released when
/// the returned handle is dropped.
pub(crate) async fn lock_dir(dir: &Path) -> Result<File, ImageError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let file = File::open(&dir).map_err(|e| ImageError::io("open", &dir, e))?;
        file.lock().map_err(|e| ImageError::io("lock", &dir, e))?;
        Ok(file)
    })
    .await
    .expect("lock task does not panic")
}

/// Reads the sha512 from `<url>.sha512sum` (`<hex>  <file name>`).
async fn checksum_file(url: &str) -> Result<String, ImageError> {
    let sum_url = format!("{url}.sha512sum");
    let response = client(&sum_url)?
        .get(&sum_url)
        .send()
        .await
        .map_err(|source| ImageError::Unreachable {
            url: sum_url.clone(),
            source,
        })?;
    if !response.status().is_success() {
        return Err(ImageError::HttpStatus {
            url: response.url().to_string(),
            status: response.status().as_u16(),
        });
    }
    let body = response
        .bytes()
        .await
        .map_err(|source| ImageError::Unreachable {
            url: sum_url.clone(),
            source,
        })?;
    if body.len() > CHECKSUM_FILE_MAX {
        return Err(ImageError::ChecksumFile {
            url: sum_url,
            reason: format!("{} bytes is too large for a checksum file", body.len()),
        });
    }

    let text = String::from_utf8_lossy(&body);
    match text.split_whitespace().next() {
        Some(token) if is_sha512_hex(token) => Ok(token.to_ascii_lowercase()),
        Some(token) => Err(ImageError::ChecksumFile {
            url: sum_url,
            reason: format!("its first word `{token:.40}` is not 128 hex digits"),
        }),
        None => Err(ImageError::ChecksumFile {
            url: sum_url,
            reason: "it is empty".to_owned(),
        }),
    }
}

/// An HTTP client for `url`: redirects followed, timeouts on connect and on stalls, and no
/// proxy for loopback addresses (a proxy could not reach this host's own servers).
fn client(url: &str) -> Result<reqwest::Client, ImageError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("vmoat/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::limited(10))
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60));
    if is_loopback_url(url) {
        builder = builder.no_proxy();
    }
    builder.build().map_err(ImageError::Client)
}

fn is_loopback_url(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    let host = parsed.host_str().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `data` if the cache entry holds a verified copy with this digest. A copy with another
/// digest, or one that fails the check, is removed so that it is fetched again.
fn trusted_data(
    dir: &Path,
    expected: &str,
    progress: &Progress,
) -> Result<Option<PathBuf>, ImageError> {
    let data = dir.join(DATA);
    let digest_file = dir.join(DIGEST);
    let stamp_file = dir.join(STAMP);
    if !data.is_file() {
        return Ok(None);
    }

    // Lima's digest file says which version `data` is; another version is stale.
    let want = format!("sha512:{expected}");
    if let Ok(recorded) = fs::read_to_string(&digest_file)
        && recorded.trim() != want
    {
        tracing::info!(dir = %dir.display(), "cached image is another version; fetching again");
        remove_entry_data(dir)?;
        return Ok(None);
    }

    // vmoat's stamp: unchanged since verified, so trusted without reading it.
    if let Ok(text) = fs::read_to_string(&stamp_file)
        && let Ok(stamp) = serde_json::from_str::<VerifiedStamp>(&text)
        && stamp.sha512 == expected
        && stamp.stamp.matches(&data)
    {
        return Ok(Some(data));
    }

    progress.note(&format!("verifying the cached {}", data.display()));
    let actual = sha512_file(&data)?;
    if actual != expected {
        tracing::warn!(
            file = %data.display(),
            "cached image is corrupt (sha512 {actual:.16}…, expected {expected:.16}…); \
             fetching it again"
        );
        progress.note(&format!("{} is corrupt; fetching it again", data.display()));
        remove_entry_data(dir)?;
        return Ok(None);
    }

    write_file(&digest_file, want.as_bytes())?;
    write_stamp(dir, expected)?;
    Ok(Some(data))
}

/// Removes a cache entry's data and everything that vouches for it.
fn remove_entry_data(dir: &Path) -> Result<(), ImageError> {
    for name in [DIGEST, STAMP, DATA] {
        remove_if_exists(&dir.join(name))?;
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<(), ImageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ImageError::io("remove", path, e)),
        _ => Ok(()),
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    fs::write(path, bytes).map_err(|e| ImageError::io("write", path, e))
}

fn write_stamp(dir: &Path, sha512: &str) -> Result<(), ImageError> {
    let record = VerifiedStamp {
        sha512: sha512.to_owned(),
        stamp: Stamp::of(&dir.join(DATA))?,
    };
    let path = dir.join(STAMP);
    let tmp = dir.join(format!("{STAMP}.tmp"));
    write_file(&tmp, &serde_json::to_vec(&record).expect("plain data"))?;
    fs::rename(&tmp, &path).map_err(|e| ImageError::io("rename", &tmp, e))
}

/// Downloads `url` into the entry `dir`, resuming `data.part` when there is one.
async fn download(
    dir: &Path,
    url: &str,
    expected: &str,
    unpack_to: Option<&Path>,
    progress: &Progress,
) -> Result<Fetched, ImageError> {
    let part = dir.join(PART);
    let http = client(url)?;
    write_file(&dir.join(URL), url.as_bytes())?;

    // At most two rounds: a refused or mismatched resume falls back to a fresh download.
    let mut offset = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    for _ in 0..2 {
        let mut get = http.get(url);
        if offset > 0 {
            get = get.header(RANGE, format!("bytes={offset}-"));
            if let Some(validator) = if_range_validator(dir) {
                get = get.header(IF_RANGE, validator);
            }
        }
        let response = get.send().await.map_err(|source| ImageError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
        let status = response.status();

        let resuming = match status {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                if content_range_start(&response) != Some(offset) {
                    tracing::info!(url, "server resumed at another offset; starting over");
                    remove_if_exists(&part)?;
                    offset = 0;
                    continue;
                }
                true
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                // The partial file may already be whole (killed just before the rename).
                if sha512_file(&part)? == expected {
                    return finish_whole_partial(dir, url, expected, unpack_to, progress).await;
                }
                remove_if_exists(&part)?;
                offset = 0;
                continue;
            }
            s if s.is_success() => {
                offset = 0;
                false
            }
            s => {
                remove_if_exists(&part)?;
                return Err(ImageError::HttpStatus {
                    url: response.url().to_string(),
                    status: s.as_u16(),
                });
            }
        };

        write_metadata(dir, &response)?;
        let total = response.content_length().map(|len| len + offset);
        let what = format!("downloading {}", file_name(url));
        if resuming {
            progress.note(&format!(
                "resuming {} at {}",
                file_name(url),
                crate::progress::human_bytes(offset)
            ));
        }
        let task = progress.bytes(&what, total, offset);

        // Kept bytes that do not unpack or do not verify after a resume are discarded, and one
        // clean download from the start decides (a server may have ignored If-Range).
        let restart = |why: &str| -> Result<(), ImageError> {
            remove_if_exists(&part)?;
            discard_unpacked(unpack_to);
            progress.note(&format!(
                "{} {why} after resuming; starting over",
                file_name(url)
            ));
            Ok(())
        };

        let writer = match Writer::open(&part, resuming, offset, unpack_to, url) {
            Err(ImageError::Unpack { .. }) if resuming => {
                restart("did not unpack")?;
                offset = 0;
                continue;
            }
            other => other?,
        };
        let (received, result) = stream_into(response, writer, task).await;
        let mut state = match result {
            Ok(state) => state,
            Err(StreamError::Network(source)) => {
                discard_unpacked(unpack_to);
                return Err(ImageError::Interrupted {
                    url: url.to_owned(),
                    received: offset + received,
                    source,
                });
            }
            Err(StreamError::Local(ImageError::Unpack { .. })) if resuming => {
                restart("did not unpack")?;
                offset = 0;
                continue;
            }
            Err(StreamError::Local(err)) => {
                discard_unpacked(unpack_to);
                return Err(err);
            }
        };

        let actual = hex::encode(state.hasher.finalize_reset());
        if actual != expected {
            drop(state);
            if resuming {
                restart("did not verify")?;
                offset = 0;
                continue;
            }
            remove_if_exists(&part)?;
            discard_unpacked(unpack_to);
            return Err(ImageError::DigestMismatch {
                url: url.to_owned(),
                expected: expected.to_owned(),
                actual,
            });
        }
        let unpacked_size = state.finish()?;

        let data = promote_partial(dir, expected)?;
        return Ok(Fetched {
            data,
            sha512: expected.to_owned(),
            outcome: Outcome::Downloaded {
                transferred: received,
                resumed_from: offset,
            },
            unpacked_size,
        });
    }

    Err(ImageError::HttpStatus {
        url: url.to_owned(),
        status: StatusCode::RANGE_NOT_SATISFIABLE.as_u16(),
    })
}

/// Renames a verified `data.part` to `data` and records its digest (Lima's file) and stamp.
fn promote_partial(dir: &Path, expected: &str) -> Result<PathBuf, ImageError> {
    let part = dir.join(PART);
    let data = dir.join(DATA);
    fs::rename(&part, &data).map_err(|e| ImageError::io("rename", &part, e))?;
    write_file(&dir.join(DIGEST), format!("sha512:{expected}").as_bytes())?;
    write_stamp(dir, expected)?;
    Ok(data)
}

/// A partial file that turned out whole: move it into place and unpack it from disk.
async fn finish_whole_partial(
    dir: &Path,
    url: &str,
    expected: &str,
    unpack_to: Option<&Path>,
    progress: &Progress,
) -> Result<Fetched, ImageError> {
    let data = promote_partial(dir, expected)?;
    let unpacked_size = match unpack_to {
        Some(out) => Some(unpack_local(&data, out, url, expected, progress).await?),
        None => None,
    };
    Ok(Fetched {
        data,
        sha512: expected.to_owned(),
        outcome: Outcome::Downloaded {
            transferred: 0,
            resumed_from: 0,
        },
        unpacked_size,
    })
}

fn discard_unpacked(unpack_to: Option<&Path>) {
    if let Some(out) = unpack_to {
        let _ = fs::remove_file(out);
    }
}

/// `If-Range` for a resume: the ETag if the server gave one, else Last-Modified.
fn if_range_validator(dir: &Path) -> Option<String> {
    [ETAG_FILE, TIME]
        .iter()
        .filter_map(|name| fs::read_to_string(dir.join(name)).ok())
        .map(|v| v.trim().to_owned())
        .find(|v| !v.is_empty())
}

/// The first byte of a `Content-Range: bytes A-B/N` header.
fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

/// Writes Lima's `time`, `type` and `etag` files from the response headers.
fn write_metadata(dir: &Path, response: &reqwest::Response) -> Result<(), ImageError> {
    for (name, header) in [
        (TIME, LAST_MODIFIED),
        (TYPE, CONTENT_TYPE),
        (ETAG_FILE, ETAG),
    ] {
        let value = response
            .headers()
            .get(header)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        write_file(&dir.join(name), value.as_bytes())?;
    }
    Ok(())
}

fn file_name(url: &str) -> &str {
    url.rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(url)
}

/// Where streaming failed.
enum StreamError {
    /// The connection broke; the partial file is kept for a resume.
    Network(reqwest::Error),
    /// Writing, hashing or unpacking failed.
    Local(ImageError),
}

/// Streams the response body into the writer, which runs on a blocking thread so that disk
/// writes, sha512 and gunzip overlap with the network. Returns the bytes received.
async fn stream_into(
    mut response: reqwest::Response,
    writer: Writer,
    mut task: crate::progress::BytesTask,
) -> (u64, Result<Writer, StreamError>) {
    // Three stages overlap: the network here, disk writes (and unpacking) on one thread,
    // sha512 on another. Batches are shared, not copied, between the two threads.
    let mut writer = writer;
    let mut hasher = std::mem::take(&mut writer.hasher);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(PIPELINE_DEPTH);
    let (hash_tx, mut hash_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(PIPELINE_DEPTH);
    let worker = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = rx.blocking_recv() {
            writer.write(&chunk)?;
        }
        writer.flush()?;
        Ok::<Writer, ImageError>(writer)
    });
    let hash_worker = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = hash_rx.blocking_recv() {
            hasher.update(&chunk);
        }
        hasher
    });
    let send = |batch: bytes::Bytes| {
        let (tx, hash_tx) = (tx.clone(), hash_tx.clone());
        async move { tx.send(batch.clone()).await.is_ok() && hash_tx.send(batch).await.is_ok() }
    };

    // Chunks are a few KiB; batching them into large writes saves syscalls and channel hops.
    let mut batch = bytes::BytesMut::with_capacity(BATCH);
    let mut received = 0u64;
    let mut network_error = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                received += chunk.len() as u64;
                task.inc(chunk.len() as u64);
                batch.extend_from_slice(&chunk);
                if batch.len() >= BATCH && !send(batch.split().freeze()).await {
                    break; // the writer failed; its error is returned below
                }
            }
            Ok(None) => break,
            Err(err) => {
                network_error = Some(err);
                break;
            }
        }
    }
    // What arrived before a break-off still goes to disk, for a later resume.
    if !batch.is_empty() {
        send(batch.freeze()).await;
    }
    drop((tx, hash_tx));

    let hashed = hash_worker.await.expect("hash thread does not panic");
    let written = worker
        .await
        .expect("writer thread does not panic")
        .map(|mut writer| {
            writer.hasher = hashed;
            writer
        });
    let result = match (network_error, written) {
        (_, Err(local)) => Err(StreamError::Local(local)),
        (Some(net), Ok(_)) => Err(StreamError::Network(net)),
        (None, Ok(writer)) => Ok(writer),
    };
    if result.is_ok() {
        task.finish("downloaded");
    }
    (received, result)
}

/// Receives the bytes of a download: the partial file, the hash and the unpacked copy.
struct Writer {
    file: File,
    part: PathBuf,
    hasher: Sha512,
    sink: Option<Sink>,
}

impl Writer {
    /// Opens the partial file; when resuming, re-reads its first `offset` bytes into the hash
    /// and the unpacked copy so both stay one continuous pass.
    fn open(
        part: &Path,
        resuming: bool,
        offset: u64,
        unpack_to: Option<&Path>,
        url: &str,
    ) -> Result<Writer, ImageError> {
        let mut sink = unpack_to
            .map(|out| Sink::create(out, url.ends_with(".gz"), url))
            .transpose()?;
        let mut hasher = Sha512::new();

        let file = if resuming {
            let mut existing = File::open(part).map_err(|e| ImageError::io("open", part, e))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = offset;
            while left > 0 {
                let want = buf.len().min(left as usize);
                existing
                    .read_exact(&mut buf[..want])
                    .map_err(|e| ImageError::io("read", part, e))?;
                hasher.update(&buf[..want]);
                if let Some(sink) = &mut sink {
                    sink.write(&buf[..want])?;
                }
                left -= want as u64;
            }
            let mut file = OpenOptions::new()
                .write(true)
                .open(part)
                .map_err(|e| ImageError::io("open", part, e))?;
            file.set_len(offset)
                .and_then(|()| file.seek(SeekFrom::End(0)).map(|_| ()))
                .map_err(|e| ImageError::io("extend", part, e))?;
            file
        } else {
            File::create(part).map_err(|e| ImageError::io("create", part, e))?
        };

        Ok(Writer {
            file,
            part: part.to_owned(),
            hasher,
            sink,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.file
            .write_all(bytes)
            .map_err(|e| ImageError::io("write", &self.part, e))?;
        if let Some(sink) = &mut self.sink {
            sink.write(bytes)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        self.file
            .sync_all()
            .map_err(|e| ImageError::io("sync", &self.part, e))
    }

    /// Completes the unpacked copy; returns its size.
    fn finish(&mut self) -> Result<Option<u64>, ImageError> {
        self.sink.take().map(Sink::finish).transpose()
    }
}

/// The unpacked copy of a download.
pub(crate) struct Sink {
    inner: SinkKind,
    url: String,
    path: PathBuf,
}

enum SinkKind {
    Gunzip(Box<flate2::write::MultiGzDecoder<SparseFile>>),
    Copy(SparseFile),
}

impl Sink {
    /// Creates (truncates) `path`; `gunzip` selects decompression.
    pub(crate) fn create(path: &Path, gunzip: bool, url: &str) -> Result<Sink, ImageError> {
        let file = SparseFile::create(path)?;
        let inner = if gunzip {
            SinkKind::Gunzip(Box::new(flate2::write::MultiGzDecoder::new(file)))
        } else {
            SinkKind::Copy(file)
        };
        Ok(Sink {
            inner,
            url: url.to_owned(),
            path: path.to_owned(),
        })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        let result = match &mut self.inner {
            SinkKind::Gunzip(decoder) => decoder.write_all(bytes),
            SinkKind::Copy(file) => file.write_all(bytes),
        };
        result.map_err(|source| self.unpack_error(source))
    }

    /// Flushes everything and returns the unpacked size.
    pub(crate) fn finish(self) -> Result<u64, ImageError> {
        let Sink { inner, url, path } = self;
        let result = match inner {
            SinkKind::Gunzip(decoder) => decoder.finish().and_then(SparseFile::finish),
            SinkKind::Copy(file) => file.finish(),
        };
        result.map_err(|source| ImageError::Unpack { url, path, source })
    }

    fn unpack_error(&self, source: io::Error) -> ImageError {
        ImageError::Unpack {
            url: self.url.clone(),
            path: self.path.clone(),
            source,
        }
    }
}

/// Unpacks an already verified cached file into `out`, checking its digest again on the way
/// (the same single read does both). Returns the unpacked size.
async fn unpack_local(
    data: &Path,
    out: &Path,
    url: &str,
    expected: &str,
    progress: &Progress,
) -> Result<u64, ImageError> {
    let total = fs::metadata(data).map(|m| m.len()).ok();
    let mut task = progress.bytes(&format!("unpacking {}", file_name(url)), total, 0);
    let (data, out, url, expected) = (
        data.to_owned(),
        out.to_owned(),
        url.to_owned(),
        expected.to_owned(),
    );

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let worker = tokio::task::spawn_blocking(move || -> Result<u64, ImageError> {
        let mut input = File::open(&data).map_err(|e| ImageError::io("open", &data, e))?;
        let mut sink = Sink::create(&out, url.ends_with(".gz"), &url)?;
        let mut hasher = Sha512::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input
                .read(&mut buf)
                .map_err(|e| ImageError::io("read", &data, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            sink.write(&buf[..n])?;
            let _ = tx.send(n as u64);
        }
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            drop(sink);
            let _ = fs::remove_file(&out);
            return Err(ImageError::DigestMismatch {
                url,
                expected,
                actual,
            });
        }
        sink.finish()
    });

    while let Some(n) = rx.recv().await {
        task.inc(n);
    }
    let size = worker.await.expect("unpack thread does not panic")?;
    task.finish("unpacked");
    Ok(size)
}

/// A file written front to back that leaves holes where whole blocks are zero, so a
/// mostly empty disk image takes only the space of its data.
pub(crate) struct SparseFile {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    len: u64,
}

const SPARSE_BLOCK: usize = 4096;
const SPARSE_BUFFER: usize = 1 << 20;

impl SparseFile {
    /// Creates or truncates `path`.
    pub(crate) fn create(path: &Path) -> Result<SparseFile, ImageError> {
        let file = File::create(path).map_err(|e| ImageError::io("create", path, e))?;
        Ok(SparseFile {
            file,
            path: path.to_owned(),
            buf: Vec::with_capacity(SPARSE_BUFFER),
            len: 0,
        })
    }

    fn flush_buffer(&mut self) -> io::Result<()> {
        let mut start = 0;
        while start < self.buf.len() {
            let end = (start + SPARSE_BLOCK).min(self.buf.len());
            let block = &self.buf[start..end];
            if block.iter().all(|&b| b == 0) {
                self.file.seek(SeekFrom::Current(block.len() as i64))?;
            } else {
                self.file.write_all(block)?;
            }
            start = end;
        }
        self.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered, sets the final length (trailing holes) and syncs.
    pub(crate) fn finish(mut self) -> io::Result<u64> {
        self.flush_buffer()?;
        self.file.set_len(self.len)?;
        self.file.sync_all()?;
        tracing::debug!(path = %self.path.display(), len = self.len, "unpacked");
        Ok(self.len)
    }
}

impl Write for SparseFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = SPARSE_BUFFER - self.buf.len();
        let n = room.min(bytes.len());
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() == SPARSE_BUFFER {
            self.flush_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_file_keeps_holes_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let mut file = SparseFile::create(&path).unwrap();
        file.write_all(&vec![0u8; 8 << 20]).unwrap();
        file.write_all(b"data").unwrap();
        file.write_all(&vec![0u8; 4 << 20]).unwrap();
        assert_eq!(file.finish().unwrap(), (12 << 20) + 4);

        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), (12 << 20) + 4);
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        let bytes = fs::read(&path).unwrap();
        assert_eq!(&bytes[8 << 20..(8 << 20) + 4], b"data");
    }

    #[test]
    fn gunzip_sink_unpacks() {
        let dir = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&vec![7u8; 100_000]).unwrap();
        let packed = gz.finish().unwrap();

        let out = dir.path().join("raw");
        let mut sink = Sink::create(&out, true, "http://x/a.gz").unwrap();
        for piece in packed.chunks(333) {
            sink.write(piece).unwrap();
        }
        assert_eq!(sink.finish().unwrap(), 100_000);
        assert_eq!(fs::read(&out).unwrap(), vec![7u8; 100_000]);

        let mut bad = Sink::create(&out, true, "http://x/a.gz").unwrap();
        let err = bad
            .write(b"not gzip at all")
            .and_then(|()| bad.finish().map(|_| ()));
        assert!(matches!(err, Err(ImageError::Unpack { .. })));
    }

    #[test]
    fn loopback_urls_skip_proxies() {
        assert!(is_loopback_url("http://127.0.0.1:8080/x"));
        assert!(is_loopback_url("http://localhost/x"));
        assert!(!is_loopback_url("https://github.com/x"));
        assert_eq!(file_name("https://h/a/b.raw.gz"), "b.raw.gz");
    }
}
